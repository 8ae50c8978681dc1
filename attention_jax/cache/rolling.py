"""``RollingKVCache``: a ring buffer of the last ``window`` tokens, for sliding-window layers."""

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
class RollingKVCache(base.Cache):
    """Ring buffer of ``W`` slots: position ``p`` lives in slot ``p % W``; older tokens are evicted.

    Serves a layer whose mask is (at most) ``causal() & sliding_window(W)``: a query at ``p`` needs
    keys ``p - W .. p``, i.e. the ``W`` previous tokens and itself. The view of an update is the
    ring (oldest first) followed by the new tokens, so a chunk of ``T > 1`` new tokens (a prefill)
    is exact too. It never overflows: eviction is its purpose.

    >>> import jax.numpy as jnp
    >>> cache = RollingKVCache.create(1, 2, num_kv_heads=1, head_dim=2)
    >>> for t in range(3):
    ...     cache, view = cache.update(jnp.full((1, 1, 1, 2), float(t)), jnp.zeros((1, 1, 1, 2)))
    >>> view.kv_offset.tolist(), view.keys[0, :, 0, 0].tolist()
    ([0], [0.0, 1.0, 2.0])
    """

    storage: KVStorage  # index dims [B, W]
    lengths: Array  # [B] int32
    overflow: Array  # [B] bool, always False

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
        quantized: bool = False,
    ) -> RollingKVCache:
        """An empty ring of ``window`` slots (the ``left`` of ``masks.sliding_window(left)``)."""
        value_head_dim = base.check_create(batch_size, num_kv_heads, head_dim, value_head_dim, window=window)
        storage = KVStorage.zeros((batch_size, window), num_kv_heads, head_dim, value_head_dim, dtype, quantized)
        return cls(storage, *base.zeros_state(batch_size))

    @property
    def window(self) -> int:
        return self.storage.keys.shape[1]

    def _capacity_text(self) -> str:
        return f"window={self.window}"

    def _update(self, keys, values, new):
        b, t = keys.shape[:2]
        w = self.window
        rows = jnp.arange(b)[:, None]
        # The ring before the update, oldest first: positions lengths - W .. lengths - 1.
        ring_pos = self.lengths[:, None] - w + jnp.arange(w, dtype=jnp.int32)  # [B, W]
        ring_keys, ring_values = self.storage.read((rows, ring_pos % w))  # [B, W, K, H]
        end = self.lengths + new
        view_keys = jnp.concatenate([ring_keys, self.storage.roundtrip(keys)], axis=1)  # [B, W + T, K, H]
        view_values = None
        if values is not None:
            view_values = jnp.concatenate([ring_values, self.storage.roundtrip(values)], axis=1)
        kv_offset = self.lengths - w
        view_pos = kv_offset[:, None] + jnp.arange(w + t, dtype=jnp.int32)  # [B, W + T]
        view = base.KVView(
            keys=view_keys,
            values=view_values,
            q_offset=self.lengths,
            kv_offset=kv_offset,
            kv_valid=(view_pos >= 0) & (view_pos < end[:, None]),
        )
        # Only the last W real tokens survive; writing just those keeps the scatter free of collisions.
        i = jnp.arange(t, dtype=jnp.int32)[None, :]
        keep = base.new_token_mask(new, t) & (i >= new[:, None] - w)
        slots = jnp.where(keep, self.positions(t) % w, w)  # slot w is out of range: dropped
        storage = self.storage.write((rows, slots), keys, values)
        return RollingKVCache(storage, end, self.overflow), view
