"""Linear attention, fast weight programmers (delta rule) and Performer against their published formulas.

Inputs come from numpy and every op runs under ``jax.jit``: one compilation per configuration keeps the file fast.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close, naive_attention

from attention_jax.functional.delta_rule import FastWeightState, delta_rule_attention, delta_rule_step
from attention_jax.functional.linear import LinearAttentionState, linear_attention, linear_attention_step
from attention_jax.functional.performer import favor_features, orthogonal_random_features, performer_attention
from attention_jax.nn.linear import FastWeightProgrammer, LinearAttention, Performer


def random_qkv(seed, b=2, t=16, n=4, k=None, h=16, hv=None):
    """Normal ``q [B, T, N, H]``, ``k [B, T, K, H]``, ``v [B, T, K, Hv]`` from numpy (no per-shape RNG compiles)."""
    rng = np.random.default_rng(seed)
    k, hv = k or n, hv or h
    shapes = ((b, t, n, h), (b, t, k, h), (b, t, k, hv))
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)


def jit(fn, **config):
    return jax.jit(functools.partial(fn, **config))


def np_elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(x))


def np_linear_attention(q, k, v, *, causal, phi=np_elu1, eps=1e-6):
    """Katharopoulos et al. (eq. 2 and 3): ``sum_j phi(q_i).phi(k_j) v_j / (sum_j phi(q_i).phi(k_j) + eps)``."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_size, t, n_heads, _ = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros((b_size, t, n_heads, v.shape[-1]))
    for b in range(b_size):
        for n in range(n_heads):
            kh = n // group
            fq, fk = phi(q[b, :, n]), phi(k[b, :, kh])
            for i in range(t):
                last = i + 1 if causal else k.shape[1]
                sim = fk[:last] @ fq[i]  # [j]
                out[b, i, n] = (sim @ v[b, :last, kh]) / (sim.sum() + eps)
    return out


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_matches_formula_in_every_form(causal):
    q, k, v = random_qkv(0, b=2, t=11, n=4, k=2, h=8, hv=6)  # GQA; T is not a multiple of the chunk
    expected = jnp.asarray(np_linear_attention(q, k, v, causal=causal), jnp.float32)
    for form in ("parallel", "chunked", "recurrent"):
        assert_close(jit(linear_attention, causal=causal, implementation=form, chunk_size=4)(q, k, v), expected)


def test_linear_attention_gradients_chunked_equal_parallel():
    q, k, v = random_qkv(1, b=1, t=8, n=2, h=4)

    def grads(form):
        attend = functools.partial(linear_attention, causal=True, implementation=form, chunk_size=3)
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(attend(q, k, v))), argnums=(0, 1, 2)))(q, k, v)

    parallel = grads("parallel")
    chex.assert_tree_all_finite(parallel)
    chex.assert_trees_all_close(grads("chunked"), parallel, atol=1e-4, rtol=1e-4)


def test_linear_attention_state_continues_and_steps():
    q, k, v = random_qkv(2, b=2, t=9, n=2, k=1, h=4)
    full = jit(linear_attention, causal=True)(q, k, v)
    head, state = jit(linear_attention, causal=True, return_state=True)(q[:, :5], k[:, :5], v[:, :5])
    tail = jit(linear_attention, causal=True)(q[:, 5:], k[:, 5:], v[:, 5:], state=state)
    assert_close(jnp.concatenate([head, tail], axis=1), full)
    step = jax.jit(linear_attention_step)
    state = LinearAttentionState.zeros(2, 1, 4, 4)
    for t in range(9):
        out, state = step(state, q[:, t], k[:, t], v[:, t])
        assert_close(out, full[:, t])


def test_linear_attention_pluggable_feature_map():
    q, k, v = random_qkv(3, b=1, t=6, n=2, h=4)
    phi = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], axis=-1)  # F = 2H
    np_phi = lambda x: np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)
    out = jit(linear_attention, feature_map=phi, causal=True, eps=1e-3)(q, k, v)
    assert_close(out, jnp.asarray(np_linear_attention(q, k, v, causal=True, phi=np_phi, eps=1e-3), jnp.float32))


def np_delta_rule(q, k, v, beta, phi):
    """Schlag et al. (2021): ``W += beta_t (v_t - W^T phi(k_t)) phi(k_t)^T``, ``y_t = W^T phi(q_t)``."""
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    b_size, t, n_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = n_heads // kv_heads
    out = np.zeros((b_size, t, n_heads, v.shape[-1]))
    for b in range(b_size):
        for kh in range(kv_heads):
            w = np.zeros((phi(k[b, 0, kh]).shape[-1], v.shape[-1]))  # W [F, Hv]
            for i in range(t):
                key = phi(k[b, i, kh])
                w = w + beta[b, i, kh] * np.outer(key, v[b, i, kh] - w.T @ key)
                for g in range(group):
                    out[b, i, kh * group + g] = w.T @ phi(q[b, i, kh * group + g])
    return out


def test_delta_rule_matches_formula_in_both_forms():
    q, k, v = random_qkv(4, b=2, t=10, n=4, k=2, h=6, hv=5)
    beta = jax.nn.sigmoid(jnp.asarray(np.random.default_rng(5).standard_normal((2, 10, 2)), jnp.float32))
    phi = lambda x: np_elu1(x) / np_elu1(x).sum(-1, keepdims=True)
    expected = jnp.asarray(np_delta_rule(q, k, v, beta, phi), jnp.float32)
    for form in ("recurrent", "chunked"):
        assert_close(jit(delta_rule_attention, implementation=form, chunk_size=4)(q, k, v, beta), expected)
    # L2-normalised keys and queries without a feature map (DeltaNet's choice).
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    expected = jnp.asarray(np_delta_rule(unit(q), unit(k), v, beta, lambda x: x), jnp.float32)
    assert_close(jit(delta_rule_attention, feature_map=None, chunk_size=4)(unit(q), unit(k), v, beta), expected)


