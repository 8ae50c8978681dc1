"""Hopper (sm90) forward flash kernel in Pallas Mosaic GPU: TMA loads, warpgroup MMAs, warp specialisation.

One CTA computes 128 rows (two *compute* warpgroups of 64 rows each) of one ``(batch, kv head)``
against the key tiles its visit table lists; a third *memory* warpgroup streams those K and V tiles
into a ring of shared-memory slots with the bulk tensor copy engine (TMA). Barriers carry the
hand-offs: ``k_ready/v_ready`` (a TMA landed), ``k_free/v_free`` (both compute warpgroups are done
with a slot, so the memory warpgroup may overwrite it). Scores ``S = Q K^T`` and the update
``acc += P V`` are ``wgmma`` instructions (``P`` from registers, never written to memory), and the
two compute warpgroups alternate through a ``turn`` barrier so that one runs its softmax while the
other's matrix products occupy the tensor cores.

The mask is the library's single mechanism: the CTA's row of the forward visit table
(``_flash_plan``) lists FULL key tiles first, computed without mask arithmetic, then PARTIAL ones,
where ``MaskSpec.fn`` runs on position tiles in the accumulator's register layout; EMPTY tiles are
never loaded. Both compute warpgroups walk the same list (the CTA's), so they stay in lock step.

Scope (the entry point falls back to the Triton body otherwise): bf16/f16, ``H == Hv`` of 64, 128 or
256 after padding to a power of two (96 runs as 128), no additive bias, output in the input dtype;
no score mod, dropout, array mask or per-sequence positions (``scope_reason``). Layouts as in
``_flash_triton``: ``q [B, Rp, K, H]`` rows, ``k/v [B, Sp, K, H]``, ``lse [B, K, Rp]`` float32.
There is no CPU interpreter for this kernel; tests lower it for CUDA.
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._flash_tile import LN2, LOG2E, TileMath

ROWS_PER_WARPGROUP = 64  # the M of one wgmma instruction
COMPUTE_WARPGROUPS = 2
BLOCK_ROWS = ROWS_PER_WARPGROUP * COMPUTE_WARPGROUPS  # rows per CTA: the forward tile of this body
HEAD_DIMS = (64, 128, 256)
DTYPES = (jnp.bfloat16, jnp.float16)

# Register budget per thread after `setmaxnreg`: the compute warpgroups hold the accumulator and the
# score tile, the memory warpgroup only issues copies (2 * 232 + 40 warps' worth fits 64K registers).
_COMPUTE_REGISTERS = 232
_MEMORY_REGISTERS = 40


def unsupported_reason(*, dtype, head_dim: int, value_head_dim: int, has_bias: bool, out_dtype, block_k: int):
    """Why this body cannot run a call (a string), or None when it can."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim not in HEAD_DIMS or value_head_dim != head_dim:
        return f"head dims H={head_dim}, Hv={value_head_dim} (needs H == Hv in {HEAD_DIMS} after padding)"
    if has_bias:
        return "an additive bias"
    if jnp.dtype(out_dtype) != jnp.dtype(dtype):
        return f"out_dtype {jnp.dtype(out_dtype).name} != input dtype {jnp.dtype(dtype).name}"
    if block_k < 64:
        return f"key tile {block_k} < 64"
    return None


def scope_reason(tm: TileMath, plan) -> str | None:
    """What of a call's mask data and tile math the Hopper kernels do not implement (None: nothing).

    Score mods, dropout, array masks and per-sequence positions run in the Triton body.
    """
    if tm.score_fn is not None:
        return "a score mod"
    if tm.dropout_rate > 0.0:
        return "dropout"
    if plan.array is not None:
        return "an array mask"
    if plan.per_sequence:
        return "per-sequence positions"
    return None


def _smem_transforms(dtype):
    """Tile [8, 128 bytes] and swizzle 128 B: the shared-memory layout wgmma reads without bank conflicts."""
    minor = 128 // jnp.dtype(dtype).itemsize
    return (plgpu.TilingTransform((8, minor)), plgpu.SwizzleTransform(128))


# jax <= 0.10 takes the index as a required argument of `plgpu.load`; later versions deprecate it.
_LOAD_NEEDS_INDEX = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty


def _iota(shape, dimension):
    """Indices along ``dimension`` of a tile in the accumulator's register layout."""
    return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _load(ref, layout):
    """A vector load from GMEM into registers laid out as ``layout`` (mask data: a few words per row)."""
    if _LOAD_NEEDS_INDEX:
        return plgpu.load(ref, (), layout=layout, optimized=False)
    return plgpu.load(ref, layout=layout, optimized=False)


