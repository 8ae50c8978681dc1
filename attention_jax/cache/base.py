"""What every cache shares: the view it hands to attention, input checks, the overflow rule.

A cache is an immutable pytree. ``cache.update(keys, values, lengths=n)`` appends the first
``n[b]`` of ``T`` new tokens of each sequence ``b`` at absolute positions ``lengths[b] + i`` and
returns ``(new_cache, view)``: the :class:`KVView` holds every key the new queries may need, with
the absolute position of each slot, so the attention mask stays exact while decoding.

Writing past a cache's capacity never wraps. Where lengths are concrete (eager code) ``update``
raises ``ValueError``; under ``jit`` the tokens that do not fit are dropped and the cache's
``overflow [B]`` flag is set, which :meth:`Cache.check` (or :func:`attention_jax.generate`) turns
into the same error once the values are concrete. The rolling cache evicts by design instead.

``cache.rollback(n)`` removes the last ``n[b]`` tokens of each sequence (speculative decoding: the
draft tokens the target rejected), so that decoding on gives what it would have given had those
tokens never been written. ``n`` may be an int or ``[B]`` ints, concrete or traced. More than a
sequence holds raises ``ValueError`` where ``n`` is concrete and is clipped to its length under
``jit``. (A rolling cache can only go back as far as its extra slots keep the window: see
:class:`~attention_jax.cache.RollingKVCache`.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from attention_jax._pytree import register_dataclass
from attention_jax.cache._storage import KVStorage
from attention_jax.cache.layout import KernelLayout

Array = jax.Array


@register_dataclass
@dataclasses.dataclass(frozen=True)
class KVView:
    """The keys new queries attend to, in position order per sequence.

    Slot ``s`` of sequence ``b`` holds position ``kv_offset[b] + s``; only ``kv_valid`` slots exist.
    """

    keys: Array  # [B, S, K, H] dequantised
    values: Array | None  # [B, S, K, Hv], None for a keys-only cache
    q_offset: Array  # [B] int32, position of the first new token
    kv_offset: Array  # [B] int32, position of slot 0
    kv_valid: Array  # [B, S] bool

    def offsets(self) -> dict[str, Array]:
        """``q_offset``, ``kv_offset`` and ``kv_valid``: the keyword arguments attention ops take for a view."""
        return dict(q_offset=self.q_offset, kv_offset=self.kv_offset, kv_valid=self.kv_valid)


class Cache:
    """Base of the cache pytrees; subclasses define ``storage``, ``lengths``, ``overflow`` and ``_update``."""

    storage: KVStorage
    lengths: Array  # [B] int32 tokens written so far
    overflow: Array  # [B] bool, sticky: a write did not fit

    # -- what subclasses provide -----------------------------------------------------------------
    def _update(self, keys: Array, values: Array | None, new: Array) -> tuple[Cache, KVView]:
        raise NotImplementedError

    def _rollback(self, n: Array) -> Cache:
        """The cache without the last ``n [B]`` tokens (``0 <= n <= lengths``)."""
        return dataclasses.replace(self, lengths=self.lengths - n)

    def _would_overflow(self, new: Array) -> Array:
        """``[B]`` bool: appending ``new`` tokens would not fit (the rolling cache never overflows)."""
        return jnp.zeros(self.lengths.shape, bool)

    def kernel_layout(self) -> KernelLayout:
        """The cache as the decode kernels read it, in place (:mod:`attention_jax.cache.layout`).

        Raises ``TypeError`` for a cache kind without one: its layers keep the dense view.
        """
        raise TypeError(f"no kernel layout for a cache of type {type(self).__name__}.")

    @property
    def holds_new_tokens(self) -> bool:
        """Whether, after a step's write, the cache still holds every key that step's queries need.

        True for a cache that only appends; a ring of the window is False: its write evicts keys
        the step's earlier queries still see, so they are attended to before the write.
        """
        return True

    # -- public API ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def quantized(self) -> bool:
        return self.storage.quantized

    @property
    def elements_per_token(self) -> int:
        """K/V elements stored per token, over all heads (scales excluded)."""
        return self.storage.elements_per_token

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token, over all heads, int8 scales included."""
        return self.storage.bytes_per_token

    def positions(self, num_new: int) -> Array:
        """Absolute positions ``[B, T]`` the next ``T = num_new`` tokens will take (for RoPE)."""
        return self.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)

    def update(self, keys: Array, values: Array | None = None, *, lengths: Array | None = None):
        """Append new tokens; returns ``(new_cache, view)``.

        Args:
          keys: ``[B, T, K, H]``.
          values: ``[B, T, K, Hv]``, or None for a keys-only cache.
          lengths: ``[B]`` how many of the ``T`` tokens are real (right padding); default all.
        """
        new = self._check_update(keys, values, lengths)
        over = self._would_overflow(new)
        if not isinstance(over, jax.core.Tracer) and bool(jnp.any(over)):
            raise ValueError(self._overflow_message(new, over))
        return _apply_update(self, keys, values, new)

    def rollback(self, n: int | Array) -> Cache:
        """Remove the last ``n`` tokens of every sequence (``n`` an int or ``[B]`` ints); returns the new cache.

        Decoding after ``rollback(n)`` gives what it would have given had those tokens never been
        written. Jit-safe: a traced ``n`` larger than a sequence's length is clipped to it.

        >>> import jax.numpy as jnp
        >>> import attention_jax as aj
        >>> cache = aj.cache.KVCache.create(2, 8, num_kv_heads=1, head_dim=2)
        >>> cache, _ = cache.update(jnp.ones((2, 5, 1, 2)), jnp.ones((2, 5, 1, 2)))
        >>> cache.rollback(jnp.array([2, 0])).lengths.tolist()
        [3, 5]
        """
        n = jnp.broadcast_to(jnp.asarray(n, jnp.int32), self.lengths.shape) if jnp.ndim(n) == 0 else n
        if jnp.shape(n) != self.lengths.shape or not jnp.issubdtype(jnp.result_type(n), jnp.integer):
            raise ValueError(
                f"n must be an int or ints of shape [B]=[{self.batch_size}], got {jnp.result_type(n)} {jnp.shape(n)}."
            )
        n = jnp.asarray(n, jnp.int32)
        concrete = not isinstance(n, jax.core.Tracer) and not isinstance(self.lengths, jax.core.Tracer)
        if concrete and bool(jnp.any((n < 0) | (n > self.lengths))):
            raise ValueError(
                f"n must lie in [0, lengths] to roll back, got n={n.tolist()} for lengths={self.lengths.tolist()}."
            )
        cache = _apply_rollback(self, jnp.clip(n, 0, self.lengths))
        lost = cache.overflow & ~self.overflow
        if concrete and bool(jnp.any(lost)):
            raise ValueError(self._rollback_message(n, lost))
        return cache

    def check(self) -> None:
        """Raise ``ValueError`` if any write did not fit (call on a concrete cache, e.g. after jit)."""
        if bool(jnp.any(self.overflow)):
            rows = [int(b) for b in jnp.nonzero(self.overflow)[0]]
            raise ValueError(
                f"{type(self).__name__} overflowed: sequences {rows} were written past the cache's capacity "
                f"({self._capacity_text()}); the tokens that did not fit were dropped. Create a larger cache."
            )

    # -- helpers -------------------------------------------------------------------------------------
    def _capacity_text(self) -> str:
        raise NotImplementedError

    def _rollback_message(self, n: Array, lost: Array) -> str:
        raise NotImplementedError  # only a cache that can lose a rollback sets its flag there

    def _overflow_message(self, new: Array, over: Array) -> str:
        rows = [int(b) for b in jnp.nonzero(over)[0]]
        have = [int(self.lengths[b]) for b in rows]
        add = [int(new[b]) for b in rows]
        return (
            f"{type(self).__name__} cannot take {add} more tokens for sequences {rows} holding {have}: "
            f"{self._capacity_text()}. Create a larger cache."
        )

    def _check_update(self, keys: Array, values: Array | None, lengths: Array | None) -> Array:
        st = self.storage
        b = self.batch_size
        if jnp.ndim(keys) != 4:
            raise ValueError(f"keys must have shape [B, T, K, H], got keys.shape={jnp.shape(keys)}.")
        kb, t, k, h = keys.shape
        expected = (b, t, st.num_kv_heads, st.head_dim)
        if (kb, k, h) != (b, st.num_kv_heads, st.head_dim):
            raise ValueError(
                f"keys must have shape [B, T, K, H]={list(expected)} to fit this cache, got keys.shape={keys.shape}."
            )
        if st.values is None:
            if values is not None:
                raise ValueError("this cache stores keys only (value_head_dim=0); pass values=None.")
        else:
            expected_v = (b, t, st.num_kv_heads, st.value_head_dim)
            if values is None or tuple(values.shape) != expected_v:
                got = None if values is None else values.shape
                raise ValueError(
                    f"values must have shape [B, T, K, Hv]={list(expected_v)} to fit this cache, got {got}."
                )
        if lengths is None:
            return jnp.full((b,), t, jnp.int32)
        if jnp.shape(lengths) != (b,):
            raise ValueError(f"lengths must have shape [B]=[{b}], got lengths.shape={jnp.shape(lengths)}.")
        lengths = jnp.asarray(lengths, jnp.int32)
        if not isinstance(lengths, jax.core.Tracer) and bool(jnp.any((lengths < 0) | (lengths > t))):
            raise ValueError(f"lengths must lie in [0, T={t}], got lengths={lengths.tolist()}.")
        return jnp.clip(lengths, 0, t)


