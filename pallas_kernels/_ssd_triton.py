"""GPU (Triton) bodies of the SSD scan, in two schedules.

``"fused"`` (:func:`forward`, :func:`backward`): one program per (batch, head) holds its head's state
``h [F, H]`` float32 in registers and walks the sequence chunk by chunk (``fori_loop``, so Triton pipelines
the loads): intra-chunk products as ``[L, L]``/``[L, F]``/``[L, H]`` matmuls, then the state handed to the
next chunk. The forward also writes the state before every chunk (the backward's residual); the backward
walks the chunks in reverse carrying ``dh`` and recomputes each chunk's products from that state.

``"chunks"`` (:func:`forward_chunks`, :func:`backward_chunks`): the same math in three launches each way,
the matmuls in programs per (batch, head, chunk) and, between them, a program per (batch, head) that only
carries the ``[F, H]`` states across the chunks (elementwise), so that a short batch still fills the GPU.

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

CARRY_ROWS = 16  # state rows per program of the chunk-parallel schedule's carry


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


# -- the chunk-parallel schedule: one program per (batch, head, chunk) -------------------------------


def _chunk_specs(cm: ChunkMath, hp: int, fp: int, group: int):
    """In-specs of one chunk of ``v, b, c, cum, enter, leave, runs`` for the grid ``(B, N, C)``."""
    L = cm.chunk
    per_token = pl.BlockSpec((None, None, L), lambda b_, n_, i: (b_, n_, i))
    return [
        pl.BlockSpec((None, L, None, hp), lambda b_, n_, i: (b_, i, n_, 0)),
        pl.BlockSpec((None, L, None, fp), lambda b_, n_, i: (b_, i, n_ // group, 0)),
        pl.BlockSpec((None, L, None, fp), lambda b_, n_, i: (b_, i, n_ // group, 0)),
        per_token,
        per_token,
        per_token,
        pl.BlockSpec((None, L), lambda b_, n_, i: (b_, i)),
    ]


def _chunk_state_spec(fp: int, hp: int):
    return pl.BlockSpec((None, None, None, fp, hp), lambda b_, n_, i: (b_, n_, i, 0, 0))


def _chunk_values(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref):
    cum, runs = cum_ref[...], runs_ref[...]
    return (v_ref[...], b_ref[...], c_ref[...], _col(cum), _row(cum), _col(enter_ref[...]), _col(leave_ref[...]),
            _col(runs), _row(runs))  # fmt: skip


def _per_chunk_call(kernel, cm, v, b, num_warps, interpret, name, extra_specs, out_specs, out_shape):
    batch, tp, heads, hp = v.shape
    groups, fp = b.shape[2], b.shape[3]
    return pl.pallas_call(
        functools.partial(kernel, cm=cm),
        grid=(batch, heads, tp // cm.chunk),
        in_specs=[*_chunk_specs(cm, hp, fp, heads // groups), *extra_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name=name,
    )


def _own_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, own_ref, *, cm: ChunkMath):
    own_ref[...] = cm.own_state(v_ref[...], b_ref[...], _col(leave_ref[...]))


def _carry_kernel(p_ref, u_ref, h0_ref, hs_ref, h_ref, *, num_chunks: int, reverse: bool):
    def step(j, h):
        i = num_chunks - 1 - j if reverse else j
        hs_ref[i, :, :] = h
        return p_ref[i] * h + u_ref[i, :, :]

    h_ref[...] = lax.fori_loop(0, num_chunks, step, h0_ref[...])


def _carry(p, u, h0, *, reverse: bool, interpret, num_warps: int):
    """``h_i = p_i h_{i-1} + u_i`` over the chunks (in reverse order if ``reverse``) from ``h0``: ``(the h each
    chunk starts from [B, N, C, Fp, Hp], the last h [B, N, Fp, Hp])``. Elementwise, so the state's rows split
    into programs of ``CARRY_ROWS`` (more programs stream the states than there are (batch, head) pairs)."""
    batch, heads, num_chunks, fp, hp = u.shape
    rows = min(fp, CARRY_ROWS)
    state = pl.BlockSpec((None, None, rows, hp), lambda b_, n_, j: (b_, n_, j, 0))
    states = pl.BlockSpec((None, None, num_chunks, rows, hp), lambda b_, n_, j: (b_, n_, 0, j, 0))
    return pl.pallas_call(
        functools.partial(_carry_kernel, num_chunks=num_chunks, reverse=reverse),
        grid=(batch, heads, fp // rows),
        in_specs=[pl.BlockSpec((None, None, num_chunks), lambda b_, n_, j: (b_, n_, 0)), states, state],
        out_specs=(states, state),
        out_shape=(jax.ShapeDtypeStruct(u.shape, jnp.float32), jax.ShapeDtypeStruct(h0.shape, jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="ssd_carry_reverse" if reverse else "ssd_carry",
    )(p, u, h0)


def _passes(cm: ChunkMath, enter):
    """``[B, N, C]``: the factor with which each chunk passes the state on (its last token's ``enter``)."""
    batch, heads, tp = enter.shape
    return enter.reshape(batch, heads, tp // cm.chunk, cm.chunk)[..., -1]


def _out_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, hs_ref, y_ref, *, cm: ChunkMath):
    v, b, c, cum_col, cum_row, enter, _, runs_col, runs_row = _chunk_values(
        v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref
    )
    y_ref[...] = cm.output(v, b, c, cum_col, cum_row, enter, runs_col, runs_row, hs_ref[...]).astype(y_ref.dtype)


def forward_chunks(cm: ChunkMath, v, b, c, cum, enter, leave, runs, h0, *, interpret, num_warps: int = 4):
    """As :func:`forward`, in three launches parallel over chunks but the second: each chunk's own state,
    the carry of states across chunks (one program per batch row and head), each chunk's output."""
    batch, tp, heads, hp = v.shape
    fp = b.shape[3]
    num_chunks = tp // cm.chunk
    chunk_state = _chunk_state_spec(fp, hp)
    states = jax.ShapeDtypeStruct((batch, heads, num_chunks, fp, hp), jnp.float32)
    args = (v, b, c, cum, enter, leave, runs)
    own = _per_chunk_call(_own_kernel, cm, v, b, num_warps, interpret, "ssd_own_states", [], chunk_state, states)(*args)
    hs, h = _carry(_passes(cm, enter), own, h0, reverse=False, interpret=interpret, num_warps=num_warps)
    y_spec = pl.BlockSpec((None, cm.chunk, None, hp), lambda b_, n_, i: (b_, i, n_, 0))
    y = _per_chunk_call(_out_kernel, cm, v, b, num_warps, interpret, "ssd_output", [chunk_state], y_spec,
                        jax.ShapeDtypeStruct(v.shape, v.dtype))(*args, hs)  # fmt: skip
    return y, h, hs


def _state_grad_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, dy_ref, q_ref, *, cm: ChunkMath):
    q_ref[...] = cm.state_grad(c_ref[...], _col(enter_ref[...]), dy_ref[...].astype(v_ref.dtype))


