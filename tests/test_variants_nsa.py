"""Native Sparse Attention against a transcription of the paper's three branches; causality; bad configs."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close

import attention_jax as aj
from attention_jax import masks
from attention_jax.functional.nsa import compress_blocks, native_sparse_attention
from attention_jax.nn.nsa import NativeSparseAttention, NSACache

CONFIG = dict(compress_block=4, compress_stride=2, select_block=4, num_selected=2, window=3)


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def np_softmax_attend(q, keys, values):
    if len(keys) == 0:
        return np.zeros(values.shape[-1]), np.zeros(0)
    s = keys @ q / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    p /= p.sum()
    return p @ values, p


def np_nsa(q, k, v, kc, vc, gates, wk, wv, *, compress_block, compress_stride, select_block, num_selected, window):
    """Yuan et al. (2025), one (batch, key/value head, query) at a time, float64."""
    q, k, v, kc, vc, gates, wk, wv = (np.asarray(x, np.float64) for x in (q, k, v, kc, vc, gates, wk, wv))
    b_size, t_len, n_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = n_heads // kv_heads
    out = np.zeros(q.shape[:3] + (v.shape[-1],))
    for b in range(b_size):
        for kh in range(kv_heads):
            heads = range(kh * group, (kh + 1) * group)
            for t in range(t_len):
                # Compressed branch: blocks [m d, m d + l) that are complete at t.
                done = [m for m in range(kc.shape[1]) if m * compress_stride + compress_block - 1 <= t]
                o_cmp, p_cmp = {}, {}
                for n in heads:
                    o_cmp[n], p_cmp[n] = np_softmax_attend(q[b, t, n], kc[b, done, kh], vc[b, done, kh])
                # Selection: block j scores the group's compressed probability of the blocks that overlap it.
                own = t // select_block
                score = np.zeros(own + 1)
                for j in range(own + 1):
                    for i, m in enumerate(done):
                        start = m * compress_stride
                        if start <= (j + 1) * select_block - 1 and j * select_block <= start + compress_block - 1:
                            score[j] += sum(p_cmp[n][i] for n in heads)
                score[own] = np.inf  # the query's own block is always read
                chosen = sorted(range(own + 1), key=lambda j: (-score[j], j))[:num_selected]
                tokens = [p for j in chosen for p in range(j * select_block, (j + 1) * select_block) if p <= t]
                recent = list(range(max(0, t - window), t + 1))
                for n in heads:
                    o_slc = np_softmax_attend(q[b, t, n], k[b, tokens, kh], v[b, tokens, kh])[0]
                    o_win = np_softmax_attend(q[b, t, n], wk[b, recent, kh], wv[b, recent, kh])[0]
                    g = gates[b, t, n]
                    out[b, t, n] = g[0] * o_cmp[n] + g[1] * o_slc + g[2] * o_win
    return out


def test_matches_the_three_branch_formula():
    b, t, n, kv, h = 2, 14, 4, 2, 8  # GQA groups of 2; T not a multiple of the selection block
    q, k, v, wk, wv = (randn(i, b, t, n if i == 0 else kv, h) for i in range(5))
    kc = compress_blocks(k, block=4, stride=2).mean(3)  # any compression: here mean pooling
    vc = compress_blocks(v, block=4, stride=2).max(3)
    gates = jax.nn.sigmoid(randn(5, b, t, n, 3))
    out = jax.jit(functools.partial(native_sparse_attention, **CONFIG))(
        q, k, v, kc, vc, gates, window_key=wk, window_value=wv
    )
    expected = np_nsa(q, k, v, kc, vc, gates, wk, wv, **CONFIG)
    assert_close(out, jnp.asarray(expected, jnp.float32))


def test_module_rows_do_not_depend_on_later_tokens_and_gradients_are_finite():
    layer = NativeSparseAttention(16, 4, num_kv_heads=2, **CONFIG, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda layer, x: layer(x))
    x = randn(6, 2, 16, 16)
    y = forward(layer, x)
    for i in (2, 7, 12):
        changed = x.at[:, i + 1 :].set(randn(7 + i, 2, 15 - i, 16))
        y_changed = forward(layer, changed)
        assert_close(y_changed[:, : i + 1], y[:, : i + 1])  # rows 0..i see nothing after i
        assert not np.allclose(y_changed[:, i + 1 :], y[:, i + 1 :])
    grads = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x) ** 2)))(layer, x)
    chex.assert_tree_all_finite(grads)
    assert float(jnp.abs(grads.compress_key.hidden.kernel[...]).max()) > 0  # the compressed branch learns


def test_bad_configurations_raise():
    q = randn(0, 1, 8, 2, 4)
    kc = compress_blocks(q, block=4, stride=2).mean(3)
    gates = jnp.ones((1, 8, 2, 3))
    run = functools.partial(native_sparse_attention, q, q, q, kc, kc, gates)
    with pytest.raises(ValueError, match="compress_stride=3"):
        run(**{**CONFIG, "compress_stride": 3})
    with pytest.raises(ValueError, match="select_block=5"):
        run(**{**CONFIG, "select_block": 5})
    with pytest.raises(ValueError, match="window"):
        run(**{**CONFIG, "window": 0})
    with pytest.raises(ValueError, match="num_selected"):
        run(**{**CONFIG, "num_selected": 0})
    with pytest.raises(ValueError, match="key_cmp"):
        native_sparse_attention(q, q, q, kc[:, :2], kc, gates, **CONFIG)
    with pytest.raises(ValueError, match="compress_stride"):
        NativeSparseAttention(8, 2, compress_block=4, compress_stride=3, rngs=nnx.Rngs(0))


def test_matches_the_formula_at_an_offset():
    """Queries at q_offset + i over a longer key sequence equal those rows of the full forward."""
    b, s, n, kv, h = 2, 13, 4, 2, 8
    q, k, v, wk, wv = (randn(20 + i, b, s, n if i == 0 else kv, h) for i in range(5))
    kc = compress_blocks(k, block=4, stride=2).mean(3)
    vc = compress_blocks(v, block=4, stride=2).mean(3)
    gates = jax.nn.sigmoid(randn(25, b, s, n, 3))
    run = jax.jit(functools.partial(native_sparse_attention, **CONFIG))
    full = run(q, k, v, kc, vc, gates, window_key=wk, window_value=wv)
    offsets = jnp.array([9, 5])  # per row: 3 queries from its own position
    rows = offsets[:, None] + jnp.arange(3)
    pick = lambda x: jnp.take_along_axis(x, rows.reshape(b, 3, *[1] * (x.ndim - 2)), axis=1)
    part = run(pick(q), k, v, kc, vc, pick(gates), window_key=wk, window_value=wv, q_offset=offsets)
    assert_close(part, pick(full))


def _layer(**options):
    return NativeSparseAttention(16, 4, num_kv_heads=2, **CONFIG, rngs=nnx.Rngs(0), **options)


@functools.partial(nnx.jit, static_argnames=("steps", "kind", "quantized"))
def _full_and_decode(layer, seq, prompt, lengths, steps, kind="dense", quantized=False):
    """One program: the full forward, the prefill, ``steps`` decode steps (one traced step in a scan), and
    the padded prompt without a cache."""
    full = layer(seq)
    cache = layer.init_cache(seq.shape[0], prompt.shape[1] + steps, kind=kind, quantized=quantized, page_size=4)
    first, cache = layer(prompt, cache=cache, lengths=lengths)

    def step(cache, j):
        token = jnp.take_along_axis(seq, (lengths + j)[:, None, None], axis=1)  # [B, 1, D]
        y, cache = layer(token, cache=cache)
        return cache, y[:, 0]

    cache, outs = jax.lax.scan(step, cache, jnp.arange(steps))
    return full, first, jnp.moveaxis(outs, 0, 1), cache, layer(prompt, lengths=lengths)


@pytest.mark.parametrize("kind, quantized", [("dense", False), pytest.param("paged", True, marks=pytest.mark.slow)])
def test_decode_equals_full_forward_with_two_prompt_lengths(kind, quantized):
    """Prefill right-padded prompts of 9 and 5 tokens, then decode 4 steps each at its own positions:
    compressed blocks complete during the prefill and during decoding, selections change."""
    layer = _layer(value_head_dim=6)
    prompt_lengths, steps = (9, 5), 4
    seq = randn(30, 2, max(prompt_lengths) + steps, 16)
    prompt = seq[:, : max(prompt_lengths)]
    real = np.arange(prompt.shape[1])[None, :, None] < np.array(prompt_lengths)[:, None, None]
    prompt = jnp.where(real, prompt, 10 * randn(31, *prompt.shape))  # padding must not leak
    lengths = jnp.asarray(prompt_lengths)
    full, first, decoded, cache, padded = _full_and_decode(layer, seq, prompt, lengths, steps, kind, quantized)
    assert isinstance(cache, NSACache)
    cache.check()
    assert cache.lengths.tolist() == [p + steps for p in prompt_lengths]
    tol = dict(atol=3e-2 * float(jnp.abs(full).max()), rtol=0) if quantized else dict(atol=2e-5, rtol=2e-5)
    for b, length in enumerate(prompt_lengths):
        np.testing.assert_allclose(first[b, :length], full[b, :length], **tol)
        np.testing.assert_allclose(decoded[b], full[b, length : length + steps], **tol)
    # Without a cache, right padding changes no real row either (causal rows: the full forward's).
    assert_close(padded[1, :5], full[1, :5])


def test_recorded_weights_are_causal_and_sum_to_the_gates():
    layer = _layer()
    assert isinstance(layer, aj.nn.AttentionLayer)
    assert layer.query.kernel.shape == (16, 4, 4) and layer.out.kernel.shape == (4, 4, 16)
    x = randn(32, 2, 10, 16)

    @nnx.jit  # one program (eager, the recording call dispatched hundreds of ops)
    def run(layer, x):
        with aj.nn.record_attention_weights(layer):
            y, recorded = nnx.capture(layer, nnx.Intermediate)(x)
        return y, recorded["attention_weights"], layer(x), layer.gates(x)

    y, (weights,), plain, gates = run(layer, x)
    assert not layer.record_weights
    assert_close(y, plain)
    chex.assert_shape(weights, (2, 4, 10, 10))
    assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0  # nothing after the query
    gates = jax.nn.sigmoid(gates.reshape(2, 10, 4, 3))
    has_block = (np.arange(10) >= CONFIG["compress_block"] - 1)[None, :, None]  # a compressed block is complete
    expected = gates[..., 0] * has_block + gates[..., 1] + gates[..., 2]  # [B, T, N]
    assert_close(weights.sum(-1), jnp.moveaxis(expected, 1, 2))


def test_unsupported_arguments_raise_naming_module_and_argument():
    layer = _layer()
    x = jnp.ones((2, 6, 16))
    for argument, kwargs in (
        ("inputs_kv", dict(inputs_kv=x)),
        ("mask=full", dict(mask=masks.full())),
        ("mask", dict(mask=masks.sliding_window(2))),
        ("segment_ids", dict(segment_ids=jnp.zeros((2, 6), jnp.int32))),
    ):
        with pytest.raises(ValueError, match=f"NativeSparseAttention cannot take {argument}"):
            layer(x, **kwargs)
    with pytest.raises(ValueError, match="NativeSparseAttention cannot take kind='rolling'"):
        layer.init_cache(2, 8, kind="rolling")
    run = nnx.jit(lambda layer, x: layer(x, mask=masks.causal(), positions=jnp.arange(6)))
    chex.assert_shape(run(layer, x), (2, 6, 16))
