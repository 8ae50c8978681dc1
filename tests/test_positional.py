"""RoPE (layouts, partial rotary, each scaling against its formula), ALiBi slopes, T5 buckets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from attention_jax import positional
from attention_jax.positional import LinearScaling, Llama3Scaling, NTKScaling, RoPE, YaRNScaling

CONFIGS = [
    RoPE(),
    RoPE(layout="interleaved"),
    RoPE(rotary_dim=8),
    RoPE(theta=500_000.0, scaling=Llama3Scaling(factor=8.0, original_max_position=64)),
    RoPE(scaling=YaRNScaling(factor=4.0, original_max_position=64)),
    RoPE(scaling=NTKScaling(factor=4.0)),
    RoPE(scaling=LinearScaling(factor=2.0)),
]


def naive_rope(x, positions, inv_freq, layout, magnitude=1.0):
    """Rotate each channel pair by position * freq, written per pair in float64."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    half = len(inv_freq)
    for t, p in enumerate(np.asarray(positions)):
        for i, f in enumerate(inv_freq):
            a, b = (i, i + half) if layout == "rotate_half" else (2 * i, 2 * i + 1)
            c, s = math.cos(p * f) * magnitude, math.sin(p * f) * magnitude
            out[:, t, :, a] = x[:, t, :, a] * c - x[:, t, :, b] * s
            out[:, t, :, b] = x[:, t, :, b] * c + x[:, t, :, a] * s
    return out


@pytest.mark.parametrize("rope", CONFIGS, ids=repr)
def test_rope_matches_per_pair_rotation(rope):
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 16))
    positions = jnp.array([0, 1, 5, 17, 100, 1000])
    magnitude = rope.scaling.magnitude if isinstance(rope.scaling, YaRNScaling) else 1.0
    want = naive_rope(x, positions, rope.inv_freq(16), rope.layout, magnitude)
    assert_close(rope(x, positions), want.astype(np.float32), dtype=jnp.float32)


@pytest.mark.parametrize("rope", CONFIGS[:4], ids=repr)
def test_scores_depend_only_on_relative_position(rope):
    q = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 1, 16))

    def score(i, j):
        return float(jnp.sum(rope(q, jnp.array([i])) * rope(k, jnp.array([j]))))

    for shift in (0, 3, 250):
        np.testing.assert_allclose(score(7 + shift, 2 + shift), score(7, 2), rtol=1e-4, atol=1e-4)
    assert abs(score(7, 2) - score(7, 5)) > 1e-3  # and it does depend on the distance


def test_partial_rotary_passes_other_channels_through():
    x = jax.random.normal(jax.random.key(3), (2, 5, 3, 16))
    out = RoPE(rotary_dim=4)(x, jnp.arange(5))
    np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
    assert out.dtype == x.dtype


def test_rope_keeps_dtype_and_accepts_batched_positions():
    x = jax.random.normal(jax.random.key(4), (2, 3, 2, 8)).astype(jnp.bfloat16)
    positions = jnp.array([[0, 1, 2], [10, 11, 12]])
    out = RoPE()(x, positions)
    assert out.dtype == jnp.bfloat16
    assert_close(out[1:], RoPE()(x[1:], positions[1]), dtype=jnp.bfloat16)


def test_linear_and_ntk_scaling_formulas():
    base = 1.0 / 10_000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(RoPE(scaling=LinearScaling(4.0)).inv_freq(16), base / 4.0)
    ntk_base = 10_000.0 * 4.0 ** (16 / 14)
    np.testing.assert_allclose(RoPE(scaling=NTKScaling(4.0)).inv_freq(16), 1.0 / ntk_base ** (np.arange(0, 16, 2) / 16))


