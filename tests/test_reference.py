"""The reference attention against a naive float64 oracle, laws of attention, and input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, naive_attention, random_qkv, tol
from hypothesis import given, settings
from hypothesis import strategies as st

import attention_jax as aj
from attention_jax import masks, positional, score_mods

B, T, S = 2, 11, 13
SEG_Q = jnp.array([[0] * 4 + [1] * 7, [0] * 11])
SEG_KV = jnp.array([[0] * 6 + [1] * 7, [0] * 9 + [1] * 4])

MASKS = {
    "none": None,
    "causal": masks.causal(offset=2),
    "window": masks.sliding_window(3, 1),
    "chunked": masks.chunked(4),
    "segments": masks.segments(SEG_Q, SEG_KV),
    "padding": masks.padding(jnp.array([7, 11]), jnp.array([13, 5])),
    "prefix_lm": masks.prefix_lm(4),
    "global": masks.global_tokens([0, 5]),
    "dilated": masks.dilated(6, 3),
    "random_blocks": masks.random_blocks(4, 2, seed=3),
    "from_fn": masks.from_fn(lambda q, k: (q + k) % 3 != 1),
    "causal&segments|global": masks.causal() & masks.segments(SEG_Q, SEG_KV) | masks.global_tokens([1]),
    "bool_array": jnp.asarray(np.random.default_rng(0).random((B, 1, T, S)) > 0.3),
}


def dense_numpy(mask):
    if mask is None:
        return None
    if isinstance(mask, masks.Mask):
        d = np.asarray(mask.dense(T, S))
        return d[:, None] if d.ndim == 3 else d
    return np.asarray(mask)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("n,k", [(4, 4), (4, 2), (4, 1)])
def test_matches_naive_oracle(name, n, k):
    q, key, v = random_qkv(hash(name) % 1000, b=B, t=T, s=S, n=n, k=k, h=8, hv=6)
    out, lse = aj.dot_product_attention(q, key, v, mask=MASKS[name], implementation="reference", return_lse=True)
    want_out, want_lse = naive_attention(q, key, v, mask=dense_numpy(MASKS[name]))
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(out, want_out.astype(np.float32))
    np.testing.assert_allclose(lse, want_lse, **tol(jnp.float32))


def test_bias_softcap_scale_and_score_mods():
    n, k = 4, 2
    q, key, v = random_qkv(1, b=B, t=T, s=S, n=n, k=k, h=8)
    bias = jax.random.normal(jax.random.key(2), (1, n, T, S))
    slopes = positional.alibi_slopes(n)
    table = jax.random.normal(jax.random.key(3), (16, n))
    mod = score_mods.compose(score_mods.alibi(slopes), score_mods.relative_position_bias(table, 16, 32, True))
    out, lse = jax.jit(lambda q, key, v, bias: aj.dot_product_attention(
        q, key, v, bias=bias, scale=0.3, softcap=5.0, score_mod=mod, mask=masks.causal(), return_lse=True
    ))(q, key, v, bias)  # fmt: skip
    buckets = np.asarray(
        positional.t5_relative_buckets(jnp.arange(S)[None] - jnp.arange(T)[:, None], num_buckets=16, max_distance=32)
    )
    tab = np.asarray(table, np.float64)

    def score_fn(s, b, h, i, j):
        return s + slopes[h] * (j - i) + tab[buckets, h]

    want_out, want_lse = naive_attention(
        q, key, v, bias=bias, scale=0.3, softcap=5.0, score_fn=score_fn, mask=np.asarray(masks.causal().dense(T, S))
    )
    assert_close(out, want_out.astype(np.float32))
    np.testing.assert_allclose(lse, want_lse, **tol(jnp.float32))


def test_offsets_shift_mask_and_score_mod_positions():
    q, key, v = random_qkv(4, b=1, t=3, s=10, n=2, h=8)
    slopes = jnp.array([0.5, 0.25])
    out = aj.dot_product_attention(q, key, v, mask=masks.causal(), q_offset=7, score_mod=score_mods.alibi(slopes))
    i, j = np.arange(3)[:, None] + 7, np.arange(10)[None, :]
    want, _ = naive_attention(
        q, key, v, mask=j <= i, score_fn=lambda s, b, h, ii, jj: s + np.asarray(slopes)[h] * (jj - ii - 7)
    )
    assert_close(out, want.astype(np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_inputs_keep_float32_statistics(dtype):
    q, key, v = random_qkv(5, b=1, t=32, n=2, h=16, dtype=dtype)
    out, lse = aj.dot_product_attention(q, key, v, mask=masks.causal(), return_lse=True)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    want, want_lse = naive_attention(q, key, v, mask=np.tril(np.ones((32, 32), bool)))
    assert_close(out, want.astype(np.float32), dtype=dtype)
    np.testing.assert_allclose(lse, want_lse, **tol(dtype))


def test_fully_masked_rows_are_zero_with_zero_gradients():
    q, key, v = random_qkv(6, b=2, t=6, s=5, n=2, h=8)
    mask = masks.padding(q_lengths=jnp.array([4, 6]), kv_lengths=jnp.array([5, 0]))

    def attend(q, key, v):
        return aj.dot_product_attention(q, key, v, mask=mask, return_lse=True)

    def loss(q, key, v):
        out, lse = attend(q, key, v)
        return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    # One program for the outputs and the gradients (eager dispatch of the ops costs more than compiling them).
    (out, lse), grads = jax.jit(lambda *a: (attend(*a), jax.grad(loss, argnums=(0, 1, 2))(*a)))(q, key, v)
    np.testing.assert_array_equal(out[0, 4:], 0.0)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.all(np.isneginf(lse[1])) and np.all(np.isneginf(lse[0, :, 4:]))
    for g in grads:
        assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(grads[0][0, 4:], 0.0)
    np.testing.assert_array_equal(grads[0][1], 0.0)
    np.testing.assert_array_equal(grads[1][1], 0.0)


def test_gradients_match_float64_finite_differences():
    q, key, v = random_qkv(7, b=1, t=4, s=5, n=2, k=1, h=3)
    q, key, v = (np.asarray(x, np.float64) for x in (q, key, v))
    mask = masks.causal(offset=1)

    @jax.jit  # one float64 compilation serves the six perturbed evaluations
    def loss(q, key, v):
        return jnp.sum(jnp.sin(aj.dot_product_attention(q, key, v, mask=mask)))

    with jax.enable_x64(True):
        analytic = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(jnp.asarray(q), jnp.asarray(key), jnp.asarray(v))
        for arg, grad in zip(range(3), analytic):
            args = [jnp.asarray(x) for x in (q, key, v)]
            direction = np.random.default_rng(arg).normal(size=args[arg].shape)
            eps = 1e-6
            plus = list(args)
            minus = list(args)
            plus[arg] = args[arg] + eps * direction
            minus[arg] = args[arg] - eps * direction
            numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
            np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), numeric, rtol=1e-6, atol=1e-8)


# ---- laws of attention, as property tests ---------------------------------------------------------------


# Each example draws new shapes: numpy inputs and one jitted program per example (eager dispatch would
# compile every op of the attention anew for each shape).


def numpy_qkv(seed, t, s, n, k, h):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((1, t, n, h), (1, s, k, h),
                                                                                    (1, s, k, h)))  # fmt: skip


@jax.jit
def _attend_with_permuted_queries(q, key, v, perm):
    return aj.dot_product_attention(q, key, v), aj.dot_product_attention(q[:, perm], key, v)


@jax.jit
def _attend_with_permuted_keys(q, key, v, perm):
    return aj.dot_product_attention(q, key, v), aj.dot_product_attention(q, key[:, perm], v[:, perm])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(1, 9), s=st.integers(1, 9))
def test_permuting_queries_permutes_output_rows(seed, t, s):
    q, key, v = numpy_qkv(seed, t, s, n=2, k=1, h=4)
    perm = np.random.default_rng(seed).permutation(t)
    out, out_perm = _attend_with_permuted_queries(q, key, v, perm)
    assert_close(out_perm, out[:, perm])


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), t=st.integers(1, 9), s=st.integers(1, 9))
def test_reordering_key_value_pairs_leaves_output_unchanged(seed, t, s):
    q, key, v = numpy_qkv(seed, t, s, n=2, k=2, h=4)
    perm = np.random.default_rng(seed + 1).permutation(s)
    out, out_perm = _attend_with_permuted_keys(q, key, v, perm)
    assert_close(out_perm, out)


@jax.jit
def _row_gradients(q, key, v, i):  # the row index is data: one compilation for every example
    def row(key, v):
        return jnp.sum(jnp.take(aj.dot_product_attention(q, key, v, mask=masks.causal()), i, axis=1))

    return jax.grad(row, argnums=(0, 1))(key, v)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), i=st.integers(0, 7))
def test_causal_row_has_no_gradient_from_the_future(seed, i):
    q, key, v = numpy_qkv(seed, 8, 8, n=2, k=1, h=4)
    dk, dv = _row_gradients(q, key, v, i)
    np.testing.assert_array_equal(dk[:, i + 1 :], 0.0)
    np.testing.assert_array_equal(dv[:, i + 1 :], 0.0)
    assert np.any(dv[:, : i + 1] != 0.0)


def test_gqa_equals_mha_with_repeated_kv():
    q, key, v = random_qkv(8, b=2, t=7, s=9, n=6, k=2, h=8)
    attend = jax.jit(lambda q, key, v: aj.dot_product_attention(q, key, v, mask=masks.causal()))
    assert_close(attend(q, key, v), attend(q, jnp.repeat(key, 3, axis=2), jnp.repeat(v, 3, axis=2)))


def test_matches_jax_nn_dot_product_attention():
    q, key, v = random_qkv(9, b=2, t=16, n=4, k=2, h=8)
    ours, theirs = jax.jit(lambda q, key, v: (
        aj.dot_product_attention(q, key, v, mask=masks.causal() & masks.sliding_window(5)),
        jax.nn.dot_product_attention(q, key, v, is_causal=True, local_window_size=(5, 0))))(q, key, v)  # fmt: skip
    assert_close(ours, theirs)


def test_attention_weights_rows_sum_to_one_and_reproduce_output():
    q, key, v = random_qkv(10, b=1, t=5, n=2, h=4)
    w = aj.attention_weights(q, key, mask=masks.causal())
    assert w.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    out = jnp.einsum("BNTS,BSNH->BTNH", w, v)
    assert_close(aj.dot_product_attention(q, key, v, mask=masks.causal()), out)


# ---- bad input ------------------------------------------------------------------------------------------------

Q, K_, V = random_qkv(0, b=2, t=4, s=5, n=4, k=2, h=8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(query=Q[0]), r"query must have rank 4 \[B, T, N, H\]"),
        (dict(key=K_[..., :4], value=V[..., :4]), "query and key head dims must match, got 8 and 4"),
        (dict(key=K_[:, :, :1].repeat(3, 2), value=V[:, :, :1].repeat(3, 2)), r"N=4 must be a multiple of .* K=3"),
        (dict(value=V[:, :4]), r"key and value must agree on \[S, K\]"),
        (dict(key=K_[:1], value=V[:1]), "batch size"),
        (dict(key=K_.astype(jnp.bfloat16)), "share a dtype"),
        (dict(query=Q.astype(jnp.int32)), "floating-point"),
        (dict(mask=jnp.ones((3, 1, 4, 5), bool)), r"mask must be broadcastable to \[B, N, T, S\]=\[2, 4, 4, 5\]"),
        (dict(mask=jnp.ones((4, 5))), "boolean array"),
        (dict(bias=jnp.ones((2, 4, 4, 4))), r"bias must be broadcastable.*bias.shape=\(2, 4, 4, 4\)"),
        (dict(mask=masks.segments(jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 5), jnp.int32))), "q_segment_ids"),
        (dict(mask=masks.segments(jnp.zeros((3, 4), jnp.int32), jnp.zeros((3, 5), jnp.int32))), "batch size 3"),
        (dict(implementation="flash"), "implementation must be"),
        (dict(softcap=-1.0), "softcap must be a positive number"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(query=Q, key=K_, value=V)
    args.update(kwargs)
    query, key, value = args.pop("query"), args.pop("key"), args.pop("value")
    with pytest.raises(ValueError, match=match):
        aj.dot_product_attention(query, key, value, **args)
