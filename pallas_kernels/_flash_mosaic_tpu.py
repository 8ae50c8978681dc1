"""TPU (Mosaic) bodies of the flash kernels: grid-pipelined, K/V index maps follow the visit list.

The grid is ``(B, K, row tiles, steps)`` (``(B, K, key tiles, steps)`` for dk/dv). Step ``t``
of a row tile computes the tile ``order[t]`` of its visit list (scalar-prefetched into SMEM):
FULL tiles first without mask arithmetic, then PARTIAL ones with the mask; steps past the list
repeat its last index, so Pallas issues no new DMA and the kernel does nothing. The running
statistics and accumulators live in VMEM scratch across the steps (``arbitrary`` axis).

Mosaic wants the last two dims of every block to be (8, 128)-aligned or whole, so per-row data
travels as ``[.., rows, 1]`` columns and per-key data as ``[.., 1, keys]`` rows (transposed for the
kv-major dk/dv kernel), and Q/K/V are head-major ``[B, K, L, H]``. Positions are ``[Bq, Rp, 1]`` /
``[Bk, 1, Sp]`` (per sequence when ``Bq``/``Bk`` is B), the per-row query heads and score-mod
parameters ``[K, Rp, 1]``, the dropout row seeds ``[B, K, Rp, 1]``.

The array mask (``[Bm, Km, Rp, Sp]`` int8) is read in PARTIAL tiles only: its index map points
FULL steps at the row's first PARTIAL tile, so the pipeline fetches no array tile for them.
PARTIAL tiles also zero the K/V rows that no row of the tile sees (a NaN behind the mask stays
out of the products).
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

    def index(self, order_ref, counts_ref, b, i, t, *, clamp: bool = True, partial_only: bool = False):
        """Inner tile visited at step ``t``; clamped to the last visited one past the list.

        ``partial_only``: FULL steps read the first PARTIAL tile (data only PARTIAL tiles use, such
        as the array mask, then keeps its block index over the FULL steps: no DMA).
        """
        if clamp or partial_only:
            num_full, num_partial = self.counts_of(counts_ref, b, i)
            if partial_only:
                t = jnp.maximum(t, num_full)
            t = jnp.minimum(t, jnp.maximum(num_full + num_partial - 1, 0))
        return order_ref[self.base(b, i) * self.num_inner + t]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def _full_or_partial(t, num_full, num_partial, compute):
    pl.when(t < num_full)(functools.partial(compute, masked=False))
    pl.when((t >= num_full) & (t < num_full + num_partial))(functools.partial(compute, masked=True))


def _iota(shape, dim):
    return lax.broadcasted_iota(jnp.int32, shape, dim)


def _tile_mask(tm: TileMath, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, shape, array=None):
    """Mask of a PARTIAL tile from its position and data blocks (either orientation)."""
    q_vals, kv_vals = tuple(r[...] for r in qv_refs), tuple(r[...] for r in kvv_refs)
    return tm.visible(qpos_ref[...], kvpos_ref[...], q_vals, kv_vals, kv_index, shape, array)


def _read(ref):
    return None if ref is None else ref[...]


def _score_mod(tm: TileMath, batch, head_ref, qpos_ref, kv_pos, param_refs):
    """The score mod of a tile (None without one); q-major or kv-major as the refs' blocks are."""
    if tm.score_fn is None:
        return None
    return tm.score_mod(batch, head_ref[...], qpos_ref[...], kv_pos, tuple(r[...] for r in param_refs))


# -- forward ---------------------------------------------------------------------------------------


