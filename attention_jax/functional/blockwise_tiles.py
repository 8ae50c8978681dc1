"""Tiles of the blockwise path: operands, schedules, one score tile, and the forward pass.

Shapes: ``q [B, Tp, N, H]`` padded to whole blocks (``Tp = nq * bq``); keys and values are
transposed once per call to ``k [B, K, Sp, H]``, ``v [B, K, Sp, Hv]`` (``Sp = nk * bk``) so that a
key tile is a contiguous slice. A query tile stacks the ``G = N // K`` heads of each group as
rows, ``[B, K, R, H]`` with ``R = G * bq`` rows ordered ``(g, t)``, so the ``G`` heads of a group
share one loaded key/value tile ``[B, K, bk, H]`` in a single matmul; a score tile is
``[B, K, R, bk]`` (viewed as ``[B, N, bq, bk]`` for the bias, the score mod and the mask, which
index heads as ``n = k * G + g``).

A *schedule* lists, for each query block, the key blocks to visit: first the ``FULL`` ones (no
mask arithmetic), then the ``PARTIAL`` ones (the mask is evaluated on the tile); ``EMPTY`` blocks
are never visited. Two loops per query block run the two kinds, so no tile branches on its kind.
The order of visits does not matter to the online softmax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import dropout as dropout_lib
from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Static configuration of one blockwise call (hashable: a jit / custom_vjp static argument).

    Attributes:
      block_q, block_k: tile sizes.
      q_len, kv_len: true lengths T and S (the operands are padded past them).
      softcap: ``c`` of ``c * tanh(s / c)``, or None.
      mask_fn: the spec's elementwise ``fn(q_pos, kv_pos, q_vals, kv_vals)``, or None.
      score_fn: the spec's ``score_fn(score, batch, head, q_pos, kv_pos, params)``, or None.
      runtime_skip: partial tiles whose mask depends on data test ``any(visible)`` at run time
        and skip the math when nothing is visible (packed segments, padding).
      compute_dtype: dtype of the matmul operands (float32 on CPU; the input dtype elsewhere).
      dropout_rate: probability of dropping an attention weight (0: no dropout).
    """

    block_q: int
    block_k: int
    q_len: int
    kv_len: int
    softcap: float | None = None
    mask_fn: Callable | None = None
    score_fn: Callable | None = None
    runtime_skip: bool = False
    compute_dtype: Any = jnp.float32
    dropout_rate: float = 0.0

    @property
    def modifies_scores(self) -> bool:
        return self.score_fn is not None or self.softcap is not None


class Operands(NamedTuple):
    """The arrays of one call, padded to whole blocks (a pytree)."""

    q: Array  # [B, Tp, N, H]
    k: Array  # [B, K, Sp, H]
    v: Array  # [B, K, Sp, Hv]
    bias: Array | None  # [Bb, Nb, Tb, Sb], each dim 1 or full (padded)
    params: tuple  # score_fn parameters, each [N]
    scale: Array  # float32 scalar
    q_pos: Array  # int32 [Tp] or per sequence [B, Tp]: absolute positions
    kv_pos: Array  # int32 [Sp] or [B, Sp]
    q_vals: tuple  # mask data, each [Bv, Tp]
    kv_vals: tuple  # each [Bv, Sp]
    mask: Array | None  # bool [Bm, Nm, Tp, Sp] (padded with False), or None
    seed: Array | None  # int32 dropout seed, or None


class Schedule(NamedTuple):
    """Which key blocks each query block visits: ``idx[i, :count[i]]``, the first ``num_full[i]`` FULL.

    The rest of the listed blocks are PARTIAL (the mask is evaluated on the tile); empty tiles are
    not listed. All int32.
    """

    count: Array  # [nq]
    num_full: Array  # [nq]
    idx: Array  # [nq, W]

    def kinds(self) -> np.ndarray:
        """``[nq, W]`` FULL / PARTIAL / EMPTY of each listed visit (for tests)."""
        w = np.arange(self.idx.shape[1])[None, :]
        count, num_full = np.asarray(self.count)[:, None], np.asarray(self.num_full)[:, None]
        return np.where(w < num_full, FULL, np.where(w < count, PARTIAL, EMPTY))


