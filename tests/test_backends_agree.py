"""Every backend computes the same function: score mods, dropout and hidden NaN values, end to end.

Through ``aj.dot_product_attention`` with small tiles (defects hide at the default tile sizes), at
lengths that are not multiples of any block, on the reference, the blockwise XLA path and the
Pallas kernels (interpreted on CPU). Score mods are checked against an oracle that applies the
ScoreMod's dense ``__call__`` (not the tile form the backends run); gradients include the score
mod's parameters. Dropout must draw the same bits on every backend for the same key.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_qkv

import attention_jax as aj
from attention_jax import masks, positional, score_mods
from attention_jax.functional import backends
from pallas_kernels.flash_attention import BlockSizes

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
IMPLEMENTATIONS = {
    "reference": "reference",
    "blockwise": backends.Blockwise(block_q=16, block_k=16),
    "pallas": backends.Pallas(block_sizes=SMALL),
}
B, T, S, N, K, H = 2, 37, 45, 4, 2, 16
Q_OFFSET = S - T  # queries are the last T of S positions (causal rows see some keys)


def _oracle(q, k, v, *, mask, mod, scale=None):
    """Dense float32 attention with the mod's own ``__call__`` (the definition, not the tile form)."""
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1.0 / h**0.5 if scale is None else scale
    qg = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qg, k.astype(jnp.float32), precision="highest").reshape(b, n, t, s)
    scores = scores * scale
    idx = (
        jnp.arange(b)[:, None, None, None],
        jnp.arange(n)[None, :, None, None],
        (Q_OFFSET + jnp.arange(t))[None, None, :, None],
        jnp.arange(s)[None, None, None, :],
    )
    if mod is not None:
        scores = mod(scores, *idx)
    visible = jnp.broadcast_to(mask.dense(t, s, Q_OFFSET, 0), (b, t, s))[:, None]
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(visible, probs, 0.0).reshape(b, kh, n // kh, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32), precision="highest")
    return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def _mods():
    slopes = positional.alibi_slopes(N)
    table = 0.5 * jax.random.normal(jax.random.key(9), (8, N))
    return {
        "alibi": (score_mods.alibi, (slopes,)),
        "t5": (lambda table: score_mods.relative_position_bias(table, 8, 32, bidirectional=True), (table,)),
        "softcap": (lambda: score_mods.softcap(3.0), ()),
        "from_fn": (lambda: score_mods.from_fn(lambda s, b, h, q, k: s - 0.05 * jnp.abs(q - k)), ()),
        "compose": (
            lambda slopes, table: score_mods.compose(
                score_mods.alibi(slopes), score_mods.relative_position_bias(table, 8, 32), score_mods.softcap(4.0)
            ),
            (slopes, table),
        ),
    }


MASK = masks.causal() & masks.sliding_window(20)


def _value_and_grads(f):
    """One jitted program for ``f(q, k, v, params)`` and its gradients (eagerly, the interpreted kernels
    dispatched every grid step op by op)."""
    loss = lambda *a: jnp.sum(f(*a) * jnp.cos(jnp.arange(H)))
    return jax.jit(lambda *a: (f(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))


@functools.cache
def _oracle_values_and_grads(mod_name):
    """The oracle's output and gradients, computed once per score mod for the three backends."""
    make, params = _mods()[mod_name]
    q, k, v = random_qkv(11, b=B, t=T, s=S, n=N, k=K, h=H)
    return _value_and_grads(lambda q, k, v, params: _oracle(q, k, v, mask=MASK, mod=make(*params)))(q, k, v, params)


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("mod_name", list(_mods()))
def test_score_mods_match_their_definition_values_and_gradients(name, mod_name):
    make, params = _mods()[mod_name]
    q, k, v = random_qkv(11, b=B, t=T, s=S, n=N, k=K, h=H)

    def run(q, k, v, params):
        return aj.dot_product_attention(q, k, v, mask=MASK, score_mod=make(*params), q_offset=Q_OFFSET,
                                        implementation=IMPLEMENTATIONS[name])  # fmt: skip

    out, got = _value_and_grads(run)(q, k, v, params)
    want_out, want = _oracle_values_and_grads(mod_name)
    assert_close(out, want_out)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(g, w, grad=True)


RATE = 0.3


def _dropped(impl, q, k, v, rng, **kwargs):
    return aj.dot_product_attention(
        q, k, v, mask=MASK, q_offset=Q_OFFSET, implementation=impl, dropout_rate=RATE, dropout_rng=rng, **kwargs
    )


@pytest.mark.parametrize("name", ["blockwise", "pallas"])
def test_dropout_draws_the_same_bits_as_the_reference(name):
    q, k, v = random_qkv(12, b=B, t=T, s=S, n=N, k=K, h=H)
    rng = jax.random.key(5)

    @functools.partial(jax.jit, static_argnums=0)  # one program per backend: outputs and gradients
    def value_and_grads(impl, q, k, v, rng):
        loss = lambda q, k, v: jnp.sum(_dropped(impl, q, k, v, rng) * jnp.sin(jnp.arange(H)))
        return _dropped(impl, q, k, v, rng), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    ref, want = value_and_grads("reference", q, k, v, rng)
    out, got = value_and_grads(IMPLEMENTATIONS[name], q, k, v, rng)
    assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        assert_close(g, w, grad=True)


def test_dropout_is_dropout():
    """Zeroes about ``rate`` of the weights, rescales the rest, and changes with the key."""
    t = 64
    q = jnp.zeros((1, t, 2, 8))  # uniform weights over the visible keys
    v = jnp.ones((1, t, 2, 8))
    a = aj.dot_product_attention(q, q, v, implementation="reference", dropout_rate=RATE, dropout_rng=jax.random.key(0))
    b = aj.dot_product_attention(q, q, v, implementation="reference", dropout_rate=RATE, dropout_rng=jax.random.key(1))
    kept = np.asarray(a)[0, :, :, 0]  # each output = (kept keys / T) / (1 - rate)
    assert abs(kept.mean() - 1.0) < 0.05
    assert not np.allclose(np.asarray(a), np.asarray(b))
    weights = aj.attention_weights(q, q)
    assert np.allclose(np.asarray(weights), 1.0 / t)  # inspection ignores dropout


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_nan_in_values_no_query_sees_does_not_poison_the_output(name):
    """Unwritten cache slots hold garbage: masked for everyone, they must not turn 0 * NaN into NaN."""
    q, k, v = random_qkv(13, b=B, t=T, s=S, n=N, k=K, h=H)
    lengths = jnp.array([30, 45])
    garbage = jnp.arange(S)[None, :, None, None] >= lengths[:, None, None, None]
    v_nan = jnp.where(garbage, jnp.nan, v)
    k_nan = jnp.where(garbage, jnp.inf, k)
    mask = masks.causal() & masks.padding(kv_lengths=lengths)
    run = lambda q, k, v: aj.dot_product_attention(q, k, v, mask=mask, q_offset=Q_OFFSET,
                                                   implementation=IMPLEMENTATIONS[name])  # fmt: skip

    @jax.jit  # one program: the outputs with and without garbage, and the gradient through the garbage
    def check(q, k, v, k_nan, v_nan):
        return run(q, k_nan, v_nan), run(q, k, v), jax.grad(lambda q: jnp.sum(run(q, k_nan, v_nan)))(q)

    out, clean, grads = check(q, k, v, k_nan, v_nan)
    assert np.all(np.isfinite(np.asarray(out)))
    assert_close(out, clean)
    assert np.all(np.isfinite(np.asarray(grads)))


@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_per_head_boolean_array_with_softcap(name):
    """A boolean array mask stays a mask under softcap (a -inf bias would become finite)."""
    q, k, v = random_qkv(14, b=B, t=T, s=S, n=N, k=K, h=H)
    dense = jax.random.bernoulli(jax.random.key(3), 0.4, (B, N, T, S))
    dense = dense.at[:, :, 0].set(False)  # a fully masked row
    out, want = jax.jit(lambda q, k, v, dense: [
        aj.dot_product_attention(q, k, v, mask=dense, softcap=5.0, implementation=impl)
        for impl in (IMPLEMENTATIONS[name], "reference")])(q, k, v, dense)  # fmt: skip
    assert_close(out, want)
    assert not np.any(np.asarray(out)[:, 0])
