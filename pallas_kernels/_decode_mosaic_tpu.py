"""TPU (Mosaic) body of decode attention: grid-pipelined, K/V index maps follow the page table.

The grid is ``(B, K, splits, steps)``. The page table, the visit lists and the per-sequence
``meta`` (length, offset, counts, chunk size) are scalar-prefetched into SMEM (flattened, as 2-D
SMEM arrays pad badly). Step ``j`` of split ``c`` computes unit ``j % (bk / u)`` of the tile at
entry ``c * per_split + j // (bk / u)`` of the sequence's visit list, where a *unit* is
``u = gcd(ps, bk)`` slots: the largest run of a key tile that lies in one page, so one BlockSpec
index map (``page, unit in page, head``) names it. Steps past the chunk repeat the last index, so
Pallas issues no new DMA and the kernel does nothing. Statistics and the accumulator live in
VMEM scratch across the steps (``arbitrary`` axis).

Mosaic wants the last two dims of every block (8, 128)-aligned or whole, so the pool is read as
``[P, ps, K * H]`` (a free reshape; a head is a block of ``H`` lanes: ``H % 128 == 0`` or
``K == 1``), the scales ``[P, ps, K]`` whole along ``K`` (the head's column is selected in VMEM),
query rows ``[B, K, Rp, H]`` and per-row data as ``[B, Rp, 1]`` columns. Key positions come from an
iota, never from memory; per-slot mask data (``kv_vals``) is not served by this body.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._flash_tile import TileMath

SUBLANES = 8
LANES = 128


def interpret_params():
    """The TPU interpreter (runs the Mosaic body on CPU, simulating VMEM/SMEM and DMAs)."""
    return pltpu.InterpretParams()


def unit_size(cfg) -> int:
    return math.gcd(cfg.page_size, cfg.block_k)


def unsupported_reason(cfg, num_kv_vals: int = 0) -> str | None:
    """Why the Mosaic TPU body cannot serve ``cfg`` (None: it can)."""
    if cfg.score_fn is not None:
        return "kernel='mosaic_tpu' does not apply a score_fn yet; kernel='xla' does."
    if cfg.num_kv_heads > 1 and (cfg.head_dim % LANES or (not cfg.keys_only and cfg.value_dim % LANES)):
        return (f"kernel='mosaic_tpu' reads a head as a block of lanes: H and Hv must be multiples of {LANES} "
                f"when K > 1, got H={cfg.head_dim}, Hv={cfg.value_dim}, K={cfg.num_kv_heads}.")  # fmt: skip
    u = unit_size(cfg)
    itemsize = 1 if cfg.quantized else jnp.dtype(cfg.compute_dtype).itemsize
    sublanes = SUBLANES * 4 // itemsize  # a packed dtype's native tile is taller: (16, 128) bf16, (32, 128) int8
    if u % sublanes and u != cfg.page_size:
        return (f"kernel='mosaic_tpu' loads gcd(page_size, block_k)={u} slots per step, which must be a multiple "
                f"of {sublanes} for these pages or the whole page; got page_size={cfg.page_size}, "
                f"block_k={cfg.block_k}.")  # fmt: skip
    if num_kv_vals:
        return "kernel='mosaic_tpu' does not read per-slot mask data (kv_vals); use kernel='xla'."
    return None


def _div(x, d: int):
    """``x // d`` for ``x >= 0`` (truncating division: jnp's floor division lowers only with a TPU to ask)."""
    return lax.div(x, jnp.int32(d))


def _rem(x, d: int):
    """``x % d`` for ``x >= 0``."""
    return lax.rem(x, jnp.int32(d))


