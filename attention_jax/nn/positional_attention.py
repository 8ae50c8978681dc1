"""``PositionalAttention``: attention weights learned per position pair, alone or gated with content attention.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> x = jnp.ones((2, 6, 16))
>>> PositionalAttention(16, num_heads=2, max_length=8, rngs=nnx.Rngs(0))(x).shape
(2, 6, 16)
>>> PositionalAttention(16, num_heads=2, max_length=8, rank=4, gated=True, rngs=nnx.Rngs(0))(x).shape
(2, 6, 16)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax.functional.positional_attention import (
    factorized_positional_logits,
    gated_positional_attention,
    positional_attention,
)
from attention_jax.nn._common import check_features
from attention_jax.nn._heads import HeadProjections, positive_int

Array = jax.Array

__all__ = ["PositionalAttention"]


class PositionalAttention(nnx.Module):
    """Content-independent attention from learned positions, optionally mixed with content attention.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      max_length: the longest sequence (positions ``0 .. max_length - 1``).
      rank: None learns a full logit table ``[N, max_length, max_length]``; an int R learns position embeddings
        ``E_q, E_k [max_length, N, R]`` with logits ``E_q E_k^T / sqrt(R)`` (the factorized low-rank form).
      gated: mix with content attention per head, ``(1 - sigmoid(g)) content + sigmoid(g) positional``; the gate
        logits ``g [N]`` start at ``gate_init`` (1.0, as ConViT).
      mask: an ``attention_jax.masks.Mask`` for both terms (e.g. ``causal()``).
      implementation: passed to ``dot_product_attention`` for the content term.

    Without ``gated`` the layer projects only values: its weights never look at the input.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        max_length: int,
        rank: int | None = None,
        gated: bool = False,
        gate_init: float = 1.0,
        mask: masks_lib.Mask | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(
            in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, query_key=gated, rngs=rngs
        )
        self.max_length = positive_int("max_length", max_length)
        init = nnx.initializers.normal(0.02)
        if rank is None:
            self.logits = nnx.data(nnx.Param(init(rngs.params(), (num_heads, max_length, max_length))))
            self.query_positions = self.key_positions = nnx.data(None)
        else:
            positive_int("rank", rank)
            self.logits = nnx.data(None)
            self.query_positions = nnx.data(nnx.Param(init(rngs.params(), (max_length, num_heads, rank))))
            self.key_positions = nnx.data(nnx.Param(init(rngs.params(), (max_length, num_heads, rank))))
        self.gate = nnx.data(nnx.Param(jnp.full((num_heads,), gate_init)) if gated else None)
        self.mask = nnx.data(mask) if jax.tree.leaves(mask) else mask  # arrays in a mask are data
        self.implementation = implementation

    def position_logits(self, length: int) -> Array:
        """The positional logits ``[N, T, T]`` for the first ``length`` positions."""
        if self.logits is not None:
            return self.logits[...][:, :length, :length]
        e_q, e_k = self.query_positions[...][:length], self.key_positions[...][:length]
        return factorized_positional_logits(e_q, e_k)

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        t = x.shape[1]
        if t > self.max_length:
            raise ValueError(f"sequence length T={t} exceeds the layer's max_length={self.max_length}.")
        logits = self.position_logits(t)
        if self.gate is None:
            out = positional_attention(self.heads.values(x), logits, mask=self.mask)
        else:
            q, k, v = self.heads(x)
            out = gated_positional_attention(
                q, k, v, logits, self.gate[...], mask=self.mask, implementation=self.implementation
            )
        return self.heads.merge(out)
