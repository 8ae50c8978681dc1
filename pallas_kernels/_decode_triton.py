"""GPU (Triton) body of decode attention: one program per (sequence, key/value head, split).

A program keeps its ``T * G`` query rows (padded to a power of two >= 16) in registers and loops
inside the kernel over its chunk of the sequence's visit list: FULL tiles first (no mask arithmetic),
then PARTIAL ones (slot existence, pages ``-1`` and the mask function on index tiles, K/V rows no
row sees zeroed). Each step reads the tile's page indices from the page table (a vector load of
``block_k`` entries) and gathers the tile's K/V rows by pointer arithmetic from the pool viewed as
``[P * ps, K, H]`` (a free reshape), so any page size works with any ``block_k``. Quantised tiles
(int8, float8_e4m3fn) are dequantised after the load with their per-token scales. Head dims that
are not powers of two (MLA's ``512 + 64``) load in power-of-two pieces whose scores add up; ``Hv``
must be a power of two >= 16. Partials and the
float32 logsumexp go out per split; ``decode_attention`` merges them.

Layouts: ``q [B, K, Rp, H]`` rows, ``k [P * ps, K, H]``, ``v [P * ps, K, Hv]`` (or the keys' first
``Hv`` channels), scales ``[P * ps, K]``, ``meta [B, 8]`` and ``order [B, nk]`` from the visit plan,
``page_table [B, M]``, row positions and values ``[B, Rp]``, slot values ``[B, nk * bk]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._flash_tile import LOG2E, TileMath

MIN_BLOCK = 16


def _next_power_of_2(n: int) -> int:
    return max(MIN_BLOCK, 1 << max(0, n - 1).bit_length())


def unsupported_reason(cfg) -> str | None:
    """Why the Triton body cannot serve ``cfg`` (None: it can)."""
    if cfg.score_fn is not None:
        return "kernel='triton' does not apply a score_fn yet; kernel='xla' does."
    if cfg.head_dim % MIN_BLOCK:
        return f"kernel='triton' needs H a multiple of {MIN_BLOCK} (the pool is never padded), got H={cfg.head_dim}."
    hv = cfg.value_dim
    if hv < MIN_BLOCK or hv & (hv - 1):
        return f"kernel='triton' needs a power-of-two Hv >= {MIN_BLOCK} (the pool is never padded), got Hv={hv}."
    return None


def head_chunks(head_dim: int) -> tuple[tuple[int, int], ...]:
    """``(offset, size)`` power-of-two pieces of the head dim, largest first (Triton tiles are powers of two).

    MLA's latent keys (``512 + 64``) load as two pieces and their scores add up.

    >>> head_chunks(576), head_chunks(128)
    (((0, 512), (512, 64)), ((0, 128),))
    """
    chunks, offset = [], 0
    for bit in reversed(range(head_dim.bit_length())):
        if head_dim & (1 << bit):
            chunks.append((offset, 1 << bit))
            offset += 1 << bit
    return tuple(chunks)


def _base2_scores(tm: TileMath, s):
    """``log2(e) * softcap(scale * s)``: the scores of :meth:`TileMath.logits` from a raw ``q.k`` tile."""
    if tm.softcap is None:
        return s * (tm.scale * LOG2E)
    return jnp.tanh(s * (tm.scale / tm.softcap)) * (tm.softcap * LOG2E)


def _kernel(meta_ref, order_ref, table_ref, q_ref, qpos_ref, k_ref, v_ref, ks_ref, vs_ref, qv_refs, kvv_refs,
            o_ref, lse_ref, *, cfg, tm: TileMath):  # fmt: skip
    bk, ps, hv = cfg.block_k, cfg.page_size, cfg.value_dim
    length, offset, num_full, num_partial, per_split = (meta_ref[i] for i in range(5))
    first = pl.program_id(2) * per_split
    last = jnp.minimum(first + per_split, num_full + num_partial)
    chunks = head_chunks(cfg.head_dim)
    q = tuple(q_ref[:, pl.ds(off, size)] for off, size in chunks)  # [Rp, H] in power-of-two pieces
    q_pos = qpos_ref[...][:, None]  # [Rp, 1]
    q_vals = tuple(r[...][:, None] for r in qv_refs)
    lanes = jnp.arange(bk, dtype=jnp.int32)

    def dequantize(x, scales_ref, flat):
        if scales_ref is None:
            return x
        return (x.astype(jnp.float32) * scales_ref[flat][:, None]).astype(cfg.compute_dtype)

    def step(i, carry, masked):
        m, denom, acc = carry
        tile = order_ref[i]
        slot = tile * bk + lanes  # [bk] logical slots
        page = table_ref[jnp.minimum(slot // ps, cfg.max_pages - 1)]  # [bk]
        flat = jnp.maximum(page, 0) * ps + slot % ps  # rows of the [P * ps] pool
        dots = [tm.dot_nt(qc, dequantize(k_ref[flat, pl.ds(off, size)], ks_ref, flat))  # [Rp, bk]
                for qc, (off, size) in zip(q, chunks)]  # fmt: skip
        if v_ref is None:  # keys-only cache: the values are the keys' first Hv channels
            v = dequantize(k_ref[flat, pl.ds(0, hv)], ks_ref, flat)
        else:
            v = dequantize(v_ref[flat, :], vs_ref, flat)  # [bk, Hv]
        s2 = _base2_scores(tm, functools.reduce(jnp.add, dots))  # [Rp, bk]
        mask = None
        if masked:
            kv_pos, exists = cfg.slot_position(slot, length, offset)
            mask = (exists & (page >= 0))[None, :]
            if cfg.mask_fn is not None:
                start = pl.multiple_of(tile * bk, bk)
                kv_vals = tuple(r[pl.ds(start, bk)][None, :] for r in kvv_refs)
                mask = mask & cfg.mask_fn(q_pos, kv_pos[None, :], q_vals, kv_vals)
            mask = jnp.broadcast_to(mask, s2.shape)
            # K/V rows no row of the tile sees (unwritten slots, other pages) are zeroed: NaN-safe P @ V.
            v = jnp.where(tm.seen_keys(mask, kv_major=False, reduce_first=True), v, jnp.zeros_like(v))
        return tm.online_softmax(s2, mask, m, denom, acc, v)

    rows = q_ref.shape[0]
    carry = (
        jnp.full((rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((rows, 1), jnp.float32),
        jnp.zeros((rows, hv), jnp.float32),
    )
    carry = lax.fori_loop(first, jnp.minimum(last, num_full), functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(jnp.maximum(first, num_full), last, functools.partial(step, masked=True), carry)
    out, lse = tm.finalize(*carry)
    o_ref[...] = out
    lse_ref[...] = lse.reshape(rows)


def forward(cfg, q_rows, k_flat, v_flat, k_scales, v_scales, plan, arrays, *, interpret: bool = False,
            num_warps: int = 4, num_stages: int = 2):  # fmt: skip
    """``(out [B, K, C, R, Hv], lse [B, K, C, R])`` float32 per split, from ``q_rows [B, K, R, H]``."""
    reason = unsupported_reason(cfg)
    if reason is not None:
        raise ValueError(reason)
    b, kh, rows, h = q_rows.shape
    hv, c, bk = cfg.value_dim, cfg.num_splits, cfg.block_k
    rp = _next_power_of_2(rows)
    slots_padded = max(cfg.num_tiles * bk, cfg.max_pages * cfg.page_size)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rp - rows), (0, 0)))
    per_row = lambda x: jnp.pad(jnp.repeat(x, cfg.group, axis=1), ((0, 0), (0, rp - rows)))  # [B, T] -> [B, Rp]
    q_pos = per_row(arrays["q_positions"])
    q_vals = tuple(per_row(x) for x in arrays["q_vals"])
    kv_vals = tuple(jnp.pad(x, ((0, 0), (0, slots_padded - x.shape[1]))) for x in arrays["kv_vals"])
    pool = k_flat.shape[0]
    per_seq = lambda width: pl.BlockSpec((None, width), lambda b_, h_, c_: (b_, 0))
    scale_spec = lambda x: None if x is None else pl.BlockSpec((pool, None), lambda b_, h_, c_: (0, h_))
    in_specs = [
        per_seq(8),
        per_seq(plan.order.shape[1]),
        per_seq(cfg.max_pages),
        pl.BlockSpec((None, None, rp, h), lambda b_, h_, c_: (b_, h_, 0, 0)),
        per_seq(rp),
        pl.BlockSpec((pool, None, h), lambda b_, h_, c_: (0, h_, 0)),
        None if v_flat is None else pl.BlockSpec((pool, None, hv), lambda b_, h_, c_: (0, h_, 0)),
        scale_spec(k_scales),
        None if v_flat is None else scale_spec(v_scales),
        tuple(per_seq(rp) for _ in q_vals),
        tuple(per_seq(slots_padded) for _ in kv_vals),
    ]
    out_specs = (
        pl.BlockSpec((None, None, None, rp, hv), lambda b_, h_, c_: (b_, h_, c_, 0, 0)),
        pl.BlockSpec((None, None, None, rp), lambda b_, h_, c_: (b_, h_, c_, 0)),
    )
    out_shape = (
        jax.ShapeDtypeStruct((b, kh, c, rp, hv), jnp.float32),
        jax.ShapeDtypeStruct((b, kh, c, rp), jnp.float32),
    )
    tm = TileMath(cfg.scale, cfg.softcap, None, 0, cfg.compute_dtype == jnp.float32)
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg, tm=tm),
        grid=(b, kh, c),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="decode_attention",
    )(plan.meta, plan.order, arrays["page_table"], q_rows, q_pos, k_flat, v_flat, k_scales,
      None if v_flat is None else v_scales, q_vals, kv_vals)  # fmt: skip
    return out[..., :rows, :], lse[..., :rows]
