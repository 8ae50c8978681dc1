"""TPU (Mosaic) bodies of the SSD scan: the grid ``(B, N, C)`` walks the chunks of a head in order.

The chunk axis is the last, ``arbitrary`` one: the state ``h [F, H]`` float32 lives in VMEM scratch across
its steps while Pallas pipelines each chunk's tiles in. The backward runs the same grid with the chunk
index maps reversed (``C - 1 - i``), carrying ``dh`` in scratch and reading the forward's chunk states.

Mosaic wants the last two dims of every block (8, 128)-aligned or whole, so tiles are head-major
(``v [B, N, Tp, H]``, ``b, c [B, K, Tp, F]``), per-token data travels as columns ``[.., Tp, 1]`` and, where
a row is needed (``cum``, ``runs``), as per-chunk rows ``[.., C, 1, L]``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._ssd_chunk import ChunkMath


def interpret_params():
    """The TPU interpreter (runs the Mosaic body on CPU, simulating VMEM and DMAs)."""
    return pltpu.InterpretParams()


def _head_major(x):
    return jnp.swapaxes(x, 1, 2)  # [B, T, N, D] <-> [B, N, T, D]


def _rows(x, chunk):
    """``[..., Tp] -> [..., C, 1, L]``."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // chunk, 1, chunk)


def _layouts(cm, v, b, c, cum, enter, leave, runs):
    """The canonical inputs in the body's layouts (see the module docstring), in kernel-argument order."""
    cols = lambda x: x[..., None]  # noqa: E731
    return (_head_major(v), _head_major(b), _head_major(c), cols(cum), _rows(cum, cm.chunk), cols(enter),
            cols(leave), cols(runs), _rows(runs, cm.chunk))  # fmt: skip


def _specs(cm, h, f, group, chunk_of):
    """In-specs of :func:`_layouts`' arrays for the grid ``(B, N, C)``; ``chunk_of(i)`` is the chunk of step ``i``."""
    L = cm.chunk
    return [
        pl.BlockSpec((None, None, L, h), lambda b_, n_, i: (b_, n_, chunk_of(i), 0)),
        pl.BlockSpec((None, None, L, f), lambda b_, n_, i: (b_, lax.div(n_, group), chunk_of(i), 0)),
        pl.BlockSpec((None, None, L, f), lambda b_, n_, i: (b_, lax.div(n_, group), chunk_of(i), 0)),
        pl.BlockSpec((None, None, L, 1), lambda b_, n_, i: (b_, n_, chunk_of(i), 0)),
        pl.BlockSpec((None, None, None, 1, L), lambda b_, n_, i: (b_, n_, chunk_of(i), 0, 0)),
        pl.BlockSpec((None, None, L, 1), lambda b_, n_, i: (b_, n_, chunk_of(i), 0)),
        pl.BlockSpec((None, None, L, 1), lambda b_, n_, i: (b_, n_, chunk_of(i), 0)),
        pl.BlockSpec((None, L, 1), lambda b_, n_, i: (b_, chunk_of(i), 0)),
        pl.BlockSpec((None, None, 1, L), lambda b_, n_, i: (b_, chunk_of(i), 0, 0)),
    ]


def _compiler_params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _read(refs):
    return tuple(r[...] for r in refs)


def _fwd_kernel(v_ref, b_ref, c_ref, cumc_ref, cumr_ref, enter_ref, leave_ref, runsc_ref, runsr_ref, h0_ref, y_ref,
                h_ref, hs_ref, h_scr, *, cm: ChunkMath):  # fmt: skip
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        h_scr[...] = h0_ref[...]

    h = h_scr[...]
    hs_ref[...] = h
    inputs = _read((v_ref, b_ref, c_ref, cumc_ref, cumr_ref, enter_ref, leave_ref, runsc_ref, runsr_ref))
    y, h = cm.forward(*inputs, h)
    y_ref[...] = y.astype(y_ref.dtype)
    h_scr[...] = h

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        h_ref[...] = h


