"""Flash attention in Pallas: forward and backward kernels that skip masked blocks, for GPU and TPU.

``flash_attention(q, k, v, mask=spec)`` computes ``softmax(mask(softcap(scale * q.k + bias))) v``
exactly, in memory linear in the sequence length, with float32 softmax statistics. Layouts follow
the library: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]`` with ``N % K == 0``
(query head ``n`` reads key/value head ``n // (N // K)``); the ``G = N // K`` heads of a group
share every loaded K/V tile and dk/dv sum over the group inside the kernel (K/V are never
repeated in memory).

The mask reaches the kernels as a :class:`~pallas_kernels.mask_info.MaskSpec`: a runtime block
map (EMPTY tiles are never loaded, FULL tiles run without mask arithmetic, PARTIAL tiles evaluate
``spec.fn`` on position tiles and per-position data), so causal, sliding-window, chunked, segment,
padding and arbitrary ``from_fn`` masks all go through one mechanism. Lengths need not be multiples
of the blocks: inputs are padded and the padding masked internally. The spec may also carry
per-sequence positions (decoding with per-sequence cache offsets), a boolean array read in PARTIAL
tiles only, and a score mod ``score_fn`` with per-head ``score_params`` (ALiBi slopes, a T5 table)
that the kernels apply to every computed tile and differentiate; ``dropout_rate`` regenerates the
bits of ``pallas_kernels.dropout`` tile by tile in the forward and both backward kernels. Key/value
rows that no row of a PARTIAL tile sees are zeroed, so NaNs behind the mask never reach the output.

Three kernel bodies sit behind the entry point, each in a file named by its lowering: Triton-style
programs that loop over their visit list inside the kernel (``_flash_triton``, forward and backward
on GPUs), warp-specialised Hopper kernels in Mosaic GPU for the forward (``_flash_mosaic_gpu_sm90``)
and dK/dV (``_flash_mosaic_gpu_sm90_dkv``) (TMA loads, ``wgmma``; chosen automatically on sm90 for
the calls they support, see ``forward_kernel`` and ``backward_kernel``), and Mosaic TPU grid-
pipelined kernels whose K/V index maps follow the scalar-prefetched visit list
(``_flash_mosaic_tpu``). All share the visit plans (``_flash_plan``) and the tile math
(``_flash_tile``). On CPU the Triton and TPU bodies run in interpret mode; the Hopper kernels are
tested by lowering them for CUDA.

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference
>>> q = jax.random.normal(jax.random.key(0), (1, 40, 4, 32))   # [B, T, N, H]
>>> kv = jax.random.normal(jax.random.key(1), (1, 40, 2, 32))  # [B, S, K, H]: GQA, G = 2
>>> out, lse = flash_attention(q, kv, kv, return_lse=True, block_sizes=BlockSizes(block_q=32, block_k=16))
>>> ref, ref_lse = flash_attention_reference(q, kv, kv)
>>> bool(jnp.allclose(out, ref, atol=1e-5)), out.shape, lse.shape
(True, (1, 40, 4, 32), (1, 4, 40))
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_derivatives import CustomVJPPrimal, SymbolicZero

from pallas_kernels import (
    _flash_mosaic_gpu_sm90,
    _flash_mosaic_gpu_sm90_dkv,
    _flash_mosaic_tpu,
    _flash_plan,
    _flash_triton,
    dropout,
)
from pallas_kernels._flash_plan import Geometry, Plan
from pallas_kernels._flash_tile import LOG2E, TileMath
from pallas_kernels.mask_info import MaskSpec

Array = jax.Array
BACKENDS = ("gpu", "tpu")
GPU_KERNELS = ("triton", "mosaic_gpu")  # the GPU bodies of the forward and of the dK/dV kernel

__all__ = [
    "BlockSizes",
    "flash_attention",
    "flash_forward",
    "flash_backward",
    "flash_attention_reference",
    "mask_block_shape",
    "resolve_backend",
]


# -- block sizes -----------------------------------------------------------------------------------


def _is_power_of_2(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and launch parameters of the three kernels (forward, dk/dv, dq).

    ``block_q*`` count *rows*: query positions times the ``G`` heads of a group (a forward tile of
    128 rows holds 64 positions of 2 heads under GQA with G = 2). ``block_k*`` count keys. All are
    powers of two >= 16; each is clamped to the (padded) problem, so any size works for any length.
    ``num_warps``/``num_stages`` tune the Triton forward kernel (``*_bwd``: both backward kernels);
    ``None`` warps picks by head dim. ``block_k_wgmma``/``stages_wgmma`` are the key tile and the
    depth of the K/V ring of the Hopper (Mosaic GPU) forward, whose row tile is fixed at 128 (two
    warpgroups of 64). The TPU body ignores them all.

    >>> BlockSizes(block_q=48)
    Traceback (most recent call last):
    ...
    ValueError: block_q must be a power of two >= 16, got block_q=48.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int = 2
    block_k_wgmma: int = 128
    stages_wgmma: int = 2

    def __post_init__(self):
        for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq", "block_k_wgmma"):
            value = getattr(self, name)
            if not _is_power_of_2(value) or value < _flash_plan.MIN_BLOCK:
                raise ValueError(f"{name} must be a power of two >= {_flash_plan.MIN_BLOCK}, got {name}={value!r}.")
        for name in ("num_warps", "num_warps_bwd"):
            value = getattr(self, name)
            if value is not None and (not _is_power_of_2(value) or value > 16):
                raise ValueError(f"{name} must be None or a power of two <= 16, got {name}={value!r}.")
        for name, least in (("num_stages", 1), ("num_stages_bwd", 1), ("stages_wgmma", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {name}={value!r}.")

    @classmethod
    def for_backend(cls, backend: str, head_dim: int = 128) -> BlockSizes:
        """Defaults per backend and head dim (the starting point for tuning on the hardware).

        GPU: the fastest of sweeps on an H100 (bf16, B=2, N=16, T=8192). Triton forward 313 / 403 /
        397 TFLOP/s at H = 64 / 128 / 256 (backward configurations for H=256 not swept yet); the
        Hopper forward's key tile 128 (H <= 128) or 64 (H = 256, where 128 overflows shared
        memory), two ring slots (benchmarks/RESULTS.md has the numbers).
        TPU: lane-aligned (multiples of 128) tiles for the MXU, not yet measured on a TPU.
        """
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend=!r}.")
        if backend == "tpu":
            return cls(512, 512, 256, 256, 256, 256)
        if head_dim <= 64:
            return cls(64, 128, 64, 64, 64, 64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=2)
        if head_dim <= 128:
            return cls(128, 64, 64, 64, 64, 64, num_warps=4, num_stages=2, num_warps_bwd=4, num_stages_bwd=3)
        return cls(128, 64, 32, 32, 32, 32, num_warps=8, num_stages=3, num_warps_bwd=4, num_stages_bwd=1,
                   block_k_wgmma=64)  # fmt: skip

    def warps(self, kernel: str, head_dim: int) -> int:
        value = self.num_warps if kernel == "fwd" else self.num_warps_bwd
        if value is not None:
            return value
        return 4 if head_dim <= 64 else 8


def resolve_backend(backend: str | None = None, interpret: bool | None = None) -> tuple[str, bool]:
    """``(body, interpret)``: the kernel body to run and whether to interpret it.

    ``backend=None`` follows ``jax.default_backend()`` (CPU runs the GPU body in the interpreter);
    ``interpret=None`` interprets exactly when the default backend is the CPU.
    """
    platform = jax.default_backend()
    if backend is None:
        backend = "tpu" if platform == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend=!r}.")
    if interpret is None:
        interpret = platform == "cpu"
    return backend, bool(interpret)


# -- static configuration --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    geom: Geometry
    block_sizes: BlockSizes
    tile_math: TileMath
    backend: str
    interpret_mode: bool
    forward_kernel: str = "triton"  # GPU only: "triton" or "mosaic_gpu"
    backward_kernel: str = "triton"  # GPU only, the dK/dV kernel (dQ is Triton's)

    @property
    def interpret(self):
        """The ``interpret`` argument of ``pallas_call`` for this body."""
        if not self.interpret_mode:
            return False
        return _flash_mosaic_tpu.interpret_params() if self.backend == "tpu" else True

    @property
    def body(self):
        """The module of the backward kernels (and of the forward unless ``forward_body`` differs)."""
        return _flash_mosaic_tpu if self.backend == "tpu" else _flash_triton

    @property
    def forward_body(self):
        if self.backend == "gpu" and self.forward_kernel == "mosaic_gpu":
            return _flash_mosaic_gpu_sm90
        return self.body

    @property
    def dkv_body(self):
        if self.backend == "gpu" and self.backward_kernel == "mosaic_gpu":
            return _flash_mosaic_gpu_sm90_dkv
        return self.body


def _check_inputs(q, k, v, bias):
    for name, x in (("q", q), ("k", k), ("v", v)):
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have rank 4 ([B, T, N, H] / [B, S, K, H]), got {name}.shape={jnp.shape(x)}.")
    if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
        raise ValueError(f"q, k and v must share a floating dtype, got {q.dtype}, {k.dtype} and {v.dtype}.")
    b, t, n, h = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[:3] != v.shape[:3] or k.shape[-1] != h:
        raise ValueError(
            f"expected q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]; got {q.shape=}, {k.shape=}, {v.shape=}."
        )
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={k.shape[2]}.")
    if bias is not None:
        target = (b, n, t, k.shape[1])
        shape = jnp.shape(bias)
        if len(shape) > 4 or any(d not in (1, e) for d, e in zip(shape[::-1], target[::-1])):
            raise ValueError(f"bias must be broadcastable to [B, N, T, S]={list(target)}, got {bias.shape=}.")


def _static_float(name: str, value, default=None):
    if value is None:
        return default
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name} must be a Python number for the Pallas kernels, got a traced {name}.") from None


def _is_hopper() -> bool:
    """Whether the default device is an sm90 GPU (H100/H200), where the Mosaic GPU forward runs."""
    if jax.default_backend() != "gpu":
        return False
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _hopper_scope_reason(mask: MaskSpec | None, dropout_rate: float) -> str | None:
    """What of a call's mask and dropout the Hopper kernels do not implement (None: nothing)."""
    if dropout_rate > 0.0:
        return "dropout"
    if mask is None:
        return None
    if mask.score_fn is not None:
        return "a score mod (score_fn)"
    if mask.array is not None:
        return "an array mask (MaskSpec.array)"
    if jnp.ndim(mask.q_positions) == 2 or jnp.ndim(mask.kv_positions) == 2:
        return "per-sequence positions"
    return None


