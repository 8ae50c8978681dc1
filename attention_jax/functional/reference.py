"""The reference attention: plain ``jnp``, float32 accumulation, the oracle of every fast path.

It reads the mask and the score mod from the same resolved ``MaskSpec`` as the fast paths
(``spec.dense``, ``spec.score_fn``) and draws dropout from the same counter-based hash
(``pallas_kernels.dropout``), so a fast path and the reference agree bit for bit on which
weights exist and which are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import dropout as dropout_lib
from pallas_kernels.mask_info import MaskSpec

Array = jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs; float64 inputs keep float64."""
    return jnp.promote_types(dtype, jnp.float32)


def _indices(spec: MaskSpec, b: int, n: int):
    """``batch, head, q_pos, kv_pos`` as int32 arrays broadcastable to ``[B, N, T, S]``."""
    q_pos = jnp.asarray(spec.q_positions, jnp.int32)
    kv_pos = jnp.asarray(spec.kv_positions, jnp.int32)
    q_pos = q_pos[:, None, :, None] if q_pos.ndim == 2 else q_pos[None, None, :, None]  # [B or 1, 1, T, 1]
    kv_pos = kv_pos[:, None, None, :] if kv_pos.ndim == 2 else kv_pos[None, None, None, :]  # [B or 1, 1, 1, S]
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
    head = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
    return batch, head, q_pos, kv_pos


def dense_scores(query: Array, key: Array, spec: MaskSpec, *, scale, bias: Array | None = None) -> Array:
    """Pre-softcap, pre-mask scores ``[B, N, T, S]`` in float32: ``scale * q.k + bias``, then the score mod."""
    b, t, n, h = query.shape
    s, k = key.shape[1], key.shape[2]
    acc = accumulation_dtype(query.dtype)
    q = query.astype(acc).reshape(b, t, k, n // k, h)  # [B, T, K, G, H]; head n = k * G + g
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key.astype(acc), precision=jax.lax.Precision.HIGHEST)
    scores = scores.reshape(b, n, t, s) * scale  # [B, N, T, S]
    if bias is not None:
        scores = scores + bias.astype(acc)
    if spec.score_fn is not None:
        params = tuple(jnp.asarray(p, acc).reshape(1, n, 1, 1) for p in spec.score_params)
        scores = spec.score_fn(scores, *_indices(spec, b, n), params).astype(acc)
    return scores


def masked_softmax(scores: Array, mask: Array | None) -> tuple[Array, Array]:
    """Softmax over the last axis of float32 ``scores`` where ``mask`` is True.

    Returns ``(probs, lse)``; a row with nothing visible gets zero probabilities and
    ``lse = -inf``, with zero (never NaN) gradients.
    """
    if mask is None:
        mask = jnp.ones(scores.shape, bool)
    mask = jnp.broadcast_to(mask, scores.shape)
    row_max = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
    # The max cancels in the softmax; stopping its gradient keeps fully masked rows finite.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    unnormalised = jnp.exp(jnp.where(mask, scores - row_max, -jnp.inf))
    denom = jnp.sum(unnormalised, axis=-1, keepdims=True)
    visible = denom > 0
    safe_denom = jnp.where(visible, denom, 1.0)
    probs = unnormalised / safe_denom
    lse = jnp.where(visible, row_max + jnp.log(safe_denom), -jnp.inf)[..., 0]
    return probs, lse


def _probs(query, key, spec, scale, softcap, bias):
    visible = spec.dense(query.shape[0])  # [B or 1, 1 or N, T, S] or None
    if visible is not None:
        # A key no query sees (an unwritten cache slot) must not reach the scores or their
        # gradients: 0 * inf there would be NaN.
        seen = jnp.any(visible, axis=(1, 2))[:, :, None, None]  # [B or 1, S, 1, 1]
        key = jnp.where(seen, key, jnp.zeros((), key.dtype))
    scores = dense_scores(query, key, spec, scale=scale, bias=bias)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    probs, lse = masked_softmax(scores, visible)
    return probs, lse, visible


def attention(
    query: Array,
    key: Array,
    value: Array,
    spec: MaskSpec,
    *,
    scale,
    softcap: float | None = None,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
) -> tuple[Array, Array]:
    """Dense attention: ``(out [B, T, N, Hv] in query.dtype, lse [B, N, T] float32)``.

    ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Hv]``; the mask, positions and
    score mod come from ``spec``. Dropout (``dropout_rate > 0`` with an int32 ``dropout_seed``)
    zeroes weights after the softmax with the bits of ``pallas_kernels.dropout``; ``lse`` is that
    of the undropped softmax.
    """
    b, t, n, _ = query.shape
    s, k, hv = key.shape[1], key.shape[2], value.shape[-1]
    probs, lse, visible = _probs(query, key, spec, scale, softcap, bias)  # [B, N, T, S], [B, N, T]
    if dropout_rate > 0.0:
        keep = dropout_lib.keep_mask(dropout_seed, *_indices(spec, b, n), dropout_rate)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    if visible is not None:
        # A value no query sees (an unwritten cache slot) must not turn 0 * NaN into NaN.
        seen = jnp.any(visible, axis=(1, 2))  # [B or 1, S]
        value = jnp.where(seen[:, :, None, None], value, jnp.zeros((), value.dtype))
    probs = probs.reshape(b, k, n // k, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value.astype(probs.dtype), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, hv).astype(query.dtype), lse


def attention_weights(
    query: Array, key: Array, spec: MaskSpec, *, scale, softcap: float | None = None, bias: Array | None = None
) -> Array:
    """The attention probabilities ``[B, N, T, S]`` in float32 (rows with nothing visible are 0)."""
    return _probs(query, key, spec, scale, softcap, bias)[0]
