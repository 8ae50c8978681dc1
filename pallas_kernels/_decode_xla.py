"""Blockwise XLA body of decode attention: the CPU default, and the fallback on every platform.

A ``fori_loop`` over visit steps, batched over sequences and splits: step ``i`` gathers, for every
(sequence, split), the key/value tile at entry ``first + i`` of that split's chunk of the visit list
and updates the split's online softmax (float32). Inactive (sequence, split) pairs compute on a
clamped tile and are masked out. The trip count is the longest chunk of the batch, a run-time value,
so EMPTY tiles are never gathered. Temporaries are per tile ``[B, C, bk, K, H]``: nothing scales with
the pool or the cache length, and nothing dequantises or gathers the whole cache.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def _per_row(x, cfg):
    """Per-query data ``[B, T] -> [B, T * G]`` (row ``t * G + g`` holds ``x[:, t]``)."""
    return jnp.repeat(x, cfg.group, axis=1)


def _gather_units(pages: Array, starts: Array, unit: int) -> Array:
    """``unit`` contiguous slots of a page at each ``starts [..., 2]`` (page, first slot): ``[..., unit, ...]``.

    A gather straight from ``[P, ps, ...]``: a reshape of the pool into units would be a second consumer of
    the cache's write in the same program, which XLA may then perform twice, on a copy of the whole cache.
    """
    trailing = pages.shape[2:]
    dims = lax.GatherDimensionNumbers(
        offset_dims=tuple(range(starts.ndim - 1, starts.ndim + len(trailing))),
        collapsed_slice_dims=(0,),
        start_index_map=(0, 1),
    )
    return lax.gather(pages, starts, dims, (1, unit, *trailing), mode=lax.GatherScatterMode.CLIP)


def forward(cfg, q_rows, k_pages, v_pages, k_scales, v_scales, plan, arrays):
    """Blockwise XLA body: ``(out [B, K, C, R, Hv] f32, lse [B, K, C, R] f32, steps)``.

    A ``fori_loop`` over visit steps; step ``i`` gathers, for every (sequence, split), the pages of one
    key tile (``[B, C, bk, K, H]``) and updates that split's online softmax. The trip count is the
    longest chunk of the batch, so EMPTY tiles cost nothing and a window visits only its tiles.
    Temporaries are per tile: nothing scales with the pool or the cache length. The gather moves
    units of ``u = gcd(ps, bk)`` contiguous slots straight from ``[P, ps, K, H]`` (:func:`_gather_units`):
    whole pages when pages are smaller than the tile, whole tiles when they are larger.
    """
    b, c, bk, ps, kh = cfg.batch, cfg.num_splits, cfg.block_k, cfg.page_size, cfg.num_kv_heads
    rows, hv = cfg.rows, cfg.value_dim
    meta = plan.meta
    length, offset, num_visits, per_split = meta[:, 0], meta[:, 1], plan.num_visits, meta[:, 4]
    split = jnp.arange(c, dtype=jnp.int32)[None, :]  # [1, C]
    first = split * per_split[:, None]  # [B, C]
    last = jnp.minimum(first + per_split[:, None], num_visits[:, None])  # [B, C]
    steps = jnp.max(jnp.maximum(last - first, 0))
    q_pos = _per_row(arrays["q_positions"], cfg)[:, None, None, :, None]  # [B, 1, 1, R, 1]
    q_vals = tuple(_per_row(x, cfg)[:, None, None, :, None] for x in arrays["q_vals"])
    kv_vals = tuple(jnp.pad(x, ((0, 0), (0, max(0, cfg.num_tiles * bk - x.shape[1])))) for x in arrays["kv_vals"])
    precision = lax.Precision.HIGHEST if cfg.compute_dtype == jnp.float32 else None
    rows_idx = jnp.arange(b)[:, None, None]
    unit = math.gcd(ps, bk)
    # Score-mod operands, broadcast against the scores [B, C, K, R, bk]: query head of row r is k * G + r % G.
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None, None]
    head = (jnp.arange(kh, dtype=jnp.int32)[:, None] * cfg.group + jnp.arange(rows, dtype=jnp.int32) % cfg.group)
    head = head[None, None, :, :, None]  # [1, 1, K, R, 1]
    head_params = tuple(x[head] for x in arrays["score_params"])

    narrow_float = jnp.issubdtype(k_pages.dtype, jnp.floating) and jnp.dtype(k_pages.dtype).itemsize < 4

    def step(i, carry):
        m_prev, l_prev, acc_prev = carry
        pools = (k_pages, v_pages, k_scales, v_scales)
        if narrow_float:
            # Tie the pool to the step: XLA:CPU has no native bf16/fp8 arithmetic and would otherwise move
            # the tile's conversion onto the whole (loop-invariant) pool, hoisted before the loop: a float32
            # copy of the cache at every call (temporaries the size of the pool without this). Not for
            # float32/int8 pools, which it reads in place anyway and whose loop the barrier slows down.
            pools, _ = lax.optimization_barrier((pools, i))
        k_pool, v_pool, ks_pool, vs_pool = pools
        idx = first + i  # [B, C]
        active = idx < last
        tile = jnp.take_along_axis(plan.order, jnp.clip(idx, 0, cfg.num_tiles - 1), axis=1)  # [B, C]
        first_slot = tile[..., None] * bk + jnp.arange(0, bk, unit, dtype=jnp.int32)  # [B, C, bk / u]
        unit_page = arrays["page_table"][rows_idx, jnp.minimum(first_slot // ps, cfg.max_pages - 1)]
        starts = jnp.stack([jnp.maximum(unit_page, 0), first_slot % ps], axis=-1)  # [B, C, bk / u, 2]

        def gather(x):  # one tile of every (sequence, split): [B, C, bk, ...]
            return _gather_units(x, starts, unit).reshape(b, c, bk, *x.shape[2:])

        slot = tile[..., None] * bk + jnp.arange(bk, dtype=jnp.int32)  # [B, C, bk]
        page = jnp.repeat(unit_page, unit, axis=-1)
        k = gather(k_pool).astype(cfg.compute_dtype)  # [B, C, bk, K, H]
        s = jnp.einsum("BKRH,BCSKH->BCKRS", q_rows, k, precision=precision, preferred_element_type=jnp.float32)
        if k_scales is not None:
            s = s * jnp.moveaxis(gather(ks_pool), -1, 2)[:, :, :, None, :]  # [B, C, K, 1, bk]
        s = s * cfg.scale
        kv_pos, exists = cfg.slot_position(slot, length[:, None, None], offset[:, None, None])
        if cfg.score_fn is not None:
            s = cfg.score_fn(s, batch, head, q_pos, kv_pos[:, :, None, None, :], head_params)
        if cfg.softcap is not None:
            s = cfg.softcap * jnp.tanh(s / cfg.softcap)
        live = exists & (page >= 0) & active[..., None]  # [B, C, bk]
        visible = live[:, :, None, None, :]  # [B, C, 1, 1, bk]
        if cfg.mask_fn is not None:
            kv = tuple(x[rows_idx, slot][:, :, None, None, :] for x in kv_vals)
            visible = visible & cfg.mask_fn(q_pos, kv_pos[:, :, None, None, :], q_vals, kv)
        s = jnp.where(visible, s, -jnp.inf)  # [B, C, K, R, bk]
        seen = jnp.any(jnp.broadcast_to(visible, s.shape[:2] + (1,) + s.shape[3:]), axis=3)  # [B, C, 1, bk]
        v = gather(k_pool)[..., :hv] if v_pool is None else gather(v_pool)  # [B, C, bk, K, Hv]
        v = v.astype(jnp.float32 if v_scales is not None else cfg.compute_dtype)
        if v_scales is not None:
            v = v * gather(vs_pool)[..., None]
        v = jnp.where(jnp.moveaxis(seen, 2, -1)[..., None], v, jnp.zeros_like(v))  # NaN-safe P @ V
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=-1))  # [B, C, K, R]
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp(m_prev - m_safe)
        p = jnp.exp(s - m_safe[..., None])
        l_new = alpha * l_prev + jnp.sum(p, axis=-1)
        pv = jnp.einsum("BCKRS,BCSKV->BCKRV", p.astype(v.dtype), v, precision=precision,
                        preferred_element_type=jnp.float32)  # fmt: skip
        return m_new, l_new, alpha[..., None] * acc_prev + pv

    carry = (
        jnp.full((b, c, kh, rows), -jnp.inf, jnp.float32),
        jnp.zeros((b, c, kh, rows), jnp.float32),
        jnp.zeros((b, c, kh, rows, hv), jnp.float32),
    )
    m, denom, acc = lax.fori_loop(0, steps, step, carry)
    empty = denom == 0.0
    safe = jnp.where(empty, 1.0, denom)
    out = acc / safe[..., None]
    lse = jnp.where(empty, -jnp.inf, m + jnp.log(safe))
    return out.transpose(0, 2, 1, 3, 4), lse.transpose(0, 2, 1, 3), steps
