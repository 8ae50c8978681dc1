"""MultiHeadLatentAttention (MLA): the formula, absorbed equals naive (values and gradients), cache size."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import nn_formulas as F
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.functional.latent import latent_attention

D, N, L, NOPE, ROPE, HV, T = 16, 4, 8, 4, 2, 6, 6


def _layer(q_lora_rank=None, **kw):
    return aj.nn.MultiHeadLatentAttention(
        D, num_heads=N, kv_lora_rank=L, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE, v_head_dim=HV,
        q_lora_rank=q_lora_rank, mask=aj.masks.causal(), rngs=nnx.Rngs(0), **kw,
    )  # fmt: skip


def _x(seed=0):
    return jax.random.normal(jax.random.key(seed), (2, T, D))


@pytest.mark.parametrize("q_lora_rank", [None, 8])
def test_matches_formula_both_paths(q_lora_rank):
    layer = _layer(q_lora_rank)
    x = _x(1)
    expected, _ = F.latent(F.params(layer), np.asarray(x, np.float64), num_heads=N, kv_lora_rank=L, nope=NOPE,
                           rope_dim=ROPE, mask=F.causal(T), q_lora=q_lora_rank is not None)  # fmt: skip
    forward = nnx.jit(lambda m, x: (m(x, absorb=False), m(x, absorb=True)))
    naive, absorbed = forward(layer, x)
    chex.assert_shape(naive, (2, T, D))
    np.testing.assert_allclose(naive, expected, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(absorbed, expected, atol=2e-5, rtol=1e-5)


def test_absorbed_gradients_equal_naive():
    layer = _layer(8)
    x, r = _x(2), jax.random.normal(jax.random.key(3), (2, T, D))
    grad = nnx.jit(lambda m, absorb: nnx.grad(lambda m: jnp.sum(m(x, absorb=absorb) * r))(m), static_argnums=1)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(grad(layer, True)), nnx.to_pure_dict(grad(layer, False)), atol=1e-4, rtol=1e-4
    )


def test_functional_absorbed_equals_naive_float64():
    rng = np.random.default_rng(4)
    with jax.enable_x64(True):
        shapes = [(2, 3, N, NOPE), (2, 3, N, ROPE), (2, 7, L), (2, 7, ROPE), (L, N, NOPE), (L, N, HV)]
        q_nope, q_rope, latent, k_rope, w_uk, w_uv = (jnp.asarray(rng.standard_normal(s)) for s in shapes)
        args = (q_nope, q_rope, latent, k_rope, w_uk, w_uv)
        mask = aj.masks.causal(offset=4)
        run = jax.jit(lambda *a: [latent_attention(*a, mask=mask, absorb=ab, return_weights=True) for ab in (0, 1)])
        (naive, w_naive), (absorbed, w_absorbed) = run(*args)
        assert naive.dtype == jnp.float64
        np.testing.assert_allclose(absorbed, naive, atol=1e-12)
        np.testing.assert_allclose(w_absorbed, w_naive, atol=1e-12)


def test_cache_holds_only_latent_and_rope_key():
    layer = _layer()
    for kind in ("dense", "paged"):
        for quantized in (False, True):
            cache = layer.init_cache(2, 8, kind=kind, quantized=quantized)
            assert cache.elements_per_token == L + ROPE  # whatever N, NOPE and HV
            assert cache.storage.values is None
            itemsize = 1 if quantized else 4
            assert cache.bytes_per_token == (L + ROPE) * itemsize + (4 if quantized else 0)
    # versus the decompressed K/V a standard cache would hold per token: N * (NOPE + ROPE + HV)
    assert L + ROPE < N * (NOPE + ROPE + HV)


def test_bad_inputs():
    with pytest.raises(ValueError, match="rotary_dim"):
        _layer(rope=aj.positional.RoPE(rotary_dim=4))
    with pytest.raises(ValueError, match=r"D=16"):
        _layer()(jnp.ones((1, 2, 8)))
    with pytest.raises(ValueError, match=r"w_uk does not match"):
        latent_attention(jnp.ones((1, 2, N, NOPE)), jnp.ones((1, 2, N, ROPE)), jnp.ones((1, 3, L)),
                         jnp.ones((1, 3, ROPE)), jnp.ones((L + 1, N, NOPE)), jnp.ones((L, N, HV)))  # fmt: skip
