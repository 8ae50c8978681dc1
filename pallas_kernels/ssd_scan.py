"""Mamba-2's chunked selective scan (state-space duality) in Pallas, forward and backward, for GPU and TPU.

``ssd_scan(x, dt, a, b, c)`` runs the recurrence with one scalar decay ``a[n]`` per head

    h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T        (h [H, F] per head, float32)
    y_t = h_t c_t

in chunks of ``chunk_size`` tokens: inside a chunk as attention-like matmuls (``c b^T`` masked by the decay
``exp(cum_t - cum_s)``, times ``dt x``), between chunks through the state. Two schedules: ``"fused"``, one
program per batch row and head that walks its chunks in order carrying the state (Triton and Mosaic TPU),
and ``"chunks"`` (Triton), programs per chunk for the matmuls and a launch in between that carries the
states across chunks (for batches too small to fill a GPU with batch rows x heads programs).
Layouts: ``x [B, T, N, H]``, ``dt [B, T, N]``, ``a [N]``, ``b, c [B, T, K, F]`` (head ``n`` reads group
``n // (N // K)``), state ``[B, N, H, F]`` float32.

Packed documents come as ``runs [B, T]``: a nondecreasing index of each token's document (0, 0, 1, 1, 1,
2, ...); the state resets where it steps, and the initial state continues the first run. Right padding is
``dt = 0`` on padded tokens (no decay, no input). ``T`` need not be a multiple of the chunk.

The XLA side prepares, per token, the running log decay from the chunk start and the two factors with
which a token reads the carried state and reaches the chunk's final state (zero across a document
boundary), so the kernels (``_ssd_chunk`` math; ``_ssd_triton`` and ``_ssd_mosaic_tpu`` bodies) see
only matmul tiles; autodiff of that preparation turns the kernels' gradients into ``dt`` and ``a``'s.
The backward kernel walks the chunks in reverse from the states the forward stored at chunk starts.

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels.ssd_scan import ssd_scan, ssd_scan_reference
>>> k = jax.random.split(jax.random.key(0), 3)
>>> x = jax.random.normal(k[0], (1, 40, 2, 16))                    # [B, T, N, H]
>>> dt = jnp.full((1, 40, 2), 0.1)                                  # [B, T, N]
>>> b, c = jax.random.normal(k[1], (2, 1, 40, 1, 16))               # [B, T, K, F] each
>>> y, state = ssd_scan(x, dt, -jnp.ones(2), b, c, chunk_size=16, interpret=True)
>>> ref, ref_state = ssd_scan_reference(x, dt, -jnp.ones(2), b, c)
>>> bool(jnp.allclose(y, ref, atol=1e-4)), y.shape, state.shape
(True, (1, 40, 2, 16), (1, 2, 16, 16))
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _ssd_mosaic_tpu, _ssd_triton
from pallas_kernels._ssd_chunk import ChunkMath
from pallas_kernels.flash_attention import resolve_backend

Array = jax.Array
MIN_CHUNK = 16  # the smallest tile side the GPU dots take
SCHEDULES = ("fused", "chunks")
# Below this many (batch row, head) programs the GPU runs the chunk-parallel schedule by default, so that a
# short batch still fills the device's multiprocessors (a guess from H100's 132 SMs; not yet measured).
FUSED_MIN_PROGRAMS = 256

__all__ = ["ssd_scan", "ssd_scan_reference", "MIN_CHUNK", "SCHEDULES"]


@dataclasses.dataclass(frozen=True)
class _Config:
    math: ChunkMath
    backend: str
    interpret_mode: bool
    num_warps: int
    schedule: str = "fused"

    @property
    def body(self):
        return _ssd_mosaic_tpu if self.backend == "tpu" else _ssd_triton

    @property
    def forward(self):
        return _ssd_triton.forward_chunks if self.schedule == "chunks" else self.body.forward

    @property
    def backward(self):
        return _ssd_triton.backward_chunks if self.schedule == "chunks" else self.body.backward

    @property
    def kwargs(self):
        if self.backend == "tpu":
            return dict(interpret=_ssd_mosaic_tpu.interpret_params() if self.interpret_mode else False)
        return dict(interpret=self.interpret_mode, num_warps=self.num_warps)


def _check(x, dt, a, b, c, runs, state) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must be [B, T, N, H], got shape {jnp.shape(x)}.")
    batch, length, heads, head_dim = jnp.shape(x)
    if jnp.shape(dt) != (batch, length, heads):
        raise ValueError(f"dt must be [B, T, N]={[batch, length, heads]}, got shape {jnp.shape(dt)}.")
    if jnp.shape(a) != (heads,):
        raise ValueError(
            f"a must be [N]={[heads]} (one decay per head: the SSD kernel takes Mamba-2's scalar A), got shape "
            f"{jnp.shape(a)}."
        )
    if jnp.ndim(b) != 4 or jnp.shape(b)[:2] != (batch, length) or jnp.shape(c) != jnp.shape(b):
        raise ValueError(
            f"b and c must be [B, T, K, F] with [B, T]={[batch, length]}, got shapes {jnp.shape(b)} and {jnp.shape(c)}."
        )
    if heads % jnp.shape(b)[2]:
        raise ValueError(f"the N={heads} heads of x must divide into the K={jnp.shape(b)[2]} groups of b and c.")
    if runs is not None and (
        jnp.shape(runs) != (batch, length) or not jnp.issubdtype(jnp.result_type(runs), jnp.integer)
    ):
        raise ValueError(
            f"runs must be integers [B, T]={[batch, length]}, got {jnp.result_type(runs)} {jnp.shape(runs)}."
        )
    want = (batch, heads, head_dim, jnp.shape(b)[3])
    if state is not None and jnp.shape(state) != want:
        raise ValueError(f"state must be [B, N, H, F]={list(want)}, got shape {jnp.shape(state)}.")
    for name, v in (("x", x), ("b", b), ("c", c)):
        if not jnp.issubdtype(jnp.result_type(v), jnp.floating):
            raise ValueError(f"{name} must be floating, got {name}.dtype={jnp.result_type(v)}.")


def _pow2(n: int) -> int:
    return max(MIN_CHUNK, 1 << (n - 1).bit_length())


def _pad(x: Array, axis: int, size: int, mode: str = "constant") -> Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, mode=mode)


def _chunk_factors(dt: Array, a: Array, runs: Array, chunk: int) -> tuple[Array, Array, Array]:
    """``(cum, enter, leave)`` each ``[B, N, Tp]`` float32 from ``dt [B, Tp, N]`` and ``runs [B, Tp]``.

    ``cum`` is the running sum of ``dt * a`` from each chunk's start; ``enter = exp(cum)`` where the token is
    in the run of the token before its chunk (it reads the carried state), ``leave = exp(cum_last - cum)``
    where it is in its chunk's last run (it reaches the chunk's final state); 0 elsewhere.
    """
    batch, tp, heads = dt.shape
    num_chunks = tp // chunk
    cum = jnp.cumsum((dt * a).reshape(batch, num_chunks, chunk, heads), axis=2)  # [B, C, L, N]
    r = runs.reshape(batch, num_chunks, chunk)  # [B, C, L]
    previous = jnp.concatenate([r[:, :1, :1] * 0, r[:, :-1, -1:]], axis=1)  # [B, C, 1] run before each chunk
    enter = jnp.where((r == previous)[..., None], jnp.exp(cum), 0.0)
    leave = jnp.where((r == r[:, :, -1:])[..., None], jnp.exp(cum[:, :, -1:] - cum), 0.0)
    per_head = lambda v: jnp.moveaxis(v.reshape(batch, tp, heads), 2, 1)  # noqa: E731
    return per_head(cum), per_head(enter), per_head(leave)


# -- the differentiable core (kernel layouts) ------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(cfg: _Config, v, b, c, cum, enter, leave, runs, h0):
    y, h, _ = cfg.forward(cfg.math, v, b, c, cum, enter, leave, runs, h0, **cfg.kwargs)
    return y, h


def _scan_fwd(cfg: _Config, v, b, c, cum, enter, leave, runs, h0):
    y, h, states = cfg.forward(cfg.math, v, b, c, cum, enter, leave, runs, h0, **cfg.kwargs)
    return (y, h), (v, b, c, cum, enter, leave, runs, states)


def _scan_bwd(cfg: _Config, residuals, cotangents):
    v, b, c, cum, enter, leave, runs, states = residuals
    dy, dh = cotangents
    dv, db, dc, dcum, denter, dleave, dh0 = cfg.backward(
        cfg.math, v, b, c, cum, enter, leave, runs, states, dy, dh, **cfg.kwargs
    )
    batch, tp, groups, f = b.shape
    per_group = lambda d: d.reshape(batch, tp, groups, -1, f).sum(axis=3)  # noqa: E731  heads of a group
    return (
        dv.astype(v.dtype),  # v = dt * x
        per_group(db).astype(b.dtype),
        per_group(dc).astype(c.dtype),
        dcum,  # running log decay
        denter,
        dleave,
        None,  # runs: integers
        dh0,  # initial state
    )


_scan.defvjp(_scan_fwd, _scan_bwd)


# -- public API ------------------------------------------------------------------------------------


def ssd_scan(
    x: Array,
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    *,
    runs: Array | None = None,
    state: Array | None = None,
    chunk_size: int = 64,
    backend: str | None = None,
    interpret: bool | None = None,
    num_warps: int = 4,
    schedule: str | None = None,
) -> tuple[Array, Array]:
    """Differentiable chunked SSD scan: ``(y [B, T, N, H] in x.dtype, final state [B, N, H, F] float32)``.

    Args:
      x: ``[B, T, N, H]`` the heads' inputs; its dtype is the matmuls' (``b``, ``c`` and ``dt * x`` are cast to it).
      dt: ``[B, T, N]`` step sizes (0 on right padding); a: ``[N]`` one decay per head (normally negative).
      b, c: ``[B, T, K, F]`` input and output projections, shared by the ``N // K`` heads of a group.
      runs: int ``[B, T]`` nondecreasing document index (packed sequences), or None for one document.
      state: ``[B, N, H, F]`` the state the first run continues (default zeros); gets a gradient.
      chunk_size: tokens per chunk, a power of two >= 16 (T is padded up to a multiple of it). A chunk is one
        tile (``[L, L]`` scores in registers / VMEM): 64 suits the GPU bodies; the TPU's MXU fills from 128
        (neither measured yet).
      backend: ``"gpu"`` (Triton body), ``"tpu"`` (Mosaic body) or None (the default backend's).
      interpret: None interprets on CPU only; True forces the interpreter of the chosen body.
      num_warps: warps per Triton program.
      schedule: ``"fused"``: one program per (batch row, head) walks its chunks in order, carrying the state
        (one launch forward, one backward: the TPU body's only schedule); ``"chunks"`` (GPU only): programs
        per chunk for the matmuls, with a launch between them that carries the states across chunks, for
        batches too small to fill a GPU with (batch row, head) programs. None: ``"fused"`` on TPU, and on GPU
        ``"fused"`` from ``FUSED_MIN_PROGRAMS`` (batch rows x heads) up, ``"chunks"`` below.

    Every input but ``runs`` gets a gradient (the backward is a Pallas kernel too).
    """
    _check(x, dt, a, b, c, runs, state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < MIN_CHUNK or (
        chunk_size & (chunk_size - 1)
    ):  # fmt: skip
        raise ValueError(f"chunk_size must be a power of two >= {MIN_CHUNK} for the SSD kernel, got {chunk_size=!r}.")
    backend, interpret = resolve_backend(backend, interpret)
    batch, length, heads, head_dim = x.shape
    if schedule is None:
        schedule = "chunks" if backend == "gpu" and batch * heads < FUSED_MIN_PROGRAMS else "fused"
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be None or one of {SCHEDULES}, got {schedule=!r}.")
    if schedule == "chunks" and backend == "tpu":
        raise ValueError("schedule='chunks' has no TPU body: the TPU kernel runs 'fused' (its grid walks the chunks).")
    state_dim = b.shape[-1]
    dtype = jnp.result_type(x)
    cfg = _Config(ChunkMath(chunk_size, dtype == jnp.float32), backend, interpret, num_warps, schedule)
    tp = -(-length // chunk_size) * chunk_size
    # Triton loads and dots want power-of-two tiles: zero-pad H and F (zeros add nothing, read nothing).
    hp, fp = (_pow2(head_dim), _pow2(state_dim)) if backend == "gpu" else (head_dim, state_dim)
    dtf = jnp.asarray(dt, jnp.float32)
    v = _pad(_pad(dtf[..., None] * jnp.asarray(x, jnp.float32), 1, tp), 3, hp).astype(dtype)
    dtf = _pad(dtf, 1, tp)  # padding: dt = 0, no decay, no input
    b_, c_ = (_pad(_pad(jnp.asarray(m, dtype), 1, tp), 3, fp) for m in (b, c))
    runs = jnp.zeros((batch, length), jnp.int32) if runs is None else jnp.asarray(runs, jnp.int32)
    runs = _pad(runs - runs[:, :1], 1, tp, mode="edge")  # the initial state continues run 0
    cum, enter, leave = _chunk_factors(dtf, jnp.asarray(a, jnp.float32), runs, chunk_size)
    if state is None:
        state = jnp.zeros((batch, heads, head_dim, state_dim), jnp.float32)
    h0 = _pad(_pad(jnp.swapaxes(jnp.asarray(state, jnp.float32), 2, 3), 2, fp), 3, hp)  # [B, N, Fp, Hp]
    y, h = _scan(cfg, v, b_, c_, cum, enter, leave, runs, h0)
    return y[:, :length, :, :head_dim].astype(dtype), jnp.swapaxes(h[:, :, :state_dim, :head_dim], 2, 3)


def ssd_scan_reference(x, dt, a, b, c, *, runs=None, state=None) -> tuple[Array, Array]:
    """The recurrence one token at a time in plain ``jnp`` (float32): the kernels' oracle, same arguments."""
    _check(x, dt, a, b, c, runs, state)
    batch, length, heads, head_dim = x.shape
    group = heads // b.shape[2]
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    bf, cf = (jnp.repeat(f32(m), group, axis=2) for m in (b, c))  # [B, T, N, F]
    if state is None:
        state = jnp.zeros((batch, heads, head_dim, b.shape[-1]), jnp.float32)
    if runs is None:
        runs = jnp.zeros((batch, length), jnp.int32)
    runs = jnp.asarray(runs)
    starts = jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)

    def step(h, inputs):
        x_t, dt_t, b_t, c_t, start = inputs  # [B, N, H], [B, N], [B, N, F], [B, N, F], [B]
        h = jnp.where(start[:, None, None, None], 0.0, h)
        decay = jnp.exp(dt_t * f32(a))[..., None, None]
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * b_t[..., None, :]
        return h, jnp.einsum("BNHF,BNF->BNH", h, c_t, precision=jax.lax.Precision.HIGHEST)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (f32(x), f32(dt), bf, cf, starts))
    h, y = jax.lax.scan(step, f32(state), xs)
    return jnp.moveaxis(y, 0, 1).astype(x.dtype), h
