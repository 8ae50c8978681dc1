"""Sparse attention patterns as masks: Longformer, BigBird and the Sparse Transformer's factorizations.

Each builder returns an ``attention_jax.masks.Mask`` made of the library's primitives, so the patterns run on
every path of ``dot_product_attention``, and the block-skipping paths skip the tiles the pattern leaves empty:
the cost grows as ``O(T * w)`` instead of ``O(T^2)``.

* Longformer (Beltagy et al., 2020): a sliding window of ``window`` keys on each side (every ``dilation``-th
  key when dilated), plus global tokens that see and are seen by every position.
* BigBird (Zaheer et al., 2020): blocks of ``block`` positions; each query block sees ``window_blocks``
  neighbouring key blocks on each side, the first ``global_blocks`` blocks (global both ways) and
  ``random_blocks`` pseudo-random key blocks.
* Sparse Transformer (Child et al., 2019): ``strided`` (the previous ``stride`` keys, and every
  ``stride``-th key before them) and ``fixed`` (the own block of ``stride`` keys, and the last ``summary``
  keys of every block). The ``*_factors`` functions return the two factors separately, for heads or layers
  that each take one.

>>> import numpy as np
>>> m = longformer(1, global_tokens=1)
>>> np.asarray(m.dense(5, 5)).astype(int)
array([[1, 1, 1, 1, 1],
       [1, 1, 1, 0, 0],
       [1, 1, 1, 1, 0],
       [1, 0, 1, 1, 1],
       [1, 0, 0, 1, 1]])
>>> np.asarray(strided(2).dense(5, 5)).astype(int)
array([[1, 0, 0, 0, 0],
       [1, 1, 0, 0, 0],
       [1, 1, 1, 0, 0],
       [0, 1, 1, 1, 0],
       [1, 0, 1, 1, 1]])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from attention_jax import masks

Array = jax.Array

__all__ = [
    "longformer",
    "bigbird",
    "strided",
    "strided_factors",
    "fixed",
    "fixed_factors",
    "global_indices",
]

# `dilated` needs a window; a window longer than any sequence gives "every stride-th key, at any distance".
_UNBOUNDED = 2**30


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {name}={value!r}.")
    return value


def global_indices(global_tokens: int | Sequence[int]) -> tuple[int, ...]:
    """An int ``g`` means the first ``g`` positions; a sequence lists the positions. Sorted, unique."""
    if isinstance(global_tokens, int) and not isinstance(global_tokens, bool):
        return tuple(range(_int("global_tokens", global_tokens, 0)))
    indices = tuple(sorted({int(i) for i in global_tokens}))
    if indices and indices[0] < 0:
        raise ValueError(f"global token positions must be non-negative, got {global_tokens=!r}.")
    return indices


@dataclasses.dataclass(frozen=True)
class _BlockBand:
    """Query block ``i // block`` sees key blocks within ``width`` of it (hashable, for ``masks.from_fn``)."""

    block: int
    width: int

    def __call__(self, q_pos: Array, kv_pos: Array) -> Array:
        return jnp.abs(q_pos // self.block - kv_pos // self.block) <= self.width


@dataclasses.dataclass(frozen=True)
class _SummaryKeys:
    """Keys among the last ``summary`` positions of each block of ``stride`` (hashable, for ``masks.from_fn``)."""

    stride: int
    summary: int

    def __call__(self, q_pos: Array, kv_pos: Array) -> Array:
        return kv_pos % self.stride >= self.stride - self.summary


def longformer(
    window: int, *, global_tokens: int | Sequence[int] = (), dilation: int = 1, causal: bool = False
) -> masks.Mask:
    """Longformer: ``window`` keys on each side (``|i - j| <= window * dilation``, ``dilation | i - j``) + globals.

    Args:
      window: keys on each side of the query (``>= 1``); with ``causal`` only the left side remains.
      global_tokens: positions that attend everywhere and are attended by all; an int ``g`` means the first g.
      dilation: gaps between the window's keys (``1``: a plain sliding window).
      causal: also require ``j <= i``.
    """
    window, dilation = _int("window", window, 1), _int("dilation", dilation, 1)
    if dilation == 1:
        mask = masks.sliding_window(window, 0 if causal else window)
    else:
        mask = masks.dilated(window * dilation, dilation)
    indices = global_indices(global_tokens)
    if indices:
        mask = mask | masks.global_tokens(indices)
    return mask & masks.causal() if causal else mask


def bigbird(
    block: int,
    *,
    window_blocks: int = 1,
    global_blocks: int = 1,
    random_blocks: int = 1,
    seed: int = 0,
    causal: bool = False,
) -> masks.Mask:
    """BigBird: block-local window + global blocks + random blocks, on blocks of ``block`` positions.

    Args:
      block: positions per block (``>= 1``).
      window_blocks: neighbouring key blocks on each side a query block sees (``0``: its own block only).
      global_blocks: the first ``global_blocks`` blocks are global (see and are seen by every position).
      random_blocks: pseudo-random key blocks per query block (``masks.random_blocks``, fixed by ``seed``).
      causal: also require ``j <= i``.
    """
    block = _int("block", block, 1)
    window_blocks = _int("window_blocks", window_blocks, 0)
    global_blocks = _int("global_blocks", global_blocks, 0)
    random_blocks = _int("random_blocks", random_blocks, 0)
    # masks has no block-granular band; chunked() is the width-0 case with an analytic block map.
    mask = masks.chunked(block) if window_blocks == 0 else masks.from_fn(_BlockBand(block, window_blocks))
    if global_blocks:
        mask = mask | masks.global_tokens(range(global_blocks * block))
    if random_blocks:
        mask = mask | masks.random_blocks(block, random_blocks, seed)
    return mask & masks.causal() if causal else mask


def strided_factors(stride: int, *, causal: bool = True) -> tuple[masks.Mask, masks.Mask]:
    """The two factors of the strided pattern: the previous ``stride`` keys, and every ``stride``-th key."""
    stride = _int("stride", stride, 1)
    local = masks.sliding_window(stride, 0 if causal else stride)
    every = masks.dilated(_UNBOUNDED, stride)
    if causal:
        return local, every & masks.causal()
    return local, every


def strided(stride: int, *, causal: bool = True) -> masks.Mask:
    """Sparse Transformer strided attention (for data with a period, e.g. images): the union of both factors."""
    local, every = strided_factors(stride, causal=causal)
    return local | every


def fixed_factors(stride: int, *, summary: int = 1, causal: bool = True) -> tuple[masks.Mask, masks.Mask]:
    """The two factors of the fixed pattern: the own block of ``stride`` keys, and each block's last ``summary``."""
    stride = _int("stride", stride, 1)
    summary = _int("summary", summary, 1)
    if summary > stride:
        raise ValueError(f"summary must be at most stride, got {summary=} and {stride=}.")
    own = masks.chunked(stride)
    summaries = masks.from_fn(_SummaryKeys(stride, summary))
    if causal:
        return own & masks.causal(), summaries & masks.causal()
    return own, summaries


def fixed(stride: int, *, summary: int = 1, causal: bool = True) -> masks.Mask:
    """Sparse Transformer fixed attention (for text): the union of both factors."""
    own, summaries = fixed_factors(stride, summary=summary, causal=causal)
    return own | summaries
