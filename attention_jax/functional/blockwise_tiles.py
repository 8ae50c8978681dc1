"""Tiles of the blockwise path: operands, schedules, one score tile, and the forward pass.

Shapes: ``q [B, Tp, N, H]``, ``k [B, Sp, K, H]``, ``v [B, Sp, K, Hv]`` padded to whole blocks
(``Tp = nq * bq``, ``Sp = nk * bk``). A query tile stacks the ``G = N // K`` heads of each group
as rows, ``[B, K, R, H]`` with ``R = G * bq`` rows ordered ``(g, t)``, so the ``G`` heads of a group
share one loaded key/value tile ``[B, K, bk, H]`` in a single matmul; a score tile is
``[B, K, R, bk]`` (viewed as ``[B, N, bq, bk]`` for the bias, the score mod and the mask, which
index heads as ``n = k * G + g``).

A *schedule* lists, for each query block, the key blocks to visit: the ``FULL`` ones (no mask
arithmetic) and the ``PARTIAL`` ones (the mask is evaluated on the tile); ``EMPTY`` blocks are
never visited. The order of visits does not matter to the online softmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one blockwise call (hashable: a jit / custom_vjp static argument).

    Attributes:
      block_q, block_k: tile sizes.
      q_len, kv_len: true lengths T and S (the operands are padded past them).
      softcap: ``c`` of ``c * tanh(s / c)``, or None.
      mask_fn: the mask's elementwise ``fn(q_pos, kv_pos, q_vals, kv_vals)``, or None.
      runtime_skip: partial tiles whose mask depends on data test ``any(visible)`` at run time
        and skip the math when nothing is visible (packed segments, padding).
      compute_dtype: dtype of the matmul operands (float32 on CPU; the input dtype elsewhere).
      mod_treedef: tree structure of the score mod (None without one).
      mod_diff: which of the score mod's leaves are differentiable (float) leaves.
    """

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    softcap: float | None = None
    mask_fn: Callable | None = None
    runtime_skip: bool = False
    compute_dtype: Any = jnp.float32
    mod_treedef: Any = None
    mod_diff: tuple[bool, ...] = ()


class Operands(NamedTuple):
    """The arrays of one call, padded to whole blocks (a pytree)."""

    q: Array  # [B, Tp, N, H]
    k: Array  # [B, Sp, K, H]
    v: Array  # [B, Sp, K, Hv]
    bias: Array | None  # [Bb, Nb, Tb, Sb], each dim 1 or full (padded)
    mod_leaves: tuple  # the score mod's leaves (None for no mod)
    scale: Array  # float32 scalar
    q_pos: Array  # int32 [Tp] absolute positions
    kv_pos: Array  # int32 [Sp]
    q_vals: tuple  # mask data, each [Bv, Tp]
    kv_vals: tuple  # each [Bv, Sp]
    mask: Array | None  # bool [Bm, Nm, Tm, Sm] (padded with False), or None


class Schedule(NamedTuple):
    """Which key blocks each query block visits: ``idx[i, :count[i]]``, of kind ``kind[i, :count[i]]``.

    ``kind`` is ``FULL`` (no mask arithmetic) or ``PARTIAL`` (the mask is evaluated on the tile);
    empty tiles are not listed. All int32.
    """

    count: Array  # [nq]
    idx: Array  # [nq, W]
    kind: Array  # [nq, W]


def static_schedule(block_map: np.ndarray) -> Schedule:
    """Schedule of a concrete block map: only non-empty tiles are listed, the full ones first."""
    block_map = np.asarray(block_map)
    rows = [np.concatenate([np.flatnonzero(row == FULL), np.flatnonzero(row == PARTIAL)]) for row in block_map]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), np.int32)
    kind = np.full((len(rows), width), PARTIAL, np.int32)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
        kind[i, : len(r)] = block_map[i, r]
    return Schedule(jnp.asarray([len(r) for r in rows], jnp.int32), jnp.asarray(idx), jnp.asarray(kind))


def runtime_schedule(block_map: Array) -> Schedule:
    """Schedule of a block map known only at run time (a ring step): visible blocks sorted first."""
    block_map = jnp.asarray(block_map, jnp.int32)
    order = jnp.argsort(-block_map, axis=1, stable=True).astype(jnp.int32)  # FULL, PARTIAL, then EMPTY
    kind = jnp.take_along_axis(block_map, order, axis=1)
    return Schedule((block_map != EMPTY).sum(axis=1, dtype=jnp.int32), order, kind)


def score_mod_of(cfg: Config, leaves: tuple):
    return None if cfg.mod_treedef is None else jax.tree.unflatten(cfg.mod_treedef, leaves)


# ---------------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------------


def _dot_precision(dtype):
    return lax.Precision.HIGHEST if jnp.dtype(dtype).itemsize >= 4 else None


