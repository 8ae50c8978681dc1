"""Performer / FAVOR+ (Choromanski et al., 2021): softmax attention through positive orthogonal random features.

``exp(q.k / sqrt(H)) = E_w[phi(q)^T phi(k)]`` with ``phi(x) = exp(w^T x' - ||x'||^2 / 2) / sqrt(M)``,
``x' = x / H^(1/4)`` and ``w ~ N(0, I_H)``; drawing the M rows ``w`` in orthogonal blocks lowers the variance.
Plugged into linear attention (:mod:`attention_jax.functional.linear`) this estimates softmax attention in
``O(T M H)``; the error falls as M grows.

>>> import jax, jax.numpy as jnp
>>> w = orthogonal_random_features(jax.random.key(0), num_features=16, head_dim=8)
>>> w.shape
(16, 8)
>>> q = jnp.ones((1, 4, 2, 8))
>>> performer_attention(q, q, q, projection=w).shape
(1, 4, 2, 8)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attention_jax.functional.linear import (
    LinearAttentionState,
    check_packing,
    linear_attention,
    linear_attention_weights,
)

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "orthogonal_random_features",
    "favor_features",
    "performer_attention",
    "performer_attention_weights",
    "PerformerState",
]


def orthogonal_random_features(key: Array, num_features: int, head_dim: int, *, scaling: str = "chi") -> Array:
    """``[M, H]`` random projection: blocks of H orthogonal rows, stacked and cut to M rows.

    ``scaling="chi"`` gives each row the norm of an independent Gaussian vector (so each row is marginally
    ``N(0, I_H)``, the unbiased FAVOR+ estimator); ``"sqrt"`` gives every row the norm ``sqrt(H)``.
    """
    for name, value in (("num_features", num_features), ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    if scaling not in ("chi", "sqrt"):
        raise ValueError(f"scaling must be 'chi' or 'sqrt', got {scaling=!r}.")
    num_blocks = -(-num_features // head_dim)
    block_key, norm_key = jax.random.split(key)
    gaussian = jax.random.normal(block_key, (num_blocks, head_dim, head_dim), jnp.float32)
    orthonormal = jnp.linalg.qr(gaussian)[0]  # [blocks, H, H], orthonormal columns
    rows = jnp.swapaxes(orthonormal, 1, 2).reshape(num_blocks * head_dim, head_dim)[:num_features]  # [M, H]
    if scaling == "sqrt":
        norms = jnp.full((num_features,), jnp.sqrt(jnp.float32(head_dim)))
    else:
        norms = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, head_dim), jnp.float32), axis=1)
    return rows * norms[:, None]


class PerformerState(NamedTuple):
    """Causal Performer decoding state: the linear-attention state of the key features and their scale.

    Key features are stored divided by ``exp(key_offset)`` (``[B, K]``, float32), the largest exponent seen so
    far; a later call with larger keys rescales the state, as an online softmax does.
    """

    linear: LinearAttentionState
    key_offset: Array

    @classmethod
    def zeros(cls, batch: int, num_kv_heads: int, num_features: int, value_head_dim: int) -> PerformerState:
        linear = LinearAttentionState.zeros(batch, num_kv_heads, num_features, value_head_dim)
        return cls(linear, jnp.full((batch, num_kv_heads), -jnp.inf, jnp.float32))


def _exponents(x: Array, projection: Array) -> Array:
    """``w^T x' - ||x'||^2 / 2`` with ``x' = x / H^(1/4)``: ``[B, T, heads, M]`` float32."""
    h = x.shape[-1]
    if jnp.ndim(projection) != 2 or projection.shape[1] != h:
        raise ValueError(f"projection must have shape [M, H] with H={h}, got projection.shape={jnp.shape(projection)}.")
    x = x.astype(jnp.float32) * h**-0.25
    wx = jnp.einsum("BTNH,MH->BTNM", x, projection.astype(jnp.float32), precision=_HI)
    return wx - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def favor_features(x: Array, projection: Array, *, is_query: bool, offset: Array | None = None) -> Array:
    """Positive random features ``[B, T, heads, M]`` (float32) of ``x [B, T, heads, H]``.

    ``phi(x) = exp(w^T x' - ||x'||^2 / 2 - c) / sqrt(M)`` with ``x' = x / H^(1/4)``. The stabiliser ``c`` (no
    gradient) is the row maximum for queries, and for keys ``offset [B, heads]`` or by default the maximum over
    all positions and features: a constant factor per query row, or one factor for every key, cancels in the
    normalised attention.
    """
    exponents = _exponents(x, projection)
    if is_query:
        offset = jnp.max(exponents, axis=-1, keepdims=True)
    elif offset is None:
        offset = jnp.max(exponents, axis=(1, 3), keepdims=True)
    else:
        offset = offset[:, None, :, None]
    m = projection.shape[0]
    return jnp.exp(exponents - jax.lax.stop_gradient(offset)) / jnp.sqrt(jnp.float32(m))


