"""DifferentialAttention against the paper's formula, lambda_init by depth, gradients, the recorded map."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import nn_formulas as F
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.functional import differential as diff_lib

D, T = 32, 6


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, T, D))


def test_lambda_init_by_depth():
    for depth in (1, 2, 5, 24):
        assert diff_lib.lambda_init(depth) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * (depth - 1)))
    assert diff_lib.lambda_init(1) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="1-based"):
        diff_lib.lambda_init(0)
    layer = aj.nn.DifferentialAttention(D, num_heads=2, depth=4, rngs=nnx.Rngs(0))
    assert layer.lambda_init == pytest.approx(diff_lib.lambda_init(4)) and layer.head_dim == D // 2 // 2


@pytest.mark.parametrize("num_kv_heads,rope", [(2, False), (1, True)])
def test_matches_formula(num_kv_heads, rope):
    layer = aj.nn.DifferentialAttention(
        D, num_heads=2, num_kv_heads=num_kv_heads, depth=3, rope=aj.positional.RoPE() if rope else None,
        mask=aj.masks.causal(), rngs=nnx.Rngs(1),
    )  # fmt: skip
    x = _x(2)
    expected, expected_map = F.differential(F.params(layer), np.asarray(x, np.float64), lambda_init=layer.lambda_init,
                                            mask=F.causal(T), rope_theta=10_000.0 if rope else None)  # fmt: skip
    with aj.nn.record_attention_weights(layer):
        y, recorded = nnx.jit(nnx.capture(lambda m, x: m(x), nnx.Intermediate))(layer, x)
    chex.assert_shape(y, (2, T, D))
    np.testing.assert_allclose(y, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(recorded["attention_weights"][0], expected_map, atol=1e-5)


def test_gradients_match_jnp_formula():
    layer = aj.nn.DifferentialAttention(D, num_heads=2, depth=2, mask=aj.masks.causal(), rngs=nnx.Rngs(3))
    x, r = _x(4), jax.random.normal(jax.random.key(5), (2, T, D))
    grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) * r)))(layer)

    def formula_loss(p):
        return jnp.sum(F.differential(p, x, lambda_init=layer.lambda_init, mask=F.causal(T), xp=jnp)[0] * r)

    expected = jax.jit(jax.grad(formula_loss))(F.params(layer, jnp))
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), expected, atol=1e-4, rtol=1e-4)
    assert float(jnp.abs(grads["lambda_q1"][...]).sum()) > 0  # lambda is learned


def test_functional_op_is_two_softmax_maps():
    ks = jax.random.split(jax.random.key(6), 5)
    q1, q2 = jax.random.normal(ks[0], (1, 4, 2, 8)), jax.random.normal(ks[1], (1, 4, 2, 8))
    k1, k2 = jax.random.normal(ks[2], (1, 4, 1, 8)), jax.random.normal(ks[3], (1, 4, 1, 8))
    v = jax.random.normal(ks[4], (1, 4, 1, 16))
    lam = jnp.array([0.3, 0.7])  # per head
    out = diff_lib.differential_attention(q1, q2, k1, k2, v, lam, mask=aj.masks.causal())
    _, w1 = F.attention(*(np.asarray(a, np.float64) for a in (q1, k1, v)), mask=F.causal(4))
    _, w2 = F.attention(*(np.asarray(a, np.float64) for a in (q2, k2, v)), mask=F.causal(4))
    expected = np.einsum("bnts,bsh->btnh", w1 - np.asarray(lam)[None, :, None, None] * w2, np.asarray(v)[:, :, 0])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"lam must be a scalar or have shape \[N\]=\[2\]"):
        diff_lib.differential_attention(q1, q2, k1, k2, v, jnp.ones(3))
    with pytest.raises(ValueError, match="equal shapes"):
        diff_lib.differential_attention(q1, q2[:, :2], k1, k2, v, 0.5)
