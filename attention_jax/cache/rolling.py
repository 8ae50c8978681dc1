"""``RollingKVCache``: a ring buffer of the last ``window`` tokens, for sliding-window layers."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass
from attention_jax.cache import base
from attention_jax.cache._storage import KVStorage
from attention_jax.cache.layout import KernelLayout, storage_layout

Array = jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class RollingKVCache(base.Cache):
    """Ring buffer of ``R = W + max_rollback`` slots: position ``p`` lives in slot ``p % R``; older tokens
    are evicted.

    Serves a layer whose mask is (at most) ``causal() & sliding_window(W)``: a query at ``p`` needs
    keys ``p - W .. p``, i.e. the ``W`` previous tokens and itself. The view of an update is the
    ring (oldest first) followed by the new tokens, so a chunk of ``T > 1`` new tokens (a prefill)
    is exact too; the layer's window mask hides the ring's extra slots. It never overflows on
    writes: eviction is its purpose.

    **Rollback.** The ``max_rollback`` extra slots keep tokens that left the window, so that
    :meth:`rollback` can bring them back: the length may go back at most ``max_rollback`` below the
    furthest length the sequence has reached (a speculative step appends ``d + 1`` tokens and rolls
    back at most ``d``: ``max_rollback=d``). Going further would need evicted tokens: eagerly that
    raises ``ValueError``; under ``jit`` the rollback happens, the lost keys are masked out and the
    ``overflow`` flag is set, which :meth:`check` (and :func:`attention_jax.generate`) turns into the
    error once concrete, like a capacity overflow.

    >>> import jax.numpy as jnp
    >>> cache = RollingKVCache.create(1, 2, num_kv_heads=1, head_dim=2)
    >>> for t in range(3):
    ...     cache, view = cache.update(jnp.full((1, 1, 1, 2), float(t)), jnp.zeros((1, 1, 1, 2)))
    >>> view.kv_offset.tolist(), view.keys[0, :, 0, 0].tolist()
    ([0], [0.0, 1.0, 2.0])
    """

    storage: KVStorage  # index dims [B, R], R = window + max_rollback
    lengths: Array  # [B] int32
    overflow: Array  # [B] bool: a rollback went past the slots held
    held_from: Array | None  # [B] int32, the oldest position the ring holds; None without max_rollback
    window: int = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(
        cls,
        batch_size: int,
        window: int,
        *,
        num_kv_heads: int,
        head_dim: int,
        value_head_dim: int | None = None,
        dtype=jnp.float32,
        quantized: bool | str = False,
        max_rollback: int = 0,
    ) -> RollingKVCache:
        """An empty ring for ``window`` (the ``left`` of ``masks.sliding_window(left)``) plus ``max_rollback``
        slots that let :meth:`rollback` undo up to that many tokens."""
        value_head_dim = base.check_create(batch_size, num_kv_heads, head_dim, value_head_dim, window=window)
        if isinstance(max_rollback, bool) or not isinstance(max_rollback, int) or max_rollback < 0:
            raise ValueError(f"max_rollback must be a non-negative integer, got {max_rollback=!r}.")
        slots = window + max_rollback
        storage = KVStorage.zeros((batch_size, slots), num_kv_heads, head_dim, value_head_dim, dtype, quantized)
        lengths, overflow = base.zeros_state(batch_size)
        # Without extra slots the oldest position held is simply lengths - W (kept out of the pytree then).
        held_from = jnp.zeros((batch_size,), jnp.int32) if max_rollback else None
        return cls(storage, lengths, overflow, held_from, window)

    @property
    def slots(self) -> int:
        """R, the ring's slots: ``window + max_rollback``."""
        return self.storage.keys.shape[1]

    @property
    def max_rollback(self) -> int:
        return self.slots - self.window

    def _oldest_held(self) -> Array:
        """``[B]`` the oldest position the ring still holds."""
        if self.held_from is None:
            return jnp.maximum(self.lengths - self.slots, 0)
        return self.held_from

    def _capacity_text(self) -> str:
        return f"window={self.window}, max_rollback={self.max_rollback}"

    def kernel_layout(self) -> KernelLayout:
        """The ring as it stands (before a step's write), in the kernel's ring layout; positions older than
        ``held_from`` (lost to a rollback past the extra slots) are hidden by ``valid_from``."""
        return storage_layout(self.storage, self.lengths, valid_from=self.held_from, ring=self.slots)

    @property
    def holds_new_tokens(self) -> bool:
        return False  # after a write the ring of W slots no longer holds the oldest key a query needs

    def _rollback(self, n):
        lengths = self.lengths - n
        # The new length's window must still be held (positions below 0 count as held).
        lost = jnp.maximum(lengths - self.window, 0) < self._oldest_held()
        return dataclasses.replace(self, lengths=lengths, overflow=self.overflow | lost)

    def _rollback_message(self, n, lost) -> str:
        rows = [int(b) for b in jnp.nonzero(lost)[0]]
        return (
            f"RollingKVCache cannot roll back {[int(n[b]) for b in rows]} tokens of sequences {rows} holding "
            f"{[int(self.lengths[b]) for b in rows]}: their window's oldest keys were evicted ({self._capacity_text()}"
            f"). Create the cache with a larger max_rollback."
        )

    def check(self) -> None:
        """Raise ``ValueError`` if a rollback went past the slots held (call on a concrete cache)."""
        if bool(jnp.any(self.overflow)):
            rows = [int(b) for b in jnp.nonzero(self.overflow)[0]]
            raise ValueError(
                f"RollingKVCache overflowed: sequences {rows} were rolled back past the tokens the ring holds "
                f"({self._capacity_text()}); their window lost keys. Create the cache with a larger max_rollback."
            )

    def _update(self, keys, values, new):
        b, t = keys.shape[:2]
        r = self.slots
        rows = jnp.arange(b)[:, None]
        # The ring before the update, oldest first: positions lengths - R .. lengths - 1.
        ring_pos = self.lengths[:, None] - r + jnp.arange(r, dtype=jnp.int32)  # [B, R]
        ring_keys, ring_values = self.storage.read((rows, ring_pos % r))  # [B, R, K, H]
        end = self.lengths + new
        view_keys = jnp.concatenate([ring_keys, self.storage.roundtrip(keys)], axis=1)  # [B, R + T, K, H]
        view_values = None
        if values is not None:
            view_values = jnp.concatenate([ring_values, self.storage.roundtrip(values)], axis=1)
        kv_offset = self.lengths - r
        view_pos = kv_offset[:, None] + jnp.arange(r + t, dtype=jnp.int32)  # [B, R + T]
        view = base.KVView(
            keys=view_keys,
            values=view_values,
            q_offset=self.lengths,
            kv_offset=kv_offset,
            kv_valid=(view_pos >= self._oldest_held()[:, None]) & (view_pos < end[:, None]),
        )
        # Only the last R real tokens survive; writing just those keeps the scatter free of collisions.
        # Slots above the length hold rolled-back tokens: overwriting them evicts nothing held.
        i = jnp.arange(t, dtype=jnp.int32)[None, :]
        keep = base.new_token_mask(new, t) & (i >= new[:, None] - r)
        slots = jnp.where(keep, self.positions(t) % r, r)  # slot r is out of range: dropped
        storage = self.storage.write((rows, slots), keys, values)
        held_from = None if self.held_from is None else jnp.maximum(self.held_from, end - r)
        return RollingKVCache(storage, end, self.overflow, held_from, self.window), view
