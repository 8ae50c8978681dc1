"""Masks: lazy, composable descriptions of which keys each query may attend to.

``True`` means "may attend". A :class:`Mask` is defined once and drives every implementation:

* ``mask.dense(T, S)`` materialises it (the reference path and tests);
* ``mask.block_map(T, S, block_q, block_k)`` classifies tiles as empty / partial / full
  (see ``pallas_kernels.mask_info``) without materialising the dense mask for structural masks;
* ``mask.fn(kv_len)`` is the elementwise function kernels evaluate on index tiles,
  ``fn(q_pos, kv_pos, q_vals, kv_vals)``, with ``mask.arrays(T, S)`` the per-position data
  (segment ids, lengths) it reads.

Positions are absolute: ``q_offset``/``kv_offset`` shift them, so the same mask is exact for a
decoding step (``q_offset = t``) and for a ring shard. Masks combine with ``&``, ``|`` and ``~``.

>>> import attention_jax as aj
>>> m = aj.masks.causal() & aj.masks.sliding_window(2)
>>> m.dense(4, 4).astype(int).tolist()
[[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]]
>>> m.block_map(4, 4, 2, 2).tolist()
[[1, 0], [1, 1]]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import mask_info
from pallas_kernels.mask_info import FULL, PARTIAL

__all__ = [
    "Mask",
    "causal",
    "sliding_window",
    "chunked",
    "segments",
    "padding",
    "prefix_lm",
    "global_tokens",
    "dilated",
    "random_blocks",
    "full",
    "from_fn",
    "valid_keys",
    "as_mask",
]

Array = jax.Array


class Mask:
    """Base class of all masks. Subclasses implement ``_fn`` and, where they can, ``_blocks``.

    Static configuration (window sizes, offsets) defines equality and hashing, so a mask can be a
    static argument of ``jax.jit``; captured arrays (segment ids, lengths) are pytree leaves.
    """

    # -- what subclasses provide -------------------------------------------------------------
    def _fn(self, kv_len: int) -> Callable[..., Array]:
        raise NotImplementedError

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len: int) -> np.ndarray | None:
        """Block map from inclusive block bounds ``q_lo/q_hi [nq, 1]``, ``kv_lo/kv_hi [1, nk]``.

        Return None when the structure gives no shortcut; the caller then evaluates densely.
        """
        return None

    def _static_key(self) -> tuple:
        raise NotImplementedError

    def q_arrays(self, q_len: int) -> tuple[Array, ...]:
        """Per-query data this mask reads, each ``[B, T]``."""
        return ()

    def kv_arrays(self, kv_len: int) -> tuple[Array, ...]:
        """Per-key data this mask reads, each ``[B, S]``."""
        return ()

    @property
    def num_q_arrays(self) -> int:
        return 0

    @property
    def num_kv_arrays(self) -> int:
        return 0

    @property
    def is_static(self) -> bool:
        """True when the mask depends on positions alone (no captured arrays)."""
        return self.num_q_arrays == 0 and self.num_kv_arrays == 0

    # -- public API ------------------------------------------------------------------------------
    def fn(self, kv_len: int | None) -> Callable[..., Array]:
        """Elementwise mask function ``fn(q_pos, kv_pos, q_vals, kv_vals) -> bool``.

        ``kv_len`` is the total key length the positions live in, None when unknown at trace time
        (only ``random_blocks`` uses it).
        """
        return _MaskFunction(self, kv_len)

    def arrays(self, q_len: int, kv_len: int) -> tuple[tuple[Array, ...], tuple[Array, ...]]:
        """``(q_vals, kv_vals)``: the per-position data ``fn`` reads, ``[B, T]`` and ``[B, S]``."""
        return self.q_arrays(q_len), self.kv_arrays(kv_len)

    def dense(
        self,
        q_len: int,
        kv_len: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        *,
        q_positions: Array | None = None,
        kv_positions: Array | None = None,
    ) -> Array:
        """Materialise as booleans ``[T, S]`` (static masks) or ``[B, T, S]`` (masks with data).

        Positions are ``q_offset + arange(T)`` and ``kv_offset + arange(S)``, or the given
        ``q_positions [T]`` / ``kv_positions [S]`` (ring layouts).
        """
        _check_lengths(q_len, kv_len)
        q_pos = _positions("q_positions", q_positions, q_len, q_offset)[:, None]
        kv_pos = _positions("kv_positions", kv_positions, kv_len, kv_offset)[None, :]
        q_vals, kv_vals = self.arrays(q_len, kv_len)
        q_vals = tuple(v[:, :, None] for v in q_vals)  # [B, T, 1]
        kv_vals = tuple(v[:, None, :] for v in kv_vals)  # [B, 1, S]
        out = self.fn(total_length(kv_len, kv_offset, kv_positions))(q_pos, kv_pos, q_vals, kv_vals)
        lead = (max(v.shape[0] for v in q_vals + kv_vals),) if q_vals + kv_vals else ()
        return jnp.broadcast_to(out, lead + (q_len, kv_len))

    def block_map(
        self,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        *,
        q_positions: np.ndarray | None = None,
        kv_positions: np.ndarray | None = None,
    ) -> np.ndarray:
        """Static ``[ceil(T / block_q), ceil(S / block_k)]`` int8 map: 0 empty, 1 partial, 2 full.

        Masks with captured arrays (segments, padding) are ``PARTIAL`` wherever their structure
        is unknown at trace time; combined with a structural mask by ``&`` they still skip what
        the structural part rules out. A key block that runs past ``kv_len`` is never ``FULL``.
        Positions as in :meth:`dense`; they must be concrete (numpy) here.
        """
        _check_lengths(q_len, kv_len)
        for name, value in (("block_q", block_q), ("block_k", block_k)):
            if not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
        if q_positions is None:
            q_lo, q_hi = mask_info.block_bounds(q_len, block_q, q_offset)
        else:
            q_lo, q_hi = mask_info.block_bounds_from_positions(
                _host_positions("q_positions", q_positions, q_len), block_q
            )
        if kv_positions is None:
            kv_lo, kv_hi = mask_info.block_bounds(kv_len, block_k, kv_offset)
        else:
            kv_lo, kv_hi = mask_info.block_bounds_from_positions(
                _host_positions("kv_positions", kv_positions, kv_len), block_k
            )
        total = total_length(kv_len, kv_offset, kv_positions)
        blocks = self._block_map_bounds(q_lo[:, None], q_hi[:, None], kv_lo[None, :], kv_hi[None, :], total)
        if blocks is None:  # no structure to use: classify the dense mask (from_fn only)
            dense = np.asarray(
                self.dense(q_len, kv_len, q_offset, kv_offset, q_positions=q_positions, kv_positions=kv_positions)
            )
            if dense.ndim == 2:
                return mask_info.block_map_from_dense(dense, block_q, block_k)
            # One map for every sequence: FULL only where the tile is full in all of them (a
            # union would skip the mask of a sequence whose data hides part of the tile).
            return mask_info.shared_block_map(dense, block_q, block_k, axis=0)
        complete = mask_info.kv_tiles_complete(kv_len, block_k, len(q_lo))
        return np.where((blocks == FULL) & ~complete, PARTIAL, blocks).astype(np.int8)

    def spec(
        self,
        q_len: int,
        kv_len: int,
        block_q: int,
        block_k: int,
        q_offset: int = 0,
        kv_offset: int = 0,
        *,
        q_positions: np.ndarray | None = None,
        kv_positions: np.ndarray | None = None,
    ) -> mask_info.MaskSpec:
        """The kernels' view of this mask for ``(block_q, block_k)`` tiles (``pallas_kernels.mask_info.MaskSpec``)."""
        block_map = self.block_map(
            q_len, kv_len, block_q, block_k, q_offset, kv_offset, q_positions=q_positions, kv_positions=kv_positions
        )
        q_vals, kv_vals = self.arrays(q_len, kv_len)
        return mask_info.MaskSpec(
            fn=self.fn(total_length(kv_len, kv_offset, kv_positions)),
            block_map=jnp.asarray(block_map, jnp.int32),
            q_positions=_positions("q_positions", q_positions, q_len, q_offset),
            kv_positions=_positions("kv_positions", kv_positions, kv_len, kv_offset),
            q_vals=q_vals,
            kv_vals=kv_vals,
            block_q=block_q,
            block_k=block_k,
        )

    def runtime_block_map(
        self, q_positions: Array, kv_positions: Array, block_q: int, block_k: int, kv_len: int | None = None
    ) -> Array:
        """Block map computed at run time from traced positions: int32 ``[B or 1, nq, nk]``.

        ``q_positions`` ``[T]`` or ``[B, T]`` and ``kv_positions`` ``[S]`` or ``[B, S]`` may be traced
        (per-sequence decode offsets, offsets under ``jit``): the structural part of the mask still
        classifies tiles exactly from their position bounds, so decoding keeps block skipping.
        Masks with no structure to use at run time (``from_fn``, ``random_blocks``) and data masks
        are PARTIAL. The ragged last key block is never FULL. ``kv_len``: total key length, as in
        :meth:`fn`.
        """
        q_positions = jnp.asarray(q_positions, jnp.int32)
        kv_positions = jnp.asarray(kv_positions, jnp.int32)
        q_lo, q_hi = mask_info.position_block_bounds(q_positions.reshape(-1, q_positions.shape[-1]), block_q)
        kv_lo, kv_hi = mask_info.position_block_bounds(kv_positions.reshape(-1, kv_positions.shape[-1]), block_k)
        nq, nk = q_lo.shape[-1], kv_lo.shape[-1]
        lead = max(q_lo.shape[0], kv_lo.shape[0])
        q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]  # [B or 1, nq, 1]
        kv_lo, kv_hi = kv_lo[:, None, :], kv_hi[:, None, :]  # [B or 1, 1, nk]
        blocks = self._block_map_bounds(q_lo, q_hi, kv_lo, kv_hi, kv_len)
        if blocks is None:
            blocks = jnp.full((1, 1, 1), PARTIAL, jnp.int32)
        complete = mask_info.kv_tiles_complete(kv_positions.shape[-1], block_k, nq)
        blocks = jnp.where(jnp.asarray(complete), blocks, jnp.minimum(blocks, PARTIAL))
        return jnp.broadcast_to(blocks, (lead, nq, nk)).astype(jnp.int32)

    def _block_map_bounds(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        blocks = self._blocks(q_lo, q_hi, kv_lo, kv_hi, kv_len)
        if blocks is None:
            return None
        xp = mask_info._array_module(blocks, q_lo, kv_lo)
        shape = np.broadcast_shapes(q_lo.shape, kv_lo.shape)
        return xp.broadcast_to(xp.asarray(blocks), shape).astype(xp.int8)

    def jax_nn_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``jax.nn.dot_product_attention`` that express this mask.

        ``causal()``, ``sliding_window`` and ``padding``, alone or combined with ``&``, map to
        ``is_causal``, ``local_window_size`` and the ``*_seq_lengths``; anything else raises a
        ``ValueError`` naming the part that has no equivalent (the cuDNN backend asks this).

        >>> (causal() & sliding_window(4)).jax_nn_arguments()
        {'is_causal': True, 'local_window_size': (4, 0)}
        """
        raise ValueError(f"{self!r} has no equivalent in jax.nn.dot_product_attention.")

    # -- algebra -----------------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return _And(self, as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return _Or(self, as_mask(other))

    def __invert__(self) -> Mask:
        return _Not(self)

    def __bool__(self):
        raise TypeError(
            "A Mask has no truth value: combine masks with `&` (both), `|` (either) and `~` (not) "
            "instead of `and`, `or` and `not`."
        )

    def __eq__(self, other: Any) -> bool:
        return type(self) is type(other) and self._static_key() == other._static_key()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._static_key()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}{self._static_key()}"


class _MaskFunction:
    """A mask's elementwise function, hashable by the mask's static structure.

    Kernels take it as a static argument, so equal masks share one jit cache entry. The captured
    arrays are replaced by placeholders: the function reads data only through ``q_vals/kv_vals``.
    """

    def __init__(self, mask: Mask, kv_len: int | None):
        self.mask = jax.tree.map(lambda _: 0, mask)
        self.kv_len = None if kv_len is None else int(kv_len)
        self._fn = self.mask._fn(self.kv_len)

    def __call__(self, q_pos, kv_pos, q_vals=(), kv_vals=()):
        return self._fn(q_pos, kv_pos, tuple(q_vals), tuple(kv_vals))

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _MaskFunction) and (self.mask, self.kv_len) == (other.mask, other.kv_len)

    def __hash__(self) -> int:
        return hash((self.mask, self.kv_len))

    def __repr__(self) -> str:
        return f"MaskFunction({self.mask!r}, kv_len={self.kv_len})"


def as_mask(mask: Any) -> Mask:
    if not isinstance(mask, Mask):
        raise TypeError(f"Expected an attention_jax.masks.Mask, got {type(mask).__name__}.")
    return mask


def _check_lengths(q_len: int, kv_len: int) -> None:
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")


def _positions(name: str, positions: Any, length: int, offset: Any = 0) -> Array:
    if positions is None:
        return mask_info.contiguous_positions(length, offset)
    if jnp.shape(positions) != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {name}.shape={jnp.shape(positions)}.")
    return jnp.asarray(positions, jnp.int32)


def _host_positions(name: str, positions: Any, length: int) -> np.ndarray:
    """Concrete positions for a static block map (numpy, so it also works while tracing)."""
    try:
        positions = np.asarray(positions)
    except jax.errors.TracerArrayConversionError:
        raise ValueError(f"{name} must be concrete (numpy) to build a static block map, got a traced array.") from None
    if positions.shape != (length,):
        raise ValueError(f"{name} must have shape [{length}], got {name}.shape={positions.shape}.")
    return positions


def total_length(kv_len: int, kv_offset: Any = 0, kv_positions: Any = None) -> int | None:
    """Length of the key sequence the positions index into (random_blocks picks blocks of it).

    None when it is unknown at trace time (traced or per-sequence offsets or positions).
    """
    if kv_positions is not None:
        try:
            return int(np.max(np.asarray(kv_positions))) + 1
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            return None
    try:
        return int(kv_offset) + kv_len
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}.")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# Structural masks: depend on positions only; hashable; analytic block maps.
# ---------------------------------------------------------------------------------------------------


class _Static(Mask):
    """Masks without captured arrays are static pytrees: jit treats them as compile-time config."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_static(cls)


class _Full(_Static):
    def _fn(self, kv_len):
        return lambda q_pos, kv_pos, q_vals, kv_vals: jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), bool)

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        return np.full((1, 1), FULL, np.int8)

    def _static_key(self):
        return ()

    def jax_nn_arguments(self):
        return {}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Causal(_Static):
    offset: int

    def _fn(self, kv_len):
        off = self.offset
        return lambda q_pos, kv_pos, q_vals, kv_vals: kv_pos <= q_pos + off

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        return mask_info.classify(kv_hi <= q_lo + self.offset, kv_lo <= q_hi + self.offset)

    def _static_key(self):
        return (self.offset,)

    def jax_nn_arguments(self):
        if self.offset != 0:
            return super().jax_nn_arguments()
        return {"is_causal": True}


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _SlidingWindow(_Static):
    left: int
    right: int

    def _fn(self, kv_len):
        left, right = self.left, self.right
        return lambda q_pos, kv_pos, q_vals, kv_vals: (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        all_visible = (kv_lo >= q_hi - self.left) & (kv_hi <= q_lo + self.right)
        any_visible = (kv_hi >= q_lo - self.left) & (kv_lo <= q_hi + self.right)
        return mask_info.classify(all_visible, any_visible)

    def _static_key(self):
        return (self.left, self.right)

    def jax_nn_arguments(self):
        return {"local_window_size": (self.left, self.right)}


def _floor_div(x, n: int):
    """``x // n`` for int arrays and a positive ``n``, from ops every kernel backend lowers.

    ``jnp.floor_divide`` goes through ``sign``, which Mosaic TPU rejects in kernels; truncating
    division of ``x - (n - 1)`` rounds negative ``x`` down as ``//`` does.
    """
    return jax.lax.div(jnp.where(x < 0, x - (n - 1), x), jnp.asarray(n, x.dtype))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Chunked(_Static):
    size: int

    def _fn(self, kv_len):
        size = self.size
        return lambda q_pos, kv_pos, q_vals, kv_vals: _floor_div(q_pos, size) == _floor_div(kv_pos, size)

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        s = self.size
        q_first, q_last, kv_first, kv_last = q_lo // s, q_hi // s, kv_lo // s, kv_hi // s
        all_visible = (q_first == q_last) & (kv_first == kv_last) & (q_first == kv_first)
        any_visible = (q_first <= kv_last) & (kv_first <= q_last)
        return mask_info.classify(all_visible, any_visible)

    def _static_key(self):
        return (self.size,)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _KeyPrefix(_Static):
    """Keys at positions < length are visible to every query (the prefix of prefix-LM)."""

    length: int

    def _fn(self, kv_len):
        n = self.length
        return lambda q_pos, kv_pos, q_vals, kv_vals: jnp.broadcast_to(
            kv_pos < n, jnp.broadcast_shapes(q_pos.shape, kv_pos.shape)
        )

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        return mask_info.classify(kv_hi < self.length, kv_lo < self.length)

    def _static_key(self):
        return (self.length,)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _GlobalTokens(_Static):
    indices: tuple[int, ...]

    def _fn(self, kv_len):
        indices = self.indices

        def fn(q_pos, kv_pos, q_vals, kv_vals):
            q_global = jnp.zeros(q_pos.shape, bool)
            kv_global = jnp.zeros(kv_pos.shape, bool)
            for g in indices:  # a handful of static indices: unrolled compares run in any kernel
                q_global = q_global | (q_pos == g)
                kv_global = kv_global | (kv_pos == g)
            return q_global | kv_global

        return fn

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        xp = mask_info._array_module(q_lo, kv_lo)
        g = xp.asarray(sorted(self.indices), dtype=xp.int32 if xp is jnp else np.int64)

        def count_in(lo, hi):  # how many global indices fall in [lo, hi]
            return xp.searchsorted(g, hi, side="right") - xp.searchsorted(g, lo, side="left")

        q_count, kv_count = count_in(q_lo, q_hi), count_in(kv_lo, kv_hi)
        all_visible = (q_count == q_hi - q_lo + 1) | (kv_count == kv_hi - kv_lo + 1)
        return mask_info.classify(all_visible, (q_count > 0) | (kv_count > 0))

    def _static_key(self):
        return self.indices


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _Dilated(_Static):
    window: int
    dilation: int

    def _fn(self, kv_len):
        window, dilation = self.window, self.dilation

        def fn(q_pos, kv_pos, q_vals, kv_vals):
            distance = jnp.abs(q_pos - kv_pos)
            return (distance <= window) & (distance % dilation == 0)

        return fn

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        # Smallest |q - kv| over the tile: 0 if the ranges overlap, else the gap between them.
        xp = mask_info._array_module(q_lo, kv_lo)
        min_distance = xp.maximum(0, xp.maximum(kv_lo - q_hi, q_lo - kv_hi))
        any_visible = min_distance <= self.window
        max_distance = xp.maximum(xp.abs(kv_hi - q_lo), xp.abs(q_hi - kv_lo))
        all_visible = (self.dilation == 1) & (max_distance <= self.window)
        return mask_info.classify(all_visible, any_visible)

    def _static_key(self):
        return (self.window, self.dilation)


# A 32-bit mixing hash (the "lowbias32" constants) written with int32 ops that wrap identically in
# numpy, XLA and Pallas kernels, so random blocks are the same on every path.
def _hash32(x):
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    x = x ^ ((x >> 15) & 0x1FFFF)
    return x


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _RandomBlocks(_Static):
    """Each query block sees exactly ``min(num_blocks, n)`` pseudo-random key blocks of ``n``."""

    block: int
    num_blocks: int
    seed: int
    kv_len: int | None = None

    def _selector(self, kv_len: int | None):
        kv_len = self.kv_len if self.kv_len is not None else kv_len
        if kv_len is None:
            raise ValueError(
                "random_blocks picks among the key blocks of the whole key sequence, whose length is unknown here "
                "(traced or per-sequence offsets, e.g. decoding); pass it: random_blocks(..., kv_len=total)."
            )
        # At least one block, also when offsets put every key before position 0 (a rolling cache).
        n = max(1, mask_info.num_blocks(max(int(kv_len), 1), self.block))
        # Visit key blocks in a seed-dependent order kb -> (kb * stride) mod n; a query block takes a
        # run of num_blocks consecutive entries of that order from a hashed start: exact count, no
        # repeats, and an elementwise formula.
        stride = 1 + (self.seed * 7919) % n
        while math.gcd(stride, n) != 1:
            stride += 1
        take = min(self.num_blocks, n)
        seed = np.int32(self.seed & 0x7FFFFFFF)

        def select(qb, kb):
            start = jnp.abs(_hash32(qb * 0x5BD1E995 + seed)) % n
            rank = (kb * stride - start) % n
            return rank < take

        return select

    def _fn(self, kv_len):
        select, block = self._selector(kv_len), self.block
        return lambda q_pos, kv_pos, q_vals, kv_vals: select(q_pos // block, kv_pos // block)

    def _blocks(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        if mask_info._array_module(q_lo, kv_lo) is jnp:
            return None  # run-time bounds: no static loop over pattern blocks (PARTIAL, still exact)
        # Visibility is constant on each (query block, key block) pair of the random pattern, so a
        # tile is classified by the pattern blocks it overlaps, whatever the tile size.
        qb_lo, qb_hi = q_lo // self.block, q_hi // self.block
        kb_lo, kb_hi = kv_lo // self.block, kv_hi // self.block
        select = self._selector(kv_len)
        any_visible = np.zeros(np.broadcast_shapes(q_lo.shape, kv_lo.shape), bool)
        all_visible = np.ones_like(any_visible)
        for dq in range(int(np.max(qb_hi - qb_lo)) + 1):
            for dk in range(int(np.max(kb_hi - kb_lo)) + 1):
                qb, kb = np.minimum(qb_lo + dq, qb_hi), np.minimum(kb_lo + dk, kb_hi)
                hit = np.asarray(select(jnp.asarray(qb, jnp.int32), jnp.asarray(kb, jnp.int32)))
                any_visible |= hit
                all_visible &= hit
        return mask_info.classify(all_visible, any_visible)

    def _static_key(self):
        return (self.block, self.num_blocks, self.seed, self.kv_len)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class _FromFn(_Static):
    function: Callable[[Array, Array], Array]

    def _fn(self, kv_len):
        function = self.function

        def fn(q_pos, kv_pos, q_vals, kv_vals):
            out = jnp.asarray(function(q_pos, kv_pos))
            return jnp.broadcast_to(out, jnp.broadcast_shapes(q_pos.shape, kv_pos.shape)).astype(bool)

        return fn

    def _static_key(self):
        return (self.function,)


# ---------------------------------------------------------------------------------------------------
# Data masks: capture arrays (pytree leaves). Their block maps are PARTIAL (unknown at trace time).
# ---------------------------------------------------------------------------------------------------


def _data_blocks(q_lo, q_hi, kv_lo, kv_hi, kv_len):
    return np.full((1, 1), PARTIAL, np.int8)


@jax.tree_util.register_pytree_node_class
class _Segments(Mask):
    def __init__(self, q_segment_ids, kv_segment_ids):
        self.q_segment_ids = q_segment_ids
        self.kv_segment_ids = kv_segment_ids

    num_q_arrays = 1
    num_kv_arrays = 1

    def q_arrays(self, q_len):
        _check_ids("q_segment_ids", self.q_segment_ids, q_len, "T")
        return (jnp.asarray(self.q_segment_ids, jnp.int32),)

    def kv_arrays(self, kv_len):
        _check_ids("kv_segment_ids", self.kv_segment_ids, kv_len, "S")
        return (jnp.asarray(self.kv_segment_ids, jnp.int32),)

    def _fn(self, kv_len):
        return lambda q_pos, kv_pos, q_vals, kv_vals: q_vals[0] == kv_vals[0]

    _blocks = staticmethod(_data_blocks)

    def _static_key(self):
        return ()

    def tree_flatten(self):
        return (self.q_segment_ids, self.kv_segment_ids), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class _Padding(Mask):
    """Query ``i`` of batch ``b`` is valid iff ``i < q_lengths[b]``; likewise keys."""

    def __init__(self, q_lengths, kv_lengths):
        self.q_lengths = q_lengths
        self.kv_lengths = kv_lengths

    @property
    def num_q_arrays(self):
        return int(self.q_lengths is not None)

    @property
    def num_kv_arrays(self):
        return int(self.kv_lengths is not None)

    def q_arrays(self, q_len):
        return _broadcast_lengths("q_lengths", self.q_lengths, q_len)

    def kv_arrays(self, kv_len):
        return _broadcast_lengths("kv_lengths", self.kv_lengths, kv_len)

    def _fn(self, kv_len):
        has_q, has_kv = self.q_lengths is not None, self.kv_lengths is not None

        def fn(q_pos, kv_pos, q_vals, kv_vals):
            out = jnp.ones(jnp.broadcast_shapes(q_pos.shape, kv_pos.shape), bool)
            if has_q:
                out = out & (q_pos < q_vals[0])
            if has_kv:
                out = out & (kv_pos < kv_vals[0])
            return out

        return fn

    _blocks = staticmethod(_data_blocks)

    def _static_key(self):
        return (self.q_lengths is not None, self.kv_lengths is not None)

    def jax_nn_arguments(self):
        out = {}
        if self.q_lengths is not None:
            out["query_seq_lengths"] = self.q_lengths
        if self.kv_lengths is not None:
            out["key_value_seq_lengths"] = self.kv_lengths
        return out

    def tree_flatten(self):
        return (self.q_lengths, self.kv_lengths), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class _ValidKeys(Mask):
    """Key slot ``j`` of sequence ``b`` exists iff ``valid[b, j]`` (a cache's written slots)."""

    def __init__(self, valid):
        self.valid = valid

    num_kv_arrays = 1

    def kv_arrays(self, kv_len):
        shape = jnp.shape(self.valid)
        if len(shape) != 2 or shape[1] != kv_len:
            raise ValueError(f"valid must have shape [B, S] with S={kv_len}, got valid.shape={shape}.")
        return (jnp.asarray(self.valid, jnp.int32),)

    def _fn(self, kv_len):
        return lambda q_pos, kv_pos, q_vals, kv_vals: jnp.broadcast_to(
            kv_vals[0] != 0, jnp.broadcast_shapes(q_pos.shape, kv_pos.shape, kv_vals[0].shape)
        )

    _blocks = staticmethod(_data_blocks)

    def _static_key(self):
        return ()

    def tree_flatten(self):
        return (self.valid,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def _check_ids(name: str, ids: Any, length: int, letter: str) -> None:
    shape = jnp.shape(ids)
    if len(shape) != 2 or shape[1] != length:
        raise ValueError(f"{name} must have shape [B, {letter}] with {letter}={length}, got {name}.shape={shape}.")
    if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
        raise ValueError(f"{name} must be integers, got dtype {jnp.result_type(ids)}.")


def _broadcast_lengths(name: str, lengths: Any, length: int) -> tuple[Array, ...]:
    if lengths is None:
        return ()
    if jnp.ndim(lengths) != 1:
        raise ValueError(f"{name} must have shape [B], got {name}.shape={jnp.shape(lengths)}.")
    lengths = jnp.asarray(lengths, jnp.int32)
    # Per-position copies of the length travel with positions (ring shards, decode offsets).
    return (jnp.broadcast_to(lengths[:, None], (lengths.shape[0], length)),)


# ---------------------------------------------------------------------------------------------------
# Combinators: the data of the children concatenates; block maps combine in the EMPTY<PARTIAL<FULL
# lattice of pallas_kernels.mask_info.
# ---------------------------------------------------------------------------------------------------


class _Binary(Mask):
    _combine_fn: Callable[[Array, Array], Array]
    _combine_blocks: Callable[[np.ndarray, np.ndarray], np.ndarray]
    _symbol: str

    def __init__(self, a: Mask, b: Mask):
        self.a, self.b = a, b

    @property
    def num_q_arrays(self):
        return self.a.num_q_arrays + self.b.num_q_arrays

    @property
    def num_kv_arrays(self):
        return self.a.num_kv_arrays + self.b.num_kv_arrays

    def q_arrays(self, q_len):
        return self.a.q_arrays(q_len) + self.b.q_arrays(q_len)

    def kv_arrays(self, kv_len):
        return self.a.kv_arrays(kv_len) + self.b.kv_arrays(kv_len)

    def _fn(self, kv_len):
        fa, fb = self.a.fn(kv_len), self.b.fn(kv_len)
        nq, nk = self.a.num_q_arrays, self.a.num_kv_arrays
        combine = type(self)._combine_fn

        def fn(q_pos, kv_pos, q_vals, kv_vals):
            return combine(fa(q_pos, kv_pos, q_vals[:nq], kv_vals[:nk]), fb(q_pos, kv_pos, q_vals[nq:], kv_vals[nk:]))

        return fn

    def _block_map_bounds(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        a = self.a._block_map_bounds(q_lo, q_hi, kv_lo, kv_hi, kv_len)
        b = self.b._block_map_bounds(q_lo, q_hi, kv_lo, kv_hi, kv_len)
        if a is None or b is None:
            return None
        return type(self)._combine_blocks(a, b)

    def _static_key(self):
        return (self.a, self.b)

    def __repr__(self):
        return f"({self.a!r} {self._symbol} {self.b!r})"

    def tree_flatten(self):
        return (self.a, self.b), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class _And(_Binary):
    _combine_fn = staticmethod(jnp.logical_and)
    _combine_blocks = staticmethod(mask_info.block_and)
    _symbol = "&"

    def jax_nn_arguments(self):
        a, b = self.a.jax_nn_arguments(), self.b.jax_nn_arguments()
        both = sorted(set(a) & set(b))
        if both:
            raise ValueError(f"{self!r} sets {both} twice; jax.nn.dot_product_attention takes each once.")
        return {**a, **b}


@jax.tree_util.register_pytree_node_class
class _Or(_Binary):
    _combine_fn = staticmethod(jnp.logical_or)
    _combine_blocks = staticmethod(mask_info.block_or)
    _symbol = "|"


@jax.tree_util.register_pytree_node_class
class _Not(Mask):
    def __init__(self, a: Mask):
        self.a = a

    @property
    def num_q_arrays(self):
        return self.a.num_q_arrays

    @property
    def num_kv_arrays(self):
        return self.a.num_kv_arrays

    def q_arrays(self, q_len):
        return self.a.q_arrays(q_len)

    def kv_arrays(self, kv_len):
        return self.a.kv_arrays(kv_len)

    def _fn(self, kv_len):
        fa = self.a.fn(kv_len)
        return lambda q_pos, kv_pos, q_vals, kv_vals: ~fa(q_pos, kv_pos, q_vals, kv_vals)

    def _block_map_bounds(self, q_lo, q_hi, kv_lo, kv_hi, kv_len):
        a = self.a._block_map_bounds(q_lo, q_hi, kv_lo, kv_hi, kv_len)
        return None if a is None else mask_info.block_not(a)

    def _static_key(self):
        return (self.a,)

    def __repr__(self):
        return f"~{self.a!r}"

    def tree_flatten(self):
        return (self.a,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


# ---------------------------------------------------------------------------------------------------
# Constructors: the public names.
# ---------------------------------------------------------------------------------------------------


def full() -> Mask:
    """Every query sees every key."""
    return _Full()


def causal(offset: int = 0) -> Mask:
    """Query ``i`` sees key ``j`` iff ``j <= i + offset``.

    >>> causal().dense(3, 3).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)):
        raise ValueError(f"offset must be an integer, got {offset=!r}.")
    return _Causal(int(offset))


def sliding_window(left: int, right: int = 0) -> Mask:
    """Query ``i`` sees key ``j`` iff ``i - left <= j <= i + right``.

    The convention of ``jax.nn.dot_product_attention(local_window_size=(left, right))``; combine
    with :func:`causal` (or keep ``right=0``) for a causal window.

    >>> sliding_window(1).dense(3, 3).astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    left = _positive_int("left", left, minimum=0)
    right = _positive_int("right", right, minimum=0)
    if left == 0 and right == 0:
        raise ValueError(f"sliding_window needs a window of at least one other token, got {left=} and {right=}.")
    return _SlidingWindow(left, right)


def chunked(size: int) -> Mask:
    """Query ``i`` sees key ``j`` iff both fall in the same chunk of ``size`` positions.

    Combine with :func:`causal` for chunked (Llama-4 style) local attention.
    """
    return _Chunked(_positive_int("size", size))


def segments(q_segment_ids: Array, kv_segment_ids: Array | None = None) -> Mask:
    """Packed documents: query and key see each other iff their segment ids are equal.

    Args:
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``; defaults to ``q_segment_ids`` (self-attention).

    >>> import jax.numpy as jnp
    >>> segments(jnp.array([[0, 0, 1]])).dense(3, 3).astype(int)[0].tolist()
    [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """
    if kv_segment_ids is None:
        kv_segment_ids = q_segment_ids
    for name, ids in (("q_segment_ids", q_segment_ids), ("kv_segment_ids", kv_segment_ids)):
        if jnp.ndim(ids) != 2:
            raise ValueError(f"{name} must have shape [B, length], got {name}.shape={jnp.shape(ids)}.")
    if jnp.shape(q_segment_ids)[0] != jnp.shape(kv_segment_ids)[0]:
        raise ValueError(
            f"q_segment_ids and kv_segment_ids must share the batch size, got {jnp.shape(q_segment_ids)} "
            f"and {jnp.shape(kv_segment_ids)}."
        )
    return _Segments(q_segment_ids, kv_segment_ids)


def padding(q_lengths: Array | None = None, kv_lengths: Array | None = None) -> Mask:
    """Right padding: query ``i`` of batch ``b`` is valid iff ``i < q_lengths[b]``; keys likewise.

    Padded query rows see nothing and output zeros.

    >>> import jax.numpy as jnp
    >>> padding(kv_lengths=jnp.array([2])).dense(2, 3).astype(int)[0].tolist()
    [[1, 1, 0], [1, 1, 0]]
    """
    if q_lengths is None and kv_lengths is None:
        raise ValueError("padding needs q_lengths, kv_lengths or both.")
    return _Padding(q_lengths, kv_lengths)


def valid_keys(valid: Array) -> Mask:
    """Only the key slots marked True exist (e.g. the written slots of a KV cache).

    Args:
      valid: bool ``[B, S]``.

    >>> import jax.numpy as jnp
    >>> valid_keys(jnp.array([[True, False, True]])).dense(1, 3).astype(int)[0].tolist()
    [[1, 0, 1]]
    """
    if jnp.ndim(valid) != 2:
        raise ValueError(f"valid must have shape [B, S], got valid.shape={jnp.shape(valid)}.")
    return _ValidKeys(valid)


def prefix_lm(prefix_length: int) -> Mask:
    """Prefix-LM: every query sees the first ``prefix_length`` keys, and causal beyond them."""
    return _KeyPrefix(_positive_int("prefix_length", prefix_length, minimum=0)) | causal()


def global_tokens(indices: Sequence[int]) -> Mask:
    """Global tokens (Longformer/BigBird): the tokens at ``indices`` see and are seen by all."""
    indices = tuple(sorted({int(i) for i in indices}))
    if not indices:
        raise ValueError("global_tokens needs at least one index, got an empty sequence.")
    if indices[0] < 0:
        raise ValueError(f"global token indices must be non-negative, got {indices[0]}.")
    return _GlobalTokens(indices)


def dilated(window: int, dilation: int) -> Mask:
    """Dilated window: query ``i`` sees key ``j`` iff ``|i - j| <= window`` and ``dilation`` divides it.

    ``window`` is measured in positions, so each side holds ``window // dilation`` keys besides ``i``.
    """
    return _Dilated(_positive_int("window", window), _positive_int("dilation", dilation))


def random_blocks(block: int, num_blocks: int, seed: int = 0, *, kv_len: int | None = None) -> Mask:
    """BigBird random attention: each query block of ``block`` positions sees ``num_blocks`` key blocks.

    The choice is a deterministic function of ``seed``, the block indices and the number of key
    blocks ``ceil(kv_len / block)``, so every implementation sees the same pattern. ``kv_len`` is
    the total key length; by default that of the call (``kv_offset + S``), which must then be
    known at trace time: pass ``kv_len`` when offsets are traced or differ per sequence (decoding).
    """
    if kv_len is not None:
        kv_len = _positive_int("kv_len", kv_len)
    return _RandomBlocks(
        _positive_int("block", block), _positive_int("num_blocks", num_blocks), int(seed), kv_len
    )


def from_fn(fn: Callable[[Array, Array], Array]) -> Mask:
    """Any mask as a function of absolute positions ``fn(q_pos, kv_pos) -> bool`` (elementwise).

    Use ``jnp`` ops only, so that kernels can evaluate it on tiles. Its block map is computed from
    the dense mask; prefer the structural constructors when one fits.

    >>> m = from_fn(lambda q, k: (q + k) % 2 == 0)
    >>> m.dense(2, 2).astype(int).tolist()
    [[1, 0], [0, 1]]
    """
    if not callable(fn):
        raise TypeError(f"from_fn expects a callable, got {type(fn).__name__}.")
    return _FromFn(fn)