class _Steps:
    """Index arithmetic of a grid step on the flattened scalar tables (SMEM refs or their values)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.unit = unit_size(cfg)
        self.units_per_tile = cfg.block_k // self.unit

    def chunk(self, meta_ref, b, c):
        """``(first, last, num_full)`` entries of the visit list that split ``c`` of sequence ``b`` computes."""
        base = b * 8
        num_full, per_split = meta_ref[base + 2], meta_ref[base + 4]
        first = c * per_split
        last = jnp.minimum(first + per_split, num_full + meta_ref[base + 3])
        return first, last, num_full

    def unit_slot(self, meta_ref, order_ref, b, c, j, clamp: bool):
        """``(visit entry, first slot of the unit)``; clamped steps repeat the chunk's last unit."""
        cfg = self.cfg
        first, last, _ = self.chunk(meta_ref, b, c)
        entry = first + _div(j, self.units_per_tile)
        unit = _rem(j, self.units_per_tile)
        if clamp:
            past = entry >= last
            entry = jnp.where(past, last - 1, entry)
            unit = jnp.where(past, self.units_per_tile - 1, unit)
            entry = jnp.clip(entry, 0, cfg.num_tiles - 1)
        tile = order_ref[b * cfg.num_tiles + entry]
        return entry, tile * cfg.block_k + unit * self.unit

    def page(self, table_ref, b, slot):
        cfg = self.cfg
        return table_ref[b * cfg.max_pages + jnp.minimum(_div(slot, cfg.page_size), cfg.max_pages - 1)]

    def kv_index(self, b, h, c, j, table_ref, meta_ref, order_ref):
        """Block index ``(page, unit in page, head)`` of the pool ``[P, ps, K * H]`` for grid step ``(b, h, c, j)``."""
        _, slot = self.unit_slot(meta_ref, order_ref, b, c, j, clamp=True)
        page = jnp.maximum(self.page(table_ref, b, slot), 0)
        return page, _div(_rem(slot, self.cfg.page_size), self.unit), h


def _head_column(scales, h):
    """Column ``[u, 1]`` of head ``h`` from a ``[u, K]`` scale block (a masked lane reduction, no relayout)."""
    lanes = lax.broadcasted_iota(jnp.int32, scales.shape, 1)
    return jnp.sum(jnp.where(lanes == h, scales, 0.0), axis=1, keepdims=True)


