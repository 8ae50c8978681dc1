"""Hopper (sm90) dK/dV kernel in Pallas Mosaic GPU: the backward's larger half, on warpgroup MMAs.

One CTA owns 128 keys (two compute warpgroups of 64 keys each, K and V resident in shared memory)
of one ``(batch, kv head)`` and walks the row tiles its column of the backward visit table lists
(FULL first, then PARTIAL with ``MaskSpec.fn``; EMPTY tiles never loaded). A memory warpgroup
streams ``Q``, ``dO`` and the per-row statistics ``lse2``/``delta`` of each row tile into a ring
of shared-memory slots (TMA), which both compute warpgroups read. Per row tile, in the transposed
(kv-major) orientation, with ``p``/``ds`` kept in registers::

    S^T = K Q^T,  dP^T = V dO^T          (wgmma, shared-memory operands)
    P^T = exp2(S^T - lse2),  dS^T = P^T * (dP^T - delta)
    dV += P^T dO,  dK += dS^T Q           (wgmma, register A operands)

Rows of a group (GQA) are interleaved in the row layout, so dK/dV sum over the group for free.
dQ stays with the Triton kernel. Scope as the forward's (bf16/f16, no bias, gradients in the input
dtype), and H == Hv <= 128: two float32 ``[64, H]`` accumulators per warpgroup must fit in registers.
Like the forward it has no CPU interpreter; tests lower it for CUDA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._flash_mosaic_gpu_sm90 import (
    _COMPUTE_REGISTERS,
    _MEMORY_REGISTERS,
    DTYPES,
    _iota,
    _load,
    _smem_transforms,
    launch,
    scope_reason,
)
from pallas_kernels._flash_tile import LOG2E, TileMath

KEYS_PER_WARPGROUP = 64  # the M of one wgmma instruction
COMPUTE_WARPGROUPS = 2
BLOCK_KEYS = KEYS_PER_WARPGROUP * COMPUTE_WARPGROUPS  # keys per CTA: the dK/dV tile of this body
HEAD_DIMS = (64, 128)


def unsupported_reason(*, dtype, head_dim: int, value_head_dim: int, has_bias: bool, grad_dtype, block_rows: int):
    """Why this kernel cannot compute a call's dK/dV (a string), or None when it can."""
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if head_dim not in HEAD_DIMS or value_head_dim != head_dim:
        return f"head dims H={head_dim}, Hv={value_head_dim} (needs H == Hv in {HEAD_DIMS} after padding)"
    if has_bias:
        return "an additive bias"
    if grad_dtype is not None and jnp.dtype(grad_dtype) != jnp.dtype(dtype):
        return f"grad_dtype {jnp.dtype(grad_dtype).name} != input dtype {jnp.dtype(dtype).name}"
    if block_rows < 64:
        return f"row tile {block_rows} < 64"
    return None


