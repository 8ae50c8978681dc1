"""Sparse attention: Longformer, BigBird and the Sparse Transformer, as masks on ``dot_product_attention``.

The patterns come from :mod:`attention_jax.sparse_patterns`; these functions check them against the sequence
length and run ``dot_product_attention`` with the mask, so the block-skipping implementations skip the empty
tiles. Each equals dense attention under ``pattern.dense(T, S)``.

>>> import jax.numpy as jnp
>>> q = jnp.ones((1, 16, 2, 8))
>>> longformer_attention(q, q, q, window=2, global_tokens=1).shape
(1, 16, 2, 8)
>>> bigbird_attention(q, q, q, block=4).shape
(1, 16, 2, 8)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from attention_jax import sparse_patterns
from attention_jax.functional import _checks
from attention_jax.functional.dot_product import dot_product_attention

Array = jax.Array
PATTERNS = ("strided", "fixed")

__all__ = ["longformer_attention", "bigbird_attention", "sparse_transformer_attention", "transformer_pattern"]


def transformer_pattern(pattern: str, *, stride: int, summary: int = 1, causal: bool = True):
    """The Sparse Transformer's mask by name: ``"strided"`` or ``"fixed"`` (both factors, their union)."""
    if pattern == "strided":
        return sparse_patterns.strided(stride, causal=causal)
    if pattern == "fixed":
        return sparse_patterns.fixed(stride, summary=summary, causal=causal)
    raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern=!r}.")


def _check_globals(indices: tuple[int, ...], shape: _checks.AttentionShape, what: str) -> None:
    length = min(shape.q_len, shape.kv_len)
    if len(indices) > length:
        raise ValueError(f"{what} asks for {len(indices)} global tokens but the sequence has {length} positions.")
    if indices and indices[-1] >= length:
        raise ValueError(f"{what} has a global token at position {indices[-1]}, beyond the {length} positions.")


def longformer_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    window: int,
    global_tokens: int | Sequence[int] = (),
    dilation: int = 1,
    causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Longformer attention: local (optionally dilated) window plus global tokens.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      window, global_tokens, dilation, causal: see :func:`attention_jax.sparse_patterns.longformer`.
      scale, implementation: as in ``dot_product_attention``.
    """
    shape = _checks.check_qkv(query, key, value)
    mask = sparse_patterns.longformer(window, global_tokens=global_tokens, dilation=dilation, causal=causal)
    _check_globals(sparse_patterns.global_indices(global_tokens), shape, f"global_tokens={global_tokens!r}")
    return dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)


def bigbird_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    block: int,
    window_blocks: int = 1,
    global_blocks: int = 1,
    random_blocks: int = 1,
    seed: int = 0,
    causal: bool = False,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """BigBird attention: block window + global blocks + random blocks.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      block, window_blocks, global_blocks, random_blocks, seed, causal: see
        :func:`attention_jax.sparse_patterns.bigbird`.
      scale, implementation: as in ``dot_product_attention``.
    """
    shape = _checks.check_qkv(query, key, value)
    mask = sparse_patterns.bigbird(
        block,
        window_blocks=window_blocks,
        global_blocks=global_blocks,
        random_blocks=random_blocks,
        seed=seed,
        causal=causal,
    )
    _check_globals(tuple(range(global_blocks * block)), shape, f"{global_blocks=} of {block=}")
    return dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)


def sparse_transformer_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    pattern: str,
    stride: int,
    summary: int = 1,
    causal: bool = True,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Sparse Transformer attention with the union of a factorized pattern's two factors.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      pattern: ``"strided"`` or ``"fixed"`` (:mod:`attention_jax.sparse_patterns`).
      stride: the period ``l``; summary: ``c``, summary keys per block of the fixed pattern.
      causal: also require ``j <= i`` (the paper's autoregressive setting).
      scale, implementation: as in ``dot_product_attention``.
    """
    _checks.check_qkv(query, key, value)
    mask = transformer_pattern(pattern, stride=stride, summary=summary, causal=causal)
    return dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)
