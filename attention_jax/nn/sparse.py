"""Sparse self-attention presets: Longformer, BigBird and the Sparse Transformer.

Each is a :class:`~attention_jax.nn.MultiHeadAttention` whose ``pattern`` (a mask that always
applies) comes from :mod:`attention_jax.sparse_patterns`, so it takes every keyword and call
argument of ``MultiHeadAttention`` (RoPE, GQA, ``segment_ids``, ``lengths``, dropout, recording,
the block-skipping fast paths) and, with a causal mask, decodes with a KV cache. ``causal=True``
makes ``masks.causal()`` the layer's default mask; a call's ``mask`` replaces it, the pattern stays.

Packed documents (``segment_ids``) never see each other. A pattern of relative positions (Longformer's
window, the strided pattern) gives each document exactly what it gets alone; one anchored at absolute
positions (global tokens, BigBird's blocks, the fixed pattern) is evaluated at the packed row's
positions, so a document after the first does not get the global tokens it would get alone.

Shapes: ``inputs_q [B, T, D] -> [B, T, out_features]``; parameters ``query [D, N, H]``,
``key [D, K, H]``, ``value [D, K, Hv]``, ``out [N, Hv, D]`` as in ``MultiHeadAttention``.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> x = jnp.ones((2, 16, 32))
>>> LongformerAttention(32, num_heads=4, window=2, global_tokens=1, rngs=nnx.Rngs(0))(x).shape
(2, 16, 32)
>>> BigBirdAttention(32, num_heads=4, block=4, rope=aj.positional.RoPE(), rngs=nnx.Rngs(0))(x).shape
(2, 16, 32)
>>> layer = SparseTransformerAttention(32, num_heads=4, num_kv_heads=2, pattern="fixed", stride=4, rngs=nnx.Rngs(0))
>>> y, cache = layer(x, cache=layer.init_cache(2, 20))          # causal: prefill, then decode
>>> y, cache = layer(x[:, :1], cache=cache)
>>> y.shape, cache.lengths.tolist()
((2, 1, 32), [17, 17])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

from attention_jax import masks, sparse_patterns
from attention_jax.functional.sparse import transformer_pattern
from attention_jax.nn.multi_head import MultiHeadAttention

__all__ = ["LongformerAttention", "BigBirdAttention", "SparseTransformerAttention"]


def _with_default_mask(module_name: str, causal: bool, options: dict[str, Any]) -> dict[str, Any]:
    """``MultiHeadAttention`` keywords with ``mask=causal()`` when ``causal`` (refusing a second mask)."""
    if causal:
        if options.get("mask") is not None:
            raise ValueError(f"{module_name} takes causal=True or mask=, not both; got mask={options['mask']!r}.")
        options = dict(options, mask=masks.causal())
    return options


class LongformerAttention(MultiHeadAttention):
    """Longformer self-attention: a (dilated) sliding window of ``window`` keys per side plus global tokens.

    Args:
      in_features, num_heads: D and N, as in ``MultiHeadAttention``.
      window, global_tokens, dilation: see :func:`attention_jax.sparse_patterns.longformer`. Global
        tokens sit at absolute positions of the row (see the module docstring on ``segment_ids``).
      causal: the default mask is ``masks.causal()`` (the left half of the window; decodes with a cache).
      **options: any other ``MultiHeadAttention`` keyword (``num_kv_heads``, ``rope``, ``dropout_rate``,
        ``implementation``, ``record_weights``, ...), ``rngs`` included.
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
        rngs: nnx.Rngs,
        **options: Any,
    ):
        pattern = sparse_patterns.longformer(window, global_tokens=global_tokens, dilation=dilation)
        options = _with_default_mask(type(self).__name__, causal, options)
        super().__init__(in_features, num_heads=num_heads, pattern=pattern, rngs=rngs, **options)
        self.window, self.dilation, self.causal = window, dilation, causal
        self.global_tokens = sparse_patterns.global_indices(global_tokens)


class BigBirdAttention(MultiHeadAttention):
    """BigBird self-attention: block window + global blocks + random blocks.

    Args:
      in_features, num_heads: D and N, as in ``MultiHeadAttention``.
      block, window_blocks, global_blocks, random_blocks, seed: see :func:`attention_jax.sparse_patterns.bigbird`.
      max_length: the key length the random blocks are drawn over (``masks.random_blocks(kv_len=)``).
        None draws them over each call's length; set it to decode with a cache (whose length grows)
        and to give every sequence length the same pattern.
      causal: the default mask is ``masks.causal()`` (decodes with a cache, given ``max_length``).
      **options: any other ``MultiHeadAttention`` keyword, ``rngs`` included.
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
        max_length: int | None = None,
        causal: bool = False,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        pattern = sparse_patterns.bigbird(
            block, window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=0, seed=seed
        )
        if random_blocks:  # what sparse_patterns.bigbird adds, with the key length fixed when given
            pattern = pattern | masks.random_blocks(block, random_blocks, seed, kv_len=max_length)
        options = _with_default_mask(type(self).__name__, causal, options)
        super().__init__(in_features, num_heads=num_heads, pattern=pattern, rngs=rngs, **options)
        self.block, self.window_blocks, self.global_blocks = block, window_blocks, global_blocks
        self.random_blocks, self.seed, self.max_length, self.causal = random_blocks, seed, max_length, causal

    def init_cache(self, batch_size: int, max_length: int, **options: Any):
        """A KV cache, as ``MultiHeadAttention.init_cache``; with random blocks the layer needs ``max_length``."""
        if self.random_blocks and self.max_length is None:
            raise ValueError(
                "BigBirdAttention needs max_length= (at construction) to decode: its random blocks are drawn over "
                "the whole key length, which a growing cache does not know; the full forward uses it too."
            )
        return super().init_cache(batch_size, max_length, **options)


class SparseTransformerAttention(MultiHeadAttention):
    """Sparse Transformer self-attention with the ``"strided"`` or ``"fixed"`` factorized pattern (both factors).

    ``"strided"`` is relative (packed ``segment_ids`` are exact); ``"fixed"`` has blocks anchored at
    absolute positions (see the module docstring).

    Args:
      in_features, num_heads: D and N, as in ``MultiHeadAttention``.
      pattern: ``"strided"`` or ``"fixed"`` (kept in ``self.factorization``; ``self.pattern`` is the mask).
      stride, summary: see :func:`attention_jax.sparse_patterns.strided` and ``fixed``.
      causal: the default mask is ``masks.causal()`` (the paper's autoregressive setting; the default).
      **options: any other ``MultiHeadAttention`` keyword, ``rngs`` included.
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
        rngs: nnx.Rngs,
        **options: Any,
    ):
        mask = transformer_pattern(pattern, stride=stride, summary=summary, causal=False)
        options = _with_default_mask(type(self).__name__, causal, options)
        super().__init__(in_features, num_heads=num_heads, pattern=mask, rngs=rngs, **options)
        self.factorization, self.stride, self.summary, self.causal = pattern, stride, summary, causal
