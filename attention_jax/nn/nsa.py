"""``NativeSparseAttention``: DeepSeek's NSA as a causal self-attention layer.

Three branches with their own keys and values (the paper's independent branches): compressed blocks, top-n
selected blocks and a sliding window, mixed per head by sigmoid gates computed from the input.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, compress_block=4, compress_stride=2,
...                               select_block=4, num_selected=2, window=4, rngs=nnx.Rngs(0))
>>> layer(jnp.ones((1, 16, 32))).shape
(1, 16, 32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax.functional.nsa import check_config, compress_blocks, native_sparse_attention
from attention_jax.nn._common import check_features
from attention_jax.nn._heads import HeadProjections

Array = jax.Array

__all__ = ["NativeSparseAttention", "BlockCompressor"]


class BlockCompressor(nnx.Module):
    """The compression function ``phi``: a block of ``block`` keys (or values) to one, per key/value head.

    ``phi(x_block) = W_2 gelu(W_1 flatten(x_block + P))`` with a learned intra-block position encoding ``P``.
    """

    def __init__(self, block: int, head_dim: int, *, rngs: nnx.Rngs):
        self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (block, head_dim)))
        self.hidden = nnx.Linear(block * head_dim, head_dim, rngs=rngs)
        self.output = nnx.Linear(head_dim, head_dim, rngs=rngs)

    def __call__(self, blocks: Array) -> Array:
        """``[B, M, K, block, H] -> [B, M, K, H]``."""
        x = blocks + self.position[...]
        return self.output(jax.nn.gelu(self.hidden(x.reshape(*x.shape[:-2], -1))))


class NativeSparseAttention(nnx.Module):
    """Native Sparse Attention (Yuan et al., 2025), causal self-attention.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes (selection is shared by the
        ``num_heads // num_kv_heads`` query heads of a group).
      compress_block, compress_stride: l and d, the compressed blocks (d divides l).
      select_block: l', positions per selection block (a multiple of d).
      num_selected: n, blocks each query reads in the selected branch.
      window: keys before the query in the sliding-window branch.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        compress_block: int = 32,
        compress_stride: int = 16,
        select_block: int = 64,
        num_selected: int = 16,
        window: int = 512,
        rngs: nnx.Rngs,
    ):
        check_config(compress_block, compress_stride, select_block, num_selected, window)
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        k, h = self.heads.num_kv_heads, self.heads.head_dim
        self.compress_kv = nnx.Linear(in_features, 2 * k * h, use_bias=False, rngs=rngs)
        self.window_kv = nnx.Linear(in_features, 2 * k * h, use_bias=False, rngs=rngs)
        self.compress_key = BlockCompressor(compress_block, h, rngs=rngs)
        self.compress_value = BlockCompressor(compress_block, h, rngs=rngs)
        self.gates = nnx.Linear(in_features, 3 * num_heads, rngs=rngs)
        self.config = dict(
            compress_block=compress_block,
            compress_stride=compress_stride,
            select_block=select_block,
            num_selected=num_selected,
            window=window,
        )

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        b, t, _ = x.shape
        k_heads = self.heads.num_kv_heads
        q, k, v = self.heads(x)  # selected branch
        k_src, v_src = jnp.split(self.compress_kv(x).reshape(b, t, k_heads, -1), 2, axis=-1)
        block, stride = self.config["compress_block"], self.config["compress_stride"]
        k_cmp = self.compress_key(compress_blocks(k_src, block=block, stride=stride))  # [B, M, K, H]
        v_cmp = self.compress_value(compress_blocks(v_src, block=block, stride=stride))
        k_win, v_win = jnp.split(self.window_kv(x).reshape(b, t, k_heads, -1), 2, axis=-1)
        gates = jax.nn.sigmoid(self.gates(x).reshape(b, t, self.heads.num_heads, 3))
        out = native_sparse_attention(q, k, v, k_cmp, v_cmp, gates, window_key=k_win, window_value=v_win, **self.config)
        return self.heads.merge(out)
