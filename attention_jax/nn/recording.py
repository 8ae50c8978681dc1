"""Recording attention weights for inspection, without changing model code.

Every attention module of :mod:`attention_jax.nn` has a ``record_weights`` flag. When it is on,
the module recomputes its attention weights ``[B, N, T, S]`` (float32) with
:func:`attention_jax.attention_weights` (the output still comes from the fast path; nothing falls
back silently) and stores them with ``self.sow(nnx.Intermediate, "attention_weights", w)``.
Collect them with ``nnx.capture`` (recommended) or pop them afterwards with ``nnx.pop``:

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> layer = aj.nn.MultiHeadAttention(8, num_heads=2, rngs=nnx.Rngs(0))
>>> with aj.nn.record_attention_weights(layer):
...     y, recorded = nnx.capture(layer, nnx.Intermediate)(jnp.ones((1, 3, 8)))
>>> recorded["attention_weights"][0].shape          # a tuple: one entry per call
(1, 2, 3, 3)

Gradient-weighted maps need the gradient of a score with respect to the weights. Inside
``nnx.capture(..., nnx.Perturbation)`` a recording module also passes its weights through
``self.perturb("attention_weights", w)`` and makes its output depend on them:
``out = stop_gradient(out) + (w v - stop_gradient(w v))``. The forward values stay the fast
path's exactly; the gradients flow through the recorded weights (the reference path) and the
gradient with respect to the perturbation is ``d score / d w``. Outside such a capture recording
leaves the backward pass alone.

``record_attention_weights(model)`` flips the flag on every module of ``model`` that has one and
restores it on exit. The flag is static configuration, so ``nnx.jit`` retraces and records. Called
without a model it turns recording on for every module called inside the ``with`` block through a
context variable; that is read when a function is traced, so under ``jit`` prefer passing the model.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from flax import nnx

from attention_jax.functional.multi_head import weighted_values

__all__ = ["record_attention_weights", "should_record", "record", "sow_weights"]

_RECORDING = contextvars.ContextVar("attention_jax_record_attention_weights", default=False)

WEIGHTS_NAME = "attention_weights"


@contextlib.contextmanager
def record_attention_weights(model: nnx.Module | None = None, *, enabled: bool = True):
    """Turn attention-weight recording on (or off with ``enabled=False``) inside the block.

    Args:
      model: set ``record_weights`` on every submodule of ``model`` that has it (and restore it
        after). Without a model, a context variable turns recording on for every module.
      enabled: the value to set.
    """
    token = _RECORDING.set(enabled) if model is None else None
    saved = []
    if model is not None:
        for _, module in nnx.iter_graph(model):
            if isinstance(module, nnx.Module) and hasattr(module, "record_weights"):
                saved.append((module, module.record_weights))
                module.record_weights = enabled
    try:
        yield model
    finally:
        for module, value in saved:
            module.record_weights = value
        if token is not None:
            _RECORDING.reset(token)


def should_record(flag: bool | None, default: bool) -> bool:
    """A call's ``record_weights``: the call-time flag if given, else the module's, or the context's."""
    if flag is not None:
        return flag
    return default or _RECORDING.get()


def sow_weights(module: nnx.Module, weights) -> None:
    """Store ``weights`` under ``"attention_weights"`` as an ``nnx.Intermediate`` of ``module``."""
    module.sow(nnx.Intermediate, WEIGHTS_NAME, weights)


def record(module: nnx.Module, out, weights, value):
    """Sow ``weights [B, N, T, S]``; under a Perturbation capture, route gradients of ``out`` through them.

    ``out [B, T, N, Hv]`` must equal ``weights`` applied to ``value [B, S, K, Hv]`` (query head ``n``
    reading value head ``n // (N // K)``); ``value=None`` only sows (e.g. under dropout, where
    ``out`` used other weights). Returns ``out`` (unchanged in value).
    """
    sow_weights(module, weights)
    if value is None or not _perturbation_captured(module):
        return out
    weights = module.perturb(WEIGHTS_NAME, weights)
    applied = weighted_values(weights, value)  # [B, T, N, Hv] float32
    return jax.lax.stop_gradient(out) + (applied - jax.lax.stop_gradient(applied)).astype(out.dtype)


def _perturbation_captured(module: nnx.Module) -> bool:
    return any(type(var) is nnx.Perturbation for var in getattr(module, "__captures__", ()))
