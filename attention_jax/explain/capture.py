"""Attention weights and gradients out of any model built with :mod:`attention_jax.nn`, without changing it.

Every attention module of :mod:`attention_jax.nn` can record its weights (see
:mod:`attention_jax.nn.recording`): it has a ``record_weights`` flag. :func:`capture` finds every
module with that flag, turns it on for one call and collects the weights by module path; a model
without such a module is a ``ValueError``, not an empty result. The fast path still computes the
outputs; the weights are recomputed exactly.

Paths are ordered naturally (list indices numerically), which for a stack of blocks is layer order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from attention_jax.nn import record_attention_weights
from attention_jax.nn.recording import WEIGHTS_NAME

Array = jax.Array

__all__ = ["capture", "attention_gradients", "attention_modules", "layer_gradients"]


def _natural_key(path: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path)]


def _path(parts) -> str:
    return "/".join(str(p) for p in parts)


def _call(model, call, args, kwargs):
    return model(*args, **kwargs) if call is None else call(model, *args, **kwargs)


def _collect(state: nnx.State, name: str) -> dict[str, Array]:
    """``{module path: value}`` of the variables called ``name``, in natural path order.

    A module called several times gets ``path[i]`` for its ``i``-th call.
    """
    found = {}
    for parts, variable in nnx.to_flat_state(state):
        if parts[-1] != name:
            continue
        values = variable.get_value()
        values = list(values) if isinstance(values, tuple) else [values]
        path = _path(parts[:-1])
        for i, value in enumerate(values):
            found[path if len(values) == 1 else f"{path}[{i}]"] = value
    return dict(sorted(found.items(), key=lambda item: _natural_key(item[0])))


def attention_modules(model: nnx.Module) -> dict[str, nnx.Module]:
    """``{path: module}`` of every module of ``model`` that can record attention weights, in natural order.

    That is any module with a ``record_weights`` attribute, the recording flag of the attention-layer protocol
    (:class:`attention_jax.nn.AttentionLayer`), whatever its class: a user's own module qualifies by having it.
    """
    found = {
        _path(parts): module
        for parts, module in nnx.iter_graph(model)
        if isinstance(module, nnx.Module) and hasattr(module, "record_weights")
    }
    return dict(sorted(found.items(), key=lambda item: _natural_key(item[0])))


def capture(model: nnx.Module, *args, call: Callable | None = None, **kwargs) -> tuple[Any, dict[str, Array]]:
    """Run ``model(*args, **kwargs)`` with every attention module recording; return ``(output, weights)``.

    ``weights`` maps each attention module's path (e.g. ``"blocks/0/attention"``) to its attention
    weights ``[B, N, T, S]`` float32. Pass ``call=fn`` to run ``fn(model, *args, **kwargs)`` instead
    (another method, extra pre-processing). The recording flags are restored afterwards.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> from attention_jax import explain
    >>> layer = aj.nn.MultiHeadAttention(8, num_heads=2, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    >>> y, weights = explain.capture(layer, jnp.ones((1, 3, 8)))
    >>> {path: w.shape for path, w in weights.items()}        # the model itself has the empty path
    {'': (1, 2, 3, 3)}
    """
    recorders = _recorders(model)
    with record_attention_weights(model):
        out, state = nnx.capture(lambda m, *a, **k: _call(m, call, a, k), nnx.Intermediate)(model, *args, **kwargs)
    weights = _collect(state, WEIGHTS_NAME)
    if not weights:
        raise ValueError(
            f"no attention weights were recorded: the modules of {type(model).__name__} that can record "
            f"({', '.join(f'{p or type(model).__name__!r}' for p in recorders)}) were not called, or they do not "
            f"sow {WEIGHTS_NAME!r} when record_weights is on (see attention_jax.nn.recording)."
        )
    return out, weights


def _recorders(model: nnx.Module) -> dict[str, nnx.Module]:
    """:func:`attention_modules`, or a ``ValueError`` saying the model has none."""
    found = attention_modules(model)
    if not found:
        raise ValueError(
            f"no attention weights can be recorded: {type(model).__name__} has no attention module that can record "
            "them (a module with a record_weights flag, per attention_jax.nn.AttentionLayer)."
        )
    return found


def attention_gradients(
    model: nnx.Module, score_fn: Callable[[Any], Array], *args, call: Callable | None = None, **kwargs
) -> tuple[dict[str, Array], dict[str, Array]]:
    """The attention weights and the gradient of ``score_fn(output)`` with respect to them, by module path.

    ``score_fn`` maps the model's output to a scalar, e.g. ``lambda logits: logits[:, label].sum()``
    (summing over the batch gives each example its own gradient). Feed the result to
    :func:`attention_jax.explain.gradient_weighted_rollout`.

    Needs attention modules that expose their recorded weights as an ``nnx.Perturbation`` named
    ``"attention_weights"`` with the output differentiable in them; raises ``NotImplementedError`` otherwise.
    """
    _recorders(model)
    fn = lambda m, *a, **k: _call(m, call, a, k)
    with record_attention_weights(model):
        _, perturbations = nnx.capture(fn, nnx.Perturbation)(model, *args, **kwargs)
        if not _collect(perturbations, WEIGHTS_NAME):
            raise NotImplementedError(
                "the attention modules of this model do not expose their weights for differentiation "
                "(no nnx.Perturbation named 'attention_weights' was created while recording)."
            )

        grads, state = _score_gradients(fn, score_fn, model, perturbations, args, kwargs)
    return _collect(state, WEIGHTS_NAME), _collect(grads, WEIGHTS_NAME)


def _score_gradients(fn, score_fn, model, perturbations, args, kwargs):
    """Gradient of ``score_fn(fn(model, ...))`` w.r.t. the perturbations, and the intermediates of that call."""

    def score(model, perturbations):
        out, state = nnx.capture(fn, nnx.Intermediate, init=perturbations)(model, *args, **kwargs)
        return score_fn(out), state

    return nnx.grad(score, argnums=1, has_aux=True)(model, perturbations)


class _Probe(nnx.Module):
    """Wraps a module: records its input (first argument) or output, and makes it a perturbation point."""

    def __init__(self, inner: nnx.Module, at: str):
        self.inner, self.at = inner, at

    def __call__(self, x, *args, **kwargs):
        if self.at == "input":
            self.sow(nnx.Intermediate, _PROBED, x)
            return self.inner(self.perturb(_PROBED, x), *args, **kwargs)
        out = self.inner(x, *args, **kwargs)
        y, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)  # (y, cache) when decoding
        self.sow(nnx.Intermediate, _PROBED, y)
        y = self.perturb(_PROBED, y)
        return y if rest is None else (y, *rest)


_PROBED = "probed_activations"


def _get(model: nnx.Module, parts: tuple) -> nnx.Module:
    for part in parts:
        model = model[part] if isinstance(part, int) else getattr(model, part)
    return model


def _set(model: nnx.Module, parts: tuple, new: nnx.Module) -> None:
    parent = _get(model, parts[:-1])
    if isinstance(parts[-1], int):
        parent[parts[-1]] = new
    else:
        setattr(parent, parts[-1], new)


def layer_gradients(
    model: nnx.Module,
    score_fn: Callable[[Any], Array],
    *args,
    layer: str | None = None,
    at: str = "input",
    call: Callable | None = None,
    **kwargs,
) -> tuple[Array, Array]:
    """A submodule's input or output ``[B, T, D]`` and the gradient of ``score_fn(model output)`` with respect to it.

    Feed the result to :func:`attention_jax.explain.grad_cam`.

    Args:
      layer: a module path as :func:`attention_modules` lists them; default: the last attention module.
      at: ``"input"`` (its first argument) or ``"output"``. Grad-CAM on a ViT uses the *input* of the last
        attention layer (as pytorch-grad-cam does): a classifier that reads the class token after the last
        block does not depend on the other tokens of that layer's output, so their gradient is zero.
      call: run ``call(model, *args, **kwargs)`` instead of ``model(*args, **kwargs)``.

    The submodule is wrapped for the call and put back afterwards.
    """
    if at not in ("input", "output"):
        raise ValueError(f"at must be 'input' or 'output', got {at=!r}.")
    modules = {_path(parts): parts for parts, m in nnx.iter_graph(model) if isinstance(m, nnx.Module)}
    if layer is None:
        candidates = list(attention_modules(model))
        if not candidates:
            raise ValueError(f"{type(model).__name__} has no attention module (no module with a record_weights flag); "
                             "pass layer= explicitly.")
        layer = candidates[-1]
    if layer not in modules or layer == "":
        raise ValueError(f"layer must be the path of a submodule, got {layer=!r}; some paths: {sorted(modules)[:8]}.")
    parts = modules[layer]
    fn = lambda m, *a, **k: _call(m, call, a, k)
    original = _get(model, parts)
    _set(model, parts, _Probe(original, at))
    try:
        _, perturbations = nnx.capture(fn, nnx.Perturbation)(model, *args, **kwargs)
        grads, state = _score_gradients(fn, score_fn, model, perturbations, args, kwargs)
    finally:
        _set(model, parts, original)
    (activations,) = _collect(state, _PROBED).values()
    (gradients,) = _collect(grads, _PROBED).values()
    return activations, gradients
