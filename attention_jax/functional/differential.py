"""Differential attention (Ye et al., 2024, "Differential Transformer").

The difference of two softmax maps cancels common-mode attention noise:
``out = softmax(q1 k1^T / sqrt(H)) v - lambda * softmax(q2 k2^T / sqrt(H)) v``, with ``lambda``
re-parameterised as ``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` and
``lambda_init = 0.8 - 0.6 * exp(-0.3 * (depth - 1))`` for the ``depth``-th layer (1-based).
Since the value is shared, each map is one ordinary attention call, fast paths included.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional.multi_head import multi_head_attention

Array = jax.Array


def lambda_init(depth: int) -> float:
    """``0.8 - 0.6 * exp(-0.3 * (depth - 1))`` for the ``depth``-th layer, ``depth >= 1``.

    >>> round(lambda_init(1), 4), round(lambda_init(12), 4)
    (0.2, 0.7779)
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth is the 1-based layer index, got {depth=!r}.")
    return 0.8 - 0.6 * math.exp(-0.3 * (depth - 1))


def differential_lambda(lambda_q1: Array, lambda_k1: Array, lambda_q2: Array, lambda_k2: Array, init: float) -> Array:
    """``exp(sum(lq1 * lk1)) - exp(sum(lq2 * lk2)) + init`` in float32 (a scalar, or per head for ``[N, H]`` inputs)."""
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    first = jnp.exp(jnp.sum(f32(lambda_q1) * f32(lambda_k1), axis=-1))
    second = jnp.exp(jnp.sum(f32(lambda_q2) * f32(lambda_k2), axis=-1))
    return first - second + init


def differential_attention(
    q1: Array,
    q2: Array,
    k1: Array,
    k2: Array,
    value: Array,
    lam: Array | float,
    *,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    kv_valid: Array | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """``softmax(q1 k1) v - lam * softmax(q2 k2) v``.

    Args:
      q1, q2: ``[B, T, N, H]``.
      k1, k2: ``[B, S, K, H]`` (GQA as in ``dot_product_attention``).
      value: ``[B, S, K, Hv]`` (``Hv = 2 H`` in the paper).
      lam: a scalar or ``[N]`` per head.
      mask, scale, softcap, score_mod, dropout_rate, dropout_rng, q_offset, kv_offset, kv_valid,
        implementation: as in
        :func:`attention_jax.functional.multi_head.multi_head_attention`, shared by both maps.
      return_weights: also return the differential map ``w1 - lam * w2`` ``[B, N, T, S]``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the map).

    >>> import jax.numpy as jnp
    >>> q = jnp.ones((1, 2, 1, 4)); k = jnp.ones((1, 2, 1, 4)); v = jnp.ones((1, 2, 1, 8))
    >>> differential_attention(q, q, k, k, v, 0.25)[0, :, 0, 0].tolist()   # both maps average ones
    [0.75, 0.75]
    """
    options = dict(
        mask=mask, scale=scale, softcap=softcap, score_mod=score_mod, dropout_rate=dropout_rate,
        q_offset=q_offset, kv_offset=kv_offset, kv_valid=kv_valid,
        implementation=implementation, return_weights=return_weights,
    )  # fmt: skip
    if q1.shape != q2.shape or k1.shape != k2.shape:
        raise ValueError(
            f"the two maps must have equal shapes, got q1.shape={q1.shape}, q2.shape={q2.shape}, "
            f"k1.shape={k1.shape} and k2.shape={k2.shape}."
        )
    lam = jnp.asarray(lam, jnp.float32)
    if lam.shape not in ((), (q1.shape[2],)):
        raise ValueError(f"lam must be a scalar or have shape [N]=[{q1.shape[2]}], got lam.shape={lam.shape}.")
    rngs = (None, None) if dropout_rng is None else tuple(jax.random.split(dropout_rng))  # independent maps
    first = multi_head_attention(q1, k1, value, dropout_rng=rngs[0], **options)
    second = multi_head_attention(q2, k2, value, dropout_rng=rngs[1], **options)
    if return_weights:
        (first, w1), (second, w2) = first, second
    lam_out = lam if lam.ndim == 0 else lam[:, None]  # broadcast over [.., N, Hv]
    out = (first.astype(jnp.float32) - lam_out * second.astype(jnp.float32)).astype(q1.dtype)
    if not return_weights:
        return out
    lam_w = lam if lam.ndim == 0 else lam[:, None, None]  # over [B, N, T, S]
    return out, w1 - lam_w * w2