def _gpu_kernels(
    q, k, v, *, bias, forward_kernel, backward_kernel, backend, interpret, out_dtype, grad_dtype, block_sizes,
    scope_reason=None,
) -> tuple[str, str, BlockSizes]:  # fmt: skip
    """The GPU bodies of the forward and of dK/dV for a call, and the block sizes they run with.

    ``None`` picks the Mosaic GPU (wgmma) kernel on sm90 when it supports the call, Triton
    otherwise; asking for ``"mosaic_gpu"`` explicitly raises when the call is out of its scope.
    Each Hopper kernel has its own fixed tile side (128 rows forward, 128 keys for dK/dV), which
    replaces that kernel's fields of ``block_sizes``.
    """
    for name, value in (("forward_kernel", forward_kernel), ("backward_kernel", backward_kernel)):
        if value not in (None, *GPU_KERNELS):
            raise ValueError(f"{name} must be None or one of {GPU_KERNELS}, got {value!r}.")
    if backend != "gpu":
        return "triton", "triton", block_sizes

    def decide(name, requested, blocks, reason_of):
        if requested == "triton" or (requested is None and (interpret or not _is_hopper())):
            return "triton"
        geom = _flash_plan.make_geometry(q.shape, k.shape, v.shape, blocks, pad_head_dims=True)
        reason = "it has no CPU interpreter (use 'triton' to interpret)" if interpret else reason_of(geom)
        reason = reason or scope_reason
        if reason is None:
            return "mosaic_gpu"
        if requested == "mosaic_gpu":
            raise ValueError(f"{name}='mosaic_gpu' cannot run this call: {reason}.")
        return "triton"

    def forward_reason(geom):
        reason = _flash_mosaic_gpu_sm90.unsupported_reason(
            dtype=q.dtype, head_dim=geom.head_dim_padded, value_head_dim=geom.value_head_dim_padded,
            has_bias=bias is not None, out_dtype=out_dtype or q.dtype, block_k=geom.fwd[1],
        )  # fmt: skip
        if reason is None and geom.fwd[0] != _flash_mosaic_gpu_sm90.BLOCK_ROWS:
            reason = f"T * G = {geom.rows} rows (needs more than {_flash_mosaic_gpu_sm90.BLOCK_ROWS // 2})"
        return reason

    def dkv_reason(geom):
        reason = _flash_mosaic_gpu_sm90_dkv.unsupported_reason(
            dtype=q.dtype, head_dim=geom.head_dim_padded, value_head_dim=geom.value_head_dim_padded,
            has_bias=bias is not None, grad_dtype=grad_dtype, block_rows=geom.dkv[0],
        )  # fmt: skip
        if reason is None and geom.dkv[1] != _flash_mosaic_gpu_sm90_dkv.BLOCK_KEYS:
            reason = f"S = {geom.kv_len} keys (needs more than {_flash_mosaic_gpu_sm90_dkv.BLOCK_KEYS // 2})"
        return reason

    hopper_fwd = dataclasses.replace(
        block_sizes, block_q=_flash_mosaic_gpu_sm90.BLOCK_ROWS, block_k=block_sizes.block_k_wgmma
    )
    fwd = decide("forward_kernel", forward_kernel, hopper_fwd, forward_reason)
    blocks = hopper_fwd if fwd == "mosaic_gpu" else block_sizes
    hopper_dkv = dataclasses.replace(
        blocks, block_q_dkv=max(64, blocks.block_q_dkv), block_k_dkv=_flash_mosaic_gpu_sm90_dkv.BLOCK_KEYS
    )
    bwd = decide("backward_kernel", backward_kernel, hopper_dkv, dkv_reason)
    return fwd, bwd, hopper_dkv if bwd == "mosaic_gpu" else blocks


