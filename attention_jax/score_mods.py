"""Score modifications (FlexAttention-style): functions applied to each pre-softmax score.

A score mod is called as ``mod(score, batch, head, q_idx, kv_idx)`` where ``score`` is a float32
array and the index arguments are int32 arrays that broadcast against it (absolute positions for
``q_idx``/``kv_idx``). It must be elementwise so every implementation can apply it on tiles.
Mods compose with :func:`compose`; ``dot_product_attention`` applies them after the bias and
before the mask.

Every backend, the Pallas kernels included, runs a mod in its *tile form*: a static function
``tile_fn()(score, batch, head, q_pos, kv_pos, params)`` plus per-head parameters
``head_params()`` (a tuple of ``[N]`` arrays) that the backend hands to the function already
selected for each element's head. A kernel never gathers from a table; the parameters'
gradients (the ALiBi slopes, the T5 table) come back through the backends' custom VJPs.

>>> import jax.numpy as jnp
>>> mod = compose(alibi(jnp.array([0.5])), softcap(30.0))
>>> s = mod(jnp.zeros((1, 1, 1, 3)), jnp.zeros((1, 1, 1, 1), jnp.int32), jnp.zeros((1, 1, 1, 1), jnp.int32),
...         jnp.full((1, 1, 1, 1), 2), jnp.arange(3).reshape(1, 1, 1, 3))
>>> s.round(3).tolist()
[[[[-1.0, -0.5, 0.0]]]]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from attention_jax import positional
from attention_jax._pytree import register_dataclass

__all__ = ["ScoreMod", "softcap", "alibi", "relative_position_bias", "from_fn", "compose"]

Array = jax.Array


class ScoreMod:
    """Base class: ``__call__(score, batch, head, q_idx, kv_idx) -> score`` and its tile form."""

    def __call__(self, score: Array, batch: Array, head: Array, q_idx: Array, kv_idx: Array) -> Array:
        raise NotImplementedError

    def tile_fn(self) -> Callable[..., Array]:
        """Static, hashable ``fn(score, batch, head, q_pos, kv_pos, params) -> score``.

        ``params[i]`` is ``head_params()[i]`` at the element's head, broadcastable to ``score``.
        """
        raise NotImplementedError

    def head_params(self) -> tuple[Array, ...]:
        """Per-head float parameters of :meth:`tile_fn`, each ``[N]``."""
        return ()


@dataclasses.dataclass(frozen=True)
class _SoftcapTile:
    cap: float

    def __call__(self, score, batch, head, q_pos, kv_pos, params):
        return self.cap * jnp.tanh(score / self.cap)


@dataclasses.dataclass(frozen=True)
class _AlibiTile:
    def __call__(self, score, batch, head, q_pos, kv_pos, params):
        return score + params[0] * (kv_pos - q_pos).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class _RelativeBiasTile:
    num_buckets: int
    max_distance: int
    bidirectional: bool

    def __call__(self, score, batch, head, q_pos, kv_pos, params):
        bucket = positional.t5_relative_buckets(
            kv_pos - q_pos, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )  # fmt: skip
        # A chain of selects instead of a gather: it lowers in every kernel, and its gradient is
        # a masked sum per bucket.
        bias = jnp.zeros_like(score)
        for b, value in enumerate(params):
            bias = jnp.where(bucket == b, value, bias)
        return score + bias


@dataclasses.dataclass(frozen=True)
class _FnTile:
    fn: Callable[..., Array]

    def __call__(self, score, batch, head, q_pos, kv_pos, params):
        return self.fn(score, batch, head, q_pos, kv_pos).astype(score.dtype)


@dataclasses.dataclass(frozen=True)
class _ComposeTile:
    parts: tuple[tuple[Callable, int], ...]  # (tile fn, number of its params)

    def __call__(self, score, batch, head, q_pos, kv_pos, params):
        start = 0
        for fn, count in self.parts:
            score = fn(score, batch, head, q_pos, kv_pos, tuple(params[start : start + count]))
            start += count
        return score


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Softcap(ScoreMod):
    cap: float

    def __call__(self, score, batch, head, q_idx, kv_idx):
        return self.cap * jnp.tanh(score / self.cap)

    def tile_fn(self):
        return _SoftcapTile(self.cap)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class _Alibi(ScoreMod):
    slopes: Array  # [N]

    def __call__(self, score, batch, head, q_idx, kv_idx):
        slope = jnp.asarray(self.slopes, jnp.float32)[head]
        return score + slope * (kv_idx - q_idx).astype(jnp.float32)

    def tile_fn(self):
        return _AlibiTile()

    def head_params(self):
        return (self.slopes,)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class _RelativePositionBias(ScoreMod):
    table: Array  # [num_buckets, N]
    num_buckets: int = dataclasses.field(metadata=dict(static=True))
    max_distance: int = dataclasses.field(metadata=dict(static=True))
    bidirectional: bool = dataclasses.field(metadata=dict(static=True))

    def __call__(self, score, batch, head, q_idx, kv_idx):
        bucket = positional.t5_relative_buckets(
            kv_idx - q_idx,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return score + jnp.asarray(self.table, jnp.float32)[bucket, head]

    def tile_fn(self):
        return _RelativeBiasTile(self.num_buckets, self.max_distance, self.bidirectional)

    def head_params(self):
        return tuple(self.table[b] for b in range(self.num_buckets))  # num_buckets x [N]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _FromFn(ScoreMod):
    fn: Callable[..., Array]

    def __call__(self, score, batch, head, q_idx, kv_idx):
        return self.fn(score, batch, head, q_idx, kv_idx)

    def tile_fn(self):
        return _FnTile(self.fn)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class _Compose(ScoreMod):
    mods: tuple[ScoreMod, ...]

    def __call__(self, score, batch, head, q_idx, kv_idx):
        for mod in self.mods:
            score = mod(score, batch, head, q_idx, kv_idx)
        return score

    def tile_fn(self):
        return _ComposeTile(tuple((mod.tile_fn(), len(mod.head_params())) for mod in self.mods))

    def head_params(self):
        return tuple(p for mod in self.mods for p in mod.head_params())


def softcap(cap: float) -> ScoreMod:
    """``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if not cap > 0:
        raise ValueError(f"softcap must be positive, got {cap=}.")
    return _Softcap(float(cap))