def _key_features(key: Array, projection: Array, valid: Array | None, state: PerformerState | None):
    """``(phi(k) [B, S, K, M], key offset [B, K], state rescaled to it or None)``.

    One stabiliser for the state and this call: the largest exponent of the real keys (padded keys,
    ``valid [B, S]`` False, get zero features) and of the state. It is ``-inf`` until a row has seen a
    key; the features then use 0, which changes nothing (they are all zero or the state is empty).
    """
    exponents = _exponents(key, projection)  # [B, S, K, M]
    if valid is not None:
        exponents = jnp.where(valid[..., None, None], exponents, -jnp.inf)  # exp(-inf) = 0, gradient 0
    offset = jax.lax.stop_gradient(jnp.max(exponents, axis=(1, 3)))  # [B, K]
    linear_state = None
    if state is not None:
        offset = jnp.maximum(offset, state.key_offset)
    finite = jnp.where(jnp.isfinite(offset), offset, 0.0)
    if state is not None:
        rescale = jnp.exp(state.key_offset - finite)  # [B, K]; 0 for an empty state
        linear_state = LinearAttentionState(
            state.linear.kv * rescale[..., None, None], state.linear.normalizer * rescale[..., None]
        )
    phi_k = jnp.exp(exponents - finite[:, None, :, None]) / jnp.sqrt(jnp.float32(projection.shape[0]))
    return phi_k, offset, linear_state


def performer_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    projection: Array,
    causal: bool = False,
    implementation: str | None = None,
    chunk_size: int = 64,
    eps: float = 0.0,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
    state: PerformerState | None = None,
    return_state: bool = False,
):
    """FAVOR+ attention: a random-feature estimate of ``softmax(q.k / sqrt(H)) v``.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      projection: ``[M, H]`` from :func:`orthogonal_random_features` (M features).
      causal, implementation, chunk_size, segment_ids, lengths: as in
        :func:`attention_jax.functional.linear.linear_attention` (packed documents reset the state at each
        boundary; padded keys add nothing).
      eps: added to the denominator; the default 0 keeps the output independent of the key scale, so
        decoding in pieces equals one call.
      state: a ``PerformerState`` to continue from (causal decoding); return_state: also return the new one.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the ``PerformerState`` when ``return_state``).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4, got {name}.shape={jnp.shape(x)}.")
    b, t = query.shape[:2]
    _, valid = check_packing(None, lengths, b, t, key.shape[1])
    phi_q = favor_features(query, projection, is_query=True)  # [B, T, N, M]
    phi_k, offset, linear_state = _key_features(key, projection, valid, state)  # [B, S, K, M]
    result = linear_attention(
        phi_q,
        phi_k,
        value.astype(jnp.float32),
        feature_map=None,
        causal=causal,
        implementation=implementation,
        chunk_size=chunk_size,
        eps=eps,
        segment_ids=segment_ids,
        lengths=lengths,
        state=linear_state,
        return_state=return_state,
    )
    if return_state:
        return result[0].astype(query.dtype), PerformerState(result[1], offset)
    return result.astype(query.dtype)


def performer_attention_weights(
    query: Array,
    key: Array,
    *,
    projection: Array,
    causal: bool = False,
    eps: float = 0.0,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
) -> Array:
    """The implicit attention weights ``[B, N, T, S]`` (float32) of :func:`performer_attention` (the
    normalised random-feature kernel matrix; quadratic in T, for inspection)."""
    return linear_attention_weights(
        favor_features(query, projection, is_query=True),
        _key_features(key, projection, check_packing(None, lengths, *query.shape[:2], key.shape[1])[1], None)[0],
        feature_map=None,
        causal=causal,
        eps=eps,
        segment_ids=segment_ids,
        lengths=lengths,
    )
