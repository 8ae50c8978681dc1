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

from attention_jax.functional.delta_rule import (
    FastWeightState,
    delta_rule_attention,
    delta_rule_step,
    delta_rule_weights,
)
from attention_jax.functional.linear import (
    IMPLEMENTATIONS,
    LinearAttentionState,
    linear_attention,
    linear_attention_step,
    linear_attention_weights,
)
from attention_jax.functional.multi_head import weighted_values
from attention_jax.functional.performer import (
    PerformerState,
    favor_features,
    orthogonal_random_features,
    performer_attention,
    performer_attention_weights,
)
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
    call = nnx.jit(lambda layer, x, cache: layer(x, cache=cache))
    for layer in (
        LinearAttention(16, 4, num_kv_heads=2, causal=True, chunk_size=3, rngs=nnx.Rngs(0)),
        Performer(16, 2, num_features=8, causal=True, rngs=nnx.Rngs(2)),
    ):
        y = nnx.jit(lambda layer, x: layer(x))(layer, x)
        y_prefix, cache = call(layer, x[:, :4], layer.init_cache(2, 8))  # one compilation serves both halves
        y_rest, cache = call(layer, x[:, 4:], cache)
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
    layer = LinearAttention(8, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="LinearAttention cannot take cache"):
        layer(jnp.ones((1, 3, 8)), cache=layer.init_cache(1, 3))


# Packed rows: documents of 5, 5, 1 and 2, 7, 2 tokens; chunks of 4 cut them elsewhere.
SEGMENTS = np.array([[3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 2], [0, 0, 1, 1, 1, 1, 1, 1, 1, 4, 4]])


def per_document(oracle, arrays, segment_ids):
    """``oracle`` run on each document (run of equal ids) alone, stitched back into ``[B, T, ...]``."""
    pieces = []
    for b, ids in enumerate(segment_ids):
        starts = [0] + [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]] + [len(ids)]
        pieces.append(
            np.concatenate([oracle(*(x[b : b + 1, s:e] for x in arrays))[0] for s, e in zip(starts, starts[1:])])
        )
    return jnp.asarray(np.stack(pieces), jnp.float32)


def np_normalized_elu(x):
    return np_elu1(x) / np_elu1(x).sum(-1, keepdims=True)


def packed_case(op, q, k, v, beta, w):
    """``(run(form, **packing), forms, numpy oracle, weights(**packing))`` of one op."""
    causal = op != "delta" and op.endswith("causal")
    if op.startswith("linear"):
        oracle = lambda q, k, v: np_linear_attention(q, k, v, causal=causal)
        run = lambda form, **pack: jit(linear_attention, causal=causal, implementation=form, chunk_size=4)(
            q, k, v, **pack
        )
        weights = lambda **pack: jit(linear_attention_weights, causal=causal)(q, k, **pack)
        return run, IMPLEMENTATIONS, oracle, weights
    if op.startswith("performer"):
        oracle = lambda q, k, v: np_linear_attention(
            np_favor(q, w, True), np_favor(k, w, False), v, causal=causal, phi=lambda x: x, eps=0
        )
        run = lambda form, **pack: jit(performer_attention, causal=causal, implementation=form, chunk_size=4)(
            q, k, v, projection=w, **pack
        )
        weights = lambda **pack: jit(performer_attention_weights, causal=causal)(q, k, projection=w, **pack)
        return run, IMPLEMENTATIONS, oracle, weights
    oracle = lambda q, k, v, b: np_delta_rule(q, k, v, b, np_normalized_elu)
    run = lambda form, **pack: jit(delta_rule_attention, implementation=form, chunk_size=4)(q, k, v, beta, **pack)
    weights = lambda **pack: jit(delta_rule_weights)(q, k, beta, **pack)
    return run, ("chunked", "recurrent"), oracle, weights


OPS = ["linear", "linear_causal", "performer", "performer_causal", "delta"]


@pytest.mark.parametrize("op", OPS)
def test_packed_documents_equal_documents_run_alone(op):
    q, k, v = random_qkv(10, b=2, t=11, n=4, k=2, h=4, hv=3)  # GQA
    beta = jax.nn.sigmoid(jnp.asarray(np.random.default_rng(11).standard_normal((2, 11, 2)), jnp.float32))
    w = orthogonal_random_features(jax.random.key(3), 8, 4)
    run, forms, oracle, weights = packed_case(op, q, k, v, beta, w)
    arrays = (q, k, v, beta) if op == "delta" else (q, k, v)
    expected = per_document(oracle, [np.asarray(x) for x in arrays], SEGMENTS)
    segment_ids = jnp.asarray(SEGMENTS)
    for form in forms:
        assert_close(run(form, segment_ids=segment_ids), expected)
    # The implicit weights stay inside each document and reproduce the output (y = A v).
    a = weights(segment_ids=segment_ids)
    chex.assert_shape(a, (2, 4, 11, 11))
    across = SEGMENTS[:, :, None] != SEGMENTS[:, None, :]
    assert not np.any(np.asarray(a) * across[:, None]), "weight across documents"
    assert_close(weighted_values(a, v), expected)


