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

import attention_jax as aj
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


PRESETS = {  # name -> (preset factory, its pattern and default mask as MultiHeadAttention keywords)
    "longformer": (
        functools.partial(LongformerAttention, window=2, global_tokens=(0, 5), dilation=1, causal=True),
        dict(pattern=sparse_patterns.longformer(2, global_tokens=(0, 5)), mask=masks.causal()),
    ),
    "bigbird": (  # max_length fixes the random blocks' key length: the pattern of any call length, and decoding
        functools.partial(BigBirdAttention, block=3, random_blocks=1, seed=2, max_length=24, causal=True),
        dict(
            pattern=sparse_patterns.bigbird(3, random_blocks=0, seed=2) | masks.random_blocks(3, 1, 2, kv_len=24),
            mask=masks.causal(),
        ),  # fmt: skip
    ),
    "strided": (
        functools.partial(SparseTransformerAttention, pattern="strided", stride=3),
        dict(pattern=sparse_patterns.strided(3, causal=False), mask=masks.causal()),
    ),
}
D = 16


def _pair(name, **options):
    """A preset and a MultiHeadAttention with its pattern and the same parameters."""
    make, pattern = PRESETS[name]
    preset = make(D, 4, num_kv_heads=2, rope=aj.positional.RoPE(), rngs=nnx.Rngs(0), **options)
    mha = aj.nn.MultiHeadAttention(D, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(), rngs=nnx.Rngs(1),
                                   **pattern, **options)  # fmt: skip
    nnx.update(mha, nnx.state(preset, nnx.Param))
    return preset, mha


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_multi_head_attention_under_their_pattern(name):
    preset, mha = _pair(name)
    assert isinstance(preset, aj.nn.MultiHeadAttention) and isinstance(preset, aj.nn.AttentionLayer)
    x = randn(6, 2, 12, D)
    lengths = jnp.array([12, 7])
    run = nnx.jit(lambda layer, x, lengths: (layer(x), layer(x, lengths=lengths), layer(x, mask=masks.full())))
    for got, want in zip(run(preset, x, lengths), run(mha, x, lengths), strict=True):
        assert_close(got, want)
    # The pattern is really applied: the preset is not dense attention.
    dense = aj.nn.MultiHeadAttention(D, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(), rngs=nnx.Rngs(1))
    nnx.update(dense, nnx.state(preset, nnx.Param))
    assert not np.allclose(run(preset, x, lengths)[2], run(dense, x, lengths)[2], atol=1e-3)


def test_preset_keeps_its_old_causal_behaviour():
    """causal=True equals the old functional op (the causal pattern), and a call's mask=full() lifts it."""
    layer = LongformerAttention(D, 2, window=2, global_tokens=1, dilation=2, causal=True, rngs=nnx.Rngs(0))
    x = randn(7, 2, 12, D)
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    old = longformer_attention(q, k, v, window=2, global_tokens=1, dilation=2, causal=True)
    assert_close(layer(x), layer.out(old))
    bidirectional = longformer_attention(q, k, v, window=2, global_tokens=1, dilation=2)
    assert_close(layer(x, mask=masks.full()), layer.out(bidirectional))


@functools.partial(nnx.jit, static_argnames="steps")
def _full_and_decode(layer, seq, prompt, lengths, steps):
    full = layer(seq)
    cache = layer.init_cache(seq.shape[0], prompt.shape[1] + steps)
    first, cache = layer(prompt, cache=cache, lengths=lengths)
    outs = []
    for j in range(steps):
        token = jnp.take_along_axis(seq, (lengths + j)[:, None, None], axis=1)  # [B, 1, D]
        y, cache = layer(token, cache=cache)
        outs.append(y[:, 0])
    return full, first, jnp.stack(outs, axis=1)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_causal_preset_decodes_like_the_full_forward(name):
    make, _ = PRESETS[name]
    layer = make(D, 4, num_kv_heads=2, rope=aj.positional.RoPE(), rngs=nnx.Rngs(0))
    prompt_lengths, steps = (7, 4), 3
    seq = randn(8, 2, max(prompt_lengths) + steps, D)
    prompt = seq[:, : max(prompt_lengths)]
    real = np.arange(prompt.shape[1])[None, :, None] < np.array(prompt_lengths)[:, None, None]
    prompt = jnp.where(real, prompt, 10 * randn(9, *prompt.shape))  # padding must not leak
    full, first, decoded = _full_and_decode(layer, seq, prompt, jnp.asarray(prompt_lengths), steps)
    for b, length in enumerate(prompt_lengths):
        assert_close(first[b, :length], full[b, :length])
        assert_close(decoded[b], full[b, length : length + steps])


@pytest.mark.parametrize("name", ["longformer", "strided"])
def test_packed_segments_equal_documents_run_separately(name):
    """Patterns of relative positions (a window, a stride) honour segment_ids exactly."""
    if name == "longformer":
        layer = LongformerAttention(D, 4, window=2, dilation=2, rope=aj.positional.RoPE(), rngs=nnx.Rngs(0))
    else:
        layer = SparseTransformerAttention(D, 4, pattern="strided", stride=3, rope=aj.positional.RoPE(),
                                           rngs=nnx.Rngs(0))  # fmt: skip
    docs = (5, 7)
    x = randn(10, 2, sum(docs), D)
    segment_ids = jnp.asarray(np.repeat(np.arange(len(docs)), docs)[None].repeat(2, 0))
    packed = nnx.jit(lambda layer, x, s: layer(x, segment_ids=s))(layer, x, segment_ids)
    start = 0
    for length in docs:
        alone = nnx.jit(lambda layer, x: layer(x))(layer, x[:, start : start + length])
        assert_close(packed[:, start : start + length], alone)
        start += length


def test_patterns_at_absolute_positions_keep_packed_documents_isolated():
    layer = BigBirdAttention(D, 4, block=2, random_blocks=1, max_length=12, rngs=nnx.Rngs(0))
    x = randn(11, 2, 12, D)
    segment_ids = jnp.asarray(np.repeat([0, 1], 6)[None].repeat(2, 0))
    run = nnx.jit(lambda layer, x, s: layer(x, segment_ids=s))
    changed = x.at[:, 6:].set(randn(12, 2, 6, D))
    assert_close(run(layer, changed, segment_ids)[:, :6], run(layer, x, segment_ids)[:, :6])
    assert_close(run(layer, changed[:, ::-1], segment_ids)[:, 6:], run(layer, x[:, ::-1], segment_ids)[:, 6:])


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
    with pytest.raises(ValueError, match="pattern"):
        SparseTransformerAttention(8, 2, pattern="axial", stride=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="BigBirdAttention needs max_length"):
        BigBirdAttention(8, 2, block=2, causal=True, rngs=nnx.Rngs(0)).init_cache(1, 8)
    with pytest.raises(ValueError, match="BigBirdAttention takes causal=True or mask=, not both"):
        BigBirdAttention(8, 2, block=2, causal=True, mask=masks.sliding_window(2), rngs=nnx.Rngs(0))
