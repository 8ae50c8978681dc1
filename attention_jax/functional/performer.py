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

from attention_jax.functional.linear import LinearAttentionState, linear_attention

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = ["orthogonal_random_features", "favor_features", "performer_attention", "PerformerState"]


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
    state: PerformerState | None = None,
    return_state: bool = False,
):
    """FAVOR+ attention: a random-feature estimate of ``softmax(q.k / sqrt(H)) v``.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      projection: ``[M, H]`` from :func:`orthogonal_random_features` (M features).
      causal, implementation, chunk_size: as in :func:`attention_jax.functional.linear.linear_attention`.
      eps: added to the denominator; the default 0 keeps the output independent of the key scale, so
        decoding in pieces equals one call.
      state: a ``PerformerState`` to continue from (causal decoding); return_state: also return the new one.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the ``PerformerState`` when ``return_state``).
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4, got {name}.shape={jnp.shape(x)}.")
    phi_q = favor_features(query, projection, is_query=True)  # [B, T, N, M]
    linear_state = offset = None
    if state is not None or return_state:
        # One key scale for the state and this call: the larger of the state's and this call's maxima.
        offset = jax.lax.stop_gradient(jnp.max(_exponents(key, projection), axis=(1, 3)))  # [B, K]
        if state is not None:
            offset = jnp.maximum(offset, state.key_offset)
            rescale = jnp.exp(state.key_offset - offset)  # [B, K]; 0 for an empty state
            linear_state = LinearAttentionState(
                state.linear.kv * rescale[..., None, None], state.linear.normalizer * rescale[..., None]
            )
    phi_k = favor_features(key, projection, is_query=False, offset=offset)  # [B, S, K, M]
    result = linear_attention(
        phi_q,
        phi_k,
        value.astype(jnp.float32),
        feature_map=None,
        causal=causal,
        implementation=implementation,
        chunk_size=chunk_size,
        eps=eps,
        state=linear_state,
        return_state=return_state,
    )
    if return_state:
        return result[0].astype(query.dtype), PerformerState(result[1], offset)
    return result.astype(query.dtype)
