"""Attention dropout bits from a counter-based hash: the same bits everywhere, nothing stored.

Dropout on the attention weights zeroes ``p[b, n, i, j]`` with probability ``rate`` and scales the
survivors by ``1 / (1 - rate)``. A flash kernel never holds the whole ``[T, S]`` matrix, so the
bits cannot come from ``jax.random`` over that shape; instead each bit is a pure function of
``(seed, batch, head, query position, key position)``. The forward and the backward regenerate
the same bits tile by tile without storing them, every implementation (reference, blockwise XLA
path, Pallas kernels, ring steps) draws exactly the same ones, and a ring shard keeps the bits of
the unsharded call because positions are absolute.

The hash is murmur3's 32-bit finaliser over int32 arithmetic (wrapping multiplies, logical
shifts, xor), which lowers in XLA, Triton and Mosaic alike. Positions enter as the absolute
positions of :class:`~pallas_kernels.mask_info.MaskSpec`.

>>> import jax.numpy as jnp
>>> keep = keep_mask(jnp.int32(7), 0, jnp.arange(4)[:, None], jnp.arange(4096)[None, :], 0, rate=0.25)
>>> keep.shape, round(float(keep.mean()), 2)
((4, 4096), 0.75)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

__all__ = ["keep_mask", "row_seed", "keep_from_row_seed", "keep_threshold", "seed_from_key"]

# Odd 32-bit constants (as int32 bit patterns): murmur3's finaliser and golden-ratio mixing.
_C1 = -2048144789  # 0x85EBCA6B
_C2 = -1028477387  # 0xC2B2AE35
_GOLDEN = -1640531535  # 0x9E3779B1
_KEY = 668265263  # 0x27D4EB2F


def _mix(h: Array) -> Array:
    """murmur3 ``fmix32`` on int32 bit patterns (every input bit affects every output bit)."""
    h = h ^ lax.shift_right_logical(h, jnp.int32(16))
    h = h * jnp.int32(_C1)
    h = h ^ lax.shift_right_logical(h, jnp.int32(13))
    h = h * jnp.int32(_C2)
    return h ^ lax.shift_right_logical(h, jnp.int32(16))


def keep_threshold(rate: float) -> int:
    """The 31-bit threshold: an element survives iff its 31-bit hash is ``>= threshold``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate=}.")
    return min(int(round(rate * 2.0**31)), 2**31 - 1)


def row_seed(seed, batch, head, q_pos) -> Array:
    """Per-row part of the hash: depends on ``(seed, batch, head, query position)`` (int32 arrays).

    Kernels compute it once per row of a tile, then one :func:`keep_from_row_seed` per element.
    """
    i32 = lambda x: jnp.asarray(x, jnp.int32)
    h = _mix(i32(seed) ^ (i32(batch) * jnp.int32(_GOLDEN)))
    h = _mix(h ^ (i32(head) * jnp.int32(_C2)))
    return _mix(h ^ (i32(q_pos) * jnp.int32(_KEY)))


def keep_from_row_seed(row: Array, kv_pos, rate: float) -> Array:
    """Boolean keep-mask from a :func:`row_seed` and key positions (broadcasting against each other)."""
    h = _mix(row ^ (jnp.asarray(kv_pos, jnp.int32) * jnp.int32(_GOLDEN)))
    return lax.shift_right_logical(h, jnp.int32(1)) >= jnp.int32(keep_threshold(rate))


def keep_mask(seed, batch, head, q_pos, kv_pos, rate: float) -> Array:
    """Which attention weights survive dropout at ``rate``: bool, the broadcast shape of the indices.

    Args:
      seed: int32 scalar (see :func:`seed_from_key`).
      batch, head, q_pos, kv_pos: int32 arrays (or ints) that broadcast against each other: the
        batch index, the query head, and the absolute query and key positions.
      rate: static probability of dropping a weight, ``0 <= rate < 1``.
    """
    return keep_from_row_seed(row_seed(seed, batch, head, q_pos), kv_pos, rate)


def seed_from_key(key: Array) -> Array:
    """An int32 seed drawn from a ``jax.random`` key (typed or raw ``uint32[2]``)."""
    bits = jax.random.bits(key, (), jnp.uint32)
    return lax.bitcast_convert_type(bits, jnp.int32)
