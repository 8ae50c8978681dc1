"""Bahdanau and Luong attention against their formulas, and the RNN encoder-decoder that uses them."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close

from attention_jax import masks
from attention_jax.functional.additive import additive_attention, luong_attention
from attention_jax.nn.recurrent import AdditiveAttention, LuongAttention, Seq2SeqWithAttention


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_attend(scores, values, mask):
    """Row-wise softmax of ``scores [B, T, S]`` over visible keys, then the weighted values."""
    scores, values = np.asarray(scores, np.float64), np.asarray(values, np.float64)
    mask = np.broadcast_to(mask, scores.shape)
    weights = np.where(mask, np.exp(scores - np.where(mask, scores, -np.inf).max(-1, keepdims=True)), 0.0)
    weights = weights / weights.sum(-1, keepdims=True)
    return weights @ values, weights


def np_scores(kind, s, h, weight=None, v=None):
    """Bahdanau: ``v . tanh(s_t + h_j)`` (projected); Luong: ``s.h``, ``s.h/sqrt(d)``, ``s^T W h``, concat."""
    s, h = np.asarray(s, np.float64), np.asarray(h, np.float64)
    if kind == "additive":
        return np.tanh(s[:, :, None, :] + h[:, None, :, :]) @ np.asarray(v, np.float64)
    if kind == "dot":
        return s @ h.transpose(0, 2, 1)
    if kind == "scaled_dot":
        return s @ h.transpose(0, 2, 1) / np.sqrt(h.shape[-1])
    if kind == "general":
        return s @ np.asarray(weight, np.float64) @ h.transpose(0, 2, 1)
    w, v = np.asarray(weight, np.float64), np.asarray(v, np.float64)
    out = np.zeros((s.shape[0], s.shape[1], h.shape[1]))
    for b in range(s.shape[0]):
        for t in range(s.shape[1]):
            for j in range(h.shape[1]):
                out[b, t, j] = v @ np.tanh(w.T @ np.concatenate([s[b, t], h[b, j]]))  # v^T tanh(W [s; h])
    return out


PADDING = np.array([[True] * 5, [True, True, True, False, False]])  # [B, S]: the second source has 3 tokens


@pytest.mark.parametrize("kind", ["additive", "dot", "scaled_dot", "general", "concat"])
def test_scores_and_context_match_formula(kind):
    s, h, values = randn(0, 2, 3, 4), randn(1, 2, 5, 4), randn(2, 2, 5, 6)
    weight = {"general": randn(3, 4, 4), "concat": randn(3, 8, 7)}.get(kind)
    v = randn(4, 7) if kind == "concat" else randn(4, 4)
    if kind == "additive":
        fn = jax.jit(lambda s, h, values, v: additive_attention(s, h, values, v=v, mask=PADDING))
        context, alignment = fn(s, h, values, v)
    else:
        fn = jax.jit(lambda s, h, values, w, v: luong_attention(s, h, values, score=kind, weight=w, v=v, mask=PADDING))
        context, alignment = fn(s, h, values, weight, v if kind == "concat" else None)
    expected_context, expected_alignment = np_attend(np_scores(kind, s, h, weight, v), values, PADDING[:, None])
    assert_close(alignment, jnp.asarray(expected_alignment, jnp.float32))
    assert_close(context, jnp.asarray(expected_context, jnp.float32))
    assert float(alignment[1, :, 3:].max()) == 0.0  # padded keys get no weight


def test_one_step_query_masks_and_gradients():
    s, h = randn(5, 2, 4), randn(6, 2, 5, 4)
    v = randn(7, 4)
    context, alignment = jax.jit(lambda s, h, v: additive_attention(s, h, h, v=v))(s, h, v)
    full_context, _ = jax.jit(lambda s, h, v: additive_attention(s[:, None], h, h, v=v))(s, h, v)
    assert_close(context, full_context[:, 0])
    chex.assert_shape(alignment, (2, 5))
    _, causal_alignment = jax.jit(lambda h: luong_attention(h, h, h, mask=masks.causal()))(h)  # a Mask works too
    assert float(jnp.triu(causal_alignment[0], 1).max()) == 0.0

    def transcription(s, h, v):  # the formula written out in jnp
        alpha = jax.nn.softmax(jnp.tanh(s[:, None, :] + h) @ v, axis=-1)
        return jnp.einsum("BS,BSD->BD", alpha, h)

    def grads(attend):
        return jax.jit(jax.grad(lambda s, h, v: jnp.sum(attend(s, h, v) ** 2), argnums=(0, 1, 2)))(s, h, v)

    ours = grads(lambda s, h, v: additive_attention(s, h, h, v=v)[0])
    chex.assert_tree_all_finite(ours)
    chex.assert_trees_all_close(ours, grads(transcription), atol=1e-5)


def test_modules_apply_their_parameters():
    s, h = randn(8, 2, 3, 16), randn(9, 2, 5, 16)
    additive = AdditiveAttention(16, 16, rngs=nnx.Rngs(0))
    context, alignment = nnx.jit(lambda m, s, h: m(s, h))(additive, s, h)
    w_s, w_h = additive.query_proj.kernel[...], additive.key_proj.kernel[...]
    expected = np_attend(np_scores("additive", s @ w_s, h @ w_h, v=additive.v[...]), h, True)
    assert_close(alignment, jnp.asarray(expected[1], jnp.float32), grad=True)  # float32 projections
    luong = LuongAttention(16, 16, score="general", rngs=nnx.Rngs(1))
    expected = np_attend(np_scores("general", s, h, luong.weight[...]), h, True)
    assert_close(nnx.jit(lambda m, s, h: m(s, h))(luong, s, h)[0], jnp.asarray(expected[0], jnp.float32), grad=True)
    assert LuongAttention(16, 16, score="dot", rngs=nnx.Rngs(2)).weight is None


@pytest.mark.parametrize("cell, attention", [("gru", "additive"), ("lstm", "general")])
def test_seq2seq_alignment_respects_source_padding(cell, attention):
    model = Seq2SeqWithAttention(6, 6, embed_features=16, hidden_features=16, cell=cell, attention=attention,
                                 rngs=nnx.Rngs(0))  # fmt: skip
    source = jnp.asarray([[1, 2, 3, 4, 5], [3, 2, 1, 0, 0]], jnp.int32)
    target = jnp.asarray([[1, 2, 3, 4], [5, 4, 3, 2]], jnp.int32)
    logits, alignment = nnx.jit(lambda m, s, t, n: m(s, t, source_lengths=n))(model, source, target, jnp.array([5, 3]))
    chex.assert_shape(logits, (2, 4, 6))
    chex.assert_shape(alignment, (2, 4, 5))
    np.testing.assert_allclose(np.asarray(alignment).sum(-1), 1.0, rtol=1e-5)
    assert float(alignment[1, :, 3:].max()) == 0.0


def test_seq2seq_learns_to_copy():
    rng = np.random.default_rng(0)
    model = Seq2SeqWithAttention(6, 6, embed_features=16, hidden_features=16, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, source):
        inputs = jnp.concatenate([jnp.zeros_like(source[:, :1]), source[:, :-1]], axis=1)  # teacher forcing

        def loss_fn(model):
            logits, _ = model(source, inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, source).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, jnp.asarray(rng.integers(1, 6, (32, 5)), jnp.int32))) for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_bad_configurations_raise():
    s, h = randn(0, 1, 2, 4), randn(1, 1, 3, 6)
    with pytest.raises(ValueError, match="score"):
        luong_attention(s, h, h, score="cosine")
    with pytest.raises(ValueError, match="Dq=4 and Dk=6"):
        luong_attention(s, h, h, score="dot")
    with pytest.raises(ValueError, match="weight"):
        luong_attention(s, h, h, score="general")
    with pytest.raises(ValueError, match="v.shape"):
        additive_attention(s, randn(1, 1, 3, 4), h, v=jnp.ones(5))
    with pytest.raises(ValueError, match="mask"):
        additive_attention(s, randn(1, 1, 3, 4), h, v=jnp.ones(4), mask=jnp.ones((1, 2, 4), bool))
    with pytest.raises(ValueError, match="cell"):
        Seq2SeqWithAttention(4, 4, cell="rnn", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="attention"):
        Seq2SeqWithAttention(4, 4, attention="cosine", rngs=nnx.Rngs(0))
