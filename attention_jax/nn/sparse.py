"""Sparse self-attention modules: Longformer, BigBird and the Sparse Transformer.

Each is multi-head self-attention whose mask comes from :mod:`attention_jax.sparse_patterns`; the pattern is
checked when the layer is built.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> x = jnp.ones((1, 16, 32))
>>> LongformerAttention(32, num_heads=4, window=2, global_tokens=1, rngs=nnx.Rngs(0))(x).shape
(1, 16, 32)
>>> BigBirdAttention(32, num_heads=4, block=4, rngs=nnx.Rngs(0))(x).shape
(1, 16, 32)
>>> SparseTransformerAttention(32, num_heads=4, pattern="fixed", stride=4, rngs=nnx.Rngs(0))(x).shape
(1, 16, 32)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from attention_jax import sparse_patterns
from attention_jax.functional.sparse import (
    PATTERNS,
    bigbird_attention,
    longformer_attention,
    sparse_transformer_attention,
)
from attention_jax.nn._common import check_features
from attention_jax.nn._heads import HeadProjections

Array = jax.Array

__all__ = ["LongformerAttention", "BigBirdAttention", "SparseTransformerAttention"]


class LongformerAttention(nnx.Module):
    """Longformer self-attention: a (dilated) sliding window of ``window`` keys per side plus global tokens.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      window, global_tokens, dilation, causal: see :func:`attention_jax.sparse_patterns.longformer`.
      implementation: passed to ``dot_product_attention``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        window: int,
        global_tokens: int | Sequence[int] = (),
        dilation: int = 1,
        causal: bool = False,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        sparse_patterns.longformer(window, global_tokens=global_tokens, dilation=dilation, causal=causal)
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.window, self.dilation, self.causal = window, dilation, causal
        self.global_tokens = sparse_patterns.global_indices(global_tokens)
        self.implementation = implementation

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        q, k, v = self.heads(x)
        out = longformer_attention(
            q,
            k,
            v,
            window=self.window,
            global_tokens=self.global_tokens,
            dilation=self.dilation,
            causal=self.causal,
            implementation=self.implementation,
        )
        return self.heads.merge(out)


class BigBirdAttention(nnx.Module):
    """BigBird self-attention: block window + global blocks + random blocks.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      block, window_blocks, global_blocks, random_blocks, seed, causal: see
        :func:`attention_jax.sparse_patterns.bigbird`.
      implementation: passed to ``dot_product_attention``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        block: int,
        window_blocks: int = 1,
        global_blocks: int = 1,
        random_blocks: int = 1,
        seed: int = 0,
        causal: bool = False,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.pattern = dict(
            block=block,
            window_blocks=window_blocks,
            global_blocks=global_blocks,
            random_blocks=random_blocks,
            seed=seed,
            causal=causal,
        )
        sparse_patterns.bigbird(**self.pattern)
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.implementation = implementation

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        q, k, v = self.heads(x)
        return self.heads.merge(bigbird_attention(q, k, v, **self.pattern, implementation=self.implementation))


class SparseTransformerAttention(nnx.Module):
    """Sparse Transformer self-attention with the ``"strided"`` or ``"fixed"`` factorized pattern (both factors).

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      pattern, stride, summary, causal: see :func:`attention_jax.functional.sparse.sparse_transformer_attention`.
      implementation: passed to ``dot_product_attention``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        pattern: str,
        stride: int,
        summary: int = 1,
        causal: bool = True,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        if pattern == "strided":
            sparse_patterns.strided(stride, causal=causal)
        elif pattern == "fixed":
            sparse_patterns.fixed(stride, summary=summary, causal=causal)
        else:
            raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern=!r}.")
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.pattern, self.stride, self.summary, self.causal = pattern, stride, summary, causal
        self.implementation = implementation

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        q, k, v = self.heads(x)
        out = sparse_transformer_attention(
            q,
            k,
            v,
            pattern=self.pattern,
            stride=self.stride,
            summary=self.summary,
            causal=self.causal,
            implementation=self.implementation,
        )
        return self.heads.merge(out)
