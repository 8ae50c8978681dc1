"""Sequence layouts for ring attention: which positions of a global sequence each device holds.

A sequence of length ``T`` sharded over ``P`` devices gives each device ``C = T / P`` positions:

* ``"contiguous"``: device ``i`` holds ``[i * C, (i + 1) * C)``. Simple, but with a causal mask
  the last device does ``P`` times the work of the first.
* ``"zigzag"``: the sequence is cut into ``2P`` chunks; device ``i`` holds chunks ``i`` and
  ``2P - 1 - i`` (an early and a late one), so causal work is balanced. Needs ``T % 2P == 0``.
* ``"striped"``: device ``i`` holds positions ``i, i + P, i + 2P, ...`` (Brandon et al., 2023);
  balanced for causal masks at any block size. Needs ``T % P == 0`` for the permutation helpers
  and ``T % P**2 == 0`` to convert a contiguously sharded array in place
  (:func:`shard_to_layout`).

A *layout order* is the global sequence permuted so that device ``i``'s shard is the ``i``-th
slice of length ``C``: ``x_layout = x[layout_permutation(T, P, layout)]``. Masks stay exact
because every shard knows the original position of each of its entries
(:func:`layout_positions`).

>>> layout_positions(8, 2, "zigzag").tolist()
[[0, 1, 6, 7], [2, 3, 4, 5]]
>>> layout_positions(8, 2, "striped").tolist()
[[0, 2, 4, 6], [1, 3, 5, 7]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(length: int, num_shards: int, layout: str, *, name: str = "T", in_place: bool = False) -> None:
    """Raise ``ValueError`` unless ``length`` positions split over ``num_shards`` in ``layout``.

    ``in_place``: also require what :func:`shard_to_layout` needs (``T % P**2 == 0`` for striped).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout=!r}.")
    if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
        raise ValueError(f"the number of shards must be a positive integer, got {num_shards=!r}.")
    unit, why = num_shards, f"P = {num_shards}"
    if layout == "zigzag":
        unit, why = 2 * num_shards, f"2 * P = {2 * num_shards}"
    elif layout == "striped" and in_place:  # each contiguous shard splits evenly over the P devices
        unit, why = num_shards**2, f"P**2 = {num_shards**2}"
    if length % unit:
        raise ValueError(
            f"layout={layout!r} over P={num_shards} devices needs a sequence length divisible by {why}, "
            f"got {name}={length}."
        )


def layout_permutation(length: int, num_shards: int, layout: str) -> np.ndarray:
    """``perm [T]`` with ``x_layout = x[perm]``: position held at each slot of the layout order.

    >>> layout_permutation(8, 2, "zigzag").tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    check_layout(length, num_shards, layout)
    positions = np.arange(length)
    if layout == "contiguous":
        return positions
    if layout == "striped":
        return positions.reshape(length // num_shards, num_shards).T.reshape(-1)
    chunks = positions.reshape(2 * num_shards, -1)  # [2P, T / 2P]
    order = np.stack([np.arange(num_shards), 2 * num_shards - 1 - np.arange(num_shards)], axis=1).reshape(-1)
    return chunks[order].reshape(-1)


def layout_positions(length: int, num_shards: int, layout: str) -> np.ndarray:
    """``[P, T / P]`` int32: the original position of every entry of every shard."""
    return layout_permutation(length, num_shards, layout).reshape(num_shards, -1).astype(np.int32)


def to_layout(x: jax.Array, num_shards: int, layout: str, *, axis: int = 1) -> jax.Array:
    """Permute the sequence ``axis`` of a global array into layout order.

    >>> import numpy as np
    >>> to_layout(np.arange(8), 2, "zigzag", axis=0).tolist()
    [0, 1, 6, 7, 2, 3, 4, 5]
    """
    perm = layout_permutation(x.shape[axis], num_shards, layout)
    return jnp.take(x, perm, axis=axis) if layout != "contiguous" else jnp.asarray(x)


def from_layout(x: jax.Array, num_shards: int, layout: str, *, axis: int = 1) -> jax.Array:
    """Inverse of :func:`to_layout`: put the sequence ``axis`` back in original order.

    >>> import numpy as np
    >>> from_layout(to_layout(np.arange(8), 4, "striped", axis=0), 4, "striped", axis=0).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    inverse = np.argsort(layout_permutation(x.shape[axis], num_shards, layout))
    return jnp.take(x, inverse, axis=axis) if layout != "contiguous" else jnp.asarray(x)


# -- inside shard_map: convert a contiguous shard to a layout shard with collectives -----------------


