"""KV caches for decoding: explicit, jit-friendly pytrees.

* :class:`KVCache`: dense, fixed capacity per sequence.
* :class:`RollingKVCache`: a ring buffer of the window, for sliding-window layers (evicts by design).
* :class:`PagedKVCache`: a shared pool of pages with a page table per sequence.

Each takes ``quantized=True`` (or ``"int8"``) to store int8 keys/values with a float32 scale per token
and head, or ``quantized="fp8"`` for float8_e4m3fn. ``cache.update(keys, values, lengths=n)`` returns
``(new_cache, view)`` and ``cache.rollback(n)`` removes the last ``n`` tokens; see
:mod:`attention_jax.cache.base` for the view and for what happens past capacity.
:meth:`PagedKVCache.fork` lets sequences share pages (copied on write).

>>> import jax.numpy as jnp
>>> import attention_jax as aj
>>> cache = aj.cache.KVCache.create(1, 16, num_kv_heads=2, head_dim=8, quantized=True)
>>> cache.elements_per_token, cache.bytes_per_token      # 2 heads x (8 + 8) int8, plus 2 x 2 scales
(32, 48)
>>> aj.cache.KVCache.create(1, 16, num_kv_heads=2, head_dim=8, quantized="fp8").storage.keys.dtype
dtype(float8_e4m3fn)
"""

from attention_jax.cache._storage import KVStorage, dequantize, quantization, quantize
from attention_jax.cache.base import Cache, KVView
from attention_jax.cache.dense import KVCache
from attention_jax.cache.paged import PagedKVCache
from attention_jax.cache.rolling import RollingKVCache

__all__ = [
    "Cache",
    "KVView",
    "KVCache",
    "RollingKVCache",
    "PagedKVCache",
    "KVStorage",
    "quantize",
    "quantization",
    "dequantize",
]
