"""GPU (Triton) bodies of the flash kernels: one program per (row tile, batch, kv head).

Each program keeps its Q (or K/V) tile in registers and loops *inside the kernel* over the tiles
the visit table lists: first the FULL tiles (no mask arithmetic), then the PARTIAL ones (mask
function on index tiles); EMPTY tiles are never loaded. Both loops are ``fori_loop``s with
runtime bounds, which lower to ``scf.for`` and so get Triton's software pipelining
(``num_stages``). Accumulators are float32 and dots ask for a float32 result.

Layouts (see ``flash_attention.py``): ``q/do [B, Rp, K, H]`` (rows), ``k/v [B, Sp, K, H]``
(the caller's own layout: no transpose of K/V), ``bias [Bb, Rp, Kb, Sp]`` and the array mask
``[Bm, Rp, Km, Sp]`` int8, ``lse/delta [B, K, Rp]``, positions ``[Bq, Rp]``/``[Bk, Sp]``, the
per-row query heads and score-mod parameters ``[K, Rp]``, the dropout row seeds ``[B, K, Rp]``.

PARTIAL tiles also zero the K/V rows that no row of the tile sees (a NaN behind the mask stays
out of the products). Score mods and dropout read positions in every tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._flash_tile import TileMath


def _batch_or_zero(n: int):
    return (lambda b: b) if n > 1 else (lambda b: 0)


def _compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _col(x):
    return x[:, None]


def _row(x):
    return x[None, :]


def _q_major_mask(tm: TileMath, q_pos, q_vals, kv_pos, kvv_refs, array_ref, start, block_k, pad_kv, shape):
    """Mask of the q-major tile whose keys start at ``start`` (PARTIAL tiles only)."""
    cols = pl.ds(start, block_k)
    kv_index = _row(start + jnp.arange(block_k, dtype=jnp.int32)) if pad_kv else None
    kv_vals = tuple(_row(r[cols]) for r in kvv_refs)
    array = None if array_ref is None else array_ref[:, cols]
    return tm.visible(q_pos, kv_pos, q_vals, kv_vals, kv_index, shape, array)


def _q_major_specs(plan, table, block_rows: int, hp: int, kv_len: int, hvp: int, bias, params):
    """In-specs shared by the forward and dq kernels (grid ``(row tile, B, K)``), in kernel-argument order."""
    order, _ = table
    tb = _batch_or_zero(order.shape[0])
    tq, tk = _batch_or_zero(plan.q_pos.shape[0]), _batch_or_zero(plan.kv_pos.shape[0])
    per_row = pl.BlockSpec((None, block_rows), lambda i, b_, h: (h, i))  # [K, Rp]
    return [
        pl.BlockSpec((None, None, order.shape[-1]), lambda i, b_, h: (tb(b_), i, 0)),
        pl.BlockSpec((None, None, 2), lambda i, b_, h: (tb(b_), i, 0)),
        pl.BlockSpec((None, block_rows, None, hp), lambda i, b_, h: (b_, i, h, 0)),
        pl.BlockSpec((None, kv_len, None, hp), lambda i, b_, h: (b_, 0, h, 0)),
        pl.BlockSpec((None, kv_len, None, hvp), lambda i, b_, h: (b_, 0, h, 0)),
        _bias_spec(bias, (None, block_rows, None, kv_len), lambda i, b_, h: (i, 0)),
        _bias_spec(plan.array, (None, block_rows, None, kv_len), lambda i, b_, h: (i, 0)),
        pl.BlockSpec((None, block_rows), lambda i, b_, h: (tq(b_), i)),
        pl.BlockSpec((None, kv_len), lambda i, b_, h: (tk(b_), 0)),
        tuple(pl.BlockSpec((None, block_rows), lambda i, b_, h: (b_, i)) for _ in plan.q_vals),
        tuple(pl.BlockSpec((None, kv_len), lambda i, b_, h: (b_, 0)) for _ in plan.kv_vals),
        None if plan.head is None else per_row,
        None if plan.row_seed is None else pl.BlockSpec((None, None, block_rows), lambda i, b_, h: (b_, h, i)),
        tuple(per_row for _ in params),
    ]


def _q_major_inputs(plan, table, q, k, v, bias, params):
    return (*table, q, k, v, bias, plan.array, plan.q_pos, plan.kv_pos, plan.q_vals, plan.kv_vals, plan.head,
            plan.row_seed, tuple(params))  # fmt: skip


def _row_context(head_ref, seed_ref, param_refs):
    """Columns ``[bm, 1]`` every tile of a row block needs for the score mod and dropout:
    ``(query heads, parameters, row seeds)`` (None / empty when the call has no such thing)."""
    head = None if head_ref is None else _col(head_ref[...])
    params = tuple(_col(r[...]) for r in param_refs)
    seed = None if seed_ref is None else _col(seed_ref[...])
    return head, params, seed


def _bias_spec(bias, block_shape, tile_index):
    """BlockSpec of ``bias [Bb, Rp, Kb, Sp]``: broadcast batch/head dims always read index 0."""
    if bias is None:
        return None
    tb, th = _batch_or_zero(bias.shape[0]), _batch_or_zero(bias.shape[2])

    def index(i, b_, h):
        r, c = tile_index(i, b_, h)
        return tb(b_), r, th(h), c

    return pl.BlockSpec(block_shape, index)


# -- forward ---------------------------------------------------------------------------------------


def _fwd_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    head_ref, seed_ref, param_refs, o_ref, lse_ref, *, tm: TileMath, block_k: int, pad_kv: bool,
):  # fmt: skip
    block_rows = q_ref.shape[0]
    q = q_ref[...]  # [bm, H]
    q_pos = _col(qpos_ref[...])  # [bm, 1]
    q_vals = tuple(_col(r[...]) for r in qv_refs)
    head, params, seed = _row_context(head_ref, seed_ref, param_refs)
    batch = pl.program_id(1) if tm.score_fn is not None else None  # read outside the loops

    def step(t, carry, masked):
        m, denom, acc = carry
        start = pl.multiple_of(order_ref[t] * block_k, block_k)
        cols = pl.ds(start, block_k)
        bias = None if bias_ref is None else bias_ref[:, cols]
        kv_pos = _row(kvpos_ref[cols]) if masked or tm.needs_positions else None  # [1, bk]
        mod = tm.score_mod(batch, head, q_pos, kv_pos, params)
        s2, _, _ = tm.logits(q, k_ref[cols, :], bias, mod)  # [bm, bk]
        v = v_ref[cols, :]
        mask = None
        if masked:
            mask = _q_major_mask(tm, q_pos, q_vals, kv_pos, kvv_refs, array_ref, start, block_k, pad_kv, s2.shape)
            if mask is not None:  # keys no row of this tile sees: zero their V rows (NaN-safe P @ V)
                v = jnp.where(tm.seen_keys(mask, kv_major=False, reduce_first=True), v, jnp.zeros_like(v))
        return tm.online_softmax(s2, mask, m, denom, acc, v, tm.keep(seed, kv_pos))

    num_full, num_partial = counts_ref[0], counts_ref[1]
    carry = (
        jnp.full((block_rows, 1), -jnp.inf, jnp.float32),
        jnp.zeros((block_rows, 1), jnp.float32),
        jnp.zeros((block_rows, v_ref.shape[-1]), jnp.float32),
    )
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(num_full, num_full + num_partial, functools.partial(step, masked=True), carry)
    out, lse = tm.finalize(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse.reshape(block_rows)


def forward(cfg, q, k, v, bias, plan, out_dtype, params=()):
    """``out [B, Rp, K, Hv]`` (``out_dtype``) and ``lse [B, K, Rp]`` float32; ``params`` each ``[K, Rp]``."""
    geom, bs = cfg.geom, cfg.block_sizes
    block_rows, block_k = geom.fwd
    b, rows, kh, hp = q.shape
    kv_len, hvp = k.shape[1], v.shape[-1]
    in_specs = _q_major_specs(plan, plan.fwd, block_rows, hp, kv_len, hvp, bias, params)
    out_specs = (
        pl.BlockSpec((None, block_rows, None, hvp), lambda i, b_, h: (b_, i, h, 0)),
        pl.BlockSpec((None, None, block_rows), lambda i, b_, h: (b_, h, i)),
    )
    out_shape = (
        jax.ShapeDtypeStruct((b, rows, kh, hvp), out_dtype),
        jax.ShapeDtypeStruct((b, kh, rows), jnp.float32),
    )
    kernel = functools.partial(_fwd_kernel, tm=cfg.tile_math, block_k=block_k, pad_kv=geom.kv_len < kv_len)
    return pl.pallas_call(
        kernel,
        grid=(rows // block_rows, b, kh),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(bs.warps("fwd", geom.head_dim), bs.num_stages),
        interpret=cfg.interpret,
        name="flash_fwd",
    )(*_q_major_inputs(plan, plan.fwd, q, k, v, bias, params))


# -- backward: dk, dv (kv-major tiles) -------------------------------------------------------------


def _dkv_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, do_ref, lse_ref, delta_ref, qpos_ref,
    kvpos_ref, qv_refs, kvv_refs, head_ref, seed_ref, param_refs, dk_ref, dv_ref, *, tm: TileMath, block_rows: int,
    pad_kv: bool,
):  # fmt: skip
    block_k = k_ref.shape[0]
    k, v = k_ref[...], v_ref[...]  # [bk, H], [bk, Hv]
    kv_pos = _col(kvpos_ref[...])  # [bk, 1]
    kv_vals = tuple(_col(r[...]) for r in kvv_refs)
    kv_index = _col(pl.program_id(0) * block_k + jnp.arange(block_k, dtype=jnp.int32)) if pad_kv else None
    batch = pl.program_id(1) if tm.score_fn is not None else None  # read outside the loops

    def step(t, carry, masked):
        dk, dv = carry
        start = pl.multiple_of(order_ref[t] * block_rows, block_rows)
        rows = pl.ds(start, block_rows)
        q, do = q_ref[rows, :], do_ref[rows, :]
        bias = None if bias_ref is None else bias_ref[rows, :].astype(jnp.float32).T
        q_pos = _row(qpos_ref[rows]) if masked or tm.needs_positions else None  # [1, bm]
        head = None if head_ref is None else _row(head_ref[rows])
        mod = tm.score_mod(batch, head, q_pos, kv_pos, tuple(_row(r[rows]) for r in param_refs))
        kk, vv = k, v
        mask = None
        if masked:
            q_vals = tuple(_row(r[rows]) for r in qv_refs)
            array = None if array_ref is None else array_ref[rows, :].astype(jnp.int32).T
            mask = tm.visible(q_pos, kv_pos, q_vals, kv_vals, kv_index, (block_k, block_rows), array)
            if mask is not None:  # keys no row of this tile sees: zero K/V rows (NaN-safe products)
                seen = tm.seen_keys(mask, kv_major=True)
                kk, vv = jnp.where(seen, k, jnp.zeros_like(k)), jnp.where(seen, v, jnp.zeros_like(v))
        s2, th, vjp = tm.logits(kk, q, bias, mod, pullback="score")  # [bk, bm]
        keep = tm.keep(None if seed_ref is None else _row(seed_ref[rows]), kv_pos)
        dp = tm.dot_nt(vv, do)
        pd, ds, _ = tm.probs_and_grads(s2, th, mask, _row(lse_ref[rows]), dp, _row(delta_ref[rows]), keep, vjp)
        dv = dv + tm.dot_nn(pd.astype(do.dtype), do)
        dk = dk + tm.dot_nn(ds.astype(q.dtype), q)
        return dk, dv

    num_full, num_partial = counts_ref[0], counts_ref[1]
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    dk, dv = lax.fori_loop(num_full, num_full + num_partial, functools.partial(step, masked=True), carry)
    dk_ref[...] = (dk * tm.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype=None, params=()):
    """``dk [B, Sp, K, H]`` and ``dv [B, Sp, K, Hv]`` in ``grad_dtype`` (default: the dtypes of ``k``, ``v``)."""
    geom, bs = cfg.geom, cfg.block_sizes
    block_rows, block_k = geom.dkv
    b, rows, kh, hp = q.shape
    kv_len, hvp = k.shape[1], v.shape[-1]
    order, counts = plan.dkv
    tb = _batch_or_zero(order.shape[0])
    tq, tk = _batch_or_zero(plan.q_pos.shape[0]), _batch_or_zero(plan.kv_pos.shape[0])
    per_row = pl.BlockSpec((None, rows), lambda j, b_, h: (h, 0))  # [K, Rp]
    in_specs = (
        pl.BlockSpec((None, None, order.shape[-1]), lambda j, b_, h: (tb(b_), j, 0)),
        pl.BlockSpec((None, None, 2), lambda j, b_, h: (tb(b_), j, 0)),
        pl.BlockSpec((None, rows, None, hp), lambda j, b_, h: (b_, 0, h, 0)),
        pl.BlockSpec((None, block_k, None, hp), lambda j, b_, h: (b_, j, h, 0)),
        pl.BlockSpec((None, block_k, None, hvp), lambda j, b_, h: (b_, j, h, 0)),
        _bias_spec(bias, (None, rows, None, block_k), lambda j, b_, h: (0, j)),
        _bias_spec(plan.array, (None, rows, None, block_k), lambda j, b_, h: (0, j)),
        pl.BlockSpec((None, rows, None, hvp), lambda j, b_, h: (b_, 0, h, 0)),
        pl.BlockSpec((None, None, rows), lambda j, b_, h: (b_, h, 0)),
        pl.BlockSpec((None, None, rows), lambda j, b_, h: (b_, h, 0)),
        pl.BlockSpec((None, rows), lambda j, b_, h: (tq(b_), 0)),
        pl.BlockSpec((None, block_k), lambda j, b_, h: (tk(b_), j)),
        tuple(pl.BlockSpec((None, rows), lambda j, b_, h: (b_, 0)) for _ in plan.q_vals),
        tuple(pl.BlockSpec((None, block_k), lambda j, b_, h: (b_, j)) for _ in plan.kv_vals),
        None if plan.head is None else per_row,
        None if plan.row_seed is None else pl.BlockSpec((None, None, rows), lambda j, b_, h: (b_, h, 0)),
        tuple(per_row for _ in params),
    )
    out_specs = (
        pl.BlockSpec((None, block_k, None, hp), lambda j, b_, h: (b_, j, h, 0)),
        pl.BlockSpec((None, block_k, None, hvp), lambda j, b_, h: (b_, j, h, 0)),
    )
    kernel = functools.partial(_dkv_kernel, tm=cfg.tile_math, block_rows=block_rows, pad_kv=geom.kv_len < kv_len)
    return pl.pallas_call(
        kernel,
        grid=(kv_len // block_k, b, kh),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=(
            jax.ShapeDtypeStruct(k.shape, grad_dtype or k.dtype),
            jax.ShapeDtypeStruct(v.shape, grad_dtype or v.dtype),
        ),
        compiler_params=_compiler_params(bs.warps("dkv", geom.head_dim), bs.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_bwd_dkv",
    )(order, counts, q, k, v, bias, plan.array, do, lse2, delta, plan.q_pos, plan.kv_pos, plan.q_vals, plan.kv_vals,
      plan.head, plan.row_seed, tuple(params))  # fmt: skip


# -- backward: dq (and dbias) (q-major tiles) ------------------------------------------------------


def _dq_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, bias_ref, array_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    head_ref, seed_ref, param_refs, do_ref, lse_ref, delta_ref, dq_ref, dbias_ref, dparam_refs, *, tm: TileMath,
    block_k: int, pad_kv: bool,
):  # fmt: skip
    q, do = q_ref[...], do_ref[...]  # [bm, H], [bm, Hv]
    lse2, delta = _col(lse_ref[...]), _col(delta_ref[...])  # [bm, 1]
    q_pos = _col(qpos_ref[...])
    q_vals = tuple(_col(r[...]) for r in qv_refs)
    head, params, seed = _row_context(head_ref, seed_ref, param_refs)
    batch = pl.program_id(1) if tm.score_fn is not None else None  # read outside the loops

    def step(t, carry, masked):
        dq, dparams = carry
        start = pl.multiple_of(order_ref[t] * block_k, block_k)
        cols = pl.ds(start, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        bias = None if bias_ref is None else bias_ref[:, cols]
        kv_pos = _row(kvpos_ref[cols]) if masked or tm.needs_positions else None  # [1, bk]
        mod = tm.score_mod(batch, head, q_pos, kv_pos, params)
        mask = None
        if masked:
            shape = (q.shape[0], block_k)
            mask = _q_major_mask(tm, q_pos, q_vals, kv_pos, kvv_refs, array_ref, start, block_k, pad_kv, shape)
            if mask is not None:  # keys no row of this tile sees: zero K/V rows (NaN-safe products)
                seen = tm.seen_keys(mask, kv_major=False, reduce_first=True)
                k, v = jnp.where(seen, k, jnp.zeros_like(k)), jnp.where(seen, v, jnp.zeros_like(v))
        s2, th, vjp = tm.logits(q, k, bias, mod, pullback="params" if params else "score")  # [bm, bk]
        _, ds, dps = tm.probs_and_grads(s2, th, mask, lse2, tm.dot_nt(do, v), delta, tm.keep(seed, kv_pos), vjp)
        if dbias_ref is not None:
            dbias_ref[:, cols] = ds.astype(dbias_ref.dtype)
        if dps is not None:
            dparams = tuple(a + d for a, d in zip(dparams, dps))
        return dq + tm.dot_nn(ds.astype(k.dtype), k), dparams

    num_full, num_partial = counts_ref[0], counts_ref[1]
    carry = jnp.zeros(q.shape, jnp.float32), tuple(jnp.zeros((q.shape[0], 1), jnp.float32) for _ in params)
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    dq, dparams = lax.fori_loop(num_full, num_full + num_partial, functools.partial(step, masked=True), carry)
    dq_ref[...] = (dq * tm.scale).astype(dq_ref.dtype)
    for ref, d in zip(dparam_refs, dparams):
        ref[...] = d.reshape(ref.shape)
    if dbias_ref is not None:  # tiles never visited have zero gradient

        def zero(t, _):
            start = pl.multiple_of(order_ref[t] * block_k, block_k)
            dbias_ref[:, pl.ds(start, block_k)] = jnp.zeros((q.shape[0], block_k), dbias_ref.dtype)
            return _

        lax.fori_loop(num_full + num_partial, order_ref.shape[0], zero, 0)


def backward_dq(cfg, q, k, v, bias, do, lse2, delta, plan, with_dbias: bool, grad_dtype=None, params=()):
    """``dq [B, Rp, K, H]`` (``grad_dtype`` or ``q.dtype``), ``dbias [B, Rp, K, Sp]`` float32 or None, and
    the per-row gradients of the score-mod parameters (each ``[B, K, Rp]`` float32)."""
    geom, bs = cfg.geom, cfg.block_sizes
    block_rows, block_k = geom.dq
    b, rows, kh, hp = q.shape
    kv_len, hvp = k.shape[1], v.shape[-1]
    row_stat = pl.BlockSpec((None, None, block_rows), lambda i, b_, h: (b_, h, i))
    in_specs = [
        *_q_major_specs(plan, plan.dq, block_rows, hp, kv_len, hvp, bias, params),
        pl.BlockSpec((None, block_rows, None, hvp), lambda i, b_, h: (b_, i, h, 0)),
        row_stat,
        row_stat,
    ]
    out_specs = (
        pl.BlockSpec((None, block_rows, None, hp), lambda i, b_, h: (b_, i, h, 0)),
        pl.BlockSpec((None, block_rows, None, kv_len), lambda i, b_, h: (b_, i, h, 0)) if with_dbias else None,
        tuple(row_stat for _ in params),
    )
    out_shape = (
        jax.ShapeDtypeStruct(q.shape, grad_dtype or q.dtype),
        jax.ShapeDtypeStruct((b, rows, kh, kv_len), jnp.float32) if with_dbias else None,
        tuple(jax.ShapeDtypeStruct((b, kh, rows), jnp.float32) for _ in params),
    )
    kernel = functools.partial(_dq_kernel, tm=cfg.tile_math, block_k=block_k, pad_kv=geom.kv_len < kv_len)
    return pl.pallas_call(
        kernel,
        grid=(rows // block_rows, b, kh),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_compiler_params(bs.warps("dq", geom.head_dim), bs.num_stages_bwd),
        interpret=cfg.interpret,
        name="flash_bwd_dq",
    )(*_q_major_inputs(plan, plan.dq, q, k, v, bias, params), do, lse2, delta)
