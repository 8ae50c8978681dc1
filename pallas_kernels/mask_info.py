"""Block maps: the one description of which tiles of a score matrix a mask leaves visible.

A block map is an integer array ``[num_q_blocks, num_kv_blocks]`` with one entry per
``(block_q, block_k)`` tile of the ``[T, S]`` score matrix:

* ``EMPTY`` (0): every entry of the tile is masked; kernels skip the tile (no loads, no math);
* ``PARTIAL`` (1): some entries are visible; kernels evaluate the mask function on the tile;
* ``FULL`` (2): every entry is visible; kernels run without mask arithmetic.

This module is the kernel floor's half of the mask mechanism: it imports only numpy and jax.
``attention_jax.masks`` builds block maps for its ``Mask`` objects with the helpers below, and
every implementation (blockwise XLA path, Pallas kernels, ring) reads them the same way.

A *mask function* has the signature ``fn(q_pos, kv_pos, q_vals, kv_vals) -> bool`` where
``q_pos`` is an int32 tile of absolute query positions (shape ``[bq, 1]``), ``kv_pos`` of
absolute key positions (``[1, bk]``), and ``q_vals`` / ``kv_vals`` are tuples of per-position
data (segment ids, lengths) sliced to the same tiles. It must use only elementwise jnp ops so
that it runs inside Pallas kernels on every backend.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EMPTY = 0
PARTIAL = 1
FULL = 2

MaskFn = Callable[..., jax.Array]


def num_blocks(length: int, block: int) -> int:
    """Number of blocks of size ``block`` that cover ``length`` positions (the last may be ragged)."""
    return -(-length // block)


def block_bounds(length: int, block: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive first and last *valid* absolute position of each block.

    >>> lo, hi = block_bounds(10, 4, offset=100)
    >>> lo.tolist(), hi.tolist()
    ([100, 104, 108], [103, 107, 109])
    """
    starts = np.arange(num_blocks(length, block), dtype=np.int64) * block
    return starts + offset, np.minimum(starts + block, length) - 1 + offset


