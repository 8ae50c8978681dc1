"""TPU (Mosaic) bodies of the flash kernels: grid-pipelined, K/V index maps follow the visit list.

The grid is ``(B, K, row tiles, steps)`` (``(B, K, key tiles, steps)`` for dk/dv). Step ``t``
of a row tile computes the tile ``order[t]`` of its visit list (scalar-prefetched into SMEM):
FULL tiles first without mask arithmetic, then PARTIAL ones with the mask; steps past the list
repeat its last index, so Pallas issues no new DMA and the kernel does nothing. The running
statistics and accumulators live in VMEM scratch across the steps (``arbitrary`` axis).

Mosaic wants the last two dims of every block to be (8, 128)-aligned or whole, so per-row data
travels as ``[.., rows, 1]`` columns and per-key data as ``[.., 1, keys]`` rows (transposed for the
kv-major dk/dv kernel), and Q/K/V are head-major ``[B, K, L, H]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._flash_tile import TileMath


def interpret_params():
    """The TPU interpreter (runs the Mosaic body on CPU, simulating VMEM/SMEM and DMAs)."""
    return pltpu.InterpretParams()


def _batch_or_zero(n: int):
    return (lambda b: b) if n > 1 else (lambda b: 0)


def _head_major(x):
    return None if x is None else jnp.swapaxes(x, 1, 2)  # [B, L, K, D] <-> [B, K, L, D]


class _Visits:
    """Index arithmetic on the flattened visit tables (``order [Bm * n * m]``, ``counts [Bm * n * 2]``)."""

    def __init__(self, order, counts):
        self.table_batch, self.num_outer, self.num_inner = order.shape
        self.order = order.reshape(-1)
        self.counts = counts.reshape(-1)
        self._tb = _batch_or_zero(self.table_batch)

    def base(self, b, i):
        return self._tb(b) * self.num_outer + i

    def counts_of(self, counts_ref, b, i):
        base = self.base(b, i)
        return counts_ref[2 * base], counts_ref[2 * base + 1]

    def index(self, order_ref, counts_ref, b, i, t, *, clamp: bool = True):
        """Inner tile visited at step ``t``; clamped to the last visited one past the list."""
        if clamp:
            num_full, num_partial = self.counts_of(counts_ref, b, i)
            t = jnp.minimum(t, jnp.maximum(num_full + num_partial - 1, 0))
        return order_ref[self.base(b, i) * self.num_inner + t]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _full_or_partial(t, num_full, num_partial, compute):
    pl.when(t < num_full)(functools.partial(compute, masked=False))
    pl.when((t >= num_full) & (t < num_full + num_partial))(functools.partial(compute, masked=True))


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _tile_mask(tm: TileMath, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, shape):
    """Mask of a PARTIAL tile from its position and data blocks (either orientation)."""
    q_vals, kv_vals = tuple(r[...] for r in qv_refs), tuple(r[...] for r in kvv_refs)
    return tm.visible(qpos_ref[...], kvpos_ref[...], q_vals, kv_vals, kv_index, shape)


# -- forward ---------------------------------------------------------------------------------------


def _fwd_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs, o_ref, lse_ref,
    m_scr, l_scr, acc_scr, *, tm: TileMath, visits: _Visits, pad_kv: bool,
):  # fmt: skip
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def compute(masked):
        bias = None if bias_ref is None else bias_ref[...]
        s2, _ = tm.logits(q_ref[...], k_ref[...], bias)  # [bm, bk]
        mask = None
        if masked:
            j = visits.index(order_ref, counts_ref, b, i, t)
            kv_index = j * block_k + _iota((1, block_k), 1) if pad_kv else None
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, s2.shape)
        m, denom, acc = tm.online_softmax(s2, mask, m_scr[...], l_scr[...], acc_scr[...], v_ref[...])
        m_scr[...], l_scr[...], acc_scr[...] = m, denom, acc

    _full_or_partial(t, *visits.counts_of(counts_ref, b, i), compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        out, lse = tm.finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _specs_q_major(visits, block_rows, block_k, hp, hvp, bias, n_qv, n_kvv):
    """In-specs shared by the forward and dq kernels (grid ``(B, K, row tile, step)``)."""

    def kv_tile(b, h, i, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, i, t)

    specs = [
        pl.BlockSpec((None, None, block_rows, hp), lambda b, h, i, t, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, block_k, hp), lambda b, h, i, t, *r: (b, h, kv_tile(b, h, i, t, *r), 0)),
        pl.BlockSpec((None, None, block_k, hvp), lambda b, h, i, t, *r: (b, h, kv_tile(b, h, i, t, *r), 0)),
        None,
        pl.BlockSpec((block_rows, 1), lambda b, h, i, t, *_: (i, 0)),
        pl.BlockSpec((1, block_k), lambda b, h, i, t, *r: (0, kv_tile(b, h, i, t, *r))),
        tuple(pl.BlockSpec((None, block_rows, 1), lambda b, h, i, t, *_: (b, i, 0)) for _ in range(n_qv)),
        tuple(
            pl.BlockSpec((None, 1, block_k), lambda b, h, i, t, *r: (b, 0, kv_tile(b, h, i, t, *r)))
            for _ in range(n_kvv)
        ),
    ]
    if bias is not None:
        bb, bh = _batch_or_zero(bias.shape[0]), _batch_or_zero(bias.shape[1])
        specs[3] = pl.BlockSpec(
            (None, None, block_rows, block_k), lambda b, h, i, t, *r: (bb(b), bh(h), i, kv_tile(b, h, i, t, *r))
        )
    return specs


def _mask_arrays(plan):
    """Per-row data as columns ``[.., Rp, 1]`` and per-key data as rows ``[.., 1, Sp]``."""
    return (
        plan.q_pos[:, None],
        plan.kv_pos[None, :],
        tuple(x[:, :, None] for x in plan.q_vals),
        tuple(x[:, None, :] for x in plan.kv_vals),
    )


def forward(cfg, q, k, v, bias, plan, out_dtype):
    """``out [B, Rp, K, Hv]`` (``out_dtype``) and ``lse [B, K, Rp]`` float32."""
    geom = cfg.geom
    block_rows, block_k = geom.fwd
    q, k, v, bias = _head_major(q), _head_major(k), _head_major(v), _head_major(bias)
    b, kh, rows, hp = q.shape
    kv_len, hvp = k.shape[2], v.shape[-1]
    visits = _Visits(*plan.fwd)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, rows // block_rows, kv_len // block_k),
        in_specs=_specs_q_major(visits, block_rows, block_k, hp, hvp, bias, len(plan.q_vals), len(plan.kv_vals)),
        out_specs=(
            pl.BlockSpec((None, None, block_rows, hvp), lambda b, h, i, t, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_rows, 1), lambda b, h, i, t, *_: (b, h, i, 0)),
        ),
        scratch_shapes=(
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, hvp), jnp.float32),
        ),
    )
    kernel = functools.partial(_fwd_kernel, tm=cfg.tile_math, visits=visits, pad_kv=geom.kv_len < kv_len)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct((b, kh, rows, hvp), out_dtype),
            jax.ShapeDtypeStruct((b, kh, rows, 1), jnp.float32),
        ),
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(visits.order, visits.counts, q, k, v, bias, *_mask_arrays(plan))
    return _head_major(out), lse[..., 0]


# -- backward: dq (and dbias) ----------------------------------------------------------------------


def _dq_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs, do_ref, lse_ref,
    delta_ref, dq_ref, dbias_ref, dq_scr, *, tm: TileMath, visits: _Visits, pad_kv: bool,
):  # fmt: skip
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]
    num_full, num_partial = visits.counts_of(counts_ref, b, i)

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        bias = None if bias_ref is None else bias_ref[...]
        s2, th = tm.logits(q, k, bias)  # [bm, bk]
        mask = None
        if masked:
            j = visits.index(order_ref, counts_ref, b, i, t)
            kv_index = j * block_k + _iota((1, block_k), 1) if pad_kv else None
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, s2.shape)
        _, ds = tm.probs_and_grads(s2, th, mask, lse_ref[...], tm.dot_nt(do, v), delta_ref[...])
        dq_scr[...] += tm.dot_nn(ds.astype(k.dtype), k)
        if dbias_ref is not None:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)

    _full_or_partial(t, num_full, num_partial, compute)
    if dbias_ref is not None:  # every tile of the row is written once: zeros where nothing was computed

        @pl.when(t >= num_full + num_partial)
        def _zero():
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * tm.scale).astype(dq_ref.dtype)


def backward_dq(cfg, q, k, v, bias, do, lse2, delta, plan, with_dbias: bool, grad_dtype=None):
    """``dq [B, Rp, K, H]`` (``grad_dtype`` or ``q.dtype``) and ``dbias [B, Rp, K, Sp]`` float32 or None."""
    geom = cfg.geom
    block_rows, block_k = geom.dq
    q, k, v, bias, do = (_head_major(x) for x in (q, k, v, bias, do))
    b, kh, rows, hp = q.shape
    kv_len, hvp = k.shape[2], v.shape[-1]
    visits = _Visits(*plan.dq)

    def dbias_index(b, h, i, t, order_ref, counts_ref):  # unclamped: each step its own tile
        return b, h, i, visits.index(order_ref, counts_ref, b, i, t, clamp=False)

    row_stat = pl.BlockSpec((None, None, block_rows, 1), lambda b, h, i, t, *_: (b, h, i, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, rows // block_rows, kv_len // block_k),
        in_specs=[
            *_specs_q_major(visits, block_rows, block_k, hp, hvp, bias, len(plan.q_vals), len(plan.kv_vals)),
            pl.BlockSpec((None, None, block_rows, hvp), lambda b, h, i, t, *_: (b, h, i, 0)),
            row_stat,
            row_stat,
        ],
        out_specs=(
            pl.BlockSpec((None, None, block_rows, hp), lambda b, h, i, t, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_rows, block_k), dbias_index) if with_dbias else None,
        ),
        scratch_shapes=(pltpu.VMEM((block_rows, hp), jnp.float32),),
    )
    kernel = functools.partial(_dq_kernel, tm=cfg.tile_math, visits=visits, pad_kv=geom.kv_len < kv_len)
    dq, dbias = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows, kv_len), jnp.float32) if with_dbias else None,
        ),
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_bwd_dq",
    )(visits.order, visits.counts, q, k, v, bias, *_mask_arrays(plan), do, lse2[..., None], delta[..., None])
    return _head_major(dq), _head_major(dbias)


# -- backward: dk, dv (kv-major tiles) -------------------------------------------------------------


def _dkv_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs, do_ref, lse_ref,
    delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, tm: TileMath, visits: _Visits, pad_kv: bool,
):  # fmt: skip
    b, j, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(t == 0)
    def _init():
        dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
        dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        bias = None if bias_ref is None else bias_ref[...].astype(jnp.float32).T
        s2, th = tm.logits(k, q, bias)  # [bk, bm]
        mask = None
        if masked:
            kv_index = j * block_k + _iota((block_k, 1), 0) if pad_kv else None
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, s2.shape)
        p, ds = tm.probs_and_grads(s2, th, mask, lse_ref[...], tm.dot_nt(v, do), delta_ref[...])
        dv_scr[...] += tm.dot_nn(p.astype(do.dtype), do)
        dk_scr[...] += tm.dot_nn(ds.astype(q.dtype), q)

    _full_or_partial(t, *visits.counts_of(counts_ref, b, j), compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * tm.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype=None):
    """``dk [B, Sp, K, H]`` and ``dv [B, Sp, K, Hv]`` in ``grad_dtype`` (default: the dtypes of ``k``, ``v``)."""
    geom = cfg.geom
    block_rows, block_k = geom.dkv
    q, k, v, bias, do = (_head_major(x) for x in (q, k, v, bias, do))
    b, kh, rows, hp = q.shape
    kv_len, hvp = k.shape[2], v.shape[-1]
    visits = _Visits(*plan.dkv)

    def row_tile(b, h, j, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, j, t)

    def q_tile(d):
        return pl.BlockSpec((None, None, block_rows, d), lambda b, h, j, t, *r: (b, h, row_tile(b, h, j, t, *r), 0))

    def kv_tile(d):
        return pl.BlockSpec((None, None, block_k, d), lambda b, h, j, t, *_: (b, h, j, 0))

    row_stat = pl.BlockSpec((None, None, 1, block_rows), lambda b, h, j, t, *r: (b, h, 0, row_tile(b, h, j, t, *r)))
    bias_spec = None
    if bias is not None:
        bb, bh = _batch_or_zero(bias.shape[0]), _batch_or_zero(bias.shape[1])
        bias_spec = pl.BlockSpec(
            (None, None, block_rows, block_k), lambda b, h, j, t, *r: (bb(b), bh(h), row_tile(b, h, j, t, *r), j)
        )
    in_specs = [
        q_tile(hp),
        kv_tile(hp),
        kv_tile(hvp),
        bias_spec,
        pl.BlockSpec((1, block_rows), lambda b, h, j, t, *r: (0, row_tile(b, h, j, t, *r))),
        pl.BlockSpec((block_k, 1), lambda b, h, j, t, *_: (j, 0)),
        tuple(
            pl.BlockSpec((None, 1, block_rows), lambda b, h, j, t, *r: (b, 0, row_tile(b, h, j, t, *r)))
            for _ in plan.q_vals
        ),
        tuple(pl.BlockSpec((None, block_k, 1), lambda b, h, j, t, *_: (b, j, 0)) for _ in plan.kv_vals),
        q_tile(hvp),
        row_stat,
        row_stat,
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, kv_len // block_k, rows // block_rows),
        in_specs=in_specs,
        out_specs=(kv_tile(hp), kv_tile(hvp)),
        scratch_shapes=(pltpu.VMEM((block_k, hp), jnp.float32), pltpu.VMEM((block_k, hvp), jnp.float32)),
    )
    kernel = functools.partial(_dkv_kernel, tm=cfg.tile_math, visits=visits, pad_kv=geom.kv_len < kv_len)
    mask_arrays = (
        plan.q_pos[None, :],
        plan.kv_pos[:, None],
        tuple(x[:, None, :] for x in plan.q_vals),
        tuple(x[:, :, None] for x in plan.kv_vals),
    )
    dk, dv = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
            jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype),
        ),
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_bwd_dkv",
    )(visits.order, visits.counts, q, k, v, bias, *mask_arrays, do, lse2[:, :, None, :], delta[:, :, None, :])
    return _head_major(dk), _head_major(dv)
