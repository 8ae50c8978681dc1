"""Low-rank attention: Linformer (projected keys and values) and Nystromformer (Nystrom landmarks).

* Linformer (Wang et al., 2020): ``softmax(Q (E K)^T / sqrt(H)) (F V)`` with learned ``E, F [P, S]`` that
  project keys and values along the sequence from length S to P.
* Nystromformer (Xiong et al., 2021): with m landmarks ``Q~, K~`` (means of m equal segments of Q and K),
  ``softmax(Q K~^T) softmax(Q~ K~^T)^+ softmax(Q~ K^T) V``, the pseudo-inverse by the iteration
  ``Z <- Z (13 I - A Z (15 I - A Z (7 I - A Z))) / 4`` from ``Z_0 = A^T / (||A||_1 ||A||_inf)``.

>>> import jax.numpy as jnp
>>> q = jnp.ones((1, 8, 2, 4))
>>> nystrom_attention(q, q, q, num_landmarks=4).shape
(1, 8, 2, 4)
>>> e = jnp.ones((3, 8)) / 8                                    # project S=8 keys to P=3
>>> linformer_attention(q, q, q, key_projection=e).shape
(1, 8, 2, 4)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.functional import _checks
from attention_jax.functional.dot_product import attention_weights, dot_product_attention

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = ["linformer_attention", "nystrom_attention", "iterative_pinv", "segment_means"]


def linformer_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    key_projection: Array,
    value_projection: Array | None = None,
    kv_valid: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """Linformer: attention over keys and values projected along the sequence, ``S -> P``.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      key_projection: ``E [P, S]``, shared by heads.
      value_projection: ``F [P, S]``; defaults to ``E`` (the paper's key-value sharing).
      kv_valid: ``[B, S]`` bool, the keys that exist (right padding): the others are zeroed before
        the projection, so a padded row gives what its real keys alone give with ``E[:, :len]``.
      scale, implementation: as in ``dot_product_attention`` (which runs on the projected keys).
      return_weights: also return the implicit weights ``[B, N, T, S]`` float32 on the original
        keys, ``softmax(Q (E K)^T) F``: the output is exactly these weights applied to ``value``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the weights with ``return_weights``.
    """
    shape = _checks.check_qkv(query, key, value)
    value_projection = key_projection if value_projection is None else value_projection
    for name, proj in (("key_projection", key_projection), ("value_projection", value_projection)):
        if jnp.ndim(proj) != 2 or proj.shape[1] != shape.kv_len:
            raise ValueError(
                f"{name} must have shape [P, S] with S={shape.kv_len}, got {name}.shape={jnp.shape(proj)}."
            )
    if key_projection.shape[0] != value_projection.shape[0]:
        raise ValueError(
            f"key and value projections must share P, got {key_projection.shape} and {value_projection.shape}."
        )
    f32 = jnp.float32
    key, value = key.astype(f32), value.astype(f32)
    value_projection = jnp.broadcast_to(value_projection.astype(f32), (shape.batch, *value_projection.shape))
    if kv_valid is not None:
        if jnp.shape(kv_valid) != (shape.batch, shape.kv_len):
            raise ValueError(
                f"kv_valid must have shape [B, S]={[shape.batch, shape.kv_len]}, got {jnp.shape(kv_valid)}."
            )
        key = jnp.where(kv_valid[:, :, None, None], key, 0.0)
        value_projection = jnp.where(kv_valid[:, None, :], value_projection, 0.0)  # [B, P, S]: no padded value
    k = jnp.einsum("PS,BSKH->BPKH", key_projection.astype(f32), key, precision=_HI)  # [B, P, K, H]
    v = jnp.einsum("BPS,BSKH->BPKH", value_projection, value, precision=_HI)  # [B, P, K, Hv]
    out = dot_product_attention(query.astype(f32), k, v, scale=scale, implementation=implementation)
    out = out.astype(query.dtype)
    if not return_weights:
        return out
    weights = attention_weights(query.astype(f32), k, scale=scale)  # [B, N, T, P]
    return out, jnp.einsum("BNTP,BPS->BNTS", weights, value_projection, precision=_HI)


def segment_means(x: Array, num_segments: int) -> Array:
    """Means of ``num_segments`` equal segments along axis 1: ``[B, T, ...] -> [B, m, ...]``."""
    b, t = x.shape[:2]
    return x.reshape(b, num_segments, t // num_segments, *x.shape[2:]).mean(axis=2)


def iterative_pinv(a: Array, iterations: int = 6) -> Array:
    """Moore-Penrose pseudo-inverse of square matrices ``[..., m, m]`` by the Nystromformer iteration."""
    identity = jnp.eye(a.shape[-1], dtype=a.dtype)
    col = jnp.max(jnp.sum(jnp.abs(a), axis=-2), axis=-1)[..., None, None]  # ||A||_1
    row = jnp.max(jnp.sum(jnp.abs(a), axis=-1), axis=-1)[..., None, None]  # ||A||_inf
    z = jnp.swapaxes(a, -1, -2) / (col * row)
    mm = lambda x, y: jnp.matmul(x, y, precision=_HI)
    for _ in range(iterations):
        az = mm(a, z)
        z = 0.25 * mm(z, 13 * identity - mm(az, 15 * identity - mm(az, 7 * identity - az)))
    return z


def nystrom_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    num_landmarks: int,
    pinv_iterations: int = 6,
    scale: float | None = None,
    return_weights: bool = False,
):
    """Nystromformer: ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with m segment-mean landmarks.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      num_landmarks: m; must divide T and S (landmarks are means of m equal segments).
      pinv_iterations: iterations of :func:`iterative_pinv`.
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(H)``.
      return_weights: also return the implicit weights ``[B, N, T, S]`` float32,
        ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)``: the output is exactly these
        weights applied to ``value`` (rows need not be non-negative).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the weights with ``return_weights``.
    """
    shape = _checks.check_qkv(query, key, value)
    m = num_landmarks
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"num_landmarks must be a positive integer, got {num_landmarks=!r}.")
    if shape.q_len % m or shape.kv_len % m:
        raise ValueError(
            f"num_landmarks must divide T and S (landmarks are segment means), got {num_landmarks=}, "
            f"T={shape.q_len} and S={shape.kv_len}."
        )
    if isinstance(pinv_iterations, bool) or not isinstance(pinv_iterations, int) or pinv_iterations < 1:
        raise ValueError(f"pinv_iterations must be a positive integer, got {pinv_iterations=!r}.")
    scale = _checks.check_scale(scale, shape.head_dim)
    b, t, n, _ = query.shape
    k_heads, g = shape.num_kv_heads, shape.group_size
    q = query.astype(jnp.float32).reshape(b, t, k_heads, g, shape.head_dim)  # [B, T, K, G, H]
    k, v = key.astype(jnp.float32), value.astype(jnp.float32)
    q_land, k_land = segment_means(q, m), segment_means(k, m)  # [B, m, K, G, H], [B, m, K, H]
    softmax = lambda s: jax.nn.softmax(s * scale, axis=-1)
    kernel_1 = softmax(jnp.einsum("BTKGH,BMKH->BKGTM", q, k_land, precision=_HI))  # [B, K, G, T, m]
    kernel_2 = softmax(jnp.einsum("BLKGH,BMKH->BKGLM", q_land, k_land, precision=_HI))  # [B, K, G, m, m]
    kernel_3 = softmax(jnp.einsum("BLKGH,BSKH->BKGLS", q_land, k, precision=_HI))  # [B, K, G, m, S]
    landmark_values = jnp.einsum("BKGLS,BSKV->BKGLV", kernel_3, v, precision=_HI)  # [B, K, G, m, Hv]
    pinv = iterative_pinv(kernel_2, pinv_iterations)  # [B, K, G, m, m]
    mixed = jnp.matmul(pinv, landmark_values, precision=_HI)
    out = jnp.einsum("BKGTM,BKGMV->BTKGV", kernel_1, mixed, precision=_HI)
    out = out.reshape(b, t, n, shape.value_head_dim).astype(query.dtype)
    if not return_weights:
        return out
    left = jnp.matmul(kernel_1, pinv, precision=_HI)  # [B, K, G, T, m]
    weights = jnp.einsum("BKGTM,BKGMS->BKGTS", left, kernel_3, precision=_HI)
    return out, weights.reshape(b, n, t, shape.kv_len)
