"""Linformer and Nystromformer against their formulas."""

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
from attention_jax.functional.lowrank import iterative_pinv, linformer_attention, nystrom_attention
from attention_jax.functional.multi_head import weighted_values
from attention_jax.nn.lowrank import Linformer, Nystromformer


def randn(seed, *shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_pinv_iteration(a, iterations):
    """Xiong et al. (2021), eq. 13: ``Z <- Z (13 I - AZ (15 I - AZ (7 I - AZ))) / 4`` from ``A^T / (|A|_1 |A|_inf)``."""
    eye = np.eye(a.shape[-1])
    z = a.T / (np.abs(a).sum(0).max() * np.abs(a).sum(1).max())
    for _ in range(iterations):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def np_nystrom(q, k, v, m, iterations):
    """``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with segment-mean landmarks, per head."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_size, t, n_heads, h = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros((b_size, t, n_heads, v.shape[-1]))
    for b in range(b_size):
        for n in range(n_heads):
            qn, kn, vn = q[b, :, n] / h**0.5, k[b, :, n // group], v[b, :, n // group]
            q_land = qn.reshape(m, -1, h).mean(1)
            k_land = kn.reshape(m, -1, h).mean(1)
            f, a, bb = np_softmax(qn @ k_land.T), np_softmax(q_land @ k_land.T), np_softmax(q_land @ kn.T)
            out[b, :, n] = f @ np_pinv_iteration(a, iterations) @ bb @ vn
    return out


def test_linformer_matches_formula():
    q, k, v = randn(0, 2, 8, 4, 8), randn(1, 2, 8, 2, 8), randn(2, 2, 8, 2, 6)  # GQA
    e, f = randn(3, 3, 8), randn(4, 3, 8)
    out = jax.jit(linformer_attention)(q, k, v, key_projection=e, value_projection=f)
    projected_k = np.einsum("PS,BSKH->BPKH", np.asarray(e, np.float64), np.asarray(k, np.float64))
    projected_v = np.einsum("PS,BSKH->BPKH", np.asarray(f, np.float64), np.asarray(v, np.float64))
    assert_close(out, jnp.asarray(naive_attention(q, projected_k, projected_v)[0], jnp.float32))


def test_nystrom_matches_formula_and_is_exact_with_every_token_a_landmark():
    q, k, v = randn(5, 2, 8, 4, 8), randn(6, 2, 8, 2, 8), randn(7, 2, 8, 2, 8)
    out = jax.jit(functools.partial(nystrom_attention, num_landmarks=4))(q, k, v)
    assert_close(out, jnp.asarray(np_nystrom(q, k, v, 4, 6), jnp.float32), grad=True)
    # m = T: the Nystrom factorisation is softmax(QK^T) itself (well conditioned: large, matching q and k).
    x = randn(8, 1, 6, 2, 8, scale=3.0)
    exact = naive_attention(x, x, v[:1, :6, :2])[0]
    out = jax.jit(functools.partial(nystrom_attention, num_landmarks=6, pinv_iterations=30))(x, x, v[:1, :6, :2])
    assert_close(out, jnp.asarray(exact, jnp.float32), grad=True)


def test_iterative_pinv_converges_to_pinv():
    a = np_softmax(3 * np.eye(5) + 0.3 * np.random.default_rng(0).standard_normal((5, 5)))
    pinv = jax.jit(iterative_pinv, static_argnums=1)(jnp.asarray(a, jnp.float32), 20)
    np.testing.assert_allclose(pinv, np.linalg.pinv(a), atol=1e-4)


def test_modules_and_gradients():
    x = randn(9, 2, 8, 16)
    linformer = Linformer(16, 2, max_length=12, projected_length=4, rngs=nnx.Rngs(0))
    nystrom = Nystromformer(16, 2, num_landmarks=4, rngs=nnx.Rngs(1))
    for layer in (linformer, nystrom):
        loss = lambda layer, x: jnp.sum(layer(x) ** 2)
        grads = nnx.jit(nnx.grad(loss))(layer, x)
        chex.assert_tree_all_finite(grads)
    # T = 8 < max_length used the first 8 columns of E and F; a longer sequence is refused.
    with pytest.raises(ValueError, match="max_length=12"):
        linformer(randn(9, 1, 13, 16))


def _layers():
    return (
        Linformer(16, 4, num_kv_heads=2, max_length=12, projected_length=3, rngs=nnx.Rngs(0)),
        Nystromformer(16, 4, num_kv_heads=2, num_landmarks=2, pinv_iterations=8, rngs=nnx.Rngs(1)),
    )


def test_modules_follow_the_protocol_with_multi_head_layout():
    for layer in _layers():
        assert isinstance(layer, aj.nn.AttentionLayer)
        shapes = {name: getattr(layer, name).kernel.shape for name in ("query", "key", "value", "out")}
        assert shapes == {"query": (16, 4, 4), "key": (16, 2, 4), "value": (16, 2, 4), "out": (4, 4, 16)}


def test_linformer_lengths_equal_the_real_tokens_alone():
    layer = _layers()[0]
    x = randn(10, 2, 10, 16)
    lengths = jnp.array([10, 6])
    # One compiled program: the padded batch and each row alone.
    padded, short, full = nnx.jit(lambda layer, x, n: (layer(x, lengths=n), layer(x[1:, :6]), layer(x[:1])))(
        layer, x, lengths
    )
    assert_close(padded[1, :6], short[0])  # E[:, :6], the 6 real keys
    assert_close(padded[0], full[0])


@nnx.jit
def _cross_attention_and_functional(linformer, nystrom, x, context):
    """Each module's cross-attention and the functional op on its own projections, in one compiled program."""
    q, k, v = linformer.query(x), linformer.key(context), linformer.value(context)
    e, f = linformer.key_projection[...][:, :8], linformer.value_projection[...][:, :8]
    expected_linformer = linformer.out(linformer_attention(q, k, v, key_projection=e, value_projection=f))
    q, k, v = nystrom.query(x), nystrom.key(context), nystrom.value(context)
    expected_nystrom = nystrom.out(nystrom_attention(q, k, v, num_landmarks=2, pinv_iterations=8))
    return linformer(x, context), expected_linformer, nystrom(x, context), expected_nystrom


def test_cross_attention_matches_the_functional_ops():
    linformer, nystrom = _layers()
    x, context = randn(11, 2, 4, 16), randn(12, 2, 8, 16)
    ours_linformer, expected_linformer, ours_nystrom, expected_nystrom = _cross_attention_and_functional(
        linformer, nystrom, x, context
    )
    assert_close(ours_linformer, expected_linformer)
    assert_close(ours_nystrom, expected_nystrom)


@nnx.jit
def _recorded(layer, x, kwargs):
    """The output, the recorded weights and those weights applied to the values, in one compiled program."""
    with aj.nn.record_attention_weights(layer):
        y, recorded = nnx.capture(layer, nnx.Intermediate)(x, **kwargs)
    (weights,) = recorded["attention_weights"]
    return y, weights, layer.out(weighted_values(weights, layer.value(x)))


def test_recorded_weights_reproduce_the_output():
    """The recorded implicit weights [B, N, T, S], applied to the values, give the layer's output."""
    x = randn(13, 2, 8, 16)
    lengths = jnp.array([8, 5])
    for layer in _layers():
        kwargs = dict(lengths=lengths) if isinstance(layer, Linformer) else {}
        y, weights, reapplied = _recorded(layer, x, kwargs)
        chex.assert_shape(weights, (2, 4, 8, 8))
        assert_close(reapplied, y)
        if kwargs:
            assert float(jnp.abs(weights[1, :, :, 5:]).max()) == 0.0  # padded keys get no weight


def test_unsupported_arguments_raise_naming_module_and_argument():
    x = jnp.ones((2, 4, 16))
    for layer in _layers():
        name = type(layer).__name__
        with pytest.raises(ValueError, match=f"{name} cannot take mask=causal"):
            layer(x, mask=masks.causal())
        with pytest.raises(ValueError, match=f"{name} cannot take mask"):
            layer(x, mask=masks.sliding_window(2))
        with pytest.raises(ValueError, match=f"{name} cannot take segment_ids"):
            layer(x, segment_ids=jnp.zeros((2, 4), jnp.int32))
        with pytest.raises(ValueError, match=f"{name} cannot take cache"):
            layer(x, cache=object())
        with pytest.raises(ValueError, match=f"{name} cannot decode"):
            layer.init_cache(2, 8)
        chex.assert_shape(layer(x, mask=masks.full(), positions=jnp.arange(4)), (2, 4, 16))
    with pytest.raises(ValueError, match="Nystromformer cannot take lengths"):
        _layers()[1](x, lengths=jnp.array([4, 2]))


def test_bad_configurations_raise():
    q = randn(0, 1, 6, 2, 4)
    with pytest.raises(ValueError, match="num_landmarks=4"):
        nystrom_attention(q, q, q, num_landmarks=4)  # 4 does not divide T = 6
    with pytest.raises(ValueError, match="num_landmarks"):
        nystrom_attention(q, q, q, num_landmarks=0)
    with pytest.raises(ValueError, match="key_projection"):
        linformer_attention(q, q, q, key_projection=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="projected_length"):
        Linformer(8, 2, max_length=6, projected_length=0, rngs=nnx.Rngs(0))
