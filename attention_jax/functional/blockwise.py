"""Blockwise attention in plain JAX (``implementation="blockwise"``): flash attention without a kernel.

The same algorithm as the Pallas kernels, written with ``lax`` loops so that XLA compiles it on
every backend; it is the default on CPU and the fallback everywhere.

* Memory is ``O(T)``: scores exist one ``[block_q, block_k]`` tile at a time.
* The mask acts through its block map, turned into a static *schedule*: for each query block, the
  key blocks it visits. ``EMPTY`` tiles are never visited (causal costs half of full attention, a
  sliding window ``O(T * w)``), ``FULL`` tiles run without mask arithmetic, and only ``PARTIAL``
  tiles evaluate the mask function on index tiles. Masks that read data (segment ids, lengths, a
  traced boolean array) are PARTIAL wherever their structure allows; such a tile is skipped at run
  time when its data hides it entirely (packed documents, padding).
* Online softmax with float32 statistics and deferred normalisation; the logsumexp is saved for a
  ``jax.custom_vjp`` whose backward recomputes each visible tile once (``blockwise_bwd``).
* GQA/MQA natively (a key/value tile is loaded once for the ``G`` query heads that share it),
  ``Hv != H``, ``T != S``, lengths that are not multiples of the blocks (padded and masked
  internally), softcap, additive bias and score mods with their gradients, boolean array masks.

Besides ``attention`` (the entry point of ``dot_product_attention``), the module provides the
per-block step of ring attention, ``fwd`` and ``bwd`` (see ``pallas_kernels.ring_attention``),
where the block map is a run-time array.

>>> import jax, jax.numpy as jnp
>>> import attention_jax as aj
>>> q = jax.random.normal(jax.random.key(0), (1, 300, 4, 32))    # [B, T, N, H]
>>> kv = jax.random.normal(jax.random.key(1), (1, 300, 2, 32))   # [B, S, K, H]
>>> out = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), implementation="blockwise")
>>> ref = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), implementation="reference")
>>> bool(jnp.allclose(out, ref, atol=1e-5))
True
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks
from attention_jax.functional.blockwise_bwd import Wanted, backward
from attention_jax.functional.blockwise_tiles import (
    Config,
    Operands,
    Schedule,
    forward,
    runtime_schedule,
    static_schedule,
)
from pallas_kernels import mask_info
from pallas_kernels.mask_info import FULL, PARTIAL, MaskSpec

__all__ = ["attention", "fwd", "bwd", "default_block_sizes", "schedule_for"]

Array = jax.Array

# Preferred tile sizes per backend (measured on CPU in benchmarks/bench_flash_cpu.py).
_PREFERRED_BLOCKS = {"cpu": (512, 256), "gpu": (128, 128), "tpu": (512, 512)}


def default_block_sizes(q_len: int, kv_len: int, backend: str | None = None) -> tuple[int, int]:
    """``(block_q, block_k)`` for a call: the backend's preferred size, shrunk to cover the lengths evenly.

    >>> default_block_sizes(1000, 64, "cpu")
    (500, 64)
    """
    pq, pk = _PREFERRED_BLOCKS.get(backend or jax.default_backend(), (128, 128))
    return _fit(q_len, pq), _fit(kv_len, pk)


def _fit(length: int, preferred: int) -> int:
    n = -(-length // preferred)
    return -(-length // n)


def _compute_dtype(dtype) -> Any:
    """Matmul operand dtype: float32 (or wider) on CPU, where low-precision dots are slower."""
    if jax.default_backend() == "cpu":
        return jnp.promote_types(dtype, jnp.float32)
    return jnp.dtype(dtype)


# ---------------------------------------------------------------------------------------------------
# Single-device entry point
# ---------------------------------------------------------------------------------------------------


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    shape: _checks.AttentionShape,
    scale: float | Array,
    mask: masks_lib.Mask | Array | None = None,
    bias: Array | None = None,
    score_mod: Any = None,
    softcap: float | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    block_q: int | None = None,
    block_k: int | None = None,
) -> tuple[Array, Array]:
    """Blockwise attention: ``(out [B, T, N, Hv] in query.dtype, lse [B, N, T] float32)``.

    Arguments as in ``dot_product_attention`` (validated there); ``block_q``/``block_k`` override
    the tile sizes of :func:`default_block_sizes`. Differentiable in ``query``, ``key``,
    ``value``, ``bias``, the score mod's float leaves and an array ``scale``.
    """
    t, s = shape.q_len, shape.kv_len
    dq_block, dk_block = default_block_sizes(t, s)
    bq = _check_block("block_q", block_q, dq_block)
    bk = _check_block("block_k", block_k, dk_block)
    nq, nk = mask_info.num_blocks(t, bq), mask_info.num_blocks(s, bk)
    tp, sp = nq * bq, nk * bk

    block_map, mask_fn, q_vals, kv_vals, mask_array = _resolve_mask(mask, shape, bq, bk, q_offset, kv_offset)
    runtime_skip = bool(q_vals or kv_vals) or (mask_array is not None and not _is_concrete(mask_array))
    if mask_array is not None:
        mask_array = _pad_broadcast(mask_array, tp, sp, False)
    mod_leaves, mod_treedef = jax.tree.flatten(score_mod)
    mod_diff = tuple(bool(jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)) for leaf in mod_leaves)
    cfg = Config(
        block_q=bq,
        block_k=bk,
        q_len=t,
        kv_len=s,
        softcap=softcap,
        mask_fn=mask_fn,
        runtime_skip=runtime_skip,
        compute_dtype=_compute_dtype(query.dtype),
        mod_treedef=None if score_mod is None else mod_treedef,
        mod_diff=mod_diff,
    )
    diff = (
        _pad_axis(query, 1, tp),
        _pad_axis(key, 1, sp),
        _pad_axis(value, 1, sp),
        None if bias is None else _pad_broadcast(bias, tp, sp, 0),
        tuple(leaf for leaf, d in zip(mod_leaves, mod_diff) if d),
        jnp.asarray(scale, jnp.float32),
    )
    aux = (
        tuple(leaf for leaf, d in zip(mod_leaves, mod_diff) if not d),
        mask_info.contiguous_positions(tp, q_offset),
        mask_info.contiguous_positions(sp, kv_offset),
        tuple(_pad_axis(a, 1, tp) for a in q_vals),
        tuple(_pad_axis(a, 1, sp) for a in kv_vals),
        mask_array,
        static_schedule(block_map),
    )
    out, lse = _attend(cfg, diff, aux)
    return out[:, :t], lse[..., :t]


def schedule_for(mask: masks_lib.Mask | None, q_len: int, kv_len: int, block_q: int, block_k: int) -> Schedule:
    """The static schedule ``attention`` runs for ``mask`` (exposed for tests and benchmarks)."""
    shape = _checks.AttentionShape(1, q_len, kv_len, 1, 1, 1, 1)
    return static_schedule(_resolve_mask(mask, shape, block_q, block_k, 0, 0)[0])


def _check_block(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer or None, got {name}={value!r}.")
    return int(value)


def _is_concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _resolve_mask(mask, shape, bq, bk, q_offset, kv_offset):
    """``(block_map [nq, nk] numpy, mask_fn, q_vals, kv_vals, mask_array)`` for any accepted mask."""
    t, s = shape.q_len, shape.kv_len
    nq = mask_info.num_blocks(t, bq)
    complete = mask_info.kv_tiles_complete(s, bk, nq)  # the ragged last key block is never FULL
    ragged = np.where(complete, FULL, PARTIAL).astype(np.int8)
    if mask is None:
        return ragged, None, (), (), None
    if isinstance(mask, masks_lib.Mask):
        try:
            q_offset, kv_offset = int(q_offset), int(kv_offset)
        except (TypeError, jax.errors.ConcretizationTypeError):
            raise ValueError("q_offset and kv_offset must be Python ints when mask is a Mask.") from None
        try:
            with jax.ensure_compile_time_eval():  # from_fn / random_blocks evaluate jnp on the host
                block_map = mask.block_map(t, s, bq, bk, q_offset, kv_offset)
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            # A from_fn mask combined with traced data (segment ids under jit) has no static map:
            # every tile is partial, and tiles its data hides are skipped at run time.
            block_map = np.minimum(ragged, PARTIAL).astype(np.int8)
        q_vals, kv_vals = mask.arrays(t, s)
        for name, vals in (("q", q_vals), ("kv", kv_vals)):
            for a in vals:
                if a.shape[0] not in (1, shape.batch):
                    raise ValueError(
                        f"the mask's {name} arrays have batch size {a.shape[0]}, expected 1 or B={shape.batch}."
                    )
        return block_map, mask.fn(kv_offset + s), tuple(q_vals), tuple(kv_vals), None
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {jnp.result_type(mask)}.")
    _checks.check_broadcastable("mask", mask, shape)
    mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + tuple(jnp.shape(mask)))
    if not _is_concrete(mask):
        return np.minimum(ragged, PARTIAL).astype(np.int8), None, (), (), mask
    dense = np.broadcast_to(np.asarray(mask), mask.shape[:2] + (t, s))
    return mask_info.shared_block_map(dense, bq, bk, axis=(0, 1)), None, (), (), mask


def _pad_axis(x: Array, axis: int, length: int, value=0) -> Array:
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _pad_broadcast(x: Array, tp: int, sp: int, value) -> Array:
    """A ``[.., T or 1, S or 1]`` array as rank 4, padded on its full-size T and S dims."""
    x = jnp.reshape(x, (1,) * (4 - jnp.ndim(x)) + tuple(jnp.shape(x)))
    if x.shape[2] > 1:
        x = _pad_axis(x, 2, tp, value)
    if x.shape[3] > 1:
        x = _pad_axis(x, 3, sp, value)
    return x


def _operands(cfg: Config, diff, aux) -> tuple[Operands, Schedule]:
    q, k, v, bias, mod_diff_leaves, scale = diff
    mod_rest, q_pos, kv_pos, q_vals, kv_vals, mask_array, sched = aux
    diff_it, rest_it = iter(mod_diff_leaves), iter(mod_rest)
    leaves = tuple(next(diff_it) if d else next(rest_it) for d in cfg.mod_diff)
    x = Operands(q, k, v, bias, leaves, scale, q_pos, kv_pos, tuple(q_vals), tuple(kv_vals), mask_array)
    return x, sched


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: Config, diff, aux):
    x, sched = _operands(cfg, diff, aux)
    return forward(cfg, x, sched, x.q.dtype)


def _attend_fwd(cfg: Config, diff, aux):
    perturbed = jax.tree.map(lambda p: p.perturbed, diff)
    diff, aux = jax.tree.map(lambda p: p.value, (diff, aux))
    x, sched = _operands(cfg, diff, aux)
    out, lse = forward(cfg, x, sched, x.q.dtype)
    wanted = Wanted(
        bias=diff[3] is not None and any(jax.tree.leaves(perturbed[3])),
        scale=bool(perturbed[5]),
        mod=tuple(_mod_wanted(cfg, perturbed[4])),
    )
    return (out, lse), (diff, aux, out, lse, wanted)


def _mod_wanted(cfg: Config, perturbed_diff_leaves):
    it = iter(perturbed_diff_leaves)
    for d in cfg.mod_diff:
        yield bool(next(it)) if d else False


def _attend_bwd(cfg: Config, residuals, cotangents):
    diff, aux, out, lse, wanted = residuals
    dout, dlse = cotangents
    x, sched = _operands(cfg, diff, aux)
    if isinstance(dout, SymbolicZero):
        dout = jnp.zeros_like(out)
    if isinstance(dlse, SymbolicZero):  # the usual case: delta = rowsum(out * dout), per query block
        g = backward(cfg, x, sched, lse, None, dout, wanted, out=out)
    else:  # a cotangent on lse adds p * dlse to ds, i.e. delta -= dlse
        delta = jnp.einsum(
            "BTNH,BTNH->BNT", out.astype(jnp.float32), dout.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
        )
        delta = delta - jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
        g = backward(cfg, x, sched, lse, delta, dout, wanted)
    q, k, v, bias, mod_diff_leaves, scale = diff
    dbias = None if g.dbias is None else g.dbias.astype(bias.dtype)
    dmod = tuple(
        None if d is None else d.astype(leaf.dtype)
        for d, leaf, is_diff in zip(g.dmod, x.mod_leaves, cfg.mod_diff)
        if is_diff
    )
    dscale = None if g.dscale is None else g.dscale.astype(scale.dtype)
    d_diff = (g.dq.astype(q.dtype), g.dk.astype(k.dtype), g.dv.astype(v.dtype), dbias, dmod, dscale)
    return d_diff, None


_attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------------
# Ring attention step (pallas_kernels.ring_attention's per-block interface)
# ---------------------------------------------------------------------------------------------------


def fwd(q: Array, k: Array, v: Array, spec: MaskSpec, *, scale: float | None = None, softcap: float | None = None):
    """One ring step: ``(out [B, T, N, Hv] float32 normalised by its own lse, lse [B, N, T] float32)``.

    ``spec.block_map`` may be a run-time array: empty tiles are skipped through a schedule
    computed at run time (visible key blocks sorted first, a loop over their count).
    """
    t = q.shape[1]
    cfg, x, sched = _step_operands(q, k, v, spec, scale, softcap)
    out, lse = forward(cfg, x, sched, jnp.float32)
    return out[:, :t], lse[..., :t]


def bwd(
    q: Array,
    k: Array,
    v: Array,
    spec: MaskSpec,
    lse: Array,
    delta: Array,
    dout: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
):
    """One ring step's gradient contributions ``(dq, dk, dv)`` (float32) given the global ``lse`` and ``delta``."""
    t, s = q.shape[1], k.shape[1]
    cfg, x, sched = _step_operands(q, k, v, spec, scale, softcap)
    tp = x.q.shape[1]
    lse = _pad_axis(jnp.asarray(lse, jnp.float32), 2, tp, -jnp.inf)
    delta = _pad_axis(jnp.asarray(delta, jnp.float32), 2, tp)
    g = backward(cfg, x, sched, lse, delta, _pad_axis(dout, 1, tp))
    return g.dq[:, :t], g.dk[:, :s], g.dv[:, :s]


