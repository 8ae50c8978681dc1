"""Shared test helpers: the per-dtype tolerance table, random inputs, a float64 numpy oracle."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from attention_jax.functional import backends

# Tolerances for comparing a fast path (or a low-precision input) against the float32 reference.
# bf16 keeps 8 bits of mantissa: outputs of a softmax-weighted mean are good to ~1e-2.
TOLERANCES = {
    jnp.dtype(jnp.float64): dict(atol=1e-9, rtol=1e-9),
    jnp.dtype(jnp.float32): dict(atol=2e-5, rtol=2e-5),
    jnp.dtype(jnp.float16): dict(atol=5e-3, rtol=5e-3),
    jnp.dtype(jnp.bfloat16): dict(atol=3e-2, rtol=3e-2),
}
# Gradients accumulate over S (dq) or T (dk, dv): a looser table.
GRAD_TOLERANCES = {
    jnp.dtype(jnp.float64): dict(atol=1e-8, rtol=1e-8),
    jnp.dtype(jnp.float32): dict(atol=1e-4, rtol=1e-4),
    jnp.dtype(jnp.float16): dict(atol=2e-2, rtol=2e-2),
    jnp.dtype(jnp.bfloat16): dict(atol=8e-2, rtol=8e-2),
}


def tol(dtype, grad: bool = False) -> dict:
    return (GRAD_TOLERANCES if grad else TOLERANCES)[jnp.dtype(dtype)]


def assert_close(actual, expected, dtype=None, grad: bool = False):
    """Check shape and dtype first, then values with the tolerance of ``dtype``."""
    chex.assert_equal_shape([actual, expected])
    dtype = jnp.dtype(dtype or expected.dtype)
    chex.assert_trees_all_close(
        np.asarray(jnp.asarray(actual, jnp.float32)), np.asarray(jnp.asarray(expected, jnp.float32)), **tol(dtype, grad)
    )


def random_qkv(seed: int, b=2, t=16, s=None, n=4, k=None, h=16, hv=None, dtype=jnp.float32, *, host=False):
    """Fresh normal ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``.

    ``host=True`` draws them with numpy instead (other values): no XLA compile for each new shape,
    which is most of the cost where every test has its own shapes.
    """
    s = t if s is None else s
    k = n if k is None else k
    hv = h if hv is None else hv
    if host:
        rng = np.random.default_rng(seed)
        shapes = (b, t, n, h), (b, s, k, h), (b, s, k, hv)
        return tuple(jnp.asarray(rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype))) for shape in shapes)
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (b, t, n, h), jnp.float32).astype(dtype)
    key = jax.random.normal(kk, (b, s, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, k, hv), jnp.float32).astype(dtype)
    return q, key, v


def naive_attention(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, score_fn=None):
    """A deliberately naive oracle: explicit loops over batch and heads, float64 numpy.

    ``mask`` is a numpy boolean array broadcastable to ``[B, N, T, S]``; ``score_fn(s, b, n, i, j)``
    modifies a ``[T, S]`` score matrix of batch b and head n given index grids i, j.
    Returns ``(out [B, T, N, Hv], lse [B, N, T])``; fully masked rows give 0 and -inf.
    """
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    b_size, t, n_heads, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    group = n_heads // kv_heads
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    out = np.zeros((b_size, t, n_heads, v.shape[-1]))
    lse = np.full((b_size, n_heads, t), -np.inf)
    full_mask = np.broadcast_to(
        np.ones((1, 1, 1, 1), bool) if mask is None else np.asarray(mask), (b_size, n_heads, t, s)
    )
    full_bias = None if bias is None else np.broadcast_to(np.asarray(bias, np.float64), (b_size, n_heads, t, s))
    i_grid, j_grid = np.meshgrid(np.arange(t), np.arange(s), indexing="ij")
    for b in range(b_size):
        for n in range(n_heads):
            kv_head = n // group
            scores = scale * q[b, :, n, :] @ k[b, :, kv_head, :].T  # [T, S]
            if full_bias is not None:
                scores = scores + full_bias[b, n]
            if score_fn is not None:
                scores = score_fn(scores, b, n, i_grid, j_grid)
            if softcap is not None:
                scores = softcap * np.tanh(scores / softcap)
            for i in range(t):
                visible = full_mask[b, n, i]
                if not visible.any():
                    continue
                row = scores[i][visible]
                m = row.max()
                weights = np.exp(row - m)
                lse[b, n, i] = m + np.log(weights.sum())
                out[b, i, n] = (weights / weights.sum()) @ v[b, visible, kv_head, :]
    return out, lse


class RecordingBackend(backends.Blockwise):
    """The blockwise backend, keeping the MaskSpecs it receives (to inspect what the resolver built)."""

    def __init__(self, block_q=None, block_k=None):
        object.__setattr__(self, "block_q", block_q)
        object.__setattr__(self, "block_k", block_k)
        object.__setattr__(self, "specs", [])

    def __call__(self, call, spec):
        self.specs.append(spec)
        return super().__call__(call, spec)