@pytest.mark.parametrize("op", OPS)
def test_padded_keys_are_ignored(op):
    q, k, v = random_qkv(12, b=2, t=9, n=2, h=4)
    beta = jnp.full((2, 9, 2), 0.6)
    w = orthogonal_random_features(jax.random.key(4), 8, 4)
    run, forms, oracle, weights = packed_case(op, q, k, v, beta, w)
    lengths = np.array([5, 9])
    q_np, k_np, v_np, b_np = (np.asarray(x) for x in (q, k, v, beta))
    causal = op == "delta" or op.endswith("causal")
    expected = []
    for b, n in enumerate(lengths):  # row b alone with its real keys; non-causal queries past n still read them
        args = (q_np[b : b + 1, :n] if causal else q_np[b : b + 1], k_np[b : b + 1, :n], v_np[b : b + 1, :n])
        expected.append(oracle(*args, *((b_np[b : b + 1, :n],) if op == "delta" else ()))[0][:n])
    padded = jnp.asarray(lengths, jnp.int32)
    for form in forms:
        out = run(form, lengths=padded)
        for b, n in enumerate(lengths):
            assert_close(out[b, :n], jnp.asarray(expected[b], jnp.float32))
    a = np.asarray(weights(lengths=padded))
    assert not np.any(a[0, :, :, 5:]), "weight on a padded key"


def test_packed_state_and_gradients():
    """The state returned after a packed row is the last document's; gradients match documents run alone."""
    q, k, v = random_qkv(13, b=2, t=11, n=2, h=4)
    segment_ids = jnp.asarray(SEGMENTS)
    beta = jnp.full((2, 11, 2), 0.5)
    _, state = jit(linear_attention, causal=True, return_state=True, chunk_size=4)(q, k, v, segment_ids=segment_ids)
    _, alone = jit(linear_attention, causal=True, return_state=True)(q[:, 9:], k[:, 9:], v[:, 9:])  # row 1's last
    assert_close(state.kv[1], alone.kv[1])
    _, fast = jit(delta_rule_attention, return_state=True, chunk_size=4)(q, k, v, beta, segment_ids=segment_ids)
    _, fast_alone = jit(delta_rule_attention, return_state=True)(q[:, 9:], k[:, 9:], v[:, 9:], beta[:, 9:])
    assert_close(fast.weights[1], fast_alone.weights[1])

    def loss(q, k, v, op):  # documents of row 0 cut at 5 and 10: packed vs. each run alone
        if op == "packed":
            return jnp.sum(jnp.sin(linear_attention(q, k, v, causal=True, chunk_size=4, segment_ids=segment_ids)[:1]))
        pieces = [
            linear_attention(q[:1, s:e], k[:1, s:e], v[:1, s:e], causal=True) for s, e in ((0, 5), (5, 10), (10, 11))
        ]
        return sum(jnp.sum(jnp.sin(p)) for p in pieces)

    grads = [jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, op) for op in ("packed", "alone")]
    chex.assert_tree_all_finite(grads[0])
    chex.assert_trees_all_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_performer_state_with_padding_and_empty_rows():
    q, k, v = random_qkv(14, b=2, t=6, n=2, h=4)
    w = orthogonal_random_features(jax.random.key(5), 8, 4)
    call = jit(performer_attention, causal=True, return_state=True)
    # Row 0 reads nothing yet (length 0): its state stays empty and finite; row 1 absorbs 3 keys.
    out, state = call(q, k, v, projection=w, lengths=jnp.array([0, 3]), state=PerformerState.zeros(2, 2, 8, 4))
    chex.assert_tree_all_finite(out)
    assert np.all(np.isneginf(np.asarray(state.key_offset[0]))) and not np.any(np.asarray(state.linear.kv[0]))
    tail, _ = call(q[:, 3:], k[:, 3:], v[:, 3:], projection=w, state=state)
    full = jit(performer_attention, causal=True)(q, k, v, projection=w)
    assert_close(tail[1], full[1, 3:])
