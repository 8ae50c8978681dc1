"""``KVCache``: a dense cache of fixed capacity, slot ``s`` holding position ``s``."""

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
class KVCache(base.Cache):
    """Dense cache: ``[B, C, K, H]`` keys and ``[B, C, K, Hv]`` values, each sequence its own length.

    >>> import jax.numpy as jnp
    >>> cache = KVCache.create(2, 8, num_kv_heads=1, head_dim=4)
    >>> k = jnp.ones((2, 3, 1, 4))
    >>> cache, view = cache.update(k, k, lengths=jnp.array([3, 1]))
    >>> cache.lengths.tolist(), view.kv_valid[:, :4].astype(int).tolist()
    ([3, 1], [[1, 1, 1, 0], [1, 0, 0, 0]])
    """

    storage: KVStorage  # index dims [B, C]
    lengths: Array  # [B] int32
    overflow: Array  # [B] bool

    @classmethod
    def create(
        cls,
        batch_size: int,
        capacity: int,
        *,
        num_kv_heads: int,
        head_dim: int,
        value_head_dim: int | None = None,
        dtype=jnp.float32,
        quantized: bool | str = False,
    ) -> KVCache:
        """An empty cache for ``capacity`` tokens per sequence.

        ``value_head_dim`` defaults to ``head_dim``; 0 stores keys only. ``quantized`` (True or
        ``"int8"``, or ``"fp8"``) stores int8 or float8_e4m3fn with a float32 scale per token and head;
        reads come back in ``dtype``.
        """
        value_head_dim = base.check_create(batch_size, num_kv_heads, head_dim, value_head_dim, capacity=capacity)
        storage = KVStorage.zeros((batch_size, capacity), num_kv_heads, head_dim, value_head_dim, dtype, quantized)
        return cls(storage, *base.zeros_state(batch_size))

    @property
    def capacity(self) -> int:
        return self.storage.keys.shape[1]

    def _capacity_text(self) -> str:
        return f"capacity={self.capacity} tokens per sequence"

    def _would_overflow(self, new):
        return self.lengths + new > self.capacity

    def kernel_layout(self) -> KernelLayout:
        return storage_layout(self.storage, self.lengths)

    def _update(self, keys, values, new):
        b, t = keys.shape[:2]
        c = self.capacity
        pos = self.positions(t)  # [B, T]
        end = self.lengths + new  # [B]
        write = base.new_token_mask(new, t) & (pos < c)
        index = (jnp.arange(b)[:, None], jnp.where(write, pos, c))  # slot c is out of range: dropped
        storage = self.storage.write(index, keys, values)
        cache = KVCache(storage, end, self.overflow | (end > c))
        all_keys, all_values = storage.read()
        view = base.KVView(
            keys=all_keys,
            values=all_values,
            q_offset=self.lengths,
            kv_offset=jnp.zeros((b,), jnp.int32),
            kv_valid=jnp.arange(c, dtype=jnp.int32)[None, :] < end[:, None],
        )
        return cache, view