def _prepare(
    q, k, v, *, mask, scale, softcap, bias, block_sizes, backend, interpret, forward_kernel=None, backward_kernel=None,
    out_dtype=None, grad_dtype=None, dropout_rate=0.0, dropout_seed=None,
) -> tuple[_Config, Plan, tuple]:  # fmt: skip
    """Validate a call and derive its static configuration, runtime visit plan and score-mod parameters.

    The parameters come back per row (each ``[K, Rp]`` float32), the layout the kernels read.
    """
    _check_inputs(q, k, v, bias)
    if mask is not None and not isinstance(mask, MaskSpec):
        raise TypeError(f"mask must be a pallas_kernels.mask_info.MaskSpec or None, got {type(mask).__name__}.")
    backend, interpret = resolve_backend(backend, interpret)
    if block_sizes is None:
        block_sizes = BlockSizes.for_backend(backend, head_dim=q.shape[-1])
    if not isinstance(block_sizes, BlockSizes):
        raise TypeError(f"block_sizes must be a BlockSizes, got {type(block_sizes).__name__}.")
    softcap = _static_float("softcap", softcap)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive, got {softcap=}.")
    dropout_rate = _static_float("dropout_rate", dropout_rate, 0.0)
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}.")
    if dropout_rate > 0.0 and dropout_seed is None:
        raise ValueError("dropout_rate > 0 needs a dropout_seed (an int32 scalar, e.g. dropout.seed_from_key(key)).")
    forward_kernel, backward_kernel, kernel_blocks = _gpu_kernels(
        q, k, v, bias=bias, forward_kernel=forward_kernel, backward_kernel=backward_kernel, backend=backend,
        interpret=interpret, out_dtype=out_dtype, grad_dtype=grad_dtype, block_sizes=block_sizes,
        scope_reason=_hopper_scope_reason(mask, dropout_rate),
    )  # fmt: skip
    geom = _flash_plan.make_geometry(q.shape, k.shape, v.shape, kernel_blocks, pad_head_dims=backend == "gpu")
    tile_math = TileMath(
        scale=_static_float("scale", scale, 1.0 / q.shape[-1] ** 0.5),
        softcap=softcap,
        mask_fn=None if mask is None else mask.fn,
        kv_len=geom.kv_len,
        f32_inputs=jnp.dtype(q.dtype) == jnp.float32,
        score_fn=None if mask is None else mask.score_fn,
        dropout_rate=dropout_rate,
        has_array=mask is not None and mask.array is not None,
    )
    cfg = _Config(geom, block_sizes, tile_math, backend, interpret, forward_kernel, backward_kernel)
    score_mod = tile_math.score_fn is not None
    params = () if not score_mod else tuple(_flash_plan.params_to_rows(x, geom) for x in mask.score_params)
    plan = _flash_plan.make_plan(mask, geom, score_mod=score_mod, dropout_seed=dropout_seed if dropout_rate else None)
    return cfg, plan, params


