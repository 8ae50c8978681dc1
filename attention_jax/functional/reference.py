"""The reference attention: plain ``jnp``, float32 accumulation, the oracle of every fast path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.functional._checks import AttentionShape

Array = jax.Array


def accumulation_dtype(dtype) -> jnp.dtype:
    """float32 for bf16/f16/f32 inputs; float64 inputs keep float64."""
    return jnp.promote_types(dtype, jnp.float32)


def dense_scores(
    query: Array,
    key: Array,
    *,
    shape: AttentionShape,
    scale: float | Array,
    bias: Array | None = None,
    score_mod=None,
    softcap: float | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
    """Pre-mask scores ``[B, N, T, S]`` in float32: ``scale * q.k + bias``, then score_mod, then softcap."""
    b, t, n, h = query.shape
    s, k, g = shape.kv_len, shape.num_kv_heads, shape.group_size
    acc = accumulation_dtype(query.dtype)
    q = query.astype(acc).reshape(b, t, k, g, h)  # [B, T, K, G, H]; head n = k * G + g
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, key.astype(acc), precision=jax.lax.Precision.HIGHEST)
    scores = scores.reshape(b, n, t, s) * scale  # [B, N, T, S]
    if bias is not None:
        scores = scores + bias.astype(acc)
    if score_mod is not None:
        batch_idx = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
        head_idx = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
        q_idx = (q_offset + jnp.arange(t, dtype=jnp.int32))[None, None, :, None]
        kv_idx = (kv_offset + jnp.arange(s, dtype=jnp.int32))[None, None, None, :]
        scores = score_mod(scores, batch_idx, head_idx, q_idx, kv_idx)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
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


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    shape: AttentionShape,
    scale: float | Array,
    mask: Array | None = None,
    bias: Array | None = None,
    score_mod=None,
    softcap: float | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> tuple[Array, Array]:
    """Dense attention. ``mask`` is boolean, broadcastable to ``[B, N, T, S]``.

    Returns ``(out [B, T, N, Hv] in query.dtype, lse [B, N, T] float32)``.
    """
    scores = dense_scores(
        query,
        key,
        shape=shape,
        scale=scale,
        bias=bias,
        score_mod=score_mod,
        softcap=softcap,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    probs, lse = masked_softmax(scores, mask)  # [B, N, T, S], [B, N, T]
    b, t, n, _ = query.shape
    k, g = shape.num_kv_heads, shape.group_size
    probs = probs.reshape(b, k, g, t, shape.kv_len)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, value.astype(probs.dtype), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, shape.value_head_dim).astype(query.dtype), lse


def attention_weights(
    query: Array,
    key: Array,
    *,
    shape: AttentionShape,
    scale: float | Array,
    mask: Array | None = None,
    bias: Array | None = None,
    score_mod=None,
    softcap: float | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
    """The attention probabilities ``[B, N, T, S]`` in float32 (rows with nothing visible are 0)."""
    scores = dense_scores(
        query,
        key,
        shape=shape,
        scale=scale,
        bias=bias,
        score_mod=score_mod,
        softcap=softcap,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    return masked_softmax(scores, mask)[0]
