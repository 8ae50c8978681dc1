"""GPU (Triton) bodies of the SSD scan: one program per (batch, head), the chunks in a loop inside it.

A program holds its head's state ``h [F, H]`` float32 in registers and walks the sequence chunk by chunk
(``fori_loop``, so Triton pipelines the loads): intra-chunk products as ``[L, L]``/``[L, F]``/``[L, H]``
matmuls, then the state handed to the next chunk. The forward also writes the state before every chunk
(the backward's residual); the backward walks the chunks in reverse carrying ``dh`` and recomputes each
chunk's products from that state.

Layouts (the ``ssd_scan`` canonical ones, head and state dims zero-padded to powers of two >= 16):
``v [B, Tp, N, Hp]``, ``b, c [B, Tp, K, Fp]`` (head ``n`` reads group ``n // G``), per token
``cum, enter, leave [B, N, Tp]`` float32 and ``runs [B, Tp]`` int32, states ``[B, N, Fp, Hp]`` float32
and the chunk states ``[B, N, C, Fp, Hp]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._ssd_chunk import ChunkMath


def _col(x):
    return x[:, None]


def _row(x):
    return x[None, :]


def _chunk_inputs(i, chunk, v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref):
    rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    cum, runs = cum_ref[rows], runs_ref[rows]  # [L], [L]
    return (v_ref[rows, :], b_ref[rows, :], c_ref[rows, :], _col(cum), _row(cum), _col(enter_ref[rows]),
            _col(leave_ref[rows]), _col(runs), _row(runs)), rows  # fmt: skip


def _specs(b, tp, n, hp, fp, group):
    """In-specs of ``v, b, c, cum, enter, leave, runs, h0`` for the grid ``(B, N)``."""
    per_token = pl.BlockSpec((None, None, tp), lambda b_, n_: (b_, n_, 0))
    return [
        pl.BlockSpec((None, tp, None, hp), lambda b_, n_: (b_, 0, n_, 0)),
        pl.BlockSpec((None, tp, None, fp), lambda b_, n_: (b_, 0, n_ // group, 0)),
        pl.BlockSpec((None, tp, None, fp), lambda b_, n_: (b_, 0, n_ // group, 0)),
        per_token,
        per_token,
        per_token,
        pl.BlockSpec((None, tp), lambda b_, n_: (b_, 0)),
        pl.BlockSpec((None, None, fp, hp), lambda b_, n_: (b_, n_, 0, 0)),
    ]


def _fwd_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, h0_ref, y_ref, h_ref, hs_ref, *,
                cm: ChunkMath, num_chunks: int):  # fmt: skip
    def step(i, h):
        inputs, rows = _chunk_inputs(i, cm.chunk, v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref)
        hs_ref[i, :, :] = h
        y, h = cm.forward(*inputs, h)
        y_ref[rows, :] = y.astype(y_ref.dtype)
        return h

    h_ref[...] = lax.fori_loop(0, num_chunks, step, h0_ref[...])


def forward(cm: ChunkMath, v, b, c, cum, enter, leave, runs, h0, *, interpret, num_warps: int = 4):
    """``(y [B, Tp, N, Hp], h [B, N, Fp, Hp], chunk states [B, N, C, Fp, Hp])``; states float32."""
    batch, tp, heads, hp = v.shape
    groups, fp = b.shape[2], b.shape[3]
    num_chunks = tp // cm.chunk
    state = pl.BlockSpec((None, None, fp, hp), lambda b_, n_: (b_, n_, 0, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cm=cm, num_chunks=num_chunks),
        grid=(batch, heads),
        in_specs=_specs(batch, tp, heads, hp, fp, heads // groups),
        out_specs=(
            pl.BlockSpec((None, tp, None, hp), lambda b_, n_: (b_, 0, n_, 0)),
            state,
            pl.BlockSpec((None, None, num_chunks, fp, hp), lambda b_, n_: (b_, n_, 0, 0, 0)),
        ),
        out_shape=(
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            jax.ShapeDtypeStruct((batch, heads, fp, hp), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, fp, hp), jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="ssd_fwd",
    )(v, b, c, cum, enter, leave, runs, h0)


def _bwd_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, hs_ref, dy_ref, dh_ref, dv_ref,
                db_ref, dc_ref, dcum_ref, denter_ref, dleave_ref, dh0_ref, *, cm: ChunkMath,
                num_chunks: int):  # fmt: skip
    def step(j, dh):
        i = num_chunks - 1 - j
        inputs, rows = _chunk_inputs(i, cm.chunk, v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref)
        dy = dy_ref[rows, :].astype(v_ref.dtype)
        dv, db, dc, dcum_col, dcum_row, denter, dleave, dh = cm.backward(*inputs, hs_ref[i, :, :], dy, dh)
        dv_ref[rows, :] = dv.astype(dv_ref.dtype)
        db_ref[rows, :] = db
        dc_ref[rows, :] = dc
        dcum_ref[rows] = dcum_col.reshape(cm.chunk) + dcum_row.reshape(cm.chunk)
        denter_ref[rows] = denter.reshape(cm.chunk)
        dleave_ref[rows] = dleave.reshape(cm.chunk)
        return dh

    dh0_ref[...] = lax.fori_loop(0, num_chunks, step, dh_ref[...])


def backward(cm: ChunkMath, v, b, c, cum, enter, leave, runs, hs, dy, dh, *, interpret, num_warps: int = 4):
    """``dv [B, Tp, N, Hp]`` (float32), ``db, dc [B, Tp, N, Fp]`` per head (the caller sums each group),
    ``dcum, denter, dleave [B, N, Tp]`` and ``dh0 [B, N, Fp, Hp]``, all float32."""
    batch, tp, heads, hp = v.shape
    groups, fp = b.shape[2], b.shape[3]
    num_chunks = tp // cm.chunk
    specs = _specs(batch, tp, heads, hp, fp, heads // groups)
    state = specs[-1]
    per_token = specs[3]
    per_head_f = pl.BlockSpec((None, tp, None, fp), lambda b_, n_: (b_, 0, n_, 0))
    f32 = jnp.float32
    return pl.pallas_call(
        functools.partial(_bwd_kernel, cm=cm, num_chunks=num_chunks),
        grid=(batch, heads),
        in_specs=[
            *specs[:-1],
            pl.BlockSpec((None, None, num_chunks, fp, hp), lambda b_, n_: (b_, n_, 0, 0, 0)),
            specs[0],
            state,
        ],
        out_specs=(specs[0], per_head_f, per_head_f, per_token, per_token, per_token, state),
        out_shape=(
            jax.ShapeDtypeStruct(v.shape, f32),
            jax.ShapeDtypeStruct((batch, tp, heads, fp), f32),
            jax.ShapeDtypeStruct((batch, tp, heads, fp), f32),
            *(jax.ShapeDtypeStruct(cum.shape, f32) for _ in range(3)),
            jax.ShapeDtypeStruct((batch, heads, fp, hp), f32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="ssd_bwd",
    )(v, b, c, cum, enter, leave, runs, hs, dy, dh)