def _grads_kernel(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref, hs_ref, dy_ref, dh_ref, dv_ref,
                  db_ref, dc_ref, dcum_ref, denter_ref, dleave_ref, *, cm: ChunkMath):  # fmt: skip
    values = _chunk_values(v_ref, b_ref, c_ref, cum_ref, enter_ref, leave_ref, runs_ref)
    dy = dy_ref[...].astype(v_ref.dtype)
    dv, db, dc, dcum_col, dcum_row, denter, dleave, _ = cm.backward(
        *values, hs_ref[...], dy, dh_ref[...], with_dh=False
    )
    dv_ref[...] = dv.astype(dv_ref.dtype)
    db_ref[...], dc_ref[...] = db, dc
    dcum_ref[...] = dcum_col.reshape(cm.chunk) + dcum_row.reshape(cm.chunk)
    denter_ref[...] = denter.reshape(cm.chunk)
    dleave_ref[...] = dleave.reshape(cm.chunk)


def backward_chunks(cm: ChunkMath, v, b, c, cum, enter, leave, runs, hs, dy, dh, *, interpret, num_warps: int = 4):
    """As :func:`backward`, in three launches: each chunk's ``(enter * c)^T dy``, the reverse carry of the
    state gradients across chunks, then every chunk's gradients from its two states."""
    batch, tp, heads, hp = v.shape
    fp = b.shape[3]
    num_chunks = tp // cm.chunk
    L = cm.chunk
    chunk_state = _chunk_state_spec(fp, hp)
    states = jax.ShapeDtypeStruct((batch, heads, num_chunks, fp, hp), jnp.float32)
    args = (v, b, c, cum, enter, leave, runs)
    dy_spec = pl.BlockSpec((None, L, None, hp), lambda b_, n_, i: (b_, i, n_, 0))
    q = _per_chunk_call(_state_grad_kernel, cm, v, b, num_warps, interpret, "ssd_state_grads", [dy_spec],
                        chunk_state, states)(*args, dy)  # fmt: skip
    dh_after, dh0 = _carry(_passes(cm, enter), q, dh, reverse=True, interpret=interpret, num_warps=num_warps)
    f32 = jnp.float32
    per_head_f = pl.BlockSpec((None, L, None, fp), lambda b_, n_, i: (b_, i, n_, 0))
    per_token = pl.BlockSpec((None, None, L), lambda b_, n_, i: (b_, n_, i))
    grads = _per_chunk_call(
        _grads_kernel, cm, v, b, num_warps, interpret, "ssd_grads", [chunk_state, dy_spec, chunk_state],
        (dy_spec, per_head_f, per_head_f, per_token, per_token, per_token),
        (jax.ShapeDtypeStruct(v.shape, f32), jax.ShapeDtypeStruct((batch, tp, heads, fp), f32),
         jax.ShapeDtypeStruct((batch, tp, heads, fp), f32), *(jax.ShapeDtypeStruct(cum.shape, f32) for _ in range(3))),
    )(*args, hs, dy, dh_after)  # fmt: skip
    return (*grads, dh0)
