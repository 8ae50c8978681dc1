"""Key/value buffers shared by every cache: scatter writes that drop, gathers, optional int8.

A :class:`KVStorage` holds ``keys [*I, K, H]`` and ``values [*I, K, Hv]`` where ``*I`` are the
index dimensions of the cache that owns it (``[B, C]`` dense, ``[B, W]`` rolling, ``[P, page]``
paged). With ``quantized=True`` the buffers are int8 with one float32 scale per token and head,
``key_scales [*I, K]``: ``x ~= q * scale`` with ``scale = max|x| / 127`` over the head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass

Array = jax.Array

_INT8_MAX = 127.0


def quantize(x: Array) -> tuple[Array, Array]:
    """Symmetric int8 with a scale per vector of the last axis: ``(q [..., H] int8, scale [...] float32)``.

    >>> import jax.numpy as jnp
    >>> q, s = quantize(jnp.array([[1.0, -2.0, 0.5]]))
    >>> q.tolist(), s.round(4).tolist()
    ([[64, -127, 32]], [0.0157])
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / _INT8_MAX  # [...]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x / safe[..., None]), -_INT8_MAX, _INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize(q: Array, scale: Array, dtype) -> Array:
    """Inverse of :func:`quantize`, returned in ``dtype``."""
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class KVStorage:
    """Keys and (optionally) values over the index dimensions ``*I`` of a cache.

    ``values`` is None for a keys-only cache (MLA stores its latent and RoPE key as the "key").
    ``dtype`` is the dtype reads come back in.
    """

    keys: Array  # [*I, K, H]     dtype or int8
    values: Array | None  # [*I, K, Hv]    dtype or int8
    key_scales: Array | None  # [*I, K]        float32 when quantized
    value_scales: Array | None  # [*I, K]
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def zeros(cls, index_shape, num_kv_heads: int, head_dim: int, value_head_dim: int, dtype, quantized: bool):
        store = jnp.int8 if quantized else dtype
        keys = jnp.zeros((*index_shape, num_kv_heads, head_dim), store)
        values = jnp.zeros((*index_shape, num_kv_heads, value_head_dim), store) if value_head_dim else None
        key_scales = jnp.zeros((*index_shape, num_kv_heads), jnp.float32) if quantized else None
        value_scales = key_scales if quantized and value_head_dim else None
        return cls(keys, values, key_scales, value_scales, jnp.dtype(dtype))

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[-2]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def value_head_dim(self) -> int:
        return 0 if self.values is None else self.values.shape[-1]

    @property
    def elements_per_token(self) -> int:
        """Stored K/V elements per token (all heads), scales excluded."""
        return self.num_kv_heads * (self.head_dim + self.value_head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes per token, scales included."""
        scales = (1 + (self.values is not None)) * self.num_kv_heads * 4 if self.quantized else 0
        return self.elements_per_token * self.keys.dtype.itemsize + scales

    def write(self, index: tuple[Array, ...], keys: Array, values: Array | None) -> KVStorage:
        """Scatter ``keys [*J, K, H]`` at ``index`` (a tuple of int arrays ``[*J]``); out-of-range entries drop."""
        new_keys, new_key_scales = self._encode(keys)
        out_keys = self.keys.at[index].set(new_keys, mode="drop")
        out_key_scales = None if new_key_scales is None else self.key_scales.at[index].set(new_key_scales, mode="drop")
        out_values, out_value_scales = None, None
        if self.values is not None:
            new_values, new_value_scales = self._encode(values)
            out_values = self.values.at[index].set(new_values, mode="drop")
            if new_value_scales is not None:
                out_value_scales = self.value_scales.at[index].set(new_value_scales, mode="drop")
        return KVStorage(out_keys, out_values, out_key_scales, out_value_scales, self.dtype)

    def read(self, index: tuple[Array, ...] | None = None) -> tuple[Array, Array | None]:
        """Gather (all entries when ``index`` is None) and dequantise to ``dtype``."""
        pick = (lambda x: x) if index is None else (lambda x: None if x is None else x[index])
        keys, values = pick(self.keys), pick(self.values)
        if self.quantized:
            keys = dequantize(keys, pick(self.key_scales), self.dtype)
            values = None if values is None else dequantize(values, pick(self.value_scales), self.dtype)
        return keys, values

    def roundtrip(self, x: Array | None) -> Array | None:
        """``x`` as a later read of it will return it (quantised and back when int8)."""
        if x is None:
            return None
        if not self.quantized:
            return x.astype(self.dtype)
        return dequantize(*quantize(x), self.dtype)

    def _encode(self, x: Array) -> tuple[Array, Array | None]:
        if self.quantized:
            return quantize(x)
        return x.astype(self.dtype), None