def einsum(spec: str, a: Array, b: Array, dtype) -> Array:
    """Tile matmul: operands in ``dtype``, accumulation in at least float32."""
    acc = jnp.promote_types(dtype, jnp.float32)
    return jnp.einsum(
        spec, a.astype(dtype), b.astype(dtype), precision=_dot_precision(dtype), preferred_element_type=acc
    )


def q_tile(x: Array, i, block: int, num_kv_heads: int) -> Array:
    """Rows ``i * block ...`` of ``x [B, Tp, N, H]`` as ``[B, K, R, H]``, ``R = G * bq`` rows ``(g, t)``."""
    b, _, n, h = x.shape
    g = n // num_kv_heads
    tile = lax.dynamic_slice_in_dim(x, i * block, block, axis=1)  # [B, bq, N, H]
    tile = tile.reshape(b, block, num_kv_heads, g, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, bq, H]
    return tile.reshape(b, num_kv_heads, g * block, h)


def q_untile(tile: Array, block: int) -> Array:
    """``[B, K, R, H]`` back to ``[B, bq, N, H]``."""
    b, k, r, h = tile.shape
    g = r // block
    return tile.reshape(b, k, g, block, h).transpose(0, 3, 1, 2, 4).reshape(b, block, k * g, h)


def kv_tile(x: Array, j, block: int) -> Array:
    """Rows ``j * block ...`` of ``x [B, Sp, K, H]`` as ``[B, K, bk, H]``."""
    return lax.dynamic_slice_in_dim(x, j * block, block, axis=1).transpose(0, 2, 1, 3)