def _step_operands(q, k, v, spec: MaskSpec, scale, softcap):
    shape = _checks.check_qkv(q, k, v)
    t, s = shape.q_len, shape.kv_len
    bq, bk = spec.block_q, spec.block_k
    nq, nk = mask_info.num_blocks(t, bq), mask_info.num_blocks(s, bk)
    if tuple(spec.block_map.shape) != (nq, nk):
        raise ValueError(
            f"spec.block_map must have shape [ceil(T / block_q), ceil(S / block_k)]={[nq, nk]} for {t=}, {s=}, "
            f"block_q={bq}, block_k={bk}; got {tuple(spec.block_map.shape)}."
        )
    tp, sp = nq * bq, nk * bk
    scale = _checks.check_scale(scale, shape.head_dim)
    cfg = Config(
        block_q=bq,
        block_k=bk,
        q_len=t,
        kv_len=s,
        softcap=_checks.check_softcap(softcap),
        mask_fn=spec.fn,
        runtime_skip=bool(spec.q_vals or spec.kv_vals),
        compute_dtype=_compute_dtype(q.dtype),
    )
    x = Operands(
        q=_pad_axis(q, 1, tp),
        k=_pad_axis(k, 1, sp),
        v=_pad_axis(v, 1, sp),
        bias=None,
        mod_leaves=(),
        scale=jnp.asarray(scale, jnp.float32),
        q_pos=_pad_positions(spec.q_positions, tp),
        kv_pos=_pad_positions(spec.kv_positions, sp),
        q_vals=tuple(_pad_axis(jnp.asarray(a), 1, tp) for a in spec.q_vals),
        kv_vals=tuple(_pad_axis(jnp.asarray(a), 1, sp) for a in spec.kv_vals),
        mask=None,
    )
    return cfg, x, runtime_schedule(spec.block_map)


def _pad_positions(positions: Array, length: int) -> Array:
    positions = jnp.asarray(positions, jnp.int32)
    return _pad_axis(positions, 0, length) if positions.shape[0] < length else positions