def test_delta_rule_gradients_agree_and_state_steps():
    q, k, v = random_qkv(6, b=1, t=7, n=2, h=4)
    beta = jnp.full((1, 7, 2), 0.7)

    def grads(form):
        loss = lambda q, k, v, b: jnp.sum(delta_rule_attention(q, k, v, b, implementation=form, chunk_size=3) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, beta)

    recurrent = grads("recurrent")
    chex.assert_tree_all_finite(recurrent)
    chex.assert_trees_all_close(grads("chunked"), recurrent, atol=1e-4, rtol=1e-4)
    full, final = jit(delta_rule_attention, return_state=True)(q, k, v, beta)
    step = jax.jit(delta_rule_step)
    state = FastWeightState.zeros(1, 2, 4, 4)
    for t in range(7):
        out, state = step(state, q[:, t], k[:, t], v[:, t], beta[:, t])
        assert_close(out, full[:, t])
    assert_close(state.weights, final.weights)


def np_favor(x, w, is_query):
    """FAVOR+ positive features ``exp(w^T x' - |x'|^2 / 2 - c) / sqrt(M)``, ``x' = x / H^(1/4)``."""
    x = np.asarray(x, np.float64) * x.shape[-1] ** -0.25
    wx = x @ np.asarray(w, np.float64).T  # [B, T, N, M]
    h = 0.5 * (x**2).sum(-1, keepdims=True)
    c = (wx - h).max(axis=-1, keepdims=True) if is_query else (wx - h).max(axis=(1, 3), keepdims=True)
    return np.exp(wx - h - c) / np.sqrt(w.shape[0])


def test_performer_matches_formula_and_orthogonality():
    w = orthogonal_random_features(jax.random.key(0), 12, 8)
    block = np.asarray(w[:8]) / np.linalg.norm(np.asarray(w[:8]), axis=1, keepdims=True)
    np.testing.assert_allclose(block @ block.T, np.eye(8), atol=1e-5)  # rows of a block are orthogonal
    q, k, v = random_qkv(7, b=1, t=6, n=2, h=8)
    np.testing.assert_allclose(jax.jit(favor_features, static_argnames="is_query")(q, w, is_query=True),
                               np_favor(q, w, True), rtol=1e-4)  # fmt: skip
    expected = np_linear_attention(np_favor(q, w, True), np_favor(k, w, False), v, causal=True, phi=lambda x: x, eps=0)
    assert_close(jit(performer_attention, causal=True)(q, k, v, projection=w), jnp.asarray(expected, jnp.float32))


def test_performer_error_falls_as_features_grow():
    q, k, v = random_qkv(8, b=2, t=32, n=2, h=16)
    q, k = 0.5 * q, 0.5 * k
    exact = naive_attention(q, k, v)[0]
    run = jax.jit(performer_attention)
    draws = jax.vmap(lambda key: orthogonal_random_features(key, 512, 16))(jax.random.split(jax.random.key(0), 4))
    errors = []
    for m in (8, 64, 512):  # the first m rows of a draw are a draw of m features
        errors.append(float(np.mean([np.abs(np.asarray(run(q, k, v, projection=w[:m])) - exact) for w in draws])))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.35 * errors[0], errors  # ~1/sqrt(M): 64x the features, far less error


def test_modules_decode_like_their_forward():
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 8, 16)), jnp.float32)
    call = nnx.jit(lambda layer, x, state: layer(x, state=state))
    for layer in (
        LinearAttention(16, 4, num_kv_heads=2, causal=True, chunk_size=3, rngs=nnx.Rngs(0)),
        Performer(16, 2, num_features=8, causal=True, rngs=nnx.Rngs(2)),
    ):
        y = nnx.jit(lambda layer, x: layer(x))(layer, x)
        y_prefix, state = call(layer, x[:, :4], layer.init_state(2))  # one compilation serves both halves
        y_rest, state = call(layer, x[:, 4:], state)
        assert_close(jnp.concatenate([y_prefix, y_rest], axis=1), y)
    performer = Performer(16, 2, num_features=8, rngs=nnx.Rngs(3))
    assert "projection" not in nnx.state(performer, nnx.Param)  # random features are not trained
    before = performer.projection[...]
    performer.redraw(jax.random.key(1))
    assert not jnp.allclose(before, performer.projection[...])
    fwp = FastWeightProgrammer(16, 2, chunk_size=3, rngs=nnx.Rngs(1))
    chex.assert_shape(nnx.jit(lambda layer, x: layer(x))(fwp, x), (2, 8, 16))


def test_bad_configurations_raise():
    q, k, v = random_qkv(0, b=1, t=4, n=2, h=4)
    with pytest.raises(ValueError, match="implementation"):
        linear_attention(q, k, v, implementation="fast")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="T == S"):
        linear_attention(q, k[:, :3], v[:, :3], causal=True)
    with pytest.raises(ValueError, match="beta"):
        delta_rule_attention(q, k, v, jnp.ones((1, 4)))
    with pytest.raises(ValueError, match="num_features"):
        orthogonal_random_features(jax.random.key(0), 0, 4)
    with pytest.raises(ValueError, match="num_features"):
        Performer(8, 2, num_features=-1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="projection"):
        performer_attention(q, k, v, projection=jnp.ones((8, 3)))
    with pytest.raises(ValueError, match="causal=False"):
        LinearAttention(8, 2, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 8)), state=LinearAttentionState.zeros(1, 2, 4, 4))
