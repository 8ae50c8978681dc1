"""Key/value buffers shared by every cache: scatter writes that drop, gathers, optional int8 or fp8.

A :class:`KVStorage` holds ``keys [*I, K, H]`` and ``values [*I, K, Hv]`` where ``*I`` are the
index dimensions of the cache that owns it (``[B, C]`` dense, ``[B, W]`` rolling, ``[P, page]``
paged). Quantised storage keeps one float32 scale per token and head, ``key_scales [*I, K]``, and
``x ~= q * scale`` over the head dim:

* ``quantized=True`` or ``"int8"``: int8 with ``scale = max|x| / 127`` (rounded to the nearest step);
* ``quantized="fp8"``: ``float8_e4m3fn`` with ``scale = max|x| / 448`` (the format's largest value),
  so the relative error of each entry is at most 2**-4 (three mantissa bits, round to nearest).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass

Array = jax.Array

_INT8_MAX = 127.0
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
# The stored dtype of each quantisation, and the largest value it holds.
FORMATS = {"int8": (jnp.dtype(jnp.int8), _INT8_MAX), "fp8": (jnp.dtype(jnp.float8_e4m3fn), _FP8_MAX)}


def quantization(quantized) -> str | None:
    """The storage format a cache's ``quantized=`` asks for: None (plain), ``"int8"`` or ``"fp8"``.

    >>> quantization(False), quantization(True), quantization("fp8")
    (None, 'int8', 'fp8')
    """
    if quantized is None or quantized is False:
        return None
    if quantized is True:
        return "int8"
    if isinstance(quantized, str) and quantized in FORMATS:
        return quantized
    raise ValueError(f"quantized must be False, True, 'int8' or 'fp8', got {quantized=!r}.")


def quantize(x: Array, kind: str = "int8") -> tuple[Array, Array]:
    """Symmetric quantisation with a scale per vector of the last axis: ``(q [..., H], scale [...] float32)``.

    ``kind`` is ``"int8"`` (``q`` int8, ``scale = max|x| / 127``) or ``"fp8"`` (``q`` float8_e4m3fn,
    ``scale = max|x| / 448``).

    >>> import jax.numpy as jnp
    >>> q, s = quantize(jnp.array([[1.0, -2.0, 0.5]]))
    >>> q.tolist(), s.round(4).tolist()
    ([[64, -127, 32]], [0.0157])
    >>> q, s = quantize(jnp.array([[1.0, -2.0, 0.5]]), "fp8")
    >>> q.astype(jnp.float32).tolist(), (s * 448).tolist()
    ([[224.0, -448.0, 112.0]], [2.0])
    """
    store, top = FORMATS[kind]
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / top  # [...]
    safe = jnp.where(scale > 0, scale, 1.0)
    scaled = jnp.clip(x / safe[..., None], -top, top)
    q = (jnp.round(scaled) if kind == "int8" else scaled).astype(store)
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

    keys: Array  # [*I, K, H]     dtype, int8 or float8_e4m3fn
    values: Array | None  # [*I, K, Hv]    dtype, int8 or float8_e4m3fn
    key_scales: Array | None  # [*I, K]        float32 when quantized
    value_scales: Array | None  # [*I, K]
    dtype: jnp.dtype = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def zeros(cls, index_shape, num_kv_heads: int, head_dim: int, value_head_dim: int, dtype, quantized=False):
        """Zeroed buffers; ``quantized`` is False, True/``"int8"`` or ``"fp8"`` (see :func:`quantization`)."""
        kind = quantization(quantized)
        quantized = kind is not None
        store = FORMATS[kind][0] if quantized else dtype
        keys = jnp.zeros((*index_shape, num_kv_heads, head_dim), store)
        values = jnp.zeros((*index_shape, num_kv_heads, value_head_dim), store) if value_head_dim else None
        key_scales = jnp.zeros((*index_shape, num_kv_heads), jnp.float32) if quantized else None
        value_scales = key_scales if quantized and value_head_dim else None
        return cls(keys, values, key_scales, value_scales, jnp.dtype(dtype))

    @property
    def quantized(self) -> bool:
        return self.key_scales is not None

    @property
    def quantization(self) -> str | None:
        """None, ``"int8"`` or ``"fp8"``: how the buffers are stored."""
        if not self.quantized:
            return None
        return "int8" if self.keys.dtype == jnp.int8 else "fp8"

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
        new_keys, new_key_scales = self.encode(keys)
        out_keys = self.keys.at[index].set(new_keys, mode="drop")
        out_key_scales = None if new_key_scales is None else self.key_scales.at[index].set(new_key_scales, mode="drop")
        out_values, out_value_scales = None, None
        if self.values is not None:
            new_values, new_value_scales = self.encode(values)
            out_values = self.values.at[index].set(new_values, mode="drop")
            if new_value_scales is not None:
                out_value_scales = self.value_scales.at[index].set(new_value_scales, mode="drop")
        return KVStorage(out_keys, out_values, out_key_scales, out_value_scales, self.dtype)

    def copy(self, source: tuple[Array, ...], target: tuple[Array, ...]) -> KVStorage:
        """Copy the entries at ``source`` to ``target`` (index tuples of one shape; out-of-range targets drop).

        Stored bytes move as they are (scales too): a copy of a quantised entry reads back the same.
        """
        move = lambda x: None if x is None else x.at[target].set(x[source], mode="drop")
        return KVStorage(move(self.keys), move(self.values), move(self.key_scales), move(self.value_scales), self.dtype)

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
        return dequantize(*quantize(x, self.quantization), self.dtype)

    def encode(self, x: Array) -> tuple[Array, Array | None]:
        """``x`` as this storage holds it: int8/fp8 with its float32 scales, or ``(x in dtype, None)``."""
        if self.quantized:
            return quantize(x, self.quantization)
        return x.astype(self.dtype), None