def merge_block_map(block_map):
    """One ``[nq, nk]`` map for the whole batch from ``[nq, nk]`` or per-sequence ``[B, nq, nk]``.

    A tile is visited if any sequence needs it and FULL only if it is FULL for all of them.
    """
    if block_map.ndim == 2:
        return block_map
    xp = np if isinstance(block_map, np.ndarray) else jnp
    full = xp.all(block_map == FULL, axis=0)
    any_visible = xp.any(block_map != EMPTY, axis=0)
    return xp.where(full, FULL, xp.where(any_visible, PARTIAL, EMPTY)).astype(xp.int32)


def static_schedule(block_map: np.ndarray) -> Schedule:
    """Schedule of a concrete block map: only non-empty tiles are listed, the full ones first."""
    block_map = merge_block_map(np.asarray(block_map))
    rows = [np.concatenate([np.flatnonzero(row == FULL), np.flatnonzero(row == PARTIAL)]) for row in block_map]
    width = max(1, max(len(r) for r in rows))
    idx = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        idx[i, : len(r)] = r
    count = [len(r) for r in rows]
    num_full = [int(np.count_nonzero(row == FULL)) for row in block_map]
    return Schedule(jnp.asarray(count, jnp.int32), jnp.asarray(num_full, jnp.int32), jnp.asarray(idx))


def runtime_schedule(block_map: Array) -> Schedule:
    """Schedule of a block map known only at run time: visible blocks sorted first, FULL before PARTIAL."""
    block_map = merge_block_map(jnp.asarray(block_map, jnp.int32))
    order = jnp.argsort(-block_map, axis=1, stable=True).astype(jnp.int32)  # FULL, PARTIAL, then EMPTY
    count = (block_map != EMPTY).sum(axis=1, dtype=jnp.int32)
    return Schedule(count, (block_map == FULL).sum(axis=1, dtype=jnp.int32), order)


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
    """Rows ``j * block ...`` of ``x [B, K, Sp, H]``: ``[B, K, bk, H]``."""
    return lax.dynamic_slice_in_dim(x, j * block, block, axis=2)


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


def positions_tile(pos: Array, start, block: int) -> Array:
    """``[block]`` or ``[B, block]`` slice of positions ``[Lp]`` / ``[B, Lp]``."""
    return lax.dynamic_slice_in_dim(pos, start, block, axis=pos.ndim - 1)


def tile_indices(x: Operands, i, j, block_q: int, block_k: int):
    """Score-mod indices of tile ``(i, j)``: batch, head, query and key positions, 4-D broadcastable."""
    b, _, n, _ = x.q.shape
    q_idx = positions_tile(x.q_pos, i * block_q, block_q)  # [bq] or [B, bq]
    kv_idx = positions_tile(x.kv_pos, j * block_k, block_k)
    return (
        jnp.arange(b, dtype=jnp.int32)[:, None, None, None],
        jnp.arange(n, dtype=jnp.int32)[None, :, None, None],
        q_idx.reshape(-1, 1, block_q, 1),
        kv_idx.reshape(-1, 1, 1, block_k),
    )


def head_params(params: tuple) -> tuple:
    """Each ``[N]`` score parameter as ``[1, N, 1, 1]`` (its value at each head of a tile)."""
    return tuple(p.reshape(1, -1, 1, 1) for p in params)


def modify_scores(cfg: Config, s: Array, bias_tile, params, indices) -> Array:
    """Bias, score mod and softcap on a float32 score tile ``[B, N, bq, bk]`` (before the mask)."""
    if bias_tile is not None:
        s = s + bias_tile.astype(s.dtype)
    if cfg.score_fn is not None:
        s = jnp.broadcast_to(jnp.asarray(cfg.score_fn(s, *indices, head_params(params)), s.dtype), s.shape)
    if cfg.softcap is not None:
        s = cfg.softcap * jnp.tanh(s / cfg.softcap)
    return s


def visible_tile(cfg: Config, x: Operands, i, j) -> Array:
    """Boolean visibility of tile ``(i, j)``, broadcastable to ``[B, N, bq, bk]``."""
    bq, bk = cfg.block_q, cfg.block_k
    cols = j * bk + jnp.arange(bk, dtype=jnp.int32)
    visible = (cols < cfg.kv_len)[None, None, None, :]  # padding columns are never visible
    if cfg.mask_fn is not None:
        q_pos = positions_tile(x.q_pos, i * bq, bq)[..., :, None]  # [bq, 1] or [B, bq, 1]
        kv_pos = positions_tile(x.kv_pos, j * bk, bk)[..., None, :]  # [1, bk] or [B, 1, bk]
        q_vals = tuple(lax.dynamic_slice_in_dim(a, i * bq, bq, axis=1)[:, :, None] for a in x.q_vals)
        kv_vals = tuple(lax.dynamic_slice_in_dim(a, j * bk, bk, axis=1)[:, None, :] for a in x.kv_vals)
        m = jnp.asarray(cfg.mask_fn(q_pos, kv_pos, q_vals, kv_vals))
        m = m[:, None] if m.ndim == 3 else m  # [Bv, 1, bq, bk] or [bq, bk]
        visible = visible & m
    if x.mask is not None:
        visible = visible & broadcast_tile(x.mask, i, j, bq, bk)
    return visible