def _fwd_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    head_ref, seed_ref, param_refs, o_ref, lse_ref, m_scr, l_scr, acc_scr, *, tm: TileMath, visits: _Visits,
    pad_kv: bool,
):  # fmt: skip
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]

    @pl.when(t == 0)
    def _init():
        m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
        l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
        acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    def compute(masked):
        kv_pos = kvpos_ref[...] if tm.needs_positions else None  # [1, bk]
        mod = _score_mod(tm, b, head_ref, qpos_ref, kv_pos, param_refs)
        s2, _, _ = tm.logits(q_ref[...], k_ref[...], _read(bias_ref), mod)  # [bm, bk]
        v = v_ref[...]
        mask = None
        if masked:
            j = visits.index(order_ref, counts_ref, b, i, t)
            kv_index = j * block_k + _iota((1, block_k), 1) if pad_kv else None
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, s2.shape, _read(array_ref))
            if mask is not None:  # keys no row of this tile sees: zero their V rows (NaN-safe P @ V)
                v = jnp.where(tm.seen_keys(mask, kv_major=False), v, jnp.zeros_like(v))
        keep = tm.keep(_read(seed_ref), kv_pos)
        m, denom, acc = tm.online_softmax(s2, mask, m_scr[...], l_scr[...], acc_scr[...], v, keep)
        m_scr[...], l_scr[...], acc_scr[...] = m, denom, acc

    _full_or_partial(t, *visits.counts_of(counts_ref, b, i), compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        out, lse = tm.finalize(m_scr[...], l_scr[...], acc_scr[...])
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = lse


def _tile_spec(x, block_shape, index):
    """BlockSpec of a head-major ``[Xb, Xk, Rp, Sp]`` tile array (bias, array mask) whose batch/head
    dims may broadcast (size 1), or None; ``index(b, h, grid_i, t, *prefetch) -> (row tile, key tile)``."""
    if x is None:
        return None
    xb, xh = _batch_or_zero(x.shape[0]), _batch_or_zero(x.shape[1])
    return pl.BlockSpec(block_shape, lambda b, h, i, t, *r: (xb(b), xh(h), *index(b, h, i, t, *r)))


def _specs_q_major(visits, block_rows, block_k, hp, hvp, bias, plan, params):
    """In-specs shared by the forward and dq kernels (grid ``(B, K, row tile, step)``)."""

    def kv_tile(b, h, i, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, i, t)

    def partial_kv_tile(b, h, i, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, i, t, partial_only=True)

    tq, tk = _batch_or_zero(plan.q_pos.shape[0]), _batch_or_zero(plan.kv_pos.shape[0])
    per_row = pl.BlockSpec((None, block_rows, 1), lambda b, h, i, t, *_: (h, i, 0))  # [K, Rp, 1]
    row_stat = pl.BlockSpec((None, None, block_rows, 1), lambda b, h, i, t, *_: (b, h, i, 0))  # [B, K, Rp, 1]
    tile = (None, None, block_rows, block_k)
    return [
        pl.BlockSpec((None, None, block_rows, hp), lambda b, h, i, t, *_: (b, h, i, 0)),
        pl.BlockSpec((None, None, block_k, hp), lambda b, h, i, t, *r: (b, h, kv_tile(b, h, i, t, *r), 0)),
        pl.BlockSpec((None, None, block_k, hvp), lambda b, h, i, t, *r: (b, h, kv_tile(b, h, i, t, *r), 0)),
        _tile_spec(bias, tile, lambda b, h, i, t, *r: (i, kv_tile(b, h, i, t, *r))),
        _tile_spec(plan.array, tile, lambda b, h, i, t, *r: (i, partial_kv_tile(b, h, i, t, *r))),
        pl.BlockSpec((None, block_rows, 1), lambda b, h, i, t, *_: (tq(b), i, 0)),
        pl.BlockSpec((None, 1, block_k), lambda b, h, i, t, *r: (tk(b), 0, kv_tile(b, h, i, t, *r))),
        tuple(pl.BlockSpec((None, block_rows, 1), lambda b, h, i, t, *_: (b, i, 0)) for _ in plan.q_vals),
        tuple(
            pl.BlockSpec((None, 1, block_k), lambda b, h, i, t, *r: (b, 0, kv_tile(b, h, i, t, *r)))
            for _ in plan.kv_vals
        ),
        None if plan.head is None else per_row,
        None if plan.row_seed is None else row_stat,
        tuple(per_row for _ in params),
    ]


def _q_major_inputs(plan, q, k, v, bias, params):
    """Positions, data, heads, seeds and parameters as columns ``[.., Rp, 1]`` / rows ``[.., 1, Sp]``."""
    return (
        q, k, v, bias, _head_major(plan.array), plan.q_pos[:, :, None], plan.kv_pos[:, None, :],
        tuple(x[:, :, None] for x in plan.q_vals), tuple(x[:, None, :] for x in plan.kv_vals),
        None if plan.head is None else plan.head[:, :, None],
        None if plan.row_seed is None else plan.row_seed[..., None],
        tuple(x[:, :, None] for x in params),
    )  # fmt: skip


def forward(cfg, q, k, v, bias, plan, out_dtype, params=()):
    """``out [B, Rp, K, Hv]`` (``out_dtype``) and ``lse [B, K, Rp]`` float32; ``params`` each ``[K, Rp]``."""
    geom = cfg.geom
    block_rows, block_k = geom.fwd
    q, k, v, bias = _head_major(q), _head_major(k), _head_major(v), _head_major(bias)
    b, kh, rows, hp = q.shape
    kv_len, hvp = k.shape[2], v.shape[-1]
    visits = _Visits(*plan.fwd)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, kh, rows // block_rows, kv_len // block_k),
        in_specs=_specs_q_major(visits, block_rows, block_k, hp, hvp, bias, plan, params),
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
    )(visits.order, visits.counts, *_q_major_inputs(plan, q, k, v, bias, params))
    return _head_major(out), lse[..., 0]