def shard_to_layout(x: jax.Array, axis_name: str, layout: str, *, axis: int = 1) -> jax.Array:
    """Inside ``shard_map``: from the contiguous shard of a sequence to this device's layout shard.

    Each device sends ``C`` entries and receives ``C``: two ``ppermute`` for zigzag, one
    ``all_to_all`` for striped, nothing for contiguous; no device ever holds more than its shard.
    """
    num_shards = jax.lax.axis_size(axis_name)
    length = x.shape[axis]
    if layout == "contiguous" or num_shards == 1:
        return x
    check_layout(length * num_shards, num_shards, layout, in_place=True)
    if layout == "zigzag":
        first, second = jnp.split(x, 2, axis=axis)  # global chunks 2d and 2d + 1 of device d
        recv_first = jax.lax.ppermute(first, axis_name, _zigzag_pairs(num_shards, 0))
        recv_second = jax.lax.ppermute(second, axis_name, _zigzag_pairs(num_shards, 1))
        # Device i's early chunk (chunk i) was the first chunk of its sender iff i is even.
        even = jax.lax.axis_index(axis_name) % 2 == 0
        early = jnp.where(even, recv_first, recv_second)
        late = jnp.where(even, recv_second, recv_first)
        return jnp.concatenate([early, late], axis=axis)
    # Entry a * P + r of device d's shard has position d * C + a * P + r and belongs to device r.
    x = _split_axis(x, axis, (length // num_shards, num_shards))  # [.., C / P (a), P (r), ..]
    x = jax.lax.all_to_all(x, axis_name, split_axis=axis + 1, concat_axis=axis + 1, tiled=False)
    x = jnp.swapaxes(x, axis, axis + 1)  # [.., P (source d), C / P (a), ..]: positions in order
    return _merge_axes(x, axis)


def shard_positions(axis_name: str, length: int, layout: str) -> jax.Array:
    """Inside ``shard_map``: int32 ``[T / P]`` original positions of this device's layout shard.

    Computed from ``axis_index`` (no ``[T]`` table in the program); equals
    ``layout_positions(T, P, layout)[axis_index]``.
    """
    num_shards = jax.lax.axis_size(axis_name)
    check_layout(length, num_shards, layout)
    me = jax.lax.axis_index(axis_name)
    size = length // num_shards
    if layout == "contiguous":
        return me * size + jnp.arange(size, dtype=jnp.int32)
    if layout == "striped":
        return me + num_shards * jnp.arange(size, dtype=jnp.int32)
    half = jnp.arange(size // 2, dtype=jnp.int32)
    return jnp.concatenate([me * (size // 2) + half, (2 * num_shards - 1 - me) * (size // 2) + half])


def shard_from_layout(x: jax.Array, axis_name: str, layout: str, *, axis: int = 1) -> jax.Array:
    """Inside ``shard_map``: inverse of :func:`shard_to_layout`."""
    num_shards = jax.lax.axis_size(axis_name)
    length = x.shape[axis]
    if layout == "contiguous" or num_shards == 1:
        return x
    if layout == "zigzag":
        early, late = jnp.split(x, 2, axis=axis)
        even = jax.lax.axis_index(axis_name) % 2 == 0
        send_first = jnp.where(even, early, late)
        send_second = jnp.where(even, late, early)
        first = jax.lax.ppermute(send_first, axis_name, _inverse(_zigzag_pairs(num_shards, 0)))
        second = jax.lax.ppermute(send_second, axis_name, _inverse(_zigzag_pairs(num_shards, 1)))
        return jnp.concatenate([first, second], axis=axis)
    x = _split_axis(x, axis, (num_shards, length // num_shards))  # [.., P (d), C / P (a), ..]
    x = jnp.swapaxes(x, axis, axis + 1)  # [.., C / P (a), P (d), ..]
    x = jax.lax.all_to_all(x, axis_name, split_axis=axis + 1, concat_axis=axis + 1, tiled=False)
    return _merge_axes(x, axis)


def _zigzag_pairs(num_shards: int, half: int) -> list[tuple[int, int]]:
    """``(source, dest)``: where the ``half``-th contiguous chunk of each device goes in zigzag."""
    pairs = []
    for d in range(num_shards):
        chunk = 2 * d + half
        pairs.append((d, chunk if chunk < num_shards else 2 * num_shards - 1 - chunk))
    return pairs


def _inverse(pairs):
    return [(dst, src) for src, dst in pairs]


def _split_axis(x, axis, sizes):
    return x.reshape(x.shape[:axis] + tuple(sizes) + x.shape[axis + 1 :])


def _merge_axes(x, axis):
    return x.reshape(x.shape[:axis] + (x.shape[axis] * x.shape[axis + 1],) + x.shape[axis + 2 :])