def alibi(slopes: Array) -> ScoreMod:
    """ALiBi: adds ``slopes[head] * (kv_idx - q_idx)``; see ``positional.alibi_slopes``.

    Args:
      slopes: ``[N]`` one slope per query head.
    """
    if jnp.ndim(slopes) != 1:
        raise ValueError(f"slopes must have shape [N], got slopes.shape={jnp.shape(slopes)}.")
    return _Alibi(slopes)


def relative_position_bias(table: Array, num_buckets: int, max_distance: int, bidirectional: bool = True) -> ScoreMod:
    """T5 relative position bias: adds ``table[bucket(kv_idx - q_idx), head]``.

    Args:
      table: ``[num_buckets, N]`` learned biases (a parameter of the calling module).
    """
    if jnp.ndim(table) != 2 or jnp.shape(table)[0] != num_buckets:
        raise ValueError(
            f"table must have shape [num_buckets, N] with {num_buckets=}, got table.shape={jnp.shape(table)}."
        )
    return _RelativePositionBias(table, int(num_buckets), int(max_distance), bool(bidirectional))


def from_fn(fn: Callable[..., Array]) -> ScoreMod:
    """Any elementwise ``fn(score, batch, head, q_idx, kv_idx) -> score``."""
    if not callable(fn):
        raise TypeError(f"from_fn expects a callable, got {type(fn).__name__}.")
    return _FromFn(fn)


def compose(*mods: ScoreMod) -> ScoreMod:
    """Apply ``mods`` left to right."""
    for mod in mods:
        if not isinstance(mod, ScoreMod):
            raise TypeError(f"compose expects ScoreMod objects, got {type(mod).__name__}.")
    return _Compose(tuple(mods))
