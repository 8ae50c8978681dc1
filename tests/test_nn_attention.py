"""MultiHeadAttention against formulas written out in float64 numpy, its functional op, and jnp gradients."""

from __future__ import annotations

import warnings

import chex
import jax
import jax.numpy as jnp
import nn_formulas as F
import numpy as np
import pytest
from flax import linen, nnx

import attention_jax as aj
from attention_jax.functional.multi_head import multi_head_attention

D, N, K, T = 16, 4, 2, 6
ATOL = 2e-5


def _x(seed=0, b=2, t=T, d=D):
    return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


def _np(x):
    return np.asarray(x, np.float64)


@nnx.jit
def _call(layer, *inputs):
    """``layer(*inputs)`` compiled: eager first calls compile every small op on its own."""
    return layer(*inputs)


CONFIGS = {
    "mha": dict(module=dict(), formula=dict(num_kv_heads=N)),
    "gqa_rope_qknorm_bias_causal": dict(
        module=dict(num_kv_heads=K, rope=aj.positional.RoPE(), qk_norm=True, use_bias=True, mask=aj.masks.causal()),
        formula=dict(num_kv_heads=K, rope_theta=10_000.0, qk_norm_eps=1e-6, mask=F.causal(T)),
    ),
    "mqa_alibi_window": dict(
        module=dict(num_kv_heads=1, alibi=True, sliding_window=2),
        formula=dict(
            num_kv_heads=1,
            mask=F.window(T, 2),
            score_fn=lambda s, i, j: s + aj.positional.alibi_slopes(N)[None, :, None, None] * (j - i),
        ),
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_formula(name):
    cfg = CONFIGS[name]
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, rngs=nnx.Rngs(1), **cfg["module"])
    x = _x()
    expected, _ = F.multi_head(F.params(layer), _np(x), num_heads=N, **cfg["formula"])
    y = _call(layer, x)
    chex.assert_shape(y, (2, T, D))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=1e-5)


def test_t5_bias_softcap_sinks_match_formula():
    layer = aj.nn.MultiHeadAttention(
        D, num_heads=N, relative_buckets=8, relative_max_distance=16, softcap=5.0, sinks=True,
        mask=aj.masks.causal(), rngs=nnx.Rngs(2),
    )  # fmt: skip
    layer.sinks[...] = jnp.array([0.5, -1.0, 2.0, 0.0])
    p = F.params(layer)
    table = p["relative_bias"]  # [buckets, N]
    buckets = np.asarray(aj.positional.t5_relative_buckets(np.arange(T)[None] - np.arange(T)[:, None], num_buckets=8,
                                                            max_distance=16))  # fmt: skip
    score_fn = lambda s, i, j: s + np.transpose(table[buckets], (2, 0, 1))[None]  # noqa: E731
    x = _x(3)
    expected, weights = F.multi_head(p, _np(x), num_heads=N, num_kv_heads=N, mask=F.causal(T), score_fn=score_fn,
                                     softcap=5.0, sinks=p["sinks"])  # fmt: skip
    np.testing.assert_allclose(_call(layer, x), expected, atol=ATOL, rtol=1e-5)
    assert np.all(weights.sum(-1) < 1.0)  # the sinks take some mass


def test_cross_attention_matches_formula():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, num_kv_heads=K, kv_features=8, value_head_dim=6,
                                     out_features=10, rngs=nnx.Rngs(4))  # fmt: skip
    x, ctx = _x(5), _x(6, t=9, d=8)
    expected, _ = F.multi_head(F.params(layer), _np(x), num_heads=N, num_kv_heads=K, context=_np(ctx))
    y = _call(layer, x, ctx)
    chex.assert_shape(y, (2, T, 10))
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=1e-5)


def test_matches_functional_op():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, num_kv_heads=K, rope=aj.positional.RoPE(), rngs=nnx.Rngs(0))
    x = _x(7)
    pos = jnp.arange(T)
    q, k, v = layer.rope(layer.query(x), pos), layer.rope(layer.key(x), pos), layer.value(x)
    out = aj.dot_product_attention(q, k, v, mask=aj.masks.causal(), implementation="reference")
    np.testing.assert_allclose(layer(x, mask=aj.masks.causal()), layer.out(out), atol=1e-6)
    np.testing.assert_allclose(
        layer.out(multi_head_attention(q, k, v, mask=aj.masks.causal())), layer.out(out), atol=1e-6
    )


def test_call_time_arguments_override_constructor():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    x = _x(8)
    full = aj.nn.MultiHeadAttention(D, num_heads=N, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(layer(x, mask=aj.masks.full()), full(x), atol=1e-6)
    np.testing.assert_allclose(layer(x, implementation="reference"), layer(x), atol=1e-6)
    # right padding: outputs of real tokens do not depend on the padding
    short = layer(x[:, :4])
    np.testing.assert_allclose(layer(x, lengths=jnp.array([4, 4]))[:, :4], short, atol=1e-6)


def test_gradients_match_jnp_formula():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, num_kv_heads=K, rope=aj.positional.RoPE(), qk_norm=True,
                                     mask=aj.masks.causal(), rngs=nnx.Rngs(9))  # fmt: skip
    x = _x(10)
    w = jax.random.normal(jax.random.key(11), (2, T, D))

    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * w)))(layer)

    def formula_loss(p):
        y, _ = F.multi_head(p, x, num_heads=N, num_kv_heads=K, rope_theta=10_000.0, qk_norm_eps=1e-6,
                            mask=F.causal(T), xp=jnp)  # fmt: skip
        return jnp.sum(y * w)

    expected = jax.jit(jax.grad(formula_loss))(F.params(layer, jnp))
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), expected, atol=1e-4, rtol=1e-4)


