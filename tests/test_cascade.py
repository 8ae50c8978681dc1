"""Cascade attention == plain attention over each row's concatenated prefix + suffix: values, logsumexp, gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, naive_attention

import attention_jax as aj

B, P, N, K, H = 3, 5, 4, 2, 8
CASES = {
    # Each continuation's suffix is its own causal prefill, ragged (one row has no suffix yet).
    "prefill": dict(t=4, s=4, lengths=[4, 0, 3], q_offset=[0, 0, 0]),
    # Decoding: the last T tokens of each ragged suffix are the queries.
    "decode": dict(t=2, s=5, lengths=[5, 3, 4], q_offset=[3, 1, 2]),
}


def _inputs(case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32)).astype(dtype)
    t, s = case["t"], case["s"]
    return dict(q=draw(B, t, N, H), pk=draw(1, P, K, H), pv=draw(1, P, K, H), sk=draw(B, s, K, H),
                sv=draw(B, s, K, H), ct=draw(B, t, N, H))  # fmt: skip


def _concat_mask(case):
    """``[B, 1, T, P + S]``: the whole prefix, then the causal, ragged suffix."""
    t, s = case["t"], case["s"]
    i = np.arange(t)[None, :, None] + np.asarray(case["q_offset"])[:, None, None]  # suffix position of each query
    j = np.arange(s)[None, None, :]
    suffix = (j <= i) & (j < np.asarray(case["lengths"])[:, None, None])  # [B, T, S]
    return np.concatenate([np.ones((B, t, P), bool), suffix], axis=-1)[:, None]


def _concat(prefix, suffix):
    return jnp.concatenate([jnp.broadcast_to(prefix, (B, *prefix.shape[1:])), suffix], axis=1)


def _programs(case):
    lengths, q_offset = jnp.asarray(case["lengths"]), jnp.asarray(case["q_offset"])
    mask = jnp.asarray(_concat_mask(case))

    def cascade(q, pk, pv, sk, sv):
        return aj.functional.cascade_attention(q, pk, pv, sk, sv, mask=aj.masks.causal(), suffix_lengths=lengths,
                                               q_offset=q_offset, return_lse=True)  # fmt: skip

    def plain(q, pk, pv, sk, sv):
        k, v = _concat(pk, sk), _concat(pv, sv)
        return aj.dot_product_attention(q, k, v, mask=mask, implementation="reference", return_lse=True)

    def with_grads(f):
        def run(x):
            args = (x["q"], x["pk"], x["pv"], x["sk"], x["sv"])
            (out, lse), pullback = jax.vjp(f, *args)
            return out, lse, pullback((x["ct"], jnp.zeros_like(lse)))

        return jax.jit(run)

    return with_grads(cascade), with_grads(plain)


@pytest.mark.parametrize("name,dtype", [("prefill", jnp.float32), ("decode", jnp.float32), ("prefill", jnp.bfloat16)])
def test_cascade_equals_attention_over_prefix_and_suffix(name, dtype):
    case = CASES[name]
    x = _inputs(case, dtype)
    cascade, plain = _programs(case)
    out, lse, grads = cascade(x)
    assert out.shape == (B, case["t"], N, H) and out.dtype == dtype and lse.shape == (B, N, case["t"])
    # Values against the float64 oracle over the concatenated keys.
    expected, expected_lse = naive_attention(
        x["q"], _concat(x["pk"], x["sk"]), _concat(x["pv"], x["sv"]), mask=_concat_mask(case)
    )
    assert_close(out, jnp.asarray(expected, jnp.float32), dtype)
    assert_close(lse, jnp.asarray(expected_lse, jnp.float32), dtype)
    # Gradients (the prefix's summed over the continuations that share it) against the reference backend.
    _, _, expected_grads = plain(x)
    for name_, got, want in zip(("q", "prefix_key", "prefix_value", "suffix_key", "suffix_value"), grads,
                                expected_grads):  # fmt: skip
        assert got.shape == want.shape, name_
        assert_close(got, want, dtype, grad=True)


def test_fully_masked_rows_give_zeros_and_errors_name_arguments():
    q = jnp.ones((2, 1, 2, 4))
    empty_prefix = jnp.zeros((1, 0, 1, 4))
    suffix = jnp.ones((2, 2, 1, 4))
    out = jax.jit(lambda q, p, s: aj.functional.cascade_attention(q, p, p, s, s, suffix_lengths=jnp.array([0, 2])))(
        q, empty_prefix, suffix
    )
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)  # row 0 sees nothing: zeros, not NaN
    np.testing.assert_allclose(np.asarray(out[1]), 1.0)
    with pytest.raises(ValueError, match=r"prefix_key and prefix_value must have shape \[1, P, K, H\]"):
        aj.functional.cascade_attention(q, suffix, suffix, suffix, suffix)
    with pytest.raises(ValueError, match=r"suffix_lengths must have shape \[B\]=\[2\]"):
        aj.functional.cascade_attention(q, empty_prefix, empty_prefix, suffix, suffix, suffix_lengths=jnp.ones(3))
