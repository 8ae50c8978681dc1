"""``PagedKVCache``: a shared pool of fixed-size pages and a page table per sequence (vLLM-style)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass
from attention_jax.cache import base
from attention_jax.cache._storage import KVStorage

Array = jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(base.Cache):
    """Pages of ``page_size`` tokens shared by all sequences; ``page_table[b, i]`` is the page holding
    positions ``i * page_size ..`` of sequence ``b`` (-1: none yet).

    Pages are allocated on demand by :meth:`update` (or ahead of time by :meth:`allocate`), lowest
    free page first, and returned to the pool by :meth:`free`, all inside ``jit``. A sequence can
    hold at most ``max_pages`` pages; the pool may be smaller than ``batch_size * max_pages``, so
    sequences of different lengths share it. Running out of either is an overflow (see
    :mod:`attention_jax.cache.base`).

    >>> import jax.numpy as jnp
    >>> cache = PagedKVCache.create(2, num_pages=4, page_size=2, num_kv_heads=1, head_dim=2)
    >>> k = jnp.ones((2, 3, 1, 2))
    >>> cache, view = cache.update(k, k, lengths=jnp.array([3, 1]))
    >>> cache.page_table.tolist(), int(cache.num_free_pages)
    ([[0, 1, -1, -1], [2, -1, -1, -1]], 1)
    >>> int(cache.free(jnp.array([True, False])).num_free_pages)
    3
    """

    storage: KVStorage  # index dims [P, page_size]
    page_table: Array  # [B, max_pages] int32, -1 for no page
    free_pages: Array  # [P] bool
    lengths: Array  # [B] int32
    overflow: Array  # [B] bool

    @classmethod
    def create(
        cls,
        batch_size: int,
        *,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        value_head_dim: int | None = None,
        max_pages: int | None = None,
        dtype=jnp.float32,
        quantized: bool = False,
    ) -> PagedKVCache:
        """An empty pool of ``num_pages`` pages; each sequence may hold up to ``max_pages`` (default all)."""
        max_pages = num_pages if max_pages is None else max_pages
        value_head_dim = base.check_create(
            batch_size, num_kv_heads, head_dim, value_head_dim, num_pages=num_pages, page_size=page_size,
            max_pages=max_pages,
        )  # fmt: skip
        storage = KVStorage.zeros((num_pages, page_size), num_kv_heads, head_dim, value_head_dim, dtype, quantized)
        page_table = jnp.full((batch_size, max_pages), -1, jnp.int32)
        return cls(storage, page_table, jnp.ones((num_pages,), bool), *base.zeros_state(batch_size))

    @property
    def num_pages(self) -> int:
        return self.storage.keys.shape[0]

    @property
    def page_size(self) -> int:
        return self.storage.keys.shape[1]

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]

    @property
    def capacity(self) -> int:
        """Most tokens one sequence can hold."""
        return self.max_pages * self.page_size

    @property
    def num_free_pages(self) -> Array:
        return jnp.sum(self.free_pages)

    def _capacity_text(self) -> str:
        return f"{self.max_pages} pages of {self.page_size} tokens per sequence, {self.num_pages} pages in the pool"

    def _would_overflow(self, new):
        return _would_overflow(self, new)

    def _pages_needed(self, end: Array) -> tuple[Array, Array]:
        """Which table slots get a new page for ``end`` tokens (and the order of the requests), ``[B, max_pages]``,
        and ``[B]`` whether the pool runs dry."""
        held = jnp.sum(self.page_table >= 0, axis=1)  # [B], pages are held as a prefix of the table
        want = jnp.minimum(-(-end // self.page_size), self.max_pages)  # [B]
        slot = jnp.arange(self.max_pages, dtype=jnp.int32)[None, :]
        request = (slot >= held[:, None]) & (slot < want[:, None])  # [B, max_pages]
        rank = jnp.cumsum(request.reshape(-1)).reshape(request.shape) - 1  # order of the request in the batch
        granted = request & (rank < self.num_free_pages)
        return (granted, rank), jnp.any(request & ~granted, axis=1)

    def allocate(self, lengths: Array) -> PagedKVCache:
        """Make sure sequence ``b`` holds pages for ``lengths[b]`` tokens (existing pages are kept)."""
        end = jnp.asarray(lengths, jnp.int32)
        if end.shape != (self.batch_size,):
            raise ValueError(f"lengths must have shape [B]=[{self.batch_size}], got lengths.shape={end.shape}.")
        cache = _allocate(self, end)
        over = cache.overflow & ~self.overflow
        if not isinstance(over, jax.core.Tracer) and bool(jnp.any(over)):
            raise ValueError(self._overflow_message(end - self.lengths, over))
        return cache

    def _allocate(self, end: Array) -> PagedKVCache:
        (granted, rank), dry = self._pages_needed(end)
        p = self.num_pages
        # Free pages first, in index order: the k-th request of the batch takes the k-th free page.
        order = jnp.argsort(jnp.where(self.free_pages, 0, p) + jnp.arange(p))
        pages = order[jnp.clip(rank, 0, p - 1)]  # [B, max_pages]
        page_table = jnp.where(granted, pages, self.page_table)
        free_pages = self.free_pages.at[jnp.where(granted, pages, p)].set(False, mode="drop")
        overflow = self.overflow | dry | (end > self.capacity)
        return dataclasses.replace(self, page_table=page_table, free_pages=free_pages, overflow=overflow)

    def free(self, which: Array) -> PagedKVCache:
        """Return the pages of the sequences where ``which [B]`` is True to the pool; they restart empty."""
        which = jnp.asarray(which, bool)
        if which.shape != (self.batch_size,):
            raise ValueError(f"which must have shape [B]=[{self.batch_size}], got which.shape={which.shape}.")
        return _free(self, which)

    def _free(self, which: Array) -> PagedKVCache:
        release = which[:, None] & (self.page_table >= 0)
        free_pages = self.free_pages.at[jnp.where(release, self.page_table, self.num_pages)].set(True, mode="drop")
        return dataclasses.replace(
            self,
            page_table=jnp.where(which[:, None], -1, self.page_table),
            free_pages=free_pages,
            lengths=jnp.where(which, 0, self.lengths),
            overflow=jnp.where(which, False, self.overflow),
        )

    def _update(self, keys, values, new):
        b, t = keys.shape[:2]
        ps, p = self.page_size, self.num_pages
        end = self.lengths + new
        cache = self._allocate(end)
        pos = self.positions(t)  # [B, T]
        table_slot = pos // ps
        in_table = table_slot < self.max_pages
        page = jnp.take_along_axis(cache.page_table, jnp.minimum(table_slot, self.max_pages - 1), axis=1)
        write = base.new_token_mask(new, t) & in_table & (page >= 0)
        storage = cache.storage.write((jnp.where(write, page, p), pos % ps), keys, values)
        # Each sequence's pages in table order make its keys contiguous in position.
        gathered_keys, gathered_values = storage.read((jnp.maximum(cache.page_table, 0),))  # [B, M, ps, K, H]
        s = self.max_pages * ps
        view = base.KVView(
            keys=gathered_keys.reshape(b, s, *gathered_keys.shape[3:]),
            values=None if gathered_values is None else gathered_values.reshape(b, s, *gathered_values.shape[3:]),
            q_offset=self.lengths,
            kv_offset=jnp.zeros((b,), jnp.int32),
            kv_valid=(jnp.arange(s, dtype=jnp.int32)[None, :] < end[:, None])
            & jnp.repeat(cache.page_table >= 0, ps, axis=1),
        )
        return dataclasses.replace(cache, storage=storage, lengths=end), view


# The page bookkeeping, compiled once per shape: eager use would dispatch each small op on its own
# (and under an outer jit these are simply inlined).
_allocate = jax.jit(PagedKVCache._allocate)
_free = jax.jit(PagedKVCache._free)


@jax.jit
def _would_overflow(cache: PagedKVCache, new: Array) -> Array:
    end = cache.lengths + new
    return (end > cache.capacity) | cache._pages_needed(end)[1]