def row_stat_tile(x: Array, i, block: int, num_kv_heads: int) -> Array:
    """Rows of a per-query statistic ``[B, N, Tp]`` as ``[B, K, R]``."""
    b, n, _ = x.shape
    tile = lax.dynamic_slice_in_dim(x, i * block, block, axis=2)
    return tile.reshape(b, num_kv_heads, (n // num_kv_heads) * block)


def broadcast_tile(x: Array, i, j, block_q: int, block_k: int) -> Array:
    """The ``(i, j)`` tile of an array broadcastable to ``[B, N, Tp, Sp]`` (size-1 dims stay 1)."""
    if x.shape[2] > 1:
        x = lax.dynamic_slice_in_dim(x, i * block_q, block_q, axis=2)
    if x.shape[3] > 1:
        x = lax.dynamic_slice_in_dim(x, j * block_k, block_k, axis=3)
    return x


def tile_indices(x: Operands, i, j, block_q: int, block_k: int):
    """Score-mod indices of tile ``(i, j)``: batch, head, query and key positions, 4-D broadcastable."""
    b, _, n, _ = x.q.shape
    q_idx = lax.dynamic_slice_in_dim(x.q_pos, i * block_q, block_q)
    kv_idx = lax.dynamic_slice_in_dim(x.kv_pos, j * block_k, block_k)
    return (
        jnp.arange(b, dtype=jnp.int32)[:, None, None, None],
        jnp.arange(n, dtype=jnp.int32)[None, :, None, None],
        q_idx[None, None, :, None],
        kv_idx[None, None, None, :],
    )


def modify_scores(cfg: Config, s: Array, bias_tile, mod_leaves, indices) -> Array:
    """Bias, score mod and softcap on a float32 score tile ``[B, N, bq, bk]`` (before the mask)."""
    if bias_tile is not None:
        s = s + bias_tile.astype(s.dtype)
    mod = score_mod_of(cfg, mod_leaves)
    if mod is not None:
        s = mod(s, *indices).astype(s.dtype)
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    return s


def visible_tile(cfg: Config, x: Operands, i, j) -> Array:
    """Boolean visibility of tile ``(i, j)``, broadcastable to ``[B, N, bq, bk]``."""
    bq, bk = cfg.block_q, cfg.block_k
    cols = j * bk + jnp.arange(bk, dtype=jnp.int32)
    visible = (cols < cfg.kv_len)[None, None, None, :]  # padding columns are never visible
    if cfg.mask_fn is not None:
        q_pos = lax.dynamic_slice_in_dim(x.q_pos, i * bq, bq)[:, None]
        kv_pos = lax.dynamic_slice_in_dim(x.kv_pos, j * bk, bk)[None, :]
        q_vals = tuple(lax.dynamic_slice_in_dim(a, i * bq, bq, axis=1)[:, :, None] for a in x.q_vals)
        kv_vals = tuple(lax.dynamic_slice_in_dim(a, j * bk, bk, axis=1)[:, None, :] for a in x.kv_vals)
        m = jnp.asarray(cfg.mask_fn(q_pos, kv_pos, q_vals, kv_vals))
        m = m[:, None] if m.ndim == 3 else m  # [Bv, 1, bq, bk] or [bq, bk]
        visible = visible & m
    if x.mask is not None:
        visible = visible & broadcast_tile(x.mask, i, j, bq, bk)
    return visible


def tile_scores(cfg: Config, qt: Array, kt: Array) -> Array:
    """Raw scores ``q.k`` of tile ``(i, j)`` as ``[B, N, bq, bk]`` float32.

    ``qt [B, K, R, H]`` is already multiplied by the scale; ``kt [B, K, bk, H]``.
    """
    b, k, r, _ = qt.shape
    return einsum("BKRH,BKSH->BKRS", qt, kt, cfg.compute_dtype).reshape(b, k * (r // cfg.block_q), cfg.block_q, -1)


def as_groups(s: Array, num_kv_heads: int) -> Array:
    """``[B, N, bq, bk]`` viewed as ``[B, K, R, bk]`` (rows ``(g, t)``)."""
    b, n, bq, bk = s.shape
    return s.reshape(b, num_kv_heads, (n // num_kv_heads) * bq, bk)


def bias_tile(x: Operands, i, j, cfg: Config):
    return None if x.bias is None else broadcast_tile(x.bias, i, j, cfg.block_q, cfg.block_k)


def run_tile(cfg: Config, x: Operands, i, j, partial: Array, carry, update):
    """``update(visible)``, the new carry after tile ``(i, j)``.

    ``visible`` is None unless the mask reads data (``cfg.runtime_skip``): then it is the tile's
    visibility, computed first so that a tile whose mask hides everything is skipped at run time.
    """
    if not cfg.runtime_skip:
        return update(None)
    visible = visible_tile(cfg, x, i, j) | ~partial  # a FULL tile is visible everywhere
    return lax.cond(jnp.any(visible), lambda: update(visible), lambda: carry)


def apply_mask(cfg: Config, x: Operands, i, j, s: Array, partial: Array, visible: Array | None) -> Array:
    """Masked scores ``[B, N, bq, bk]`` (-inf where hidden); FULL tiles do no mask arithmetic."""
    if visible is not None:
        return jnp.where(visible, s, -jnp.inf)
    return lax.cond(partial, lambda s: jnp.where(visible_tile(cfg, x, i, j), s, -jnp.inf), lambda s: s, s)


# ---------------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------------


def forward(cfg: Config, x: Operands, sched: Schedule, out_dtype) -> tuple[Array, Array]:
    """Blockwise forward: ``(out [B, Tp, N, Hv] out_dtype, lse [B, N, Tp] float32)``.

    Each query block runs an online softmax over the key blocks of its schedule, with float32
    statistics and normalisation deferred to the end of the row.
    """
    b, tp, n, _ = x.q.shape
    kv_heads, hv = x.k.shape[2], x.v.shape[-1]
    g = n // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    acc_dtype = jnp.promote_types(x.q.dtype, jnp.float32)

    def query_block(i, carry):
        out, lse = carry
        qt = (q_tile(x.q, i, bq, kv_heads).astype(acc_dtype) * x.scale).astype(cfg.compute_dtype)
        stats = jnp.zeros_like(qt, acc_dtype, shape=(b, kv_heads, g * bq))
        init = (stats - jnp.inf, stats, jnp.zeros_like(qt, acc_dtype, shape=(b, kv_heads, g * bq, hv)))

        def body(jj, c):
            j, partial = sched.idx[i, jj], sched.kind[i, jj] == PARTIAL

            def update(visible):
                kt, vt = kv_tile(x.k, j, bk), kv_tile(x.v, j, bk)
                s = tile_scores(cfg, qt, kt)
                s = modify_scores(cfg, s, bias_tile(x, i, j, cfg), x.mod_leaves, tile_indices(x, i, j, bq, bk))
                s = apply_mask(cfg, x, i, j, s, partial, visible)
                return _online_update(cfg, c, as_groups(s, kv_heads), vt)

            return run_tile(cfg, x, i, j, partial, c, update)

        m, denom, acc = lax.fori_loop(0, sched.count[i], body, init)
        seen = denom > 0
        denom = jnp.where(seen, denom, 1.0)
        o = acc / denom[..., None]
        lse_i = jnp.where(seen, m + jnp.log(denom), -jnp.inf)
        out = lax.dynamic_update_slice_in_dim(out, q_untile(o, bq).astype(out.dtype), i * bq, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_i.reshape(b, n, bq).astype(jnp.float32), i * bq, axis=2)
        return out, lse

    out = jnp.zeros_like(x.q, out_dtype, shape=(b, tp, n, hv))
    lse = jnp.zeros_like(x.q, jnp.float32, shape=(b, n, tp)) - jnp.inf
    return lax.fori_loop(0, tp // bq, query_block, (out, lse))


def _online_update(cfg: Config, carry, s: Array, vt: Array):
    """One step of the online softmax with the score tile ``s [B, K, R, bk]`` (masked = -inf)."""
    m, denom, acc = carry  # running max, running sum of exp(s - m), unnormalised output
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    denom = alpha * denom + p.sum(axis=-1)
    acc = alpha[..., None] * acc + einsum("BKRS,BKSH->BKRH", p, vt, cfg.compute_dtype)
    return m_new, denom, acc