def test_dropout():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    plain = aj.nn.MultiHeadAttention(D, num_heads=N, rngs=nnx.Rngs(0))
    x = _x(12)
    np.testing.assert_allclose(layer(x, deterministic=True), plain(x), atol=1e-6)
    a, b = layer(x), layer(x)  # the stream advances: two different masks
    assert np.all(np.isfinite(a)) and not np.allclose(a, b)
    layer.eval()
    np.testing.assert_allclose(layer(x), plain(x), atol=1e-6)
    # Dropout runs inside the fast paths, with the same bits as the reference for the same key.
    layer.train()
    twin = nnx.clone(layer)
    np.testing.assert_allclose(layer(x, implementation="blockwise"), twin(x, implementation="reference"), atol=2e-5)


def test_dtype_bf16():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, dtype=jnp.bfloat16, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    ref = aj.nn.MultiHeadAttention(D, num_heads=N, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    x = _x(13)
    y = layer(x)
    assert y.dtype == jnp.bfloat16 and layer.query.kernel[...].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), ref(x), atol=5e-2, rtol=5e-2)


def test_record_weights_under_jit_and_pop():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, num_kv_heads=K, mask=aj.masks.causal(), sinks=True,
                                     rngs=nnx.Rngs(0))  # fmt: skip
    x = _x(14)
    _, expected = F.multi_head(F.params(layer), _np(x), num_heads=N, num_kv_heads=K, mask=F.causal(T),
                               sinks=np.zeros(N))  # fmt: skip
    forward = nnx.jit(lambda m, x: m(x))
    with aj.nn.record_attention_weights(layer):
        y, recorded = nnx.capture(forward, nnx.Intermediate)(layer, x)
    (weights,) = recorded["attention_weights"]
    chex.assert_shape(weights, (2, N, T, T))
    np.testing.assert_allclose(weights, expected, atol=1e-6)
    np.testing.assert_allclose(y, layer(x), atol=1e-6)  # recording leaves the output alone
    assert layer.record_weights is False  # restored

    # The flag and the context variable, with nnx.pop (sow outside capture warns in this Flax).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        layer(x, record_weights=True)
        with aj.nn.record_attention_weights():
            layer(x)
    popped = nnx.pop(layer, nnx.Intermediate)
    assert len(popped["attention_weights"].get_value()) == 2


def test_perturbation_gives_gradient_wrt_weights():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, num_kv_heads=K, mask=aj.masks.causal(), record_weights=True,
                                     rngs=nnx.Rngs(0))  # fmt: skip
    x = _x(15)
    r = jax.random.normal(jax.random.key(16), (2, T, D))
    _, zeros = nnx.capture(layer, nnx.Perturbation)(x)

    def loss(model, perturbations):
        y, _ = nnx.capture(model, nnx.Intermediate, init=perturbations)(x)
        return jnp.sum(y * r)

    grads = nnx.grad(loss, argnums=1)(layer, zeros)["attention_weights"][...]

    p = F.params(layer, jnp)
    v = F.linear(x, p["value"], jnp)

    def from_weights(w):  # the output as a function of the weights: w v, then the out projection
        out = jnp.einsum("bnts,bsnh->btnh", w, jnp.repeat(v, N // K, axis=2))
        return jnp.sum(F.linear(out, p["out"], jnp) * r)

    _, w = F.multi_head(p, x, num_heads=N, num_kv_heads=K, mask=F.causal(T), xp=jnp)
    np.testing.assert_allclose(grads, jax.grad(from_weights)(w), atol=1e-4, rtol=1e-4)


def test_bad_inputs_raise_with_shapes():
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"D=16.*\(2, 6, 8\)"):
        layer(jnp.ones((2, 6, 8)))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        aj.nn.MultiHeadAttention(D, num_heads=4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="cross-attention takes no cache"):
        layer(jnp.ones((2, 6, D)), jnp.ones((2, 3, D)), cache=layer.init_cache(2, 8))
    with pytest.raises(ValueError, match="either positions or a cache"):
        layer(jnp.ones((2, 6, D)), positions=jnp.arange(6), cache=layer.init_cache(2, 8))
    with pytest.raises(ValueError, match="sliding_window"):
        layer.init_cache(2, 8, kind="rolling")
    windowed = aj.nn.MultiHeadAttention(D, num_heads=N, sliding_window=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes a Mask.*\(6, 6\)"):
        windowed(jnp.ones((2, 6, D)), mask=jnp.ones((6, 6), bool))
    with pytest.raises(ValueError, match=r"sinks must have shape \[N\]=\[4\]"):
        multi_head_attention(jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 4, 8)), jnp.ones((1, 2, 4, 8)), sinks=jnp.ones(3))


def test_linen_bridge():
    class LinenModel(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = linen.Dense(D)(x)
            return nnx.bridge.to_linen(aj.nn.MultiHeadAttention, D, num_heads=N, mask=aj.masks.causal())(x)

    model = LinenModel()
    x = _x(17)
    variables = model.init(jax.random.key(0), x)
    y = model.apply(variables, x)
    chex.assert_shape(y, (2, T, D))
    # The same computation with the NNX module holding the Linen-initialised parameters.
    p = variables["params"]
    dense = np.asarray(x) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    layer = aj.nn.MultiHeadAttention(D, num_heads=N, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    nnx.update(layer, nnx.State(jax.tree.map(lambda a: a, p["ToLinen_0"])))
    np.testing.assert_allclose(y, layer(jnp.asarray(dense)), atol=1e-5)
