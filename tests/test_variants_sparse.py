"""Longformer, BigBird and Sparse Transformer patterns against their definitions, and attention under them."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, naive_attention

from attention_jax import masks, sparse_patterns
from attention_jax.functional.sparse import bigbird_attention, longformer_attention, sparse_transformer_attention
from attention_jax.nn.sparse import BigBirdAttention, LongformerAttention, SparseTransformerAttention
from pallas_kernels.mask_info import EMPTY

T = 48
Q_POS, K_POS = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")  # query i, key j


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def dense(mask):
    return np.asarray(mask.dense(T, T))


@pytest.mark.parametrize("window, dilation, causal", [(3, 1, False), (2, 3, False), (4, 1, True), (2, 2, True)])
def test_longformer_is_window_plus_globals(window, dilation, causal):
    glob = (0, 17)
    d = np.abs(Q_POS - K_POS)
    expected = (d <= window * dilation) & (d % dilation == 0)  # `window` keys per side, every `dilation`-th
    expected |= np.isin(Q_POS, glob) | np.isin(K_POS, glob)  # global tokens see and are seen by everything
    if causal:
        expected &= K_POS <= Q_POS
    mask = sparse_patterns.longformer(window, global_tokens=glob, dilation=dilation, causal=causal)
    np.testing.assert_array_equal(dense(mask), expected)


def test_bigbird_is_block_window_plus_global_plus_random():
    block, w, g, r = 4, 1, 1, 2
    band = np.abs(Q_POS // block - K_POS // block) <= w
    glob = (Q_POS < g * block) | (K_POS < g * block)
    mask = dense(sparse_patterns.bigbird(block, window_blocks=w, global_blocks=g, random_blocks=r, seed=3))
    np.testing.assert_array_equal(mask & ~(band | glob), dense(masks.random_blocks(block, r, 3)) & ~(band | glob))
    assert np.all(mask[band | glob])
    # Visibility is constant on block pairs, and a non-global query block sees at most 2w + 1 + g + r key blocks.
    blocks = mask.reshape(T // block, block, T // block, block)
    assert np.all(blocks == blocks[:, :1, :, :1])
    assert blocks[g:, 0, :, 0].sum(1).max() <= 2 * w + 1 + g + r


def test_sparse_transformer_patterns():
    stride, summary = 6, 2
    strided = (K_POS <= Q_POS) & ((Q_POS - K_POS <= stride) | ((Q_POS - K_POS) % stride == 0))  # Child et al. (2019)
    fixed = (K_POS <= Q_POS) & ((K_POS // stride == Q_POS // stride) | (K_POS % stride >= stride - summary))
    np.testing.assert_array_equal(dense(sparse_patterns.strided(stride)), strided)
    np.testing.assert_array_equal(dense(sparse_patterns.fixed(stride, summary=summary)), fixed)
    local, every = sparse_patterns.strided_factors(stride)
    np.testing.assert_array_equal(dense(local) | dense(every), strided)


def test_patterns_skip_blocks_and_cost_grows_linearly():
    """Visited tiles (non-empty in the block map) double when T doubles: O(T w), not O(T^2)."""
    for mask in (sparse_patterns.longformer(16, global_tokens=2), sparse_patterns.bigbird(16, random_blocks=1)):
        visited = [int((mask.block_map(t, t, 16, 16) != EMPTY).sum()) for t in (256, 512)]
        assert visited[0] < 0.5 * (256 // 16) ** 2 and visited[1] < 2.3 * visited[0], (mask, visited)


ATTENTIONS = {
    "longformer": (
        functools.partial(longformer_attention, window=3, global_tokens=2, dilation=2),
        sparse_patterns.longformer(3, global_tokens=2, dilation=2),
    ),
    "bigbird": (
        functools.partial(bigbird_attention, block=8, random_blocks=1, causal=True),
        sparse_patterns.bigbird(8, random_blocks=1, causal=True),
    ),
    "strided": (
        functools.partial(sparse_transformer_attention, pattern="strided", stride=5),
        sparse_patterns.strided(5),
    ),
    "fixed": (
        functools.partial(sparse_transformer_attention, pattern="fixed", stride=8, summary=2),
        sparse_patterns.fixed(8, summary=2),
    ),
}


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_sparse_attention_equals_dense_attention_under_the_mask(name):
    attend, mask = ATTENTIONS[name]
    q, k, v = randn(0, 2, T, 4, 8), randn(1, 2, T, 2, 8), randn(2, 2, T, 2, 8)  # GQA
    expected = jnp.asarray(naive_attention(q, k, v, mask=dense(mask))[0], jnp.float32)
    for implementation in ("reference", "blockwise"):
        assert_close(jax.jit(functools.partial(attend, implementation=implementation))(q, k, v), expected)


def test_gradients_of_the_blockwise_path_match_the_reference():
    attend, _ = ATTENTIONS["longformer"]
    q, k, v = randn(3, 1, T, 2, 8), randn(4, 1, T, 2, 8), randn(5, 1, T, 2, 8)

    def grads(implementation):
        loss = lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v, implementation=implementation)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    reference = grads("reference")
    chex.assert_tree_all_finite(reference)
    chex.assert_trees_all_close(grads("blockwise"), reference, atol=1e-4, rtol=1e-4)


def test_modules():
    x = randn(6, 2, 16, 16)
    for layer in (
        LongformerAttention(16, 2, window=2, global_tokens=1, rngs=nnx.Rngs(0)),
        BigBirdAttention(16, 2, block=4, rngs=nnx.Rngs(0)),
        SparseTransformerAttention(16, 2, pattern="strided", stride=4, rngs=nnx.Rngs(0)),
    ):
        chex.assert_shape(nnx.jit(lambda layer, x: layer(x))(layer, x), (2, 16, 16))


def test_bad_configurations_raise():
    q = randn(0, 1, 8, 2, 4)
    with pytest.raises(ValueError, match="window"):
        sparse_patterns.longformer(0)
    with pytest.raises(ValueError, match="dilation"):
        sparse_patterns.longformer(2, dilation=0)
    with pytest.raises(ValueError, match="12 global tokens but the sequence has 8 positions"):
        longformer_attention(q, q, q, window=2, global_tokens=12)
    with pytest.raises(ValueError, match="position 9"):
        longformer_attention(q, q, q, window=2, global_tokens=(1, 9))
    with pytest.raises(ValueError, match="global_blocks=3"):
        bigbird_attention(q, q, q, block=4, global_blocks=3)
    with pytest.raises(ValueError, match="block"):
        sparse_patterns.bigbird(0)
    with pytest.raises(ValueError, match="summary"):
        sparse_patterns.fixed(4, summary=5)
    with pytest.raises(ValueError, match="pattern"):
        sparse_transformer_attention(q, q, q, pattern="axial", stride=2)
    with pytest.raises(ValueError, match="window"):
        LongformerAttention(8, 2, window=0, rngs=nnx.Rngs(0))