def mask_block_shape(block_sizes: BlockSizes, q_len: int, kv_len: int, group: int = 1) -> tuple[int, int]:
    """``(block_q, block_k)`` to build a MaskSpec with, so that every kernel tile is a union of mask tiles.

    The kernels accept a MaskSpec of any tile size, but resampling a coarser map to finer tiles
    can only keep PARTIAL tiles PARTIAL; a map at this granularity skips exactly.

    >>> mask_block_shape(BlockSizes(block_q=128, block_q_dkv=64, block_q_dq=64), 1024, 1024, group=2)
    (32, 64)
    """
    geom = _flash_plan.make_geometry(
        (1, q_len, group, 1), (1, kv_len, 1, 1), (1, kv_len, 1, 1), block_sizes, pad_head_dims=False
    )
    rows = min(geom.fwd[0], geom.dkv[0], geom.dq[0])
    block_q = max(1, rows // group)
    block_q = 1 << (block_q.bit_length() - 1)  # a power of two: row tiles of G-indivisible sizes stay close
    return block_q, min(geom.fwd[1], geom.dkv[1], geom.dq[1])


# -- layouts: [B, T, N, H] <-> rows [B, Rp, K, H] (row r = t * G + g) ------------------------------


def _to_rows(x: Array, geom: Geometry, dim_padded: int) -> Array:
    b, t, _, d = x.shape
    kh, g = geom.num_kv_heads, geom.group
    if g > 1:
        x = x.reshape(b, t, kh, g, d).swapaxes(2, 3).reshape(b, t * g, kh, d)  # [B, T*G, K, D]
    return jnp.pad(x, ((0, 0), (0, geom.rows_padded - geom.rows), (0, 0), (0, dim_padded - d)))


def _from_rows(x: Array, geom: Geometry, dim: int) -> Array:
    b = x.shape[0]
    t, kh, g = geom.q_len, geom.num_kv_heads, geom.group
    x = x[:, : geom.rows, :, :dim]
    if g > 1:
        x = x.reshape(b, t, g, kh, dim).swapaxes(2, 3)  # [B, T, K, G, D]
    return x.reshape(b, t, kh * g, dim)


def _stat_to_rows(x: Array, geom: Geometry) -> Array:
    """``[B, N, T]`` -> ``[B, K, Rp]``."""
    b = x.shape[0]
    t, kh, g = geom.q_len, geom.num_kv_heads, geom.group
    x = x.reshape(b, kh, g, t).swapaxes(2, 3).reshape(b, kh, t * g)
    return jnp.pad(x, ((0, 0), (0, 0), (0, geom.rows_padded - geom.rows)))


def _stat_from_rows(x: Array, geom: Geometry) -> Array:
    """``[B, K, Rp]`` -> ``[B, N, T]``."""
    b = x.shape[0]
    t, kh, g = geom.q_len, geom.num_kv_heads, geom.group
    return x[:, :, : geom.rows].reshape(b, kh, t, g).swapaxes(2, 3).reshape(b, kh * g, t)


def _params_from_rows(x: Array, geom: Geometry) -> Array:
    """Per-row gradients ``[B, K, Rp]`` -> per head ``[N]`` (sum over batch and positions)."""
    kh, g = geom.num_kv_heads, geom.group
    return x[:, :, : geom.rows].reshape(x.shape[0], kh, geom.q_len, g).sum(axis=(0, 2)).reshape(kh * g)


def _pad_kv(x: Array, geom: Geometry, dim_padded: int) -> Array:
    s, d = x.shape[1], x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, geom.kv_padded - s), (0, 0), (0, dim_padded - d)))