def block_bounds_from_positions(positions: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest absolute position in each block of an arbitrary position vector.

    Interval bounds make every structural classification conservative-correct for positions that
    are not contiguous (a striped ring shard): "all visible" over the interval implies it over the
    subset, and "any visible" can only err towards ``PARTIAL``.

    >>> lo, hi = block_bounds_from_positions(np.array([0, 8, 16, 24, 32]), 2)
    >>> lo.tolist(), hi.tolist()
    ([0, 16, 32], [8, 24, 32])
    """
    positions = np.asarray(positions, dtype=np.int64)
    n = num_blocks(len(positions), block)
    padded = np.concatenate([positions, np.repeat(positions[-1:], n * block - len(positions))])
    tiles = padded.reshape(n, block)
    return tiles.min(axis=1), tiles.max(axis=1)


def _array_module(*xs):
    """``jax.numpy`` if any of ``xs`` is a JAX array (tracers included), else ``numpy``: host maps stay static."""
    return jnp if any(isinstance(x, jax.Array) for x in xs) else np


def position_block_bounds(positions, block: int):
    """Smallest and largest position in each block of ``positions [..., L]`` (numpy or JAX, traced too).

    The run-time counterpart of :func:`block_bounds_from_positions`, with leading (batch) dims:
    returns ``lo, hi`` of shape ``[..., ceil(L / block)]``; the ragged last block is padded with
    its last position, which changes neither bound.

    >>> import jax.numpy as jnp
    >>> lo, hi = position_block_bounds(jnp.array([[5, 6, 7], [0, 1, 2]]), 2)
    >>> lo.tolist(), hi.tolist()
    ([[5, 7], [0, 2]], [[6, 7], [1, 2]])
    """
    xp = _array_module(positions)
    positions = xp.asarray(positions)
    *lead, length = positions.shape
    n = num_blocks(length, block)
    last = positions[..., -1:]
    padded = xp.concatenate([positions, xp.broadcast_to(last, (*lead, n * block - length))], axis=-1)
    tiles = padded.reshape(*lead, n, block)
    return tiles.min(axis=-1), tiles.max(axis=-1)


def block_and(a, b):
    """Block map of ``mask_a & mask_b``: empty if either is, full if both are, else partial (numpy or JAX)."""
    return _array_module(a, b).minimum(a, b)


def block_or(a, b):
    """Block map of ``mask_a | mask_b``: full if either is, empty if both are, else partial (numpy or JAX)."""
    return _array_module(a, b).maximum(a, b)


def block_not(a):
    """Block map of ``~mask``: empty and full swap, partial stays partial."""
    return (FULL - a).astype(a.dtype)


def classify(all_visible, any_visible):
    """Turn per-block ``all``/``any`` visibility flags into a block map (numpy or JAX, like the flags)."""
    xp = _array_module(all_visible, any_visible)
    return xp.where(all_visible, FULL, xp.where(any_visible, PARTIAL, EMPTY)).astype(np.int8)


def block_map_from_dense(dense, block_q: int, block_k: int):
    """Exact block map ``[..., nq, nk]`` of a dense boolean ``[..., T, S]`` mask (blocks past the end count as masked).

    Used for masks that have no structure to exploit (``from_fn``, boolean arrays) and by tests as
    the oracle. A numpy mask gives a numpy map (static); a JAX array, traced or not, a JAX map.

    >>> import numpy as np
    >>> block_map_from_dense(np.tril(np.ones((4, 4), bool)), 2, 2).tolist()
    [[1, 0], [2, 1]]
    """
    xp = _array_module(dense)
    dense = xp.asarray(dense, dtype=bool)
    *lead, t, s = dense.shape
    nq, nk = num_blocks(t, block_q), num_blocks(s, block_k)
    pad = ((0, nq * block_q - t), (0, nk * block_k - s))
    tiles = xp.pad(dense, ((0, 0),) * len(lead) + pad).reshape(*lead, nq, block_q, nk, block_k)
    valid_tiles = np.pad(np.ones((t, s), bool), pad).reshape(nq, block_q, nk, block_k)
    any_visible = tiles.any(axis=(-3, -1))
    # A tile is full when every valid entry is visible and it has no padding on the key side.
    all_visible = xp.all(tiles | ~valid_tiles, axis=(-3, -1)) & kv_tiles_complete(s, block_k, nq)
    return classify(all_visible, any_visible)


def shared_block_map(dense, block_q: int, block_k: int, axis):
    """One block map valid for every slice of ``dense [..., T, S]`` along ``axis`` (e.g. batch, heads).

    A tile is EMPTY only if it is empty in every slice and FULL only if it is full in every slice.

    >>> import numpy as np
    >>> causal, full = np.tril(np.ones((4, 4), bool)), np.ones((4, 4), bool)
    >>> shared_block_map(np.stack([causal, full]), 2, 2, axis=0).tolist()
    [[1, 1], [2, 1]]
    """
    any_map = block_map_from_dense(dense.any(axis=axis), block_q, block_k)
    all_map = block_map_from_dense(dense.all(axis=axis), block_q, block_k)
    return classify(all_map == FULL, any_map != EMPTY)


def kv_tiles_complete(kv_len: int, block_k: int, num_q_blocks: int) -> np.ndarray:
    """``[num_q_blocks, num_kv_blocks]`` flags: False for the ragged last key block.

    A key block that runs past ``kv_len`` holds padding columns that must be masked, so it is
    never ``FULL``; kernels treat it as ``PARTIAL`` and mask ``kv_idx >= kv_len``.
    """
    nk = num_blocks(kv_len, block_k)
    complete = (np.arange(nk) + 1) * block_k <= kv_len
    return np.broadcast_to(complete[None, :], (num_q_blocks, nk))


def count_visible_blocks(block_map: np.ndarray) -> int:
    """Number of tiles a kernel computes (partial + full)."""
    return int(np.count_nonzero(np.asarray(block_map) != EMPTY))


def validate_block_map(block_map: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Check that ``block_map`` is an integer array of ``shape`` with values in {0, 1, 2}."""
    block_map = np.asarray(block_map)
    if block_map.shape != tuple(shape):
        raise ValueError(f"block_map must have shape {tuple(shape)}, got {block_map.shape}.")
    if block_map.size and (block_map.min() < EMPTY or block_map.max() > FULL):
        raise ValueError("block_map values must be 0 (empty), 1 (partial) or 2 (full).")
    return block_map.astype(np.int8)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Everything a backend needs to apply a mask and a score mod: the one resolved description.

    ``attention_jax`` resolves ``Mask | boolean array | None``, offsets, per-sequence positions and
    the score mod into one spec per call; the reference, the blockwise XLA path, the Pallas kernels
    and the ring steps all read it the same way.

    Attributes:
      fn: static elementwise mask function ``fn(q_pos, kv_pos, q_vals, kv_vals) -> bool``
        (see the module docstring); None means "everything visible" (padding still applies).
      block_map: int32 ``[nq, nk]`` or per sequence ``[B, nq, nk]`` block map for
        ``(block_q, block_k)`` tiles. A run-time array, so a ring step can pick its map with
        ``axis_index`` and a decode step can build it from per-sequence offsets.
      q_positions: int32 ``[T]`` (shared by the batch) or ``[B, T]`` (per sequence: decoding with
        a cache, packed batches) absolute position of each query; any order for ring layouts.
      kv_positions: int32 ``[S]`` or ``[B, S]`` absolute position of each key.
      q_vals: per-query data ``fn`` reads, each ``[B, T]``.
      kv_vals: per-key data ``fn`` reads, each ``[B, S]``.
      block_q, block_k: the tile sizes ``block_map`` was built for.
      score_fn: static elementwise score modification applied after the bias and before softcap
        and the mask, ``score_fn(score, batch, head, q_pos, kv_pos, params) -> score``: ``score``
        a float32 tile, the indices int32 arrays that broadcast against it (absolute positions),
        ``params`` a tuple with, for each entry of ``score_params``, its value at the element's head
        (broadcastable to ``score``). None: no score mod. Must use elementwise ``jnp`` ops only.
      score_params: per-head float parameters of ``score_fn``, each ``[N]`` (e.g. ALiBi slopes, one
        column of a T5 relative-bias table). Differentiable: backends return their gradients.
      array: bool ``[Bm, Nm, T, S]`` (``Bm`` in {1, B}, ``Nm`` in {1, N}) visibility ANDed with ``fn``:
        a boolean-array mask as the user gave it (per head if ``Nm == N``). Kernels read its tile in
        PARTIAL tiles only; ``block_map`` already accounts for it. None: no array.
    """

    fn: Callable | None
    block_map: jax.Array
    q_positions: jax.Array
    kv_positions: jax.Array
    q_vals: tuple = ()
    kv_vals: tuple = ()
    block_q: int = 128
    block_k: int = 128
    score_fn: Callable | None = None
    score_params: tuple = ()
    array: jax.Array | None = None

    @property
    def per_sequence(self) -> bool:
        """Whether positions or the block map differ between the sequences of the batch."""
        return jnp.ndim(self.q_positions) == 2 or jnp.ndim(self.kv_positions) == 2 or jnp.ndim(self.block_map) == 3

    def positions(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """``(q_positions [B, T], kv_positions [B, S])`` broadcast to the batch."""
        q = jnp.asarray(self.q_positions, jnp.int32)
        kv = jnp.asarray(self.kv_positions, jnp.int32)
        return jnp.broadcast_to(q, (batch, q.shape[-1])), jnp.broadcast_to(kv, (batch, kv.shape[-1]))

    def dense(self, batch: int) -> jax.Array | None:
        """The mask evaluated on every (query, key) pair: bool ``[B or 1, 1 or N, T, S]`` (None: all visible).

        ``fn`` and ``array`` combined. For the reference path and tests; the fast paths evaluate
        ``fn`` on tiles instead.
        """
        if self.fn is None:
            return None if self.array is None else jnp.asarray(self.array, bool)
        q_pos = jnp.asarray(self.q_positions, jnp.int32)[..., :, None]  # [T, 1] or [B, T, 1]
        kv_pos = jnp.asarray(self.kv_positions, jnp.int32)[..., None, :]  # [1, S] or [B, 1, S]
        q_vals = tuple(jnp.asarray(x)[:, :, None] for x in self.q_vals)  # [B, T, 1]
        kv_vals = tuple(jnp.asarray(x)[:, None, :] for x in self.kv_vals)  # [B, 1, S]
        visible = jnp.asarray(self.fn(q_pos, kv_pos, q_vals, kv_vals))
        t, s = q_pos.shape[-2], kv_pos.shape[-1]
        lead = batch if (visible.ndim == 3 and visible.shape[0] > 1) else 1
        visible = jnp.broadcast_to(visible, (lead, t, s))[:, None]
        return visible if self.array is None else visible & jnp.asarray(self.array, bool)

    def apply_score_fn(self, score, batch, head, q_pos, kv_pos, head_params):
        """``score`` after the score mod (unchanged without one); ``head_params`` as ``score_fn`` takes them."""
        if self.score_fn is None:
            return score
        return self.score_fn(score, batch, head, q_pos, kv_pos, tuple(head_params))


def _flatten_spec(spec: MaskSpec):
    children = (
        spec.block_map, spec.q_positions, spec.kv_positions, spec.q_vals, spec.kv_vals, spec.score_params, spec.array,
    )  # fmt: skip
    return children, (spec.fn, spec.block_q, spec.block_k, spec.score_fn)


def _unflatten_spec(aux, children):
    fn, block_q, block_k, score_fn = aux
    block_map, q_positions, kv_positions, q_vals, kv_vals, score_params, array = children
    return MaskSpec(
        fn, block_map, q_positions, kv_positions, tuple(q_vals), tuple(kv_vals), block_q, block_k, score_fn,
        tuple(score_params), array,
    )  # fmt: skip


jax.tree_util.register_pytree_node(MaskSpec, _flatten_spec, _unflatten_spec)


def contiguous_positions(length: int, offset: int | jax.Array = 0) -> jax.Array:
    """``offset + arange(length)`` as int32 (``offset`` may be traced)."""
    return offset + jnp.arange(length, dtype=jnp.int32)