def forward(cm: ChunkMath, v, b, c, cum, enter, leave, runs, h0, *, interpret):
    """As the Triton body's: ``(y [B, Tp, N, H], h [B, N, F, H], chunk states [B, N, C, F, H])``."""
    batch, tp, heads, hd = v.shape
    groups, f = b.shape[2], b.shape[3]
    num_chunks = tp // cm.chunk
    state = pl.BlockSpec((None, None, f, hd), lambda b_, n_, i: (b_, n_, 0, 0))
    y, h, hs = pl.pallas_call(
        functools.partial(_fwd_kernel, cm=cm),
        grid=(batch, heads, num_chunks),
        in_specs=[*_specs(cm, hd, f, heads // groups, lambda i: i), state],
        out_specs=(
            pl.BlockSpec((None, None, cm.chunk, hd), lambda b_, n_, i: (b_, n_, i, 0)),
            state,
            pl.BlockSpec((None, None, None, f, hd), lambda b_, n_, i: (b_, n_, i, 0, 0)),
        ),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, tp, hd), v.dtype),
            jax.ShapeDtypeStruct((batch, heads, f, hd), jnp.float32),
            jax.ShapeDtypeStruct((batch, heads, num_chunks, f, hd), jnp.float32),
        ),
        scratch_shapes=(pltpu.VMEM((f, hd), jnp.float32),),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="ssd_fwd",
    )(*_layouts(cm, v, b, c, cum, enter, leave, runs), h0)
    return _head_major(y), h, hs


def _bwd_kernel(v_ref, b_ref, c_ref, cumc_ref, cumr_ref, enter_ref, leave_ref, runsc_ref, runsr_ref, hs_ref, dy_ref,
                dh_ref, dv_ref, db_ref, dc_ref, dcumc_ref, dcumr_ref, denter_ref, dleave_ref, dh0_ref, dh_scr, *,
                cm: ChunkMath):  # fmt: skip
    i = pl.program_id(2)

    @pl.when(i == 0)
    def _init():
        dh_scr[...] = dh_ref[...]

    inputs = _read((v_ref, b_ref, c_ref, cumc_ref, cumr_ref, enter_ref, leave_ref, runsc_ref, runsr_ref))
    dy = dy_ref[...].astype(v_ref.dtype)
    dv, db, dc, dcum_col, dcum_row, denter, dleave, dh = cm.backward(*inputs, hs_ref[...], dy, dh_scr[...])
    dv_ref[...] = dv
    db_ref[...], dc_ref[...] = db, dc
    dcumc_ref[...], dcumr_ref[...] = dcum_col, dcum_row
    denter_ref[...], dleave_ref[...] = denter, dleave
    dh_scr[...] = dh

    @pl.when(i == pl.num_programs(2) - 1)
    def _finish():
        dh0_ref[...] = dh


def backward(cm: ChunkMath, v, b, c, cum, enter, leave, runs, hs, dy, dh, *, interpret):
    """As the Triton body's: ``dv [B, Tp, N, H]``, ``db, dc [B, Tp, N, F]`` per head, ``dcum, denter,
    dleave [B, N, Tp]`` and ``dh0 [B, N, F, H]``, all float32."""
    batch, tp, heads, hd = v.shape
    groups, f = b.shape[2], b.shape[3]
    num_chunks = tp // cm.chunk
    rev = lambda i: num_chunks - 1 - i  # noqa: E731
    specs = _specs(cm, hd, f, heads // groups, rev)
    state = pl.BlockSpec((None, None, f, hd), lambda b_, n_, i: (b_, n_, 0, 0))
    per_head = lambda d: pl.BlockSpec((None, None, cm.chunk, d), lambda b_, n_, i: (b_, n_, rev(i), 0))  # noqa: E731
    f32 = jnp.float32
    col = jax.ShapeDtypeStruct((batch, heads, tp, 1), f32)
    outs = pl.pallas_call(
        functools.partial(_bwd_kernel, cm=cm),
        grid=(batch, heads, num_chunks),
        in_specs=[
            *specs,
            pl.BlockSpec((None, None, None, f, hd), lambda b_, n_, i: (b_, n_, rev(i), 0, 0)),
            per_head(hd),
            state,
        ],
        out_specs=(per_head(hd), per_head(f), per_head(f), specs[3], specs[4], specs[3], specs[3], state),
        out_shape=(
            jax.ShapeDtypeStruct((batch, heads, tp, hd), f32),
            jax.ShapeDtypeStruct((batch, heads, tp, f), f32),
            jax.ShapeDtypeStruct((batch, heads, tp, f), f32),
            col,
            jax.ShapeDtypeStruct((batch, heads, num_chunks, 1, cm.chunk), f32),
            col,
            col,
            jax.ShapeDtypeStruct((batch, heads, f, hd), f32),
        ),
        scratch_shapes=(pltpu.VMEM((f, hd), f32),),
        compiler_params=_compiler_params(),
        interpret=interpret,
        name="ssd_bwd",
    )(*_layouts(cm, v, b, c, cum, enter, leave, runs), hs, _head_major(dy), dh)
    dv, db, dc, dcum_col, dcum_row, denter, dleave, dh0 = outs
    dcum = dcum_col[..., 0] + dcum_row.reshape(batch, heads, tp)
    return _head_major(dv), _head_major(db), _head_major(dc), dcum, denter[..., 0], dleave[..., 0], dh0
