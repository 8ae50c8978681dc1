"""Positional attention (content-independent), its factorized form, and the gated mix with content attention."""

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
from attention_jax import masks
from attention_jax.functional.multi_head import weighted_values
from attention_jax.functional.positional_attention import (
    factorized_positional_logits,
    gated_positional_attention,
    positional_attention,
)
from attention_jax.nn.positional_attention import PositionalAttention


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_positional(value, logits, mask):
    """``softmax(P_n) V`` per query head n (GQA: head n reads value head n // G), float64."""
    value, logits = np.asarray(value, np.float64), np.asarray(logits, np.float64)
    n_heads, t, _ = logits.shape
    group = n_heads // value.shape[2]
    out = np.zeros((value.shape[0], t, n_heads, value.shape[-1]))
    for n in range(n_heads):
        p = np.where(mask, np.exp(logits[n] - logits[n].max(-1, keepdims=True)), 0.0)
        p /= p.sum(-1, keepdims=True)
        out[:, :, n] = np.einsum("TS,BSV->BTV", p, value[:, :, n // group])
    return out


def test_positional_and_factorized_logits_match_formula():
    value = randn(0, 2, 6, 2, 5)
    e_q, e_k = randn(1, 6, 4, 3), randn(2, 6, 4, 3)  # [T, N, R]
    logits = jax.jit(factorized_positional_logits)(e_q, e_k)
    expected_logits = np.einsum("TNR,SNR->NTS", np.asarray(e_q, np.float64), np.asarray(e_k, np.float64)) / np.sqrt(3)
    assert_close(logits, jnp.asarray(expected_logits, jnp.float32))
    causal = np.tril(np.ones((6, 6), bool))
    out = jax.jit(lambda v, p: positional_attention(v, p, mask=masks.causal()))(value, logits)
    assert_close(out, jnp.asarray(np_positional(value, expected_logits, causal), jnp.float32))


def test_gated_mix_matches_formula_and_has_gradients():
    q, k, v = randn(3, 2, 6, 4, 8), randn(4, 2, 6, 2, 8), randn(5, 2, 6, 2, 8)
    logits, gate = randn(6, 4, 6, 6), randn(7, 4)
    run = jax.jit(lambda q, k, v, p, g: gated_positional_attention(q, k, v, p, g, mask=masks.causal()))
    causal = np.tril(np.ones((6, 6), bool))
    share = 1 / (1 + np.exp(-np.asarray(gate, np.float64)))[:, None]  # sigmoid(gate) per head
    content = naive_attention(q, k, v, mask=causal)[0]
    expected = (1 - share) * content + share * np_positional(v, logits, causal)
    assert_close(run(q, k, v, logits, gate), jnp.asarray(expected, jnp.float32))
    grads = jax.jit(jax.grad(lambda p, g: jnp.sum(run(q, k, v, p, g) ** 2), argnums=(0, 1)))(logits, gate)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads[1]).min()) > 0
    assert float(jnp.abs(grads[0][:, 0, 1:]).max()) == 0.0  # masked (future) logits get no gradient


def test_module_without_gate_ignores_content():
    x1, x2 = randn(8, 2, 6, 16), randn(9, 2, 6, 16)
    forward = nnx.jit(lambda layer, x: layer(x))
    for rank in (None, 4):
        layer = PositionalAttention(16, 2, max_length=8, rank=rank, rngs=nnx.Rngs(0))
        # Weights that do not depend on the input make the layer linear in it (no biases).
        assert_close(forward(layer, x1 + x2), forward(layer, x1) + forward(layer, x2))
    gated = PositionalAttention(16, 2, max_length=8, gated=True, mask=masks.causal(), rngs=nnx.Rngs(0))
    chex.assert_shape(forward(gated, x1), (2, 6, 16))
    assert not np.allclose(forward(gated, x1 + x2), forward(gated, x1) + forward(gated, x2), atol=1e-3)


def test_bad_configurations_raise():
    v = randn(0, 1, 4, 2, 4)
    with pytest.raises(ValueError, match="logits"):
        positional_attention(v, jnp.zeros((2, 4, 5)))
    with pytest.raises(ValueError, match="gate"):
        gated_positional_attention(v, v, v, jnp.zeros((2, 4, 4)), jnp.zeros(3))
    with pytest.raises(ValueError, match="max_length=4"):
        PositionalAttention(8, 2, max_length=4, rngs=nnx.Rngs(0))(jnp.ones((1, 5, 8)))
    with pytest.raises(ValueError, match="rank"):
        PositionalAttention(8, 2, max_length=4, rank=0, rngs=nnx.Rngs(0))


