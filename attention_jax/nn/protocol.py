"""The attention-layer protocol: what every attention module of :mod:`attention_jax.nn` implements.

A stack (:class:`~attention_jax.nn.TransformerBlock` and the stacks built from it) and
:func:`attention_jax.generate` talk to attention only through this protocol, so any variant drops
into any stack, and a variant that cannot honour an argument says so with a ``ValueError`` that
names the module and the argument instead of ignoring it.

>>> import functools, jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> layer = aj.nn.LinearAttention(16, num_heads=2, rngs=nnx.Rngs(0))
>>> isinstance(layer, aj.nn.AttentionLayer)
True
>>> x = jnp.ones((2, 6, 16))
>>> y, cache = layer(x, mask=aj.masks.causal(), cache=layer.init_cache(2, 8))   # prefill
>>> y.shape
(2, 6, 16)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax

from attention_jax import masks as masks_lib

Array = jax.Array

__all__ = ["AttentionLayer", "unsupported"]


@runtime_checkable
class AttentionLayer(Protocol):
    """The contract of an attention module: one call signature, one return convention, one cache entry point.

    **Call** ``layer(inputs_q, inputs_kv=None, *, mask=None, positions=None, segment_ids=None,
    lengths=None, cache=None, deterministic=None)``:

    - ``inputs_q [B, T, D]``: the queries' inputs (and the keys' for self-attention).
    - ``inputs_kv [B, S, Dkv]``: cross-attention to another sequence. A layer that only attends to
      its own input raises ``ValueError``.
    - ``mask``: a :class:`~attention_jax.masks.Mask` (or boolean ``[B|1, N|1, T, S]`` array) for this
      call. It replaces the layer's default mask (the constructor's ``mask``); structural restrictions
      of the layer (a sliding window, a sparse pattern) still apply on top. Stacks pass their own
      structure this way: a decoder passes ``masks.causal()``. A layer that is not softmax attention
      under a mask (linear attention, low-rank) honours ``None``, ``full()`` and ``causal()`` (the
      latter switches it to its causal form) and raises for any other mask.
    - ``positions [T] | [B, T]``: absolute token positions, read by position-dependent layers
      (RoPE, learned position tables); position-free layers accept and ignore them. Default: the
      position within the token's segment when ``segment_ids`` is given, else ``arange(T)`` (or the
      cache's next positions).
    - ``segment_ids [B, T]`` int: packed documents. A token sees only tokens of its own segment, and
      the default positions restart at each segment, so a packed row gives the same outputs as its
      documents run one by one. Recurrent layers reset their state at a segment boundary. A layer
      that mixes the whole sequence (Linformer, Nystromformer) raises ``ValueError``. Structural
      masks are evaluated at positions in the packed row: translation-invariant ones (causal,
      sliding windows, strided) give each document exactly its own result; patterns tied to
      absolute positions (global tokens, BigBird's blocks) keep documents isolated but place their
      global tokens in the packed row.
    - ``lengths [B]``: right padding, the real tokens per row. Padded keys are ignored (outputs at
      padded queries are unspecified), and with a cache only the real tokens are appended.
    - ``cache``: from :meth:`init_cache`; the call then returns ``(y, new_cache)``. Prefill a prompt
      and decode token by token: the outputs equal the full causal forward.
    - ``deterministic``: no dropout (overrides the module's default; ``model.eval()`` sets it).

    Returns ``y [B, T, out_features]`` (``out_features`` defaults to D), or ``(y, cache)``.

    **Decoding** ``layer.init_cache(batch_size, max_length, *, kind="dense", quantized=False,
    dtype=None, **options)``: an empty cache (a pytree) for a layer that decodes causally. KV layers
    support ``kind`` ``"dense"``, ``"rolling"`` (sliding-window layers) and ``"paged"``; recurrent
    layers (linear attention, Performer, delta-rule fast weights) and state-space layers (Mamba, Mamba-2)
    hold a constant-size state whatever ``kind`` and ``max_length`` are. A layer that cannot decode raises
    ``ValueError`` saying why.

    **Recording**: every module has a static ``record_weights`` flag;
    :func:`attention_jax.nn.record_attention_weights` and :mod:`attention_jax.explain` turn it on to
    sow the layer's attention weights ``[B, N, T, S]`` (the implicit weights for linear variants).
    """

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: Any = None,
        deterministic: bool | None = None,
    ) -> Array | tuple[Array, Any]: ...

    def init_cache(self, batch_size: int, max_length: int, **options: Any) -> Any: ...


def unsupported(module: Any, argument: str, why: str) -> ValueError:
    """The protocol's error for an argument a module cannot honour: it names the module and the argument.

    >>> unsupported(object(), "segment_ids", "it mixes the whole sequence")
    ValueError('object cannot take segment_ids: it mixes the whole sequence.')
    """
    return ValueError(f"{type(module).__name__} cannot take {argument}: {why}.")
