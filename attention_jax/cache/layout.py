"""How a cache presents its storage to :func:`pallas_kernels.decode_attention.decode_attention`.

The kernel reads keys/values as pages ``[P, ps, K, H]`` of a pool through a page table ``[B, M]``,
with per-sequence ``lengths``, the absolute position ``kv_offset`` of logical slot 0, an optional
ring of ``W`` slots, and the per-token-per-head scales of int8/fp8 pages. A :class:`KernelLayout`
holds exactly that, without copying or dequantising a byte of the cache. Each cache builds its own
(:meth:`~attention_jax.cache.Cache.kernel_layout`), so a new cache kind reaches the decode kernels
by implementing that method, nothing here:

* :class:`~attention_jax.cache.PagedKVCache`: its pool and page table as they are;
* :class:`~attention_jax.cache.KVCache`: ``[B, C, K, H]`` is ``B`` pages of ``C`` slots (a free
  reshape, ``page_table[b] = [b]``: whole tiles are contiguous);
* :class:`~attention_jax.cache.RollingKVCache`: the ring ``[B, R, K, H]`` in the kernel's ring layout
  (position ``p`` in slot ``p % R``), as it stands *before* a write; keys older than ``held_from``
  (lost to a rollback past the extra slots) are hidden by ``valid_from``;
* :func:`tokens_layout`: a few new tokens ``[B, T, K, H]``, stored as the cache would store them, as
  one page per sequence at ``kv_offset = lengths`` (the rolling cache attends to them apart from the
  ring, because a ring of ``W`` slots after the write no longer holds the oldest key a query needs).

>>> import jax.numpy as jnp
>>> import attention_jax as aj
>>> cache = aj.cache.PagedKVCache.create(2, num_pages=6, page_size=4, num_kv_heads=1, head_dim=8, quantized=True)
>>> cache, _ = cache.update(jnp.ones((2, 5, 1, 8)), jnp.ones((2, 5, 1, 8)))
>>> lay = cache.kernel_layout()
>>> lay.k_pages.dtype, lay.k_pages.shape, lay.page_table.tolist(), lay.num_slots
(dtype('int8'), (6, 4, 1, 8), [[0, 1, -1, -1, -1, -1], [2, 3, -1, -1, -1, -1]], 24)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass
from attention_jax.cache._storage import KVStorage
from pallas_kernels.decode_attention import dense_as_pages

if TYPE_CHECKING:  # the caches import this module to build their layouts
    from attention_jax.cache.base import Cache

Array = jax.Array

__all__ = ["KernelLayout", "storage_layout", "tokens_layout", "slot_positions"]


@register_dataclass
@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """A cache's storage as :func:`~pallas_kernels.decode_attention.decode_attention` reads it."""

    k_pages: Array  # [P, ps, K, H] float, int8 or float8_e4m3fn
    v_pages: Array | None  # [P, ps, K, Hv], None: keys only (values are the keys' first channels)
    k_scales: Array | None  # [P, ps, K] float32 when quantised
    v_scales: Array | None  # [P, ps, K]
    page_table: Array  # [B, M] int32, -1: no page
    lengths: Array  # [B] int32, logical slots [0, lengths) exist (ring: tokens written so far)
    kv_offset: Array  # [B] int32, absolute position of logical slot 0
    valid_from: Array | None  # [B] int32, keys at positions below it are lost (a rolling cache's rollback)
    ring: int | None = dataclasses.field(default=None, metadata=dict(static=True))  # W slots of a ring

    @property
    def num_slots(self) -> int:
        """Logical slots per sequence: ``M * ps`` (linear) or ``W`` (ring)."""
        return self.ring if self.ring is not None else self.page_table.shape[1] * self.k_pages.shape[1]

    def kernel_arguments(self) -> dict:
        """The keyword arguments of ``decode_attention`` this layout fixes (pages, table and lengths excluded)."""
        return dict(kv_offset=self.kv_offset, ring=self.ring, k_scales=self.k_scales, v_scales=self.v_scales)


def storage_layout(storage: KVStorage, lengths: Array, *, kv_offset: Array | None = None,
                   valid_from: Array | None = None, ring: int | None = None) -> KernelLayout:  # fmt: skip
    """A storage over index dims ``[B, C]`` (a dense cache, a ring, new tokens) as ``B`` pages of ``C`` slots,
    slot 0 at position ``kv_offset`` (default 0): a free reshape, ``page_table[b] = [b]``, so whole tiles
    are contiguous."""
    c = storage.keys.shape[1]
    k_pages, table = dense_as_pages(storage.keys, c)
    pages = lambda x: None if x is None else dense_as_pages(x, c)[0]
    v, ks, vs = (pages(x) for x in (storage.values, storage.key_scales, storage.value_scales))
    offset = jnp.zeros_like(lengths) if kv_offset is None else kv_offset
    return KernelLayout(k_pages, v, ks, vs, table, lengths, offset, valid_from, ring=ring)


def tokens_layout(cache: Cache, keys: Array, values: Array | None, new: Array) -> KernelLayout:
    """New tokens ``keys [B, T, K, H]`` / ``values [B, T, K, Hv]`` (``new [B]`` real ones) as one page per sequence.

    They are encoded as ``cache`` stores them (int8/fp8 with scales, or its dtype), so attending to them
    here reads what a later step reads from the cache; slot ``i`` holds position ``cache.lengths + i``.
    """
    st = cache.storage
    k, ks = st.encode(keys)
    v, vs = (None, None) if values is None else st.encode(values)
    tokens = KVStorage(k, v, ks, vs, st.dtype)
    return storage_layout(tokens, jnp.asarray(new, jnp.int32), kv_offset=jnp.asarray(cache.lengths, jnp.int32))


def slot_positions(layout: KernelLayout) -> Array:
    """``[B, S]`` absolute position of every logical slot (``S = num_slots``; a ring slot that holds nothing
    yet gets a negative position). The ring's is the latest ``p < lengths`` with ``p % W == slot``."""
    slot = jnp.arange(layout.num_slots, dtype=jnp.int32)[None, :]
    offset, length = layout.kv_offset[:, None], layout.lengths[:, None]
    if layout.ring is None:
        return offset + slot
    return offset + length - 1 - jnp.mod(length - 1 - slot, layout.ring)