def _bias_to_rows(bias: Array, geom: Geometry) -> Array:
    """Bias broadcastable to ``[B, N, T, S]`` -> ``[Bb, Rp, Kb, Sp]`` (Bb in {1, B}, Kb in {1, K})."""
    bias = jnp.asarray(bias)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bb, nb = bias.shape[:2]
    t, s, kh, g = geom.q_len, geom.kv_len, geom.num_kv_heads, geom.group
    bias = jnp.broadcast_to(bias, (bb, nb, t, s))
    if nb == 1:  # shared by all heads: one copy per row of the group
        bias = jnp.broadcast_to(bias[:, 0, :, None, None, :], (bb, t, g, 1, s)).reshape(bb, t * g, 1, s)
    else:
        bias = bias.reshape(bb, kh, g, t, s).transpose(0, 3, 2, 1, 4).reshape(bb, t * g, kh, s)
    return jnp.pad(bias, ((0, 0), (0, geom.rows_padded - geom.rows), (0, 0), (0, geom.kv_padded - s)))


def _kernel_inputs(cfg: _Config, q, k, v, bias):
    g = cfg.geom
    return (
        _to_rows(q, g, g.head_dim_padded),
        _pad_kv(k, g, g.head_dim_padded),
        _pad_kv(v, g, g.value_head_dim_padded),
        None if bias is None else _bias_to_rows(bias, g),
    )


# -- the differentiable core (kernel layouts) ------------------------------------------------------


def _backward_rows(
    cfg: _Config, q, k, v, bias, plan: Plan, lse, delta, do, with_dbias: bool, grad_dtype=None, params=()
):
    """dq, dk, dv, dbias ``[B, Rp, K, Sp]`` float32 (or None) and the score-mod parameters' gradients
    (each ``[B, K, Rp]`` per row, float32) in kernel layouts from the global statistics."""
    lse2 = jnp.where(lse == -jnp.inf, jnp.inf, lse * LOG2E)  # rows that see nothing get p = 0
    delta = jnp.where(jnp.isfinite(lse), delta, 0.0)
    dq, dbias, dparams = cfg.body.backward_dq(cfg, q, k, v, bias, do, lse2, delta, plan, with_dbias, grad_dtype,
                                              params=params)  # fmt: skip
    if params:  # the Hopper kernels take no score mod (their scope excludes it)
        dk, dv = cfg.dkv_body.backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype, params=params)
    else:
        dk, dv = cfg.dkv_body.backward_dkv(cfg, q, k, v, bias, do, lse2, delta, plan, grad_dtype)
    return dq, dk, dv, dbias, dparams