# -- backward: dq (and dbias) ----------------------------------------------------------------------


def _dq_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    head_ref, seed_ref, param_refs, do_ref, lse_ref, delta_ref, dq_ref, dbias_ref, dparam_refs, dq_scr, *,
    tm: TileMath, visits: _Visits, pad_kv: bool,
):  # fmt: skip
    b, i, t = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    block_k = k_ref.shape[0]
    num_full, num_partial = visits.counts_of(counts_ref, b, i)

    @pl.when(t == 0)
    def _init():
        dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)
        for ref in dparam_refs:  # the parameter gradients accumulate in their resident output blocks
            ref[...] = jnp.zeros(ref.shape, ref.dtype)

    def compute(masked):
        q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        kv_pos = kvpos_ref[...] if tm.needs_positions else None  # [1, bk]
        mod = _score_mod(tm, b, head_ref, qpos_ref, kv_pos, param_refs)
        mask = None
        if masked:
            j = visits.index(order_ref, counts_ref, b, i, t)
            kv_index = j * block_k + _iota((1, block_k), 1) if pad_kv else None
            shape = (q.shape[0], block_k)
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, shape, _read(array_ref))
            if mask is not None:  # keys no row of this tile sees: zero their K/V rows (NaN-safe products)
                seen = tm.seen_keys(mask, kv_major=False)
                k, v = jnp.where(seen, k, jnp.zeros_like(k)), jnp.where(seen, v, jnp.zeros_like(v))
        s2, th, vjp = tm.logits(q, k, _read(bias_ref), mod, pullback="params" if param_refs else "score")
        keep = tm.keep(_read(seed_ref), kv_pos)
        _, ds, dparams = tm.probs_and_grads(s2, th, mask, lse_ref[...], tm.dot_nt(do, v), delta_ref[...], keep, vjp)
        dq_scr[...] += tm.dot_nn(ds.astype(k.dtype), k)
        if dbias_ref is not None:
            dbias_ref[...] = ds.astype(dbias_ref.dtype)
        for ref, d in zip(dparam_refs, dparams or ()):
            ref[...] += d

    _full_or_partial(t, num_full, num_partial, compute)
    if dbias_ref is not None:  # every tile of the row is written once: zeros where nothing was computed

        @pl.when(t >= num_full + num_partial)
        def _zero():
            dbias_ref[...] = jnp.zeros(dbias_ref.shape, dbias_ref.dtype)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scr[...] * tm.scale).astype(dq_ref.dtype)


def backward_dq(cfg, q, k, v, bias, do, lse2, delta, plan, with_dbias: bool, grad_dtype=None, params=()):
    """``dq [B, Rp, K, H]`` (``grad_dtype`` or ``q.dtype``), ``dbias [B, Rp, K, Sp]`` float32 or None, and
    the per-row gradients of the score-mod parameters (each ``[B, K, Rp]`` float32)."""
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
            *_specs_q_major(visits, block_rows, block_k, hp, hvp, bias, plan, params),
            pl.BlockSpec((None, None, block_rows, hvp), lambda b, h, i, t, *_: (b, h, i, 0)),
            row_stat,
            row_stat,
        ],
        out_specs=(
            pl.BlockSpec((None, None, block_rows, hp), lambda b, h, i, t, *_: (b, h, i, 0)),
            pl.BlockSpec((None, None, block_rows, block_k), dbias_index) if with_dbias else None,
            tuple(row_stat for _ in params),
        ),
        scratch_shapes=(pltpu.VMEM((block_rows, hp), jnp.float32),),
    )
    kernel = functools.partial(_dq_kernel, tm=cfg.tile_math, visits=visits, pad_kv=geom.kv_len < kv_len)
    dq, dbias, dparams = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=(
            jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
            jax.ShapeDtypeStruct((b, kh, rows, kv_len), jnp.float32) if with_dbias else None,
            tuple(jax.ShapeDtypeStruct((b, kh, rows, 1), jnp.float32) for _ in params),
        ),
        compiler_params=_compiler_params(),
        interpret=cfg.interpret,
        name="flash_bwd_dq",
    )(
        visits.order, visits.counts, *_q_major_inputs(plan, q, k, v, bias, params), do, lse2[..., None],
        delta[..., None],
    )  # fmt: skip
    return _head_major(dq), _head_major(dbias), tuple(d[..., 0] for d in dparams)


# -- backward: dk, dv (kv-major tiles) -------------------------------------------------------------