@jax.jit
def _apply_update(cache: Cache, keys: Array, values: Array | None, new: Array) -> tuple[Cache, KVView]:
    # One compiled program per cache type and shape: eager decoding would otherwise dispatch (and
    # compile) each of its small ops on its own. Inside an outer jit this is simply inlined.
    return cache._update(keys, values, new)


@jax.jit
def _apply_rollback(cache: Cache, n: Array) -> Cache:
    return cache._rollback(n)


def new_token_mask(new: Array, num_new: int) -> Array:
    """``[B, T]`` True for the real (non-padding) new tokens."""
    return jnp.arange(num_new, dtype=jnp.int32)[None, :] < new[:, None]


def zeros_state(batch_size: int) -> tuple[Array, Array]:
    """Empty ``lengths [B]`` and ``overflow [B]``."""
    return jnp.zeros((batch_size,), jnp.int32), jnp.zeros((batch_size,), bool)


def check_create(batch_size: int, num_kv_heads: int, head_dim: int, value_head_dim: int | None, **sizes) -> int:
    """Validate the sizes of a new cache; returns the value head dim (``head_dim`` when None)."""
    for name, value in dict(batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim, **sizes).items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    if isinstance(value_head_dim, bool) or not isinstance(value_head_dim, int) or value_head_dim < 0:
        raise ValueError(f"value_head_dim must be a non-negative integer (0: keys only), got {value_head_dim=!r}.")
    return value_head_dim