def _forward_rows(cfg: _Config, q, k, v, bias, plan, params, out_dtype):
    if params:
        return cfg.forward_body.forward(cfg, q, k, v, bias, plan, out_dtype, params=params)
    return cfg.forward_body.forward(cfg, q, k, v, bias, plan, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_rows(cfg: _Config, q, k, v, bias, plan, params):
    return _forward_rows(cfg, q, k, v, bias, plan, params, q.dtype)


def _unwrap(x):
    return jax.tree.map(lambda p: p.value, x, is_leaf=lambda p: isinstance(p, CustomVJPPrimal))


def _attention_rows_fwd(cfg: _Config, q, k, v, bias, plan, params):
    bias_perturbed = bias is not None and bias.perturbed
    q, k, v, bias, plan, params = _unwrap((q, k, v, bias, plan, params))
    out, lse = _forward_rows(cfg, q, k, v, bias, plan, params, q.dtype)
    # The shape of this marker carries a static flag to the backward: compute dbias or not.
    wants_dbias = jnp.zeros((int(bias_perturbed),), jnp.int8)
    return (out, lse), (q, k, v, bias, plan, params, out, lse, wants_dbias)


def _attention_rows_bwd(cfg: _Config, residuals, cotangents):
    q, k, v, bias, plan, params, out, lse, wants_dbias = residuals
    dout, dlse = cotangents
    if isinstance(dout, SymbolicZero):
        dout = jnp.zeros(out.shape, out.dtype)
    # delta = rowsum(out * dout); a cotangent on the logsumexp adds p * dlse to ds: delta -= dlse.
    delta = jnp.einsum(
        "BRKD,BRKD->BKR", out.astype(jnp.float32), dout.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    if not isinstance(dlse, SymbolicZero):
        delta = delta - dlse
    with_dbias = wants_dbias.shape[0] == 1
    dq, dk, dv, dbias, dparams = _backward_rows(
        cfg, q, k, v, bias, plan, lse, delta, dout.astype(q.dtype), with_dbias, params=params
    )
    if with_dbias:  # sum over the dims the bias broadcasts along
        dbias = dbias.sum(axis=tuple(a for a in (0, 2) if bias.shape[a] == 1), keepdims=True).astype(bias.dtype)
    # Per-row parameter gradients [B, K, Rp] -> [K, Rp]; autodiff of params_to_rows sums rows to heads.
    dparams = tuple(d.sum(axis=0) for d in dparams)
    return dq, dk, dv, dbias, None, dparams


_attention_rows.defvjp(_attention_rows_fwd, _attention_rows_bwd, symbolic_zeros=True)


# -- public API ------------------------------------------------------------------------------------


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    bias: Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    forward_kernel: str | None = None,
    backward_kernel: str | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
):
    """Differentiable flash attention (forward, dq and dk/dv kernels behind one ``custom_vjp``).

    Args:
      q: ``[B, T, N, H]``; k: ``[B, S, K, H]``; v: ``[B, S, K, Hv]`` (one floating dtype).
      mask: a :class:`~pallas_kernels.mask_info.MaskSpec` for ``[T, S]`` (any ``block_q/block_k``:
        its map is resampled to each kernel's tiles), or None for no mask. Its ``block_map`` may be
        ``[nq, nk]`` or per batch ``[B, nq, nk]``, its positions ``[T]``/``[S]`` or per sequence
        ``[B, T]``/``[B, S]``. Its ``array`` (bool ``[Bm, Nm, T, S]``) is read in PARTIAL tiles;
        its ``score_fn`` runs on every computed tile and ``score_params`` get gradients.
      scale: multiplies ``q.k`` (default ``1/sqrt(H)``); softcap: ``c * tanh(s / c)`` after bias.
      bias: additive, broadcastable to ``[B, N, T, S]``; differentiable.
      block_sizes: tiles and launch parameters (default ``BlockSizes.for_backend(backend, H)``).
      interpret: None interprets on CPU only; True forces the interpreter of the chosen body.
      return_lse: also return the logsumexp ``[B, N, T]`` float32 (differentiable too).
      backend: ``"gpu"`` (Triton body), ``"tpu"`` (Mosaic body) or None (the default backend's).
      forward_kernel: GPU forward body: ``"triton"``, ``"mosaic_gpu"`` (Hopper wgmma kernel; bf16/f16,
        H == Hv in 64/128/256, no bias) or None: Mosaic GPU on sm90 devices when it supports
        the call, Triton otherwise.
      backward_kernel: the same choice for the dK/dV kernel (Mosaic GPU: H == Hv in 64/128); dQ is
        computed by the Triton kernel either way. The Hopper kernels take no score mod, array
        mask, per-sequence positions or dropout (automatic selection then picks Triton).
      dropout_rate: static probability of dropping an attention weight (``0 <= rate < 1``); the
        bits are ``pallas_kernels.dropout.keep_mask(seed, b, n, q_pos, kv_pos)``, regenerated in the
        backward. ``lse`` stays the undropped one.
      dropout_seed: int32 scalar (a runtime array), needed when ``dropout_rate > 0``.

    Returns:
      ``out [B, T, N, Hv]`` in ``q.dtype`` (and ``lse``). Rows that see no key give zeros,
      ``lse = -inf`` and zero gradients.
    """
    cfg, plan, params = _prepare(
        q, k, v, mask=mask, scale=scale, softcap=softcap, bias=bias, block_sizes=block_sizes, backend=backend,
        interpret=interpret, forward_kernel=forward_kernel, backward_kernel=backward_kernel,
        dropout_rate=dropout_rate, dropout_seed=dropout_seed,
    )  # fmt: skip
    out, lse = _attention_rows(cfg, *_kernel_inputs(cfg, q, k, v, bias), plan, params)
    out = _from_rows(out, cfg.geom, cfg.geom.value_head_dim)
    return (out, _stat_from_rows(lse, cfg.geom)) if return_lse else out


def flash_forward(
    q: Array,
    k: Array,
    v: Array,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    bias: Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    out_dtype=None,
    forward_kernel: str | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
) -> tuple[Array, Array]:
    """The forward kernel alone (not differentiable): ``(out [B, T, N, Hv], lse [B, N, T])``.

    The block step of ring attention: ``out`` is normalised by this call's own ``lse`` and comes
    back in ``out_dtype`` (default ``q.dtype``; float32 keeps the ring's merge exact).
    ``forward_kernel``, ``dropout_rate`` and ``dropout_seed`` as in :func:`flash_attention` (the
    bits depend on absolute positions only, so a ring's steps draw those of the whole call).
    """
    cfg, plan, params = _prepare(
        q, k, v, mask=mask, scale=scale, softcap=softcap, bias=bias, block_sizes=block_sizes, backend=backend,
        interpret=interpret, forward_kernel=forward_kernel, out_dtype=out_dtype, dropout_rate=dropout_rate,
        dropout_seed=dropout_seed,
    )  # fmt: skip
    q_, k_, v_, bias_ = _kernel_inputs(cfg, q, k, v, bias)
    out, lse = _forward_rows(cfg, q_, k_, v_, bias_, plan, params, jnp.dtype(out_dtype or q.dtype))
    return _from_rows(out, cfg.geom, cfg.geom.value_head_dim), _stat_from_rows(lse, cfg.geom)


def flash_backward(
    q: Array,
    k: Array,
    v: Array,
    lse: Array,
    delta: Array,
    dout: Array,
    *,
    mask: MaskSpec | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    bias: Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: str | None = None,
    grad_dtype=None,
    backward_kernel: str | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
    return_score_param_grads: bool = False,
):
    """The backward kernels alone: ``(dq, dk, dv)`` of one ``(q, k/v)`` block given global statistics.

    ``lse [B, N, T]`` is the logsumexp of the *whole* attention the block is part of and
    ``delta [B, N, T] = rowsum(out * dout) - dlse`` with the whole output, so the returned
    gradients are this block's exact contributions (ring attention sums them over blocks). They
    come back in ``grad_dtype`` (default: the input dtypes; float32 keeps a ring's sum exact).
    ``backward_kernel``, ``dropout_rate`` and ``dropout_seed`` as in :func:`flash_attention`.
    ``return_score_param_grads`` appends a tuple with the gradient of each ``mask.score_params``
    entry (``[N]`` float32, this block's contribution).
    """
    cfg, plan, params = _prepare(
        q, k, v, mask=mask, scale=scale, softcap=softcap, bias=bias, block_sizes=block_sizes, backend=backend,
        interpret=interpret, backward_kernel=backward_kernel, grad_dtype=grad_dtype, dropout_rate=dropout_rate,
        dropout_seed=dropout_seed,
    )  # fmt: skip
    g = cfg.geom
    q_, k_, v_, bias_ = _kernel_inputs(cfg, q, k, v, bias)
    do = _to_rows(dout.astype(q.dtype), g, g.value_head_dim_padded)
    lse_rows = _stat_to_rows(lse.astype(jnp.float32), g)
    delta_rows = _stat_to_rows(delta.astype(jnp.float32), g)
    dq, dk, dv, _, dparams = _backward_rows(
        cfg, q_, k_, v_, bias_, plan, lse_rows, delta_rows, do, False, grad_dtype, params=params
    )
    dk, dv = dk[:, : g.kv_len, :, : g.head_dim], dv[:, : g.kv_len, :, : g.value_head_dim]
    grads = (_from_rows(dq, g, g.head_dim), dk, dv)
    if return_score_param_grads:
        grads += (tuple(_params_from_rows(d, g) for d in dparams),)
    return grads


# -- reference -------------------------------------------------------------------------------------


def dense_mask(spec: MaskSpec | None, batch: int, q_len: int, kv_len: int) -> Array | None:
    """``spec`` evaluated on every (query, key) pair: bool ``[Bm, Nm, T, S]`` (None: no mask).

    ``spec.dense`` (the mask function and the array, one dense evaluation) checked against the call.
    """
    if spec is None:
        return None
    visible = spec.dense(batch)
    if visible is not None and visible.shape[-2:] != (q_len, kv_len):
        raise ValueError(f"mask covers [T, S]={list(visible.shape[-2:])}, the call is [{q_len}, {kv_len}].")
    return visible


def flash_attention_reference(
    q, k, v, *, mask: MaskSpec | None = None, scale=None, softcap=None, bias=None, dropout_rate: float = 0.0,
    dropout_seed=None,
):  # fmt: skip
    """The kernels' math in plain ``jnp`` with float32 scores: ``(out [B, T, N, Hv], lse [B, N, T])``.

    Same semantics as :func:`flash_attention`: ``scale * q.k + bias``, then ``mask.score_fn``,
    softcap, the mask (``mask.dense``: function and array), softmax with an undropped ``lse``, and
    dropout with ``pallas_kernels.dropout.keep_mask`` bits. Differentiable (``score_params`` too).

    >>> import jax.numpy as jnp
    >>> from pallas_kernels.mask_info import MaskSpec
    >>> alibi = lambda score, b, n, q_pos, kv_pos, params: score + params[0] * (kv_pos - q_pos)
    >>> spec = MaskSpec(lambda q_pos, kv_pos, *_: kv_pos <= q_pos, jnp.ones((1, 1), jnp.int32), jnp.arange(4),
    ...                 jnp.arange(4), block_q=4, block_k=4, score_fn=alibi, score_params=(jnp.array([0.5, 1.0]),))
    >>> x = jnp.zeros((1, 4, 2, 8))  # [B, T, N, H]: scores are the ALiBi bias alone
    >>> out, lse = flash_attention_reference(x, x, x, mask=spec)
    >>> round(float(lse[0, 1, 1]), 4)  # log(e^-1 + e^0): head 1 has slope 1, key 0 is 1 behind
    0.3133
    """
    b, t, n, h = q.shape
    s, kh, hv = k.shape[1], k.shape[2], v.shape[-1]
    g = n // kh
    scale = 1.0 / h**0.5 if scale is None else scale
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qf, k.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    scores = scores.reshape(b, n, t, s) * scale  # [B, N, T, S]
    if bias is not None:
        scores = scores + jnp.asarray(bias, jnp.float32)
    q_pos = kv_pos = None
    if mask is not None and (mask.score_fn is not None or dropout_rate):
        q_pos, kv_pos = mask.positions(b)  # [B, T], [B, S]
        q_pos, kv_pos = q_pos[:, None, :, None], kv_pos[:, None, None, :]  # [B, 1, T, 1], [B, 1, 1, S]
    elif dropout_rate:
        q_pos = jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
        kv_pos = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]  # [B, 1, 1, 1]
    head = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]  # [1, N, 1, 1]
    if mask is not None and mask.score_fn is not None:
        params = tuple(jnp.asarray(x, jnp.float32).reshape(1, n, 1, 1) for x in mask.score_params)
        scores = mask.apply_score_fn(scores, batch, head, q_pos, kv_pos, params).astype(jnp.float32)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    visible = dense_mask(mask, b, t, s)
    if visible is not None:
        scores = jnp.where(visible, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    p = jnp.exp(scores - m)
    if visible is not None:  # masked entries are exact zeros (no NaN from a masked score)
        p = jnp.where(visible, p, 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)[..., 0]
    probs = p / safe
    if dropout_rate:
        keep = dropout.keep_mask(dropout_seed, batch, head, q_pos, kv_pos, dropout_rate)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    probs = probs.reshape(b, kh, g, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, hv).astype(q.dtype), lse
