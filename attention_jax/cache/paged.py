"""``PagedKVCache``: a shared pool of fixed-size pages and a page table per sequence (vLLM-style)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass
from attention_jax.cache import base
from attention_jax.cache._storage import KVStorage
from attention_jax.cache.layout import KernelLayout

Array = jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache(base.Cache):
    """Pages of ``page_size`` tokens shared by all sequences; ``page_table[b, i]`` is the page holding
    positions ``i * page_size ..`` of sequence ``b`` (-1: none yet).

    Pages are allocated on demand by :meth:`update` (or ahead of time by :meth:`allocate`), lowest
    free page first, and returned to the pool by :meth:`free` and :meth:`rollback`, all inside
    ``jit``. A sequence can hold at most ``max_pages`` pages; the pool may be smaller than
    ``batch_size * max_pages``, so sequences of different lengths share it. Running out of either
    is an overflow (see :mod:`attention_jax.cache.base`).

    **Sharing.** ``ref_counts[p]`` counts the table entries that hold page ``p`` (0: free).
    :meth:`fork` makes a sequence share another's pages (a common prompt is stored once); a write
    into a shared page first copies that page alone to a free one (copy-on-write, inside ``jit``;
    when every holder writes to it in the same step, one of them keeps it). Releasing a page
    decrements its count, and it returns to the pool when its last holder lets go.

    >>> import jax.numpy as jnp
    >>> cache = PagedKVCache.create(2, num_pages=4, page_size=2, num_kv_heads=1, head_dim=2)
    >>> k = jnp.ones((2, 3, 1, 2))
    >>> cache, view = cache.update(k, k, lengths=jnp.array([3, 1]))
    >>> cache.page_table.tolist(), int(cache.num_free_pages)
    ([[0, 1, -1, -1], [2, -1, -1, -1]], 1)
    >>> int(cache.free(jnp.array([True, False])).num_free_pages)
    3
    >>> forked = cache.fork(0, 1)       # sequence 1 lets go of page 2 and shares sequence 0's pages
    >>> forked.page_table.tolist(), forked.ref_counts.tolist()
    ([[0, 1, -1, -1], [0, 1, -1, -1]], [2, 2, 0, 0])
    """

    storage: KVStorage  # index dims [P, page_size]
    page_table: Array  # [B, max_pages] int32, -1 for no page
    ref_counts: Array  # [P] int32, table entries holding each page (0: free)
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
        quantized: bool | str = False,
    ) -> PagedKVCache:
        """An empty pool of ``num_pages`` pages; each sequence may hold up to ``max_pages`` (default all).

        ``quantized``: False, True/``"int8"`` or ``"fp8"`` (see :mod:`attention_jax.cache`).
        """
        max_pages = num_pages if max_pages is None else max_pages
        value_head_dim = base.check_create(
            batch_size, num_kv_heads, head_dim, value_head_dim, num_pages=num_pages, page_size=page_size,
            max_pages=max_pages,
        )  # fmt: skip
        storage = KVStorage.zeros((num_pages, page_size), num_kv_heads, head_dim, value_head_dim, dtype, quantized)
        page_table = jnp.full((batch_size, max_pages), -1, jnp.int32)
        return cls(storage, page_table, jnp.zeros((num_pages,), jnp.int32), *base.zeros_state(batch_size))

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
    def free_pages(self) -> Array:
        """``[P]`` bool, the pages no sequence holds."""
        return self.ref_counts == 0

    @property
    def num_free_pages(self) -> Array:
        return jnp.sum(self.free_pages)

    def _capacity_text(self) -> str:
        return f"{self.max_pages} pages of {self.page_size} tokens per sequence, {self.num_pages} pages in the pool"

    def _would_overflow(self, new):
        return _would_overflow(self, new)

    def kernel_layout(self) -> KernelLayout:
        """The pool and the page table as they are."""
        st = self.storage
        return KernelLayout(st.keys, st.values, st.key_scales, st.value_scales, self.page_table, self.lengths,
                            jnp.zeros_like(self.lengths), None)  # fmt: skip

    # -- allocation ------------------------------------------------------------------------------
    def _pages_needed(self, end: Array, copy: Array | None = None) -> tuple[tuple[Array, Array], Array]:
        """Which table slots get a new page, ``[B, max_pages]``, with the order of the requests in the batch,
        and ``[B]`` whether the pool runs dry. A slot gets a page to hold ``end`` tokens, or (``copy``) to
        take a copy of the shared page it holds."""
        held = jnp.sum(self.page_table >= 0, axis=1)  # [B], pages are held as a prefix of the table
        want = jnp.minimum(-(-end // self.page_size), self.max_pages)  # [B]
        slot = jnp.arange(self.max_pages, dtype=jnp.int32)[None, :]
        request = (slot >= held[:, None]) & (slot < want[:, None])  # [B, max_pages]
        if copy is not None:
            request = request | copy
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

    def _allocate(self, end: Array, copy: Array | None = None, num_new: int | None = None) -> PagedKVCache:
        """New pages for ``end`` tokens, and copies of the shared pages where ``copy [B, max_pages]``.

        ``num_new`` (static): the update writes at most that many tokens per sequence, so only the table
        entries from ``lengths // page_size`` on that they can reach may need a copy; the copy then
        moves those few pages, not every page of the table.
        """
        (granted, rank), dry = self._pages_needed(end, copy)
        p, m = self.num_pages, self.max_pages
        # Free pages first, in index order: the k-th request of the batch takes the k-th free page.
        order = jnp.argsort(jnp.where(self.free_pages, 0, p) + jnp.arange(p))
        pages = order[jnp.clip(rank, 0, p - 1)]  # [B, max_pages]
        storage, ref_counts = self.storage, self.ref_counts
        if copy is not None:
            copied = granted & copy
            old = jnp.maximum(self.page_table, 0)
            ref_counts = ref_counts.at[jnp.where(copied, old, p)].add(-1, mode="drop")
            # The entries a write of num_new tokens can reach: [B, W], W = ceil((num_new - 1) / ps) + 1.
            reach = m if num_new is None else min(m, -(-max(num_new - 1, 0) // self.page_size) + 1)
            cols = (self.lengths // self.page_size)[:, None] + jnp.arange(reach, dtype=jnp.int32)[None, :]
            in_table = cols < m
            cols = jnp.minimum(cols, m - 1)
            pick = lambda x: jnp.take_along_axis(x, cols, axis=1)
            target = jnp.where(pick(copied) & in_table, pick(pages), p)  # [B, W], p: out of range, dropped
            storage = storage.copy((pick(old),), (target,))
        ref_counts = ref_counts.at[jnp.where(granted, pages, p)].set(1, mode="drop")
        page_table = jnp.where(granted, pages, self.page_table)
        overflow = self.overflow | dry | (end > self.capacity)
        return dataclasses.replace(
            self, storage=storage, page_table=page_table, ref_counts=ref_counts, overflow=overflow
        )

    def _release(self, drop: Array) -> PagedKVCache:
        """Let go of the table entries where ``drop [B, max_pages]``: each page's count drops by its entries."""
        drop = drop & (self.page_table >= 0)
        ref_counts = self.ref_counts.at[jnp.where(drop, self.page_table, self.num_pages)].add(-1, mode="drop")
        return dataclasses.replace(self, page_table=jnp.where(drop, -1, self.page_table), ref_counts=ref_counts)

    # -- sequences ---------------------------------------------------------------------------------
    def free(self, which: Array) -> PagedKVCache:
        """Release the pages of the sequences where ``which [B]`` is True; they restart empty. A page returns
        to the pool when no other sequence holds it."""
        which = jnp.asarray(which, bool)
        if which.shape != (self.batch_size,):
            raise ValueError(f"which must have shape [B]=[{self.batch_size}], got which.shape={which.shape}.")
        return _free(self, which)

    def _free(self, which: Array) -> PagedKVCache:
        cache = self._release(jnp.broadcast_to(which[:, None], self.page_table.shape))
        return dataclasses.replace(
            cache, lengths=jnp.where(which, 0, self.lengths), overflow=jnp.where(which, False, self.overflow)
        )

    def fork(self, src: int | Array, dst: int | Array) -> PagedKVCache:
        """Sequence ``dst`` becomes a copy of sequence ``src`` that shares its pages (``src``, ``dst``: ints or
        ``[F]`` ints, pairwise; one ``src`` for many ``dst`` forks it many times). ``dst``'s own pages are
        released first. Later writes copy a shared page before
        writing into it, so each sequence reads what it wrote.

        ``dst`` entries must be distinct and none may be a ``src`` (checked where concrete).
        """
        src, dst = jnp.atleast_1d(jnp.asarray(src, jnp.int32)), jnp.atleast_1d(jnp.asarray(dst, jnp.int32))
        if src.shape == (1,) and dst.ndim == 1:
            src = jnp.broadcast_to(src, dst.shape)
        if src.ndim != 1 or src.shape != dst.shape:
            raise ValueError(f"src and dst must be ints or [F] ints of one shape, got {src.shape} and {dst.shape}.")
        if not isinstance(src, jax.core.Tracer) and not isinstance(dst, jax.core.Tracer):
            s, d = src.tolist(), dst.tolist()
            if any(not 0 <= x < self.batch_size for x in s + d):
                raise ValueError(f"src and dst must lie in [0, B={self.batch_size}), got src={s}, dst={d}.")
            if len(set(d)) != len(d) or set(s) & set(d):
                raise ValueError(f"dst must be distinct sequences that are not sources, got src={s}, dst={d}.")
        return _fork(self, src, dst)

    def _fork(self, src: Array, dst: Array) -> PagedKVCache:
        b = self.batch_size
        cache = self._release(jnp.zeros((b,), bool).at[dst].set(True)[:, None] & (self.page_table >= 0))
        rows = cache.page_table[src]  # [F, max_pages]
        ref_counts = cache.ref_counts.at[jnp.where(rows >= 0, rows, self.num_pages)].add(1, mode="drop")
        return dataclasses.replace(
            cache,
            page_table=cache.page_table.at[dst].set(rows),
            ref_counts=ref_counts,
            lengths=cache.lengths.at[dst].set(cache.lengths[src]),
            overflow=cache.overflow.at[dst].set(cache.overflow[src]),
        )

    def _rollback(self, n):
        lengths = self.lengths - n
        keep = -(-lengths // self.page_size)  # [B] pages still needed
        slot = jnp.arange(self.max_pages, dtype=jnp.int32)[None, :]
        return dataclasses.replace(self._release(slot >= keep[:, None]), lengths=lengths)

    def _copies(self, new: Array) -> Array:
        """``[B, max_pages]``: the held pages that writing ``new [B]`` tokens copies first (copy-on-write): those
        written into while other table entries hold them too. When all the holders of a page write to it in
        one step, the first of them keeps it and only the others copy."""
        b, ps, p, m = self.batch_size, self.page_size, self.num_pages, self.max_pages
        end = self.lengths + new
        slot = jnp.arange(m, dtype=jnp.int32)[None, :]
        written = (self.page_table >= 0) & (slot >= (self.lengths // ps)[:, None]) & (slot * ps < end[:, None])
        written = written & (new > 0)[:, None]  # [B, M]
        page = jnp.maximum(self.page_table, 0)
        shared = written & (self.ref_counts[page] > 1)
        entry = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
        target = jnp.where(shared, page, p)
        writers = jnp.zeros((p,), jnp.int32).at[target].add(1, mode="drop")
        first = jnp.full((p,), b * m, jnp.int32).at[target].min(entry, mode="drop")
        keeps = (writers[page] == self.ref_counts[page]) & (first[page] == entry)
        return shared & ~keeps

    def _update(self, keys, values, new):
        b, t = keys.shape[:2]
        ps, p, m = self.page_size, self.num_pages, self.max_pages
        end = self.lengths + new
        copy = self._copies(new)
        cache = self._allocate(end, copy, num_new=t)
        # A shared page that could not be copied (the pool is dry: overflow) is not written.
        blocked = copy & (cache.page_table == self.page_table)  # [B, M]
        pos = self.positions(t)  # [B, T]
        table_slot = jnp.minimum(pos // ps, m - 1)
        in_table = pos // ps < m
        page = jnp.take_along_axis(cache.page_table, table_slot, axis=1)
        write = base.new_token_mask(new, t) & in_table & (page >= 0) & ~jnp.take_along_axis(blocked, table_slot, 1)
        storage = cache.storage.write((jnp.where(write, page, p), pos % ps), keys, values)
        # Each sequence's pages in table order make its keys contiguous in position.
        gathered_keys, gathered_values = storage.read((jnp.maximum(cache.page_table, 0),))  # [B, M, ps, K, H]
        s = m * ps
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
_fork = jax.jit(PagedKVCache._fork)


@jax.jit
def _would_overflow(cache: PagedKVCache, new: Array) -> Array:
    end = cache.lengths + new
    return (end > cache.capacity) | cache._pages_needed(end, cache._copies(new))[1]
