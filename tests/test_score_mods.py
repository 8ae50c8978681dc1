"""Score mods: each against its formula inside attention; composition order."""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, naive_attention, random_qkv

import attention_jax as aj
from attention_jax import score_mods


def test_softcap_mod_equals_softcap_argument():
    q, k, v = random_qkv(0, b=1, t=6, n=2, h=8)
    q = q * 10.0  # large scores, so the cap matters
    via_mod = aj.dot_product_attention(q, k, v, score_mod=score_mods.softcap(2.0))
    via_arg = aj.dot_product_attention(q, k, v, softcap=2.0)
    assert_close(via_mod, via_arg)
    want, _ = naive_attention(q, k, v, softcap=2.0)
    assert_close(via_arg, want.astype(np.float32))


def test_from_fn_sees_batch_head_and_positions():
    q, k, v = random_qkv(1, b=2, t=5, s=7, n=3, k=1, h=4)
    mod = score_mods.from_fn(lambda s, b, h, i, j: s + 0.1 * b - 0.2 * h + 0.01 * (i * j))
    out = aj.dot_product_attention(q, k, v, score_mod=mod)
    want, _ = naive_attention(q, k, v, score_fn=lambda s, b, h, i, j: s + 0.1 * b - 0.2 * h + 0.01 * (i * j))
    assert_close(out, want.astype(np.float32))


def test_compose_applies_left_to_right():
    add = score_mods.from_fn(lambda s, b, h, i, j: s + 1.0)
    double = score_mods.from_fn(lambda s, b, h, i, j: 2.0 * s)
    zero = jnp.zeros((1, 1, 1, 1))
    idx = jnp.zeros((1, 1, 1, 1), jnp.int32)
    assert float(score_mods.compose(add, double)(zero, idx, idx, idx, idx)[0, 0, 0, 0]) == 2.0
    assert float(score_mods.compose(double, add)(zero, idx, idx, idx, idx)[0, 0, 0, 0]) == 1.0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: score_mods.softcap(0.0), "softcap"),
        (lambda: score_mods.alibi(jnp.ones((2, 2))), "slopes"),
        (lambda: score_mods.relative_position_bias(jnp.ones((8, 2)), 16, 64), "table"),
    ],
)
def test_bad_config_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()
