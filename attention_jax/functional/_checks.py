"""Input validation shared by every attention implementation.

Errors name the argument and give the expected and the actual shape or dtype, using the axis
letters of docs/architecture.md: B batch, T query length, S key length, N query heads, K key/value
heads, H head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Sizes of one attention call: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``."""

    batch: int
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int

    @property
    def group_size(self) -> int:
        """G = N // K query heads share one key/value head."""
        return self.num_heads // self.num_kv_heads


def check_qkv(query: Any, key: Any, value: Any) -> AttentionShape:
    """Validate ranks, sizes and dtypes of ``query [B, T, N, H]``, ``key [B, S, K, H]``, ``value [B, S, K, Hv]``."""
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 4:
            letters = "[B, T, N, H]" if name == "query" else "[B, S, K, H]"
            raise ValueError(f"{name} must have rank 4 {letters}, got {name}.shape={jnp.shape(x)}.")
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}.")
    if not (jnp.result_type(query) == jnp.result_type(key) == jnp.result_type(value)):
        raise ValueError(
            f"query, key and value must share a dtype, got {jnp.result_type(query)}, {jnp.result_type(key)} "
            f"and {jnp.result_type(value)}."
        )
    b, t, n, h = query.shape
    kb, s, k, kh = key.shape
    vb, vs, vk, hv = value.shape
    if not b == kb == vb:
        raise ValueError(f"query, key and value must share the batch size B, got {b}, {kb} and {vb}.")
    if (vs, vk) != (s, k):
        raise ValueError(
            f"key and value must agree on [S, K], got key.shape={key.shape} and value.shape={value.shape}."
        )
    if kh != h:
        raise ValueError(f"query and key head dims must match, got {h} and {kh}.")
    if n % k:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={k} (N % K == 0).")
    return AttentionShape(b, t, s, n, k, h, hv)


def check_broadcastable(name: str, x: Any, shape: AttentionShape) -> None:
    """``x`` must broadcast to ``[B, N, T, S]`` without guessing (rank <= 4, each dim 1 or exact)."""
    target = (shape.batch, shape.num_heads, shape.q_len, shape.kv_len)
    x_shape = tuple(jnp.shape(x))
    ok = len(x_shape) <= 4 and all(d in (1, t) for d, t in zip(reversed(x_shape), reversed(target)))
    if not ok:
        raise ValueError(f"{name} must be broadcastable to [B, N, T, S]={list(target)}, got {name}.shape={x_shape}.")


def check_scale(scale: Any, head_dim: int) -> float | jax.Array:
    """``1 / sqrt(H)`` for None; else a real number or a float scalar array (traced is fine)."""
    if scale is None:
        return 1.0 / float(head_dim) ** 0.5
    if isinstance(scale, bool) or not (isinstance(scale, (int, float, np.number)) or hasattr(scale, "dtype")):
        raise ValueError(f"scale must be a real number or a scalar float array, got {scale=!r}.")
    if isinstance(scale, (int, float, np.number)):
        return float(scale)
    if jnp.ndim(scale) != 0:
        raise ValueError(f"scale must be a scalar, got scale.shape={jnp.shape(scale)}.")
    if not jnp.issubdtype(jnp.result_type(scale), jnp.floating):
        raise ValueError(f"scale must be a float, got dtype {jnp.result_type(scale)}.")
    return scale


def check_softcap(softcap: Any) -> float | None:
    """None or a positive static number (Python or numpy scalar, or a concrete 0-d array)."""
    if softcap is None:
        return None
    number = isinstance(softcap, (int, float, np.number)) or hasattr(softcap, "dtype")
    try:
        value = float(softcap) if number and not isinstance(softcap, bool) and jnp.ndim(softcap) == 0 else None
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"softcap must be a static positive number or None, got a traced {softcap=!r}.") from None
    if value is None or not value > 0:
        raise ValueError(f"softcap must be a positive number or None, got {softcap=!r}.")
    return value


def check_offsets(q_offset: Any, kv_offset: Any, batch: int) -> None:
    """Offsets are integer scalars (static or traced) or ``[B]`` arrays (one per sequence)."""
    for name, value in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if isinstance(value, bool) or jnp.ndim(value) not in (0, 1):
            raise ValueError(f"{name} must be an integer or an integer array of shape [B], got {name}={value!r}.")
        if jnp.ndim(value) == 1 and jnp.shape(value) != (batch,):
            raise ValueError(f"{name} must have shape [B]=[{batch}], got {name}.shape={jnp.shape(value)}.")
        if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise ValueError(f"{name} must be an integer, got dtype {jnp.result_type(value)}.")


def check_dropout(rate: Any, rng: Any) -> float:
    """A static rate in ``[0, 1)``; a PRNG key is required when the rate is positive."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.number)) or not 0.0 <= float(rate) < 1.0:
        raise ValueError(f"dropout_rate must be a number in [0, 1), got {rate=!r}.")
    if rate > 0 and rng is None:
        raise ValueError(f"dropout_rate={rate} needs dropout_rng (a jax.random key); pass dropout_rate=0 to disable.")
    return float(rate)


def check_implementation(implementation: Any, names: tuple[str, ...] = ("reference", "blockwise", "pallas", "cudnn")):
    """None for None/"auto", else the name, which must be one of ``names``."""
    if implementation in (None, "auto"):
        return None
    if implementation not in names:
        raise ValueError(f"implementation must be None, 'auto' or one of {names}, got {implementation=!r}.")
    return implementation
