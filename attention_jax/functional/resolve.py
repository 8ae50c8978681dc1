"""Resolve once: a call's mask, offsets and score mod become one ``MaskSpec`` for its backend.

This is the only place that interprets "a ``Mask``, a boolean array or None" together with
offsets. Whatever the input, every backend receives the same structured description:

* positions: ``offset + arange`` as numpy (static offsets), a JAX ``[T]`` (a traced offset) or
  ``[B, T]`` (``[B]`` offsets: one per sequence, as a decoding cache gives them);
* the block map at the backend's tiles: static numpy when the offsets are static (from the mask's
  analytic structure), else computed at run time from the traced positions
  (``Mask.runtime_block_map``), so decoding keeps block skipping and never builds a dense mask;
* a boolean-array mask travels as ``spec.array`` with a block map computed from it;
* the score mod as its tile function and per-head parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks as masks_lib
from attention_jax import score_mods as score_mods_lib
from attention_jax.functional import _checks
from attention_jax.functional.backends.base import Call, _static_int
from pallas_kernels import mask_info
from pallas_kernels.mask_info import FULL, PARTIAL, MaskSpec

Array = jax.Array


def check_mask(mask, shape: _checks.AttentionShape) -> None:
    """``mask`` is None, a ``Mask`` whose arrays have batch 1 or B, or a boolean array broadcastable to [B, N, T, S]."""
    if mask is None:
        return
    if isinstance(mask, masks_lib.Mask):
        q_vals, kv_vals = mask.arrays(shape.q_len, shape.kv_len)
        for name, vals in (("q", q_vals), ("kv", kv_vals)):
            for a in vals:
                if a.shape[0] not in (1, shape.batch):
                    raise ValueError(
                        f"the mask's {name} arrays have batch size {a.shape[0]}, expected 1 or B={shape.batch}."
                    )
        return
    if not hasattr(mask, "dtype") and not isinstance(mask, (list, tuple)):
        raise ValueError(f"mask must be an attention_jax.masks.Mask or a boolean array, got {type(mask).__name__}.")
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {jnp.result_type(mask)}.")
    _checks.check_broadcastable("mask", mask, shape)


def check_score_mod(score_mod, shape: _checks.AttentionShape) -> None:
    if score_mod is None:
        return
    if not isinstance(score_mod, score_mods_lib.ScoreMod):
        raise ValueError(
            f"score_mod must be an attention_jax.score_mods.ScoreMod (see score_mods.from_fn), got "
            f"{type(score_mod).__name__}."
        )
    for i, p in enumerate(score_mod.head_params()):
        if jnp.shape(p) != (shape.num_heads,):
            raise ValueError(
                f"score_mod's per-head parameters must have shape [N]=[{shape.num_heads}], got parameter {i} of "
                f"shape {jnp.shape(p)} (e.g. one ALiBi slope per query head)."
            )


def resolve_spec(call: Call, block_q: int, block_k: int) -> MaskSpec:
    """The ``MaskSpec`` of ``call`` for ``(block_q, block_k)`` tiles (see the module docstring)."""
    shape = call.shape
    t, s = shape.q_len, shape.kv_len
    q_pos, kv_pos = _positions(call.q_offset, t), _positions(call.kv_offset, s)
    static = isinstance(q_pos, np.ndarray) and isinstance(kv_pos, np.ndarray)
    fn, q_vals, kv_vals, array = None, (), (), None
    mask = call.mask
    if mask is None:
        block_map = _ragged_map(t, s, block_q, block_k, FULL)
    elif isinstance(mask, masks_lib.Mask):
        total = masks_lib.total_length(s, call.kv_offset) if static else None
        fn = mask.fn(total)
        q_vals, kv_vals = mask.arrays(t, s)
        if static:
            block_map = _static_block_map(mask, t, s, block_q, block_k, int(q_pos[0]), int(kv_pos[0]))
        else:
            block_map = mask.runtime_block_map(q_pos, kv_pos, block_q, block_k, total)
    else:
        array = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + tuple(jnp.shape(mask)))  # [Bm, Nm, T?, S?]
        array = jnp.broadcast_to(jnp.asarray(array, bool), array.shape[:2] + (t, s))
        if isinstance(mask, jax.core.Tracer):
            block_map = mask_info.shared_block_map(array, block_q, block_k, axis=1)  # [Bm, nq, nk], run time
        else:
            block_map = mask_info.shared_block_map(np.asarray(array), block_q, block_k, axis=1)
            block_map = block_map[0] if block_map.shape[0] == 1 else block_map
    score_fn, score_params = None, ()
    if call.score_mod is not None:
        score_fn = call.score_mod.tile_fn()
        score_params = tuple(jnp.asarray(p) for p in call.score_mod.head_params())
    return MaskSpec(
        fn=fn,
        block_map=block_map,
        q_positions=q_pos,
        kv_positions=kv_pos,
        q_vals=tuple(q_vals),
        kv_vals=tuple(kv_vals),
        block_q=block_q,
        block_k=block_k,
        score_fn=score_fn,
        score_params=score_params,
        array=array,
    )


def _positions(offset, length: int):
    """``offset + arange(length)``: numpy int32 ``[L]`` if static, else JAX ``[L]`` or ``[B, L]``."""
    static = _static_int(offset)
    if static is not None:
        return (static + np.arange(length)).astype(np.int32)
    offset = jnp.asarray(offset, jnp.int32)
    return offset[..., None] + jnp.arange(length, dtype=jnp.int32)


def _ragged_map(t: int, s: int, block_q: int, block_k: int, kind: int) -> np.ndarray:
    """``kind`` everywhere except the ragged last key block, which is at most PARTIAL."""
    nq = mask_info.num_blocks(t, block_q)
    complete = mask_info.kv_tiles_complete(s, block_k, nq)
    return np.where(complete, kind, min(kind, PARTIAL)).astype(np.int8)


def _static_block_map(mask, t, s, block_q, block_k, q_offset, kv_offset) -> np.ndarray:
    try:
        with jax.ensure_compile_time_eval():  # from_fn / random_blocks evaluate jnp on the host
            return mask.block_map(t, s, block_q, block_k, q_offset, kv_offset)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        # A from_fn mask combined with traced data (segment ids under jit) has no static map:
        # every tile is partial; backends may still skip tiles their data hides at run time.
        return _ragged_map(t, s, block_q, block_k, PARTIAL)
