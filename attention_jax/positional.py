"""Positional encodings used by attention: rotary embeddings (RoPE), ALiBi slopes, T5 buckets.

RoPE rotates pairs of channels of queries and keys by ``position * inv_freq``, so the score
``<rope(q, i), rope(k, j)>`` depends on ``i - j`` alone. Configuration objects are frozen
(hashable) dataclasses, so modules can hold them as static config.

>>> import jax.numpy as jnp
>>> rope = RoPE(theta=10_000.0)
>>> x = jnp.ones((1, 4, 2, 8))          # [B, T, N, H]
>>> rope(x, jnp.arange(4)).shape
(1, 4, 2, 8)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "RoPE",
    "LinearScaling",
    "NTKScaling",
    "Llama3Scaling",
    "YaRNScaling",
    "alibi_slopes",
    "t5_relative_buckets",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LinearScaling:
    """Position interpolation: every frequency divided by ``factor`` (Chen et al., 2023)."""

    factor: float

    def inv_freq(self, inv_freq: np.ndarray, dim: int, theta: float) -> np.ndarray:
        return inv_freq / self.factor


@dataclasses.dataclass(frozen=True)
class NTKScaling:
    """NTK-aware scaling: the base grows to ``theta * factor ** (dim / (dim - 2))``."""

    factor: float

    def inv_freq(self, inv_freq: np.ndarray, dim: int, theta: float) -> np.ndarray:
        base = theta * self.factor ** (dim / (dim - 2))
        return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1: long wavelengths divided by ``factor``, short kept, a smooth ramp between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def inv_freq(self, inv_freq: np.ndarray, dim: int, theta: float) -> np.ndarray:
        low_freq_wavelen = self.original_max_position / self.low_freq_factor
        high_freq_wavelen = self.original_max_position / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (self.original_max_position / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * inv_freq / self.factor + smooth * inv_freq
        return np.where(
            wavelen > low_freq_wavelen,
            inv_freq / self.factor,
            np.where(wavelen < high_freq_wavelen, inv_freq, smoothed),
        )


@dataclasses.dataclass(frozen=True)
class YaRNScaling:
    """YaRN (Peng et al., 2023): per-frequency blend of interpolation and extrapolation.

    Dimensions rotating more than ``beta_fast`` times over the original context extrapolate,
    fewer than ``beta_slow`` interpolate, a linear ramp between; cos/sin are scaled by
    ``attention_factor`` (default ``0.1 * ln(factor) + 1``). ``truncate`` rounds the ramp's ends
    to whole dimensions (the paper and most checkpoints); gpt-oss sets it False.
    """

    factor: float
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    truncate: bool = True

    def correction_range(self, dim: int, theta: float) -> tuple[float, float]:
        def correction_dim(num_rotations):
            return dim * math.log(self.original_max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    def inv_freq(self, inv_freq: np.ndarray, dim: int, theta: float) -> np.ndarray:
        low, high = self.correction_range(dim, theta)
        high = high + 0.001 if low == high else high  # avoid a zero-width ramp
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extrapolation = 1.0 - ramp
        return inv_freq / self.factor * (1.0 - extrapolation) + inv_freq * extrapolation

    @property
    def magnitude(self) -> float:
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0


Scaling = LinearScaling | NTKScaling | Llama3Scaling | YaRNScaling


@dataclasses.dataclass(frozen=True)
class RoPE:
    """Rotary position embedding (Su et al., 2021).

    Attributes:
      theta: base of the frequencies ``theta ** (-2i / rotary_dim)``.
      rotary_dim: number of leading channels rotated (partial rotary, e.g. ``H // 2``); None = all.
      layout: ``"rotate_half"`` pairs channel ``i`` with ``i + rotary_dim / 2`` (Llama, NeoX);
        ``"interleaved"`` pairs ``2i`` with ``2i + 1`` (the original paper, GPT-J).
      scaling: None or one of ``LinearScaling``, ``NTKScaling``, ``Llama3Scaling``, ``YaRNScaling``.
    """

    theta: float = 10_000.0
    rotary_dim: int | None = None
    layout: Literal["rotate_half", "interleaved"] = "rotate_half"
    scaling: Scaling | None = None

    def __post_init__(self):
        if self.layout not in ("rotate_half", "interleaved"):
            raise ValueError(f"layout must be 'rotate_half' or 'interleaved', got layout={self.layout!r}.")
        if self.theta <= 0:
            raise ValueError(f"theta must be positive, got theta={self.theta}.")
        if self.rotary_dim is not None and (self.rotary_dim <= 0 or self.rotary_dim % 2):
            raise ValueError(f"rotary_dim must be a positive even number, got rotary_dim={self.rotary_dim}.")

    def dim(self, head_dim: int) -> int:
        dim = head_dim if self.rotary_dim is None else self.rotary_dim
        if dim > head_dim or dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_dim={head_dim}, got {dim}.")
        return dim

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """``[rotary_dim / 2]`` float64 angular frequencies, after scaling."""
        dim = self.dim(head_dim)
        inv_freq = 1.0 / self.theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.scaling is not None:
            inv_freq = self.scaling.inv_freq(inv_freq, dim, self.theta)
        return inv_freq

    def cos_sin(self, positions: Array, head_dim: int) -> tuple[Array, Array]:
        """cos and sin ``[..., rotary_dim / 2]`` in float32 for integer or float positions ``[...]``."""
        inv_freq = jnp.asarray(self.inv_freq(head_dim), jnp.float32)
        angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
        magnitude = self.scaling.magnitude if isinstance(self.scaling, YaRNScaling) else 1.0
        return jnp.cos(angles) * magnitude, jnp.sin(angles) * magnitude

    def __call__(self, x: Array, positions: Array) -> Array:
        """Rotate ``x [B, T, N, H]`` (or ``[B, T, H]``) at ``positions [T]`` or ``[B, T]``.

        Computed in float32, returned in ``x.dtype``; channels past ``rotary_dim`` pass through.
        """
        if x.ndim not in (3, 4):
            raise ValueError(f"x must have shape [B, T, N, H] or [B, T, H], got x.shape={x.shape}.")
        positions = jnp.asarray(positions)
        if positions.shape not in ((x.shape[1],), (x.shape[0], x.shape[1])):
            raise ValueError(
                f"positions must have shape [T] or [B, T] with B={x.shape[0]}, T={x.shape[1]}, "
                f"got positions.shape={positions.shape}."
            )
        head_dim = x.shape[-1]
        dim = self.dim(head_dim)
        cos, sin = self.cos_sin(positions, head_dim)  # [T, R/2] or [B, T, R/2]
        if positions.ndim == 1:
            cos, sin = cos[None], sin[None]
        if x.ndim == 4:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
        rot, rest = x[..., :dim].astype(jnp.float32), x[..., dim:]
        if self.layout == "rotate_half":
            x1, x2 = rot[..., : dim // 2], rot[..., dim // 2 :]
            out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(rot.shape)
        return jnp.concatenate([out.astype(x.dtype), rest], axis=-1)


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes ``[N]`` for any head count (Press et al., 2022).

    For a power of two ``n`` the slopes are ``2 ** (-8 i / n)``, ``i = 1..n``; otherwise the slopes
    of the nearest lower power of two followed by every other slope of twice that.

    >>> alibi_slopes(4).tolist()
    [0.25, 0.0625, 0.015625, 0.00390625]
    """
    if num_heads <= 0:
        raise ValueError(f"num_heads must be positive, got {num_heads=}.")

    def power_of_two(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return np.asarray(slopes, dtype=np.float32)


def t5_relative_buckets(
    relative_position: Array, *, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> Array:
    """T5's bucket of each ``relative_position = kv_pos - q_pos`` (int32, same shape).

    Half the buckets hold exact small distances, the rest grow logarithmically up to
    ``max_distance``; bidirectional buckets split by sign.

    >>> import jax.numpy as jnp
    >>> t5_relative_buckets(jnp.array([-3, 0, 3]), num_buckets=8, max_distance=16).tolist()
    [2, 0, 6]
    """
    relative_position = jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)
