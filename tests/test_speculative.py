"""Speculative decoding in aj.generate: greedy with a draft == plain greedy, token for token, in fewer target calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj

V, D, NEW, DRAFT = 24, 16, 10, 3
PROMPT = jax.random.randint(jax.random.key(1), (2, 5), 0, V)
LENGTHS = jnp.array([5, 3])


@functools.cache
def _target(window=None, recurrent=False):
    mha = functools.partial(aj.nn.MultiHeadAttention, num_heads=2, num_kv_heads=1, rope=aj.positional.RoPE(),
                            sliding_window=window)  # fmt: skip
    layers = [functools.partial(aj.nn.LinearAttention, num_heads=2), mha] if recurrent else mha
    return aj.nn.TransformerLM(V, D, 2, attention=layers, rngs=nnx.Rngs(0))


def _noisy(model, scale, seed=1):
    """The model with noise on every parameter: a draft that agrees with it often, not always."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves), rest)


def _check(target, draft, **options):
    plain = aj.generate(target, PROMPT, max_new_tokens=NEW, prompt_lengths=LENGTHS, **options)
    fast, stats = aj.generate(target, PROMPT, max_new_tokens=NEW, prompt_lengths=LENGTHS, draft=draft,
                              num_draft_tokens=DRAFT, return_stats=True, **options)  # fmt: skip
    assert fast.shape == (2, NEW) and fast.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(plain))
    return stats


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_greedy_speculation_equals_greedy(kind):
    stats = _check(_target(), _noisy(_target(), 0.05), cache_kind=kind, cache_options=dict(page_size=2))
    # Some drafts were accepted and some rejected (both branches ran), and the target was called less often
    # than once per token: prefill + one call per block of 1..DRAFT + 1 tokens.
    rounds = stats["target_calls"] - 1
    assert 0 < stats["accepted"] < 2 * (NEW - 1)
    assert -(-(NEW - 1) // (DRAFT + 1)) <= rounds < NEW - 1
    assert stats["draft_calls"] == 1 + rounds * (DRAFT + 1)


def test_a_perfect_draft_is_always_accepted():
    stats = _check(_target(), _target())
    assert stats["target_calls"] == 1 + -(-(NEW - 1) // (DRAFT + 1))


@pytest.mark.slow  # two more model shapes to compile (~12 s on a quiet core)
def test_rolling_and_recurrent_caches():
    # Rolling caches get max_rollback extra slots (a window of 2 is shorter than a rejected block).
    _check(_target(window=2), _noisy(_target(window=2), 0.05), cache_kind="rolling")
    # A linear-attention layer's state cannot roll back: after a rejection the accepted tokens are re-read from
    # the state before the block (one more target call); a block accepted whole needs none.
    target = _target(recurrent=True)
    _check(target, _noisy(target, 0.05))
    assert _check(target, target)["target_calls"] == 1 + -(-(NEW - 1) // (DRAFT + 1))


def test_eos_and_errors():
    target = _target()
    plain = np.asarray(aj.generate(target, PROMPT, max_new_tokens=NEW))
    eos = int(plain[0, 2])
    expected = np.asarray(aj.generate(target, PROMPT, max_new_tokens=NEW, eos_id=eos))
    fast = aj.generate(target, PROMPT, max_new_tokens=NEW, eos_id=eos, draft=_target(), num_draft_tokens=DRAFT)
    np.testing.assert_array_equal(np.asarray(fast), expected)
    with pytest.raises(ValueError, match="greedy only"):
        aj.generate(target, PROMPT, max_new_tokens=2, draft=target, temperature=1.0, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="num_draft_tokens must be a positive integer"):
        aj.generate(target, PROMPT, max_new_tokens=2, draft=target, num_draft_tokens=0)