def visible_columns(visible: Array, num_kv_heads: int) -> Array:
    """``[Bv, K or 1, bk, 1]``: whether any query row of the tile sees each key (of each group).

    Value rows no query of a tile sees are zeroed: an uninitialised cache slot holding NaN would
    otherwise reach the output as ``0 * NaN`` in ``p . v``.
    """
    bv, nv, bq, bk = (1,) * (4 - visible.ndim) + visible.shape
    visible = visible.reshape(bv, nv, bq, bk)
    if nv == 1:
        return visible.any(axis=2)[..., None]
    return visible.reshape(bv, num_kv_heads, (nv // num_kv_heads) * bq, bk).any(axis=2)[..., None]


def tile_scores(cfg: Config, qt: Array, kt: Array) -> Array:
    """Raw scores ``q.k`` of a tile as ``[B, K, R, bk]`` float32 (``qt`` already carries the scale)."""
    return einsum("BKRH,BKSH->BKRS", qt, kt, cfg.compute_dtype)


def as_heads(s: Array, num_heads: int) -> Array:
    """``[B, K, R, bk]`` viewed as ``[B, N, bq, bk]``."""
    b, k, r, bk = s.shape
    return s.reshape(b, num_heads, (r * k) // num_heads, bk)


def as_groups(s: Array, num_kv_heads: int) -> Array:
    """``[B, N, bq, bk]`` viewed as ``[B, K, R, bk]`` (rows ``(g, t)``)."""
    b, n, bq, bk = s.shape
    return s.reshape(b, num_kv_heads, (n // num_kv_heads) * bq, bk)


def bias_tile(x: Operands, i, j, cfg: Config):
    return None if x.bias is None else broadcast_tile(x.bias, i, j, cfg.block_q, cfg.block_k)


def dropout_rows(cfg: Config, x: Operands, i, num_kv_heads: int) -> Array | None:
    """Per-row dropout hash of query block ``i``: ``[B, K, R, 1]`` int32 (None without dropout)."""
    if cfg.dropout_rate == 0.0:
        return None
    b, _, n, _ = x.q.shape
    q_idx = positions_tile(x.q_pos, i * cfg.block_q, cfg.block_q).reshape(-1, 1, cfg.block_q)
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None]
    head = jnp.arange(n, dtype=jnp.int32)[None, :, None]
    rows = dropout_lib.row_seed(x.seed, batch, head, q_idx)  # [B, N, bq]
    return rows.reshape(b, num_kv_heads, -1, 1)


def dropout_keep(cfg: Config, x: Operands, rows: Array, j) -> Array:
    """Keep-mask ``[B, K, R, bk]`` of key block ``j`` from :func:`dropout_rows`."""
    kv_idx = positions_tile(x.kv_pos, j * cfg.block_k, cfg.block_k).reshape(-1, 1, 1, cfg.block_k)
    return dropout_lib.keep_from_row_seed(rows, kv_idx, cfg.dropout_rate)


def scan_tiles(cfg: Config, x: Operands, sched: Schedule, i, carry, update):
    """Run ``update(j, visible, carry)`` over query block ``i``'s FULL tiles, then its PARTIAL ones.

    ``visible`` is None in FULL tiles (no mask arithmetic). In PARTIAL tiles it is the tile's
    visibility; when the mask reads data (``cfg.runtime_skip``) a tile it hides entirely is skipped
    at run time.
    """

    def full(jj, c):
        return update(sched.idx[i, jj], None, c)

    def partial(jj, c):
        j = sched.idx[i, jj]
        visible = visible_tile(cfg, x, i, j)
        if not cfg.runtime_skip:
            return update(j, visible, c)
        return lax.cond(jnp.any(visible), lambda: update(j, visible, c), lambda: c)

    carry = lax.fori_loop(0, sched.num_full[i], full, carry)
    return lax.fori_loop(sched.num_full[i], sched.count[i], partial, carry)


def scores_of_tile(cfg: Config, x: Operands, i, j, qt: Array, kt: Array, visible) -> Array:
    """Masked, modified scores ``[B, K, R, bk]`` of tile ``(i, j)`` (-inf where hidden)."""
    kv_heads, n = kt.shape[1], x.q.shape[2]
    s = tile_scores(cfg, qt, kt)
    if x.bias is not None or cfg.modifies_scores:
        indices = tile_indices(x, i, j, cfg.block_q, cfg.block_k)
        s = as_groups(modify_scores(cfg, as_heads(s, n), bias_tile(x, i, j, cfg), x.params, indices), kv_heads)
    if visible is not None:
        s = as_groups(jnp.where(visible, as_heads(s, n), -jnp.inf), kv_heads)
    return s


# ---------------------------------------------------------------------------------------------------
# Forward pass
# ---------------------------------------------------------------------------------------------------


def forward(cfg: Config, x: Operands, sched: Schedule, out_dtype) -> tuple[Array, Array]:
    """Blockwise forward: ``(out [B, Tp, N, Hv] out_dtype, lse [B, N, Tp] float32)``.

    Each query block runs an online softmax over the key blocks of its schedule, with float32
    statistics and normalisation deferred to the end of the row. With dropout the dropped weights
    enter ``p . v`` while the normaliser sums the undropped ones (dropout does not change lse).
    """
    b, tp, n, _ = x.q.shape
    kv_heads, hv = x.k.shape[1], x.v.shape[-1]
    g = n // kv_heads
    bq, bk = cfg.block_q, cfg.block_k
    acc_dtype = jnp.promote_types(x.q.dtype, jnp.float32)

    def query_block(i, carry):
        out, lse = carry
        qt = (q_tile(x.q, i, bq, kv_heads).astype(acc_dtype) * x.scale).astype(cfg.compute_dtype)
        rows = dropout_rows(cfg, x, i, kv_heads)
        stats = jnp.zeros_like(qt, acc_dtype, shape=(b, kv_heads, g * bq))
        init = (stats - jnp.inf, stats, jnp.zeros_like(qt, acc_dtype, shape=(b, kv_heads, g * bq, hv)))

        def update(j, visible, c):
            kt, vt = kv_tile(x.k, j, bk), kv_tile(x.v, j, bk)
            s = scores_of_tile(cfg, x, i, j, qt, kt, visible)
            if visible is not None:
                vt = jnp.where(visible_columns(visible, kv_heads), vt, jnp.zeros((), vt.dtype))
            keep = None if rows is None else dropout_keep(cfg, x, rows, j)
            return _online_update(cfg, c, s, vt, keep)

        m, denom, acc = scan_tiles(cfg, x, sched, i, init, update)
        seen = denom > 0
        inv = jnp.where(seen, 1.0 / jnp.where(seen, denom, 1.0), 0.0)
        if cfg.dropout_rate:
            inv = inv / (1.0 - cfg.dropout_rate)
        o = acc * inv[..., None]
        lse_i = jnp.where(seen, m + jnp.log(jnp.where(seen, denom, 1.0)), -jnp.inf)
        out = lax.dynamic_update_slice_in_dim(out, q_untile(o, bq).astype(out.dtype), i * bq, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, lse_i.reshape(b, n, bq).astype(jnp.float32), i * bq, axis=2)
        return out, lse

    out = jnp.zeros_like(x.q, out_dtype, shape=(b, tp, n, hv))
    lse = jnp.zeros_like(x.q, jnp.float32, shape=(b, n, tp)) - jnp.inf
    return lax.fori_loop(0, tp // bq, query_block, (out, lse))


def _online_update(cfg: Config, carry, s: Array, vt: Array, keep: Array | None):
    """One step of the online softmax with the score tile ``s [B, K, R, bk]`` (masked = -inf)."""
    m, denom, acc = carry  # running max, running sum of exp(s - m), unnormalised output
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that have seen nothing yet
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[..., None])
    denom = alpha * denom + p.sum(axis=-1)
    if keep is not None:  # the 1 / (1 - rate) factor is applied once per row, at the end
        p = jnp.where(keep, p, 0.0)
    acc = alpha[..., None] * acc + einsum("BKRS,BKSH->BKRH", p, vt, cfg.compute_dtype)
    return m_new, denom, acc