def _dkv_kernel(
    order_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kvpos_ref, qv_refs, kvv_refs,
    dk_ref, dv_ref, scratch,
    *, tm: TileMath, block_rows: int, stages: int, pad_kv: bool, batched_plan: bool,
):  # fmt: skip
    smem, ready, free, kv_ready = scratch
    q_smem, do_smem, lse_smem, delta_smem, k_smem, v_smem = smem
    q_ready, do_ready, lse_ready, delta_ready = ready
    q_free, do_free = free
    tile = lax.axis_index("keys")
    b, h = lax.axis_index("batch"), lax.axis_index("heads")
    wg = lax.axis_index("wg")
    pb = b if batched_plan else 0
    num_full, num_partial = counts_ref[pb, tile, 0], counts_ref[pb, tile, 1]
    num_steps = num_full + num_partial
    dtype = q_smem.dtype
    head_dim = q_smem.shape[-1]

    def row_block(step):
        start = pl.multiple_of(order_ref[pb, tile, step] * block_rows, block_rows)
        return start, pl.ds(start, block_rows)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
        key0 = tile * BLOCK_KEYS + wg * KEYS_PER_WARPGROUP
        keys = pl.ds(key0, KEYS_PER_WARPGROUP)
        my_k, my_v = k_smem.at[wg], v_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], my_k, kv_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], my_v, kv_ready.at[COMPUTE_WARPGROUPS + wg])

        key_layout = plgpu.Layout.WGMMA.reduce(1)  # one value per tile row (a key)
        row_layout = plgpu.Layout.WGMMA.reduce(0)  # one value per tile column (a query row)
        shape = (KEYS_PER_WARPGROUP, block_rows)
        kv_pos = kv_vals = None
        if tm.mask_fn is not None:  # per-key mask data, loaded once
            kv_pos = lax.broadcast_in_dim(_load(kvpos_ref.at[keys], key_layout), shape, [0])
            kv_vals = tuple(lax.broadcast_in_dim(_load(r.at[b, keys], key_layout), shape, [0]) for r in kvv_refs)

        def visible(start):
            """The mask of the PARTIAL tile whose rows start at ``start`` (and ``key < kv_len``)."""
            out = None
            if tm.mask_fn is not None:
                cols = pl.ds(start, block_rows)
                q_pos = lax.broadcast_in_dim(_load(qpos_ref.at[cols], row_layout), shape, [1])
                q_vals = tuple(lax.broadcast_in_dim(_load(r.at[b, cols], row_layout), shape, [1]) for r in qv_refs)
                out = tm.mask_fn(q_pos, kv_pos, q_vals, kv_vals)
            if pad_kv:
                in_range = _iota(shape, 0) + key0 < tm.kv_len
                out = in_range if out is None else out & in_range
            return out

        def by_row(ref):  # a per-row statistic [rows] broadcast along the keys
            return lax.broadcast_in_dim(_load(ref, row_layout), shape, [1])

        def step(t, carry, masked: bool):
            dk, dv = carry
            slot = lax.rem(t, stages)
            start, _ = row_block(t)
            plgpu.barrier_wait(q_ready.at[slot])
            plgpu.barrier_wait(do_ready.at[slot])

            def transposed_scores(s_ref, dp_ref):
                plgpu.wgmma(s_ref, my_k, q_smem.at[slot].T)
                plgpu.wgmma(dp_ref, my_v, do_smem.at[slot].T)
                return s_ref[...], dp_ref[...]

            s, dp = pl.run_scoped(transposed_scores, plgpu.ACC(shape, jnp.float32), plgpu.ACC(shape, jnp.float32))
            plgpu.barrier_wait(lse_ready.at[slot])
            plgpu.barrier_wait(delta_ready.at[slot])
            lse2, delta = by_row(lse_smem.at[slot]), by_row(delta_smem.at[slot])
            if tm.softcap is None:
                s2, th = s * (tm.scale * LOG2E), None
            else:
                th = jnp.tanh(s * (tm.scale / tm.softcap))
                s2 = th * (tm.softcap * LOG2E)
            mask = visible(start) if masked else None
            if mask is not None:
                s2 = jnp.where(mask, s2, -jnp.inf)
            p = jnp.exp2(s2 - lse2)  # rows that see nothing carry lse2 = +inf: p = 0
            ds = p * (dp - delta)
            if th is not None:
                ds = ds * (1.0 - th * th)
            if mask is not None:  # exact zeros where masked: a NaN in a K/V row nobody sees stays out of dK
                ds = jnp.where(mask, ds, 0.0)

            def accumulate(dk_ref, dv_ref):
                dv_ref[...] = dv
                dk_ref[...] = dk
                plgpu.wgmma(dv_ref, p.astype(dtype), do_smem.at[slot])
                plgpu.wgmma(dk_ref, ds.astype(dtype), q_smem.at[slot])
                return dk_ref[...], dv_ref[...]

            dk, dv = pl.run_scoped(accumulate, plgpu.ACC(dk.shape, jnp.float32), plgpu.ACC(dv.shape, jnp.float32))
            plgpu.barrier_arrive(q_free.at[slot])  # both products have read Q, dO and the statistics
            plgpu.barrier_arrive(do_free.at[slot])
            return dk, dv

        zeros = plgpu.layout_cast(jnp.zeros((KEYS_PER_WARPGROUP, head_dim), jnp.float32), plgpu.Layout.WGMMA)
        plgpu.barrier_wait(kv_ready.at[wg])
        plgpu.barrier_wait(kv_ready.at[COMPUTE_WARPGROUPS + wg])
        carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), (zeros, zeros))
        dk, dv = lax.fori_loop(num_full, num_steps, functools.partial(step, masked=True), carry)
        my_k[...] = (dk * tm.scale).astype(dtype)  # K and V are no longer needed: stage the results there
        my_v[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(my_k, dk_ref.at[b, keys, h])
        plgpu.copy_smem_to_gmem(my_v, dv_ref.at[b, keys, h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        def fetch(t, slot):
            _, rows = row_block(t)
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_ready.at[slot])
            plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_ready.at[slot])
            plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot], delta_ready.at[slot])

        for t in range(stages):  # fill the ring
            pl.when(t < num_steps)(functools.partial(fetch, t, t))

        @pl.loop(stages, num_steps)
        def _(t):
            slot = lax.rem(t, stages)
            plgpu.barrier_wait(q_free.at[slot])
            plgpu.barrier_wait(do_free.at[slot])
            fetch(t, slot)


def backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype=None):
    """``dk [B, Sp, K, H]`` and ``dv [B, Sp, K, H]`` in the input dtype (layouts of ``_flash_triton``)."""
    geom = cfg.geom
    block_rows, block_k = geom.dkv
    b, rows, kh, hp = q.shape
    kv_len = k.shape[1]
    reason = unsupported_reason(
        dtype=q.dtype, head_dim=hp, value_head_dim=v.shape[-1], has_bias=bias is not None, grad_dtype=grad_dtype,
        block_rows=block_rows,
    )  # fmt: skip
    if reason is None:
        reason = scope_reason(cfg.tile_math, plan)
    if cfg.interpret_mode:
        reason = "it has no CPU interpreter (its lowering is tested instead)"
    if reason is not None or block_k != BLOCK_KEYS:
        raise ValueError(f"the Mosaic GPU dK/dV kernel cannot run this call: {reason or f'key tile {block_k}'}.")
    order, counts = plan.dkv
    stages = cfg.block_sizes.stages_wgmma
    transforms = _smem_transforms(q.dtype)
    scratch_types = (
        (
            plgpu.SMEM((stages, block_rows, hp), q.dtype, transforms=transforms),  # Q
            plgpu.SMEM((stages, block_rows, hp), q.dtype, transforms=transforms),  # dO
            plgpu.SMEM((stages, block_rows), jnp.float32),  # lse2
            plgpu.SMEM((stages, block_rows), jnp.float32),  # delta
            plgpu.SMEM((COMPUTE_WARPGROUPS, KEYS_PER_WARPGROUP, hp), q.dtype, transforms=transforms),  # K, then dK
            plgpu.SMEM((COMPUTE_WARPGROUPS, KEYS_PER_WARPGROUP, hp), q.dtype, transforms=transforms),  # V, then dV
        ),
        tuple(plgpu.Barrier(num_barriers=stages) for _ in range(4)),  # Q, dO, lse2, delta landed
        (plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages),) * 2,  # Q, dO slots free
        plgpu.Barrier(num_barriers=2 * COMPUTE_WARPGROUPS),  # each warpgroup's K and V landed
    )
    kernel = functools.partial(
        _dkv_kernel,
        tm=cfg.tile_math,
        block_rows=block_rows,
        stages=stages,
        pad_kv=geom.kv_len < kv_len,
        batched_plan=order.shape[0] > 1,
    )
    return launch(
        kernel,
        (order, counts, q, k, v, do, lse2, delta, plan.q_pos[0], plan.kv_pos[0], plan.q_vals, plan.kv_vals),
        scratch_types,
        out_type=(jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)),
        grid=(kh, b, kv_len // BLOCK_KEYS),
        grid_names=("heads", "batch", "keys"),
    )
