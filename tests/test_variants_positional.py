"""Positional attention (content-independent), its factorized form, and the gated mix with content attention."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, naive_attention

from attention_jax import masks
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