def _layer(gated, rank=None, mask=None):
    return PositionalAttention(
        16, 4, num_kv_heads=2, max_length=12, rank=rank, gated=gated, mask=mask, rngs=nnx.Rngs(int(gated))
    )


def _positional_reference(layer, x, q_pos, kv_pos, mask):
    """The layer's output from the learned table indexed by hand at the given positions (no gate)."""
    if layer.logits is not None:
        logits = layer.logits[...][:, q_pos][:, :, kv_pos]  # [N, T, S]
    else:
        logits = factorized_positional_logits(layer.query_positions[...][q_pos], layer.key_positions[...][kv_pos])
    return layer.out(positional_attention(layer.value(x), logits, mask=mask))


@pytest.mark.parametrize("rank", [None, 3])
def test_positions_index_the_learned_table(rank):
    layer = _layer(False, rank)
    x = randn(10, 2, 6, 16)
    positions = jnp.array([3, 4, 5, 6, 7, 8])
    expected = _positional_reference(layer, x, positions, positions, masks.causal())
    assert_close(layer(x, positions=positions, mask=masks.causal()), expected)
    assert not np.allclose(layer(x, mask=masks.causal()), expected, atol=1e-4)  # positions did matter
    with pytest.raises(ValueError, match="max_length=12"):
        layer(x, positions=positions + 7)


@pytest.mark.parametrize("gated", [False, True])
def test_packed_segments_and_padding_equal_documents_run_separately(gated):
    layer = _layer(gated, mask=masks.causal())
    docs = (4, 6)
    x = randn(11, 2, sum(docs), 16)
    segment_ids = jnp.asarray(np.repeat(np.arange(2), docs)[None].repeat(2, 0))
    run = nnx.jit(lambda layer, x, **kw: layer(x, **kw))
    packed = run(layer, x, segment_ids=segment_ids)
    start = 0
    for length in docs:
        assert_close(packed[:, start : start + length], run(layer, x[:, start : start + length]))
        start += length
    # Right padding: real rows equal the real tokens alone, with a bidirectional mask too.
    padded = run(layer, x, mask=masks.full(), lengths=jnp.array([10, 7]))
    assert_close(padded[1, :7], run(layer, x[1:, :7], mask=masks.full())[0])


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


@pytest.mark.parametrize("gated, rank", [(False, None), (True, 3)])
def test_decode_equals_full_forward(gated, rank):
    layer = _layer(gated, rank, mask=masks.causal())
    prompt_lengths, steps = (6, 3), 3
    seq = randn(12, 2, max(prompt_lengths) + steps, 16)
    prompt = seq[:, : max(prompt_lengths)]
    real = np.arange(prompt.shape[1])[None, :, None] < np.array(prompt_lengths)[:, None, None]
    prompt = jnp.where(real, prompt, 10 * randn(13, *prompt.shape))  # padding must not leak
    full, first, decoded = _full_and_decode(layer, seq, prompt, jnp.asarray(prompt_lengths), steps)
    for b, length in enumerate(prompt_lengths):
        assert_close(first[b, :length], full[b, :length])
        assert_close(decoded[b], full[b, length : length + steps])


@nnx.jit
def _recorded_cross_attention(layer, x, context):
    """The cross-attention output, its recorded weights and those weights applied to the values, compiled once."""
    with aj.nn.record_attention_weights(layer):
        y, recorded = nnx.capture(layer, nnx.Intermediate)(x, context)
    (weights,) = recorded["attention_weights"]
    return y, weights, layer.out(weighted_values(weights, layer.value(context))), layer(x, context)


def test_recorded_weights_reproduce_the_output_and_cross_attention():
    x, context = randn(14, 2, 5, 16), randn(15, 2, 7, 16)
    for layer in (_layer(False), _layer(True, 3)):
        assert isinstance(layer, aj.nn.AttentionLayer)
        y, weights, reapplied, plain = _recorded_cross_attention(layer, x, context)
        chex.assert_shape(weights, (2, 4, 5, 7))
        assert_close(reapplied, y)
        if layer.gate is None:  # ungated: the output without recording, against the table indexed by hand
            assert_close(plain, _positional_reference(layer, context, jnp.arange(5), jnp.arange(7), None))
    with pytest.raises(ValueError, match="max_length"):
        _layer(False).init_cache(2, 13)