def _dkv_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    head_ref, seed_ref, param_refs, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_scr, dv_scr, *, tm: TileMath,
    visits: _Visits, pad_kv: bool,
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
        kv_pos = kvpos_ref[...] if tm.needs_positions else None  # [bk, 1]
        mod = _score_mod(tm, b, head_ref, qpos_ref, kv_pos, param_refs)
        mask = None
        if masked:
            kv_index = j * block_k + _iota((block_k, 1), 0) if pad_kv else None
            array = None if array_ref is None else array_ref[...].astype(jnp.int32).T
            mask = _tile_mask(tm, qpos_ref, kvpos_ref, qv_refs, kvv_refs, kv_index, (block_k, q.shape[0]), array)
            if mask is not None:  # keys no row of this tile sees: zero their K/V rows (NaN-safe products)
                seen = tm.seen_keys(mask, kv_major=True)
                k, v = jnp.where(seen, k, jnp.zeros_like(k)), jnp.where(seen, v, jnp.zeros_like(v))
        s2, th, vjp = tm.logits(k, q, bias, mod, pullback="score")  # [bk, bm]
        keep = tm.keep(_read(seed_ref), kv_pos)
        pd, ds, _ = tm.probs_and_grads(s2, th, mask, lse_ref[...], tm.dot_nt(v, do), delta_ref[...], keep, vjp)
        dv_scr[...] += tm.dot_nn(pd.astype(do.dtype), do)
        dk_scr[...] += tm.dot_nn(ds.astype(q.dtype), q)

    _full_or_partial(t, *visits.counts_of(counts_ref, b, j), compute)

    @pl.when(t == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = (dk_scr[...] * tm.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype=None, params=()):
    """``dk [B, Sp, K, H]`` and ``dv [B, Sp, K, Hv]`` in ``grad_dtype`` (default: the dtypes of ``k``, ``v``)."""
    geom = cfg.geom
    block_rows, block_k = geom.dkv
    q, k, v, bias, do = (_head_major(x) for x in (q, k, v, bias, do))
    b, kh, rows, hp = q.shape
    kv_len, hvp = k.shape[2], v.shape[-1]
    visits = _Visits(*plan.dkv)

    def row_tile(b, h, j, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, j, t)

    def partial_row_tile(b, h, j, t, order_ref, counts_ref):
        return visits.index(order_ref, counts_ref, b, j, t, partial_only=True)

    def q_tile(d):
        return pl.BlockSpec((None, None, block_rows, d), lambda b, h, j, t, *r: (b, h, row_tile(b, h, j, t, *r), 0))

    def kv_tile(d):
        return pl.BlockSpec((None, None, block_k, d), lambda b, h, j, t, *_: (b, h, j, 0))

    row_stat = pl.BlockSpec((None, None, 1, block_rows), lambda b, h, j, t, *r: (b, h, 0, row_tile(b, h, j, t, *r)))
    per_row = pl.BlockSpec((None, 1, block_rows), lambda b, h, j, t, *r: (h, 0, row_tile(b, h, j, t, *r)))
    tile = (None, None, block_rows, block_k)
    tq, tk = _batch_or_zero(plan.q_pos.shape[0]), _batch_or_zero(plan.kv_pos.shape[0])
    in_specs = [
        q_tile(hp),
        kv_tile(hp),
        kv_tile(hvp),
        _tile_spec(bias, tile, lambda b, h, j, t, *r: (row_tile(b, h, j, t, *r), j)),
        _tile_spec(plan.array, tile, lambda b, h, j, t, *r: (partial_row_tile(b, h, j, t, *r), j)),
        pl.BlockSpec((None, 1, block_rows), lambda b, h, j, t, *r: (tq(b), 0, row_tile(b, h, j, t, *r))),
        pl.BlockSpec((None, block_k, 1), lambda b, h, j, t, *_: (tk(b), j, 0)),
        tuple(
            pl.BlockSpec((None, 1, block_rows), lambda b, h, j, t, *r: (b, 0, row_tile(b, h, j, t, *r)))
            for _ in plan.q_vals
        ),
        tuple(pl.BlockSpec((None, block_k, 1), lambda b, h, j, t, *_: (b, j, 0)) for _ in plan.kv_vals),
        None if plan.head is None else per_row,
        None if plan.row_seed is None else row_stat,
        tuple(per_row for _ in params),
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
    mask_arrays = (  # kv-major: per-row data as rows [.., 1, Rp], per-key data as columns [.., Sp, 1]
        _head_major(plan.array),
        plan.q_pos[:, None, :],
        plan.kv_pos[:, :, None],
        tuple(x[:, None, :] for x in plan.q_vals),
        tuple(x[:, :, None] for x in plan.kv_vals),
        None if plan.head is None else plan.head[:, None, :],
        None if plan.row_seed is None else plan.row_seed[:, :, None, :],
        tuple(x[:, None, :] for x in params),
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