def test_llama3_scaling_formula():
    cfg = Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64)
    base = 1.0 / 500_000.0 ** (np.arange(0, 32, 2) / 32)
    got = RoPE(theta=500_000.0, scaling=cfg).inv_freq(32)
    for f, g in zip(base, got):
        wavelength = 2 * math.pi / f
        if wavelength < 64 / 4.0:  # high frequency: unchanged
            want = f
        elif wavelength > 64 / 1.0:  # low frequency: divided by the factor
            want = f / 8.0
        else:
            smooth = (64 / wavelength - 1.0) / (4.0 - 1.0)
            want = (1 - smooth) * f / 8.0 + smooth * f
        np.testing.assert_allclose(g, want, rtol=1e-12)
    assert got[0] == base[0] and got[-1] == base[-1] / 8.0


def test_yarn_scaling_formula():
    cfg = YaRNScaling(factor=4.0, original_max_position=64, beta_fast=32, beta_slow=1)
    dim, theta = 32, 10_000.0
    base = 1.0 / theta ** (np.arange(0, dim, 2) / dim)

    def correction_dim(rotations):
        return dim * math.log(64 / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(correction_dim(32)), 0), min(math.ceil(correction_dim(1)), dim - 1)
    got = RoPE(scaling=cfg).inv_freq(dim)
    for i, f in enumerate(base):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        want = f / 4.0 * ramp + f * (1.0 - ramp)
        np.testing.assert_allclose(got[i], want, rtol=1e-12)
    assert cfg.magnitude == pytest.approx(0.1 * math.log(4.0) + 1.0)


def test_alibi_slopes():
    np.testing.assert_allclose(positional.alibi_slopes(8), [2.0 ** (-(i + 1)) for i in range(8)])
    six = positional.alibi_slopes(6)
    four, eight = [2.0 ** (-2 * (i + 1)) for i in range(4)], [2.0 ** (-(i + 1)) for i in range(8)]
    np.testing.assert_allclose(six, four + eight[0::2][:2])
    assert positional.alibi_slopes(1).shape == (1,)


def test_t5_buckets_against_the_formula():
    def bucket(rel, bidirectional, num_buckets, max_distance):
        n, ret = num_buckets, 0
        if bidirectional:
            n //= 2
            ret += n if rel > 0 else 0
            rel = abs(rel)
        else:
            rel = max(-rel, 0)
        exact = n // 2
        if rel < exact:
            return ret + rel
        large = exact + int(math.log(rel / exact) / math.log(max_distance / exact) * (n - exact))
        return ret + min(large, n - 1)

    rel = np.arange(-300, 300)
    for bidirectional in (True, False):
        got = np.asarray(positional.t5_relative_buckets(jnp.asarray(rel), bidirectional=bidirectional))
        want = [bucket(int(r), bidirectional, 32, 128) for r in rel]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: RoPE(layout="spiral"), "layout"),
        (lambda: RoPE(rotary_dim=3), "rotary_dim"),
        (lambda: RoPE()(jnp.ones((2, 3, 8)), jnp.arange(4)), "positions must have shape"),
        (lambda: RoPE(rotary_dim=16)(jnp.ones((1, 2, 1, 8)), jnp.arange(2)), "rotary_dim"),
        (lambda: positional.alibi_slopes(0), "num_heads"),
    ],
)
def test_bad_config_raises(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_frequencies_match_transformers(truncate):
    """gpt-oss turns off the rounding of YaRN's ramp ends (``truncate=False``); both match transformers."""
    transformers = pytest.importorskip("transformers")
    from transformers import modeling_rope_utils

    dim, theta = 64, 150000.0
    config = transformers.LlamaConfig(
        hidden_size=4 * dim, num_attention_heads=4, max_position_embeddings=131072,
        rope_parameters={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                         "truncate": truncate, "rope_theta": theta, "beta_fast": 32.0, "beta_slow": 1.0},
    )  # fmt: skip
    expected, attention_factor = modeling_rope_utils._compute_yarn_parameters(config, "cpu")
    base = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    yarn = YaRNScaling(factor=32.0, original_max_position=4096, truncate=truncate)
    np.testing.assert_allclose(yarn.inv_freq(base, dim, theta), expected.numpy(), rtol=1e-6)
    assert yarn.magnitude == pytest.approx(attention_factor)