def _kernel(table_ref, meta_ref, order_ref, q_ref, qpos_ref, k_ref, v_ref, ks_ref, vs_ref, qv_refs, o_ref, lse_ref,
            m_scr, l_scr, acc_scr, *, cfg, tm: TileMath, steps: _Steps):  # fmt: skip
    b, h, c, j = (pl.program_id(i) for i in range(4))
    first, last, num_full = steps.chunk(meta_ref, b, c)
    entry = first + _div(j, steps.units_per_tile)
    active = entry < last

    @pl.when(j == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def dequantize(x, scales_ref):
        if scales_ref is None:
            return x
        return (x.astype(jnp.float32) * _head_column(scales_ref[...], h)).astype(cfg.compute_dtype)

    def compute(masked: bool):
        k = dequantize(k_ref[...], ks_ref)  # [u, H]
        if v_ref is None:  # keys-only cache: the values are the keys' first Hv channels
            v = k[:, : cfg.value_dim]
        else:
            v = dequantize(v_ref[...], vs_ref)  # [u, Hv]
        s2, _, _ = tm.logits(q_ref[...], k)  # [Rp, u], base 2
        mask = None
        if masked:
            _, slot0 = steps.unit_slot(meta_ref, order_ref, b, c, j, clamp=False)
            slot = slot0 + lax.broadcasted_iota(jnp.int32, (1, steps.unit), 1)
            length, offset = meta_ref[b * 8], meta_ref[b * 8 + 1]
            kv_pos, exists = cfg.slot_position(slot, length, offset)
            mask = exists & (steps.page(table_ref, b, slot0) >= 0)
            if cfg.mask_fn is not None:
                q_vals = tuple(r[...] for r in qv_refs)
                mask = mask & cfg.mask_fn(qpos_ref[...], kv_pos, q_vals, ())
            mask = jnp.broadcast_to(mask, s2.shape)
            # K/V rows no row of the tile sees (unwritten slots, other pages) are zeroed: NaN-safe P @ V.
            v = jnp.where(tm.seen_keys(mask, kv_major=False), v, jnp.zeros_like(v))
        m, denom, acc = tm.online_softmax(s2, mask, m_scr[...], l_scr[...], acc_scr[...], v)
        m_scr[...], l_scr[...], acc_scr[...] = m, denom, acc

    pl.when(active & (entry < num_full))(functools.partial(compute, masked=False))
    pl.when(active & (entry >= num_full))(functools.partial(compute, masked=True))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        out, lse = tm.finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out
        lse_ref[...] = lse


def forward(cfg, q_rows, k_pages, v_pages, k_scales, v_scales, plan, arrays, *, interpret: bool = False):
    """``(out [B, K, C, R, Hv], lse [B, K, C, R])`` float32 per split, from ``q_rows [B, K, R, H]``."""
    reason = unsupported_reason(cfg, len(arrays["kv_vals"]))
    if reason is not None:
        raise ValueError(reason)
    b, kh, rows, h = q_rows.shape
    hv, c, u = cfg.value_dim, cfg.num_splits, unit_size(cfg)
    steps = _Steps(cfg)
    num_steps = -(-cfg.num_tiles // c) * steps.units_per_tile
    rp = -(-rows // SUBLANES) * SUBLANES
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rp - rows), (0, 0)))

    def column(x):  # [B, T] -> [B, Rp, 1], the value of row t * G + g
        return jnp.pad(jnp.repeat(x, cfg.group, axis=1), ((0, 0), (0, rp - rows)))[..., None]

    q_pos = column(arrays["q_positions"])
    q_vals = tuple(column(x) for x in arrays["q_vals"])
    pool = lambda x: None if x is None else x.reshape(x.shape[0], x.shape[1], -1)  # [P, ps, K * H], free
    k3, v3 = pool(k_pages), pool(v_pages)

    def kv_spec(width):
        return pl.BlockSpec((None, u, width), steps.kv_index)

    def scale_spec(x):
        if x is None:
            return None
        return pl.BlockSpec((None, u, kh), lambda *a: steps.kv_index(*a)[:2] + (0,))

    per_row = pl.BlockSpec((None, rp, 1), lambda b_, h_, c_, j_, *_: (b_, 0, 0))
    in_specs = [
        pl.BlockSpec((None, None, rp, h), lambda b_, h_, c_, j_, *_: (b_, h_, 0, 0)),
        per_row,
        kv_spec(h),
        None if v3 is None else kv_spec(hv),
        scale_spec(k_scales),
        None if v3 is None else scale_spec(v_scales),
        tuple(per_row for _ in q_vals),
    ]
    out_specs = (
        pl.BlockSpec((None, None, None, rp, hv), lambda b_, h_, c_, j_, *_: (b_, h_, c_, 0, 0)),
        pl.BlockSpec((None, None, None, rp, 1), lambda b_, h_, c_, j_, *_: (b_, h_, c_, 0, 0)),
    )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=3,
        grid=(b, kh, c, num_steps),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=[
            pltpu.VMEM((rp, 1), jnp.float32),
            pltpu.VMEM((rp, 1), jnp.float32),
            pltpu.VMEM((rp, hv), jnp.float32),
        ],
    )
    tm = TileMath(cfg.scale, cfg.softcap, None, 0, cfg.compute_dtype == jnp.float32)
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, tm=tm, steps=steps),
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, c, rp, hv), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, c, rp, 1), jnp.float32),
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret_params() if interpret else False,
        name="decode_attention",
    )(arrays["page_table"].reshape(-1), plan.meta.reshape(-1), plan.order.reshape(-1), q_rows, q_pos, k3, v3,
      k_scales, None if v3 is None else v_scales, q_vals)  # fmt: skip
    return out[..., :rows, :], lse[..., :rows, 0]