def _fwd_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs, o_ref, lse_ref, scratch,
    *, tm: TileMath, num_tiles: int, block_k: int, stages: int, pad_kv: bool, batched_plan: bool,
):  # fmt: skip
    (q_smem, k_smem, v_smem, lse_smem), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scratch
    # Heaviest row tiles first (under a causal mask the last rows visit the most key tiles): the
    # grid's slowest axis walks the row tiles backwards, so the tail of the launch is short work.
    tile = num_tiles - 1 - lax.axis_index("rows")
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    pb = b if batched_plan else 0
    num_full, num_partial = counts_ref[pb, tile, 0], counts_ref[pb, tile, 1]
    num_steps = num_full + num_partial
    dtype = q_smem.dtype
    head_dim = q_smem.shape[-1]

    def kv_rows(step):
        start = pl.multiple_of(order_ref[pb, tile, step] * block_k, block_k)
        return start, pl.ds(start, block_k)

    def take_turn():  # hand the tensor cores to the other compute warpgroup
        plgpu.barrier_arrive(turn)
        plgpu.barrier_wait(turn)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        row0 = tile * BLOCK_ROWS + wg * ROWS_PER_WARPGROUP
        rows = pl.ds(row0, ROWS_PER_WARPGROUP)
        my_q = q_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, q_ready.at[wg])

        row_layout = plgpu.Layout.WGMMA.reduce(1)
        col_layout = plgpu.Layout.WGMMA.reduce(0)
        shape = (ROWS_PER_WARPGROUP, block_k)
        q_pos = q_vals = None
        if tm.mask_fn is not None:  # per-row mask data, loaded once
            q_pos = lax.broadcast_in_dim(_load(qpos_ref.at[rows], row_layout), shape, [0])
            q_vals = tuple(lax.broadcast_in_dim(_load(r.at[b, rows], row_layout), shape, [0]) for r in qv_refs)

        def visible(start):
            """The mask of the PARTIAL tile whose keys start at ``start`` (and ``key < kv_len``)."""
            out = None
            if tm.mask_fn is not None:
                cols = pl.ds(start, block_k)
                kv_pos = lax.broadcast_in_dim(_load(kvpos_ref.at[cols], col_layout), shape, [1])
                kv_vals = tuple(lax.broadcast_in_dim(_load(r.at[b, cols], col_layout), shape, [1]) for r in kvv_refs)
                out = tm.mask_fn(q_pos, kv_pos, q_vals, kv_vals)
            if pad_kv:
                in_range = _iota(shape, 1) + start < tm.kv_len
                out = in_range if out is None else out & in_range
            return out

        def step(t, carry, masked: bool):
            acc, m, denom = carry
            slot = lax.rem(t, stages)
            start, _ = kv_rows(t)
            plgpu.barrier_wait(k_ready.at[slot])

            def scores(acc_ref):
                plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].T)
                take_turn()
                return acc_ref[...]

            s = pl.run_scoped(scores, plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            if tm.softcap is None:
                s2 = s * (tm.scale * LOG2E)
            else:
                s2 = jnp.tanh(s * (tm.scale / tm.softcap)) * (tm.softcap * LOG2E)
            mask = visible(start) if masked else None  # None: nothing to mask (no mask fn, no padded keys)
            if mask is not None:
                s2 = jnp.where(mask, s2, -jnp.inf)
            m_new = jnp.maximum(m, s2.max(axis=1))
            # A row that has seen only masked scores keeps m = -inf; subtract 0 there, not -inf.
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp2(m - m_safe)
            p = jnp.exp2(s2 - lax.broadcast_in_dim(m_safe, shape, [0]))
            denom = denom * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(dtype)
            # Finish the softmax before yielding the turn (the compiler could otherwise sink it past the waits).
            acc, m_new, m_safe, denom, p = lax.optimization_barrier((acc, m_new, m_safe, denom, p))
            plgpu.barrier_arrive(turn)  # softmax done: the other warpgroup may issue its products
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_wait(turn)

            def update(acc_ref):
                acc_ref[...] = acc  # wgmma accumulates onto the registers holding acc
                plgpu.wgmma(acc_ref, p, v_smem.at[slot])
                return acc_ref[...]

            acc = pl.run_scoped(update, plgpu.ACC(acc.shape, jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_safe if masked else m_new, denom

        carry = (
            plgpu.layout_cast(jnp.zeros((ROWS_PER_WARPGROUP, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((ROWS_PER_WARPGROUP,), -jnp.inf, jnp.float32), row_layout),
            plgpu.layout_cast(jnp.zeros((ROWS_PER_WARPGROUP,), jnp.float32), row_layout),
        )
        plgpu.barrier_wait(q_ready.at[wg])
        pl.when(wg == 1)(take_turn)  # warpgroup 0 goes first
        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
        acc, m, denom = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)
        pl.when(wg == 0)(take_turn)  # balance the turns of warpgroup 1's head start

        empty = denom == 0.0  # rows that saw no key: output 0, lse -inf
        inv = 1.0 / jnp.where(empty, 1.0, denom)
        my_q[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)  # Q is no longer needed
        lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(jnp.where(empty, 1.0, denom))) * LN2)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_q, o_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        def fetch(t, slot):
            _, cols = kv_rows(t)
            plgpu.copy_gmem_to_smem(k_ref.at[b, cols, h], k_smem.at[slot], k_ready.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, cols, h], v_smem.at[slot], v_ready.at[slot])

        for t in range(stages):  # fill the ring
            pl.when(t < num_steps)(functools.partial(fetch, t, t))

        @pl.loop(stages, num_steps)
        def _(t):
            slot = lax.rem(t, stages)
            _, cols = kv_rows(t)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, cols, h], k_smem.at[slot], k_ready.at[slot])
            plgpu.barrier_wait(v_free.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, cols, h], v_smem.at[slot], v_ready.at[slot])


