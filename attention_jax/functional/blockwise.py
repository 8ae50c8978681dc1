"""Blockwise attention in plain JAX (``implementation="blockwise"``): flash attention without a kernel.

The same algorithm as the Pallas kernels, written with ``lax`` loops so that XLA compiles it on
every backend; it is the default on CPU and the fallback everywhere.

* Memory is ``O(T)``: scores exist one ``[block_q, block_k]`` tile at a time, dropout bits are
  regenerated per tile from a counter-based hash (``pallas_kernels.dropout``), never stored.
* The mask arrives resolved as one :class:`~pallas_kernels.mask_info.MaskSpec`. Its block map
  becomes a *schedule*: for each query block, the key blocks it visits. ``EMPTY`` tiles are never
  visited (causal costs half of full attention, a sliding window ``O(T * w)``), ``FULL`` tiles run
  without mask arithmetic, and only ``PARTIAL`` tiles evaluate the mask function (and the spec's
  boolean array) on index tiles. A numpy block map (known at trace time) gives a static schedule;
  a JAX array (traced per-sequence decode offsets, a ring step's map) a schedule computed at run
  time. Masks that read data (segment ids, lengths) skip, at run time, partial tiles their data
  hides entirely (packed documents, padding).
* Online softmax with float32 statistics and deferred normalisation; the logsumexp is saved for a
  ``jax.custom_vjp`` whose backward recomputes each visible tile once (``blockwise_bwd``).
* GQA/MQA natively (a key/value tile is loaded once for the ``G`` query heads that share it),
  ``Hv != H``, ``T != S``, lengths that are not multiples of the blocks (padded and masked
  internally), per-sequence positions, softcap, additive bias, the spec's score mod (with
  gradients for its per-head parameters), attention-weight dropout.

Besides ``attention`` (the backend entry of ``dot_product_attention``), the module provides the
per-block step of ring attention, ``fwd`` and ``bwd`` (see ``pallas_kernels.ring_attention``),
where the block map is a run-time array.

>>> import jax, jax.numpy as jnp
>>> import attention_jax as aj
>>> q = jax.random.normal(jax.random.key(0), (1, 300, 4, 32))    # [B, T, N, H]
>>> kv = jax.random.normal(jax.random.key(1), (1, 300, 2, 32))   # [B, S, K, H]
>>> spec = aj.masks.causal().spec(300, 300, *default_block_sizes(300, 300))
>>> out, lse = attention(q, kv, kv, spec, scale=32**-0.5)
>>> ref = jax.nn.dot_product_attention(q, kv, kv, is_causal=True)
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
from pallas_kernels.mask_info import MaskSpec

__all__ = ["attention", "fwd", "bwd", "default_block_sizes", "schedule_for"]

Array = jax.Array

# Preferred tile sizes per backend. CPU: 512 x 256. On a quiet 2-core machine 512-row tiles keep both
# cores busy (wall ~ half the CPU time) where 256 x 256 used ~1.2 cores: causal T=8192 forward 0.83 s
# against 1.44 s (benchmarks/bench_flash_cpu.py); under load the sizes tie.
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
    spec: MaskSpec,
    *,
    scale: float | Array,
    softcap: float | None = None,
    bias: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_seed: Array | None = None,
    shape: _checks.AttentionShape | None = None,
) -> tuple[Array, Array]:
    """Blockwise attention: ``(out [B, T, N, Hv] in query.dtype, lse [B, N, T] float32)``.

    Args:
      query, key, value: ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]`` (validated by the
        dispatcher; T, S > 0).
      spec: the resolved mask and score mod; its tiles ``(block_q, block_k)`` are the tiles run.
      scale: a number or a float scalar array (differentiable).
      softcap: ``c`` of ``c * tanh(s / c)`` applied after the score mod, before the mask.
      bias: additive float bias broadcastable to ``[B, N, T, S]`` (differentiable).
      dropout_rate: static probability of dropping an attention weight.
      dropout_seed: int32 scalar seed of the dropout hash (required when ``dropout_rate > 0``).
      shape: the sizes ``dot_product_attention`` already validated (None: validate here), so a
        call is validated once.

    Differentiable in ``query``, ``key``, ``value``, ``bias``, ``spec.score_params`` and an array
    ``scale``. The logsumexp ignores dropout (dropout acts on the normalised weights).
    """
    shape = _checks.check_qkv(query, key, value) if shape is None else shape
    dropout_rate = _check_dropout(dropout_rate, dropout_seed)
    cfg, x, sched = _prepare(query, key, value, spec, shape, scale, softcap, bias, dropout_rate, dropout_seed)
    diff = (x.q, x.k, x.v, x.bias, x.params, x.scale)
    aux = (x.q_pos, x.kv_pos, x.q_vals, x.kv_vals, x.mask, x.seed, sched)
    out, lse = _attend(cfg, diff, aux)
    return out[:, : shape.q_len], lse[..., : shape.q_len]


def schedule_for(spec: MaskSpec) -> Schedule:
    """The schedule ``attention`` runs for ``spec`` (static for a numpy block map; for tests and benchmarks)."""
    return _schedule(spec.block_map, ragged_kv=int(spec.kv_positions.shape[-1]) % spec.block_k != 0)


def _check_dropout(rate: Any, seed: Any) -> float:
    try:
        rate = float(rate)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"dropout_rate must be a static number in [0, 1), got {rate=!r}.") from None
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got dropout_rate={rate}.")
    if rate > 0.0 and seed is None:
        raise ValueError("dropout_seed must be an int32 scalar when dropout_rate > 0, got dropout_seed=None.")
    return rate


def _schedule(block_map, ragged_kv: bool = False) -> Schedule:
    """Static schedule for a block map known at trace time, else one computed at run time.

    With ``ragged_kv`` (S not a multiple of block_k) the last key block holds padding columns, so
    it is never run as FULL whatever the map says.
    """
    xp = jnp if isinstance(block_map, jax.core.Tracer) else np
    block_map = xp.asarray(block_map, xp.int32)
    if ragged_kv:
        last = xp.minimum(block_map[..., -1:], mask_info.PARTIAL)
        block_map = xp.concatenate([block_map[..., :-1], last], axis=-1)
    return runtime_schedule(block_map) if xp is jnp else static_schedule(block_map)


def _prepare(query, key, value, spec: MaskSpec, shape, scale, softcap, bias, dropout_rate=0.0, dropout_seed=None):
    """``(Config, Operands, Schedule)`` of a call: operands padded to whole tiles, keys and values transposed."""
    t, s, b = shape.q_len, shape.kv_len, shape.batch
    bq, bk = spec.block_q, spec.block_k
    for name, value_ in (("spec.block_q", bq), ("spec.block_k", bk)):
        if isinstance(value_, bool) or not isinstance(value_, (int, np.integer)) or value_ <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value_!r}.")
    nq, nk = mask_info.num_blocks(t, bq), mask_info.num_blocks(s, bk)
    map_shape = tuple(jnp.shape(spec.block_map))
    if (
        map_shape[-2:] != (nq, nk)
        or len(map_shape) not in (2, 3)
        or (len(map_shape) == 3 and map_shape[0] not in (1, b))
    ):
        raise ValueError(
            f"spec.block_map must have shape [nq, nk] or [B, nq, nk] with nq=ceil(T / block_q)={nq}, "
            f"nk=ceil(S / block_k)={nk} for {t=}, {s=}, block_q={bq}, block_k={bk}; got {map_shape}."
        )
    tp, sp = nq * bq, nk * bk
    mask_array = spec.array
    if mask_array is not None:
        mask_array = _pad_broadcast(jnp.asarray(mask_array, bool), tp, sp, False)
    params = tuple(jnp.asarray(p) for p in spec.score_params)
    for n, p in enumerate(params):
        if p.shape != (shape.num_heads,):
            raise ValueError(f"spec.score_params[{n}] must have shape [N]=[{shape.num_heads}], got {p.shape}.")
    cfg = Config(
        block_q=bq,
        block_k=bk,
        q_len=t,
        kv_len=s,
        softcap=_checks.check_softcap(softcap),
        mask_fn=spec.fn,
        score_fn=spec.score_fn,
        runtime_skip=bool(spec.q_vals or spec.kv_vals),
        compute_dtype=_compute_dtype(query.dtype),
        dropout_rate=dropout_rate,
    )
    # Keys and values once per call: in the matmul dtype (a bf16 tile would be converted at every
    # visit) and transposed to [B, K, Sp, H], so that a key tile is one contiguous slice.
    key, value = key.astype(cfg.compute_dtype), value.astype(cfg.compute_dtype)
    x = Operands(
        q=_pad_axis(query, 1, tp),
        k=_pad_axis(key, 1, sp).transpose(0, 2, 1, 3),
        v=_pad_axis(value, 1, sp).transpose(0, 2, 1, 3),
        bias=None if bias is None else _pad_broadcast(bias, tp, sp, 0),
        params=params,
        scale=jnp.asarray(scale, jnp.float32),
        q_pos=_pad_positions(spec.q_positions, tp),
        kv_pos=_pad_positions(spec.kv_positions, sp),
        q_vals=tuple(_pad_axis(jnp.asarray(a), 1, tp) for a in spec.q_vals),
        kv_vals=tuple(_pad_axis(jnp.asarray(a), 1, sp) for a in spec.kv_vals),
        mask=mask_array,
        seed=None if dropout_rate == 0.0 else jnp.asarray(dropout_seed, jnp.int32),
    )
    return cfg, x, _schedule(spec.block_map, ragged_kv=s % bk != 0)


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


def _pad_positions(positions: Array, length: int) -> Array:
    """Positions ``[L]`` or ``[B, L]`` as int32 padded to ``length`` (padding is masked by index)."""
    positions = jnp.asarray(positions, jnp.int32)
    return _pad_axis(positions, positions.ndim - 1, length)


def _operands(diff, aux) -> tuple[Operands, Schedule]:
    q, k, v, bias, params, scale = diff
    q_pos, kv_pos, q_vals, kv_vals, mask, seed, sched = aux
    return Operands(
        q, k, v, bias, tuple(params), scale, q_pos, kv_pos, tuple(q_vals), tuple(kv_vals), mask, seed
    ), sched


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(cfg: Config, diff, aux):
    x, sched = _operands(diff, aux)
    return forward(cfg, x, sched, x.q.dtype)


def _attend_fwd(cfg: Config, diff, aux):
    perturbed = jax.tree.map(lambda p: p.perturbed, diff)
    diff, aux = jax.tree.map(lambda p: p.value, (diff, aux))
    x, sched = _operands(diff, aux)
    out, lse = forward(cfg, x, sched, x.q.dtype)
    wanted = Wanted(
        bias=x.bias is not None and any(jax.tree.leaves(perturbed[3])),
        scale=bool(perturbed[5]),
        params=any(jax.tree.leaves(perturbed[4])),
    )
    return (out, lse), (diff, aux, out, lse, wanted)


def _attend_bwd(cfg: Config, residuals, cotangents):
    diff, aux, out, lse, wanted = residuals
    dout, dlse = cotangents
    x, sched = _operands(diff, aux)
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
    dbias = None if g.dbias is None else g.dbias.astype(x.bias.dtype)
    dparams = None if g.dparams is None else tuple(d.astype(p.dtype) for d, p in zip(g.dparams, x.params))
    dscale = None if g.dscale is None else g.dscale.astype(x.scale.dtype)
    # k and v travel transposed ([B, K, Sp, H]); the gradients come back as [B, Sp, K, H].
    dk, dv = g.dk.transpose(0, 2, 1, 3), g.dv.transpose(0, 2, 1, 3)
    d_diff = (g.dq.astype(x.q.dtype), dk.astype(x.k.dtype), dv.astype(x.v.dtype), dbias, dparams, dscale)
    return d_diff, None


_attend.defvjp(_attend_fwd, _attend_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------------
# Ring attention step (pallas_kernels.ring_attention's per-block interface)
# ---------------------------------------------------------------------------------------------------


def fwd(q: Array, k: Array, v: Array, spec: MaskSpec, *, scale: float | None = None, softcap: float | None = None):
    """One ring step: ``(out [B, T, N, Hv] float32 normalised by its own lse, lse [B, N, T] float32)``.

    ``spec.block_map`` may be a run-time array: empty tiles are skipped through a schedule
    computed at run time (visible key blocks sorted first, a loop over their count). Positions may
    be per sequence (``[B, T]``, ``[B, S]``).
    """
    shape = _checks.check_qkv(q, k, v)
    cfg, x, sched = _prepare(q, k, v, spec, shape, _checks.check_scale(scale, shape.head_dim), softcap, None)
    out, lse = forward(cfg, x, sched, jnp.float32)
    return out[:, : shape.q_len], lse[..., : shape.q_len]


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
    shape = _checks.check_qkv(q, k, v)
    t, s = shape.q_len, shape.kv_len
    cfg, x, sched = _prepare(q, k, v, spec, shape, _checks.check_scale(scale, shape.head_dim), softcap, None)
    tp = x.q.shape[1]
    lse = _pad_axis(jnp.asarray(lse, jnp.float32), 2, tp, -jnp.inf)
    delta = _pad_axis(jnp.asarray(delta, jnp.float32), 2, tp)
    g = backward(cfg, x, sched, lse, delta, _pad_axis(dout, 1, tp))
    return g.dq[:, :t], g.dk[:, :s], g.dv[:, :s]