def forward(cfg, q, k, v, bias, plan, out_dtype):
    """``out [B, Rp, K, H]`` (``out_dtype`` == ``q.dtype``) and ``lse [B, K, Rp]`` float32."""
    geom = cfg.geom
    block_rows, block_k = geom.fwd
    b, rows, kh, hp = q.shape
    reason = unsupported_reason(
        dtype=q.dtype, head_dim=hp, value_head_dim=v.shape[-1], has_bias=bias is not None, out_dtype=out_dtype,
        block_k=block_k,
    )  # fmt: skip
    if reason is None:
        reason = scope_reason(cfg.tile_math, plan)
    if cfg.interpret_mode:
        reason = "it has no CPU interpreter (its lowering is tested instead)"
    if reason is not None or block_rows != BLOCK_ROWS:
        raise ValueError(f"the Mosaic GPU forward cannot run this call: {reason or f'row tile {block_rows}'}.")
    order, counts = plan.fwd
    stages = cfg.block_sizes.stages_wgmma
    transforms = _smem_transforms(q.dtype)

    scratch_types = (
        (
            plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP, hp), q.dtype, transforms=transforms),
            plgpu.SMEM((stages, block_k, hp), q.dtype, transforms=transforms),
            plgpu.SMEM((stages, block_k, hp), q.dtype, transforms=transforms),
            plgpu.SMEM((COMPUTE_WARPGROUPS, ROWS_PER_WARPGROUP), jnp.float32),
        ),
        (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
        ),
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS),
    )

    kernel = functools.partial(
        _fwd_kernel,
        tm=cfg.tile_math,
        num_tiles=rows // BLOCK_ROWS,
        block_k=block_k,
        stages=stages,
        pad_kv=geom.kv_len < k.shape[1],
        batched_plan=order.shape[0] > 1,
    )
    return launch(
        kernel,
        (order, counts, q, k, v, plan.q_pos[0], plan.kv_pos[0], plan.q_vals, plan.kv_vals),
        scratch_types,
        out_type=(
            jax.ShapeDtypeStruct((b, rows, kh, hp), out_dtype),
            jax.ShapeDtypeStruct((b, kh, rows), jnp.float32),
        ),
        grid=(kh, b, rows // BLOCK_ROWS),  # the first axis varies fastest
        grid_names=("heads", "batch", "rows"),
    )


def launch(kernel, inputs, scratch_types, *, out_type, grid, grid_names):
    """Run ``kernel(*inputs, *outputs, scratch)`` with two compute warpgroups and one memory warpgroup per CTA.

    ``inputs`` may hold tuples (the mask data); ``scratch_types`` are allocated once per CTA and
    shared by its warpgroups (thread axis ``"wg"``).
    """
    flat, tree = jax.tree.flatten(inputs)

    def entry(*refs):  # flat refs -> the kernel's structure, then the scratch buffers and barriers
        ins = jax.tree.unflatten(tree, refs[: len(flat)])
        pl.run_scoped(lambda *scratch: kernel(*ins, *refs[len(flat) :], scratch), *scratch_types, collective_axes="wg")

    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )(*flat)
