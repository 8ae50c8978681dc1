"""LinearAttention, Performer and FastWeightProgrammer under the attention-layer protocol.

Packed documents against the documents run alone (outputs and parameter gradients), padding,
prefill + decode against the causal forward, masks, cross-attention, recording and the errors.
Shapes are tiny and each jitted function is shared, so configurations compile once.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close
from test_variants_linear import np_elu1, np_favor, np_linear_attention

import attention_jax as aj
from attention_jax import masks
from attention_jax.functional.multi_head import weighted_values
from attention_jax.nn.linear import FastWeightProgrammer, LinearAttention, Performer, RecurrentCache

D = 16


def make(kind: str, **options):
    """A layer with GQA (N=4, K=2, H=4) and chunks of 4 (documents and prompts below cut them elsewhere)."""
    common = dict(num_kv_heads=2, chunk_size=4, rngs=nnx.Rngs(0))
    if kind == "linear":
        return LinearAttention(D, 4, **common, **options)
    if kind == "performer":
        return Performer(D, 4, num_features=8, **common, **options)
    return FastWeightProgrammer(D, 4, **common, **options)


def inputs(seed: int, *shape: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal((*shape, D)), jnp.float32)


forward = nnx.jit(lambda layer, x: layer(x))


# Row 0 packs documents of 5, 5, 6 tokens, row 1 of 6, 5, 5 (boundaries 5, 10 and 6, 11; chunks of 4).
SEGMENTS = np.stack([np.repeat([0, 1, 2], [5, 5, 6]), np.repeat([4, 3, 8], [6, 5, 5])])
DOCUMENTS = {5: [(0, 0), (0, 5), (1, 6), (1, 11)], 6: [(0, 10), (1, 0)]}  # length: (row, start) of each


_packed = nnx.jit(lambda layer, x, segment_ids: layer(x, segment_ids=segment_ids))
_alone = nnx.jit(lambda layer, documents: [layer(d) for d in documents])  # each a batch of equal lengths


def _documents(x):
    return [jnp.stack([x[b, s : s + n] for b, s in starts]) for n, starts in DOCUMENTS.items()]


def _assert_packed_equals_alone(y, ys):
    for (n, starts), y_alone in zip(DOCUMENTS.items(), ys):
        for i, (b, s) in enumerate(starts):
            assert_close(y[b, s : s + n], y_alone[i])


FORMS = [
    ("linear", dict(causal=True)),
    ("linear", dict(causal=True, implementation="recurrent")),
    ("linear", dict(causal=True, implementation="parallel")),
    ("linear", dict()),  # non-causal: two causal chunked passes
    ("linear", dict(implementation="recurrent")),
    ("linear", dict(implementation="parallel")),
    ("performer", dict(causal=True)),
    ("performer", dict(implementation="recurrent")),
    ("fwp", dict()),
    ("fwp", dict(implementation="recurrent")),
]


@pytest.mark.parametrize("kind, options", FORMS, ids=[f"{k}-{o}" for k, o in FORMS])
def test_packed_documents_equal_documents_alone(kind, options):
    layer = make(kind, **options)
    x = inputs(1, 2, 16)
    _assert_packed_equals_alone(_packed(layer, x, jnp.asarray(SEGMENTS)), _alone(layer, _documents(x)))


@pytest.mark.parametrize("kind, options", [("linear", dict()), ("performer", dict(causal=True)), ("fwp", dict())])
def test_packed_gradients_equal_documents_alone(kind, options):
    layer = make(kind, **options)
    x = inputs(9, 2, 16)

    @nnx.jit
    def value_and_grad(layer, x):
        def packed(layer):
            y = layer(x, segment_ids=jnp.asarray(SEGMENTS))
            return jnp.sum(jnp.sin(y)), y

        def alone(layer):
            ys = [layer(d) for d in _documents(x)]
            return sum(jnp.sum(jnp.sin(y)) for y in ys), ys

        return nnx.value_and_grad(packed, has_aux=True)(layer), nnx.value_and_grad(alone, has_aux=True)(layer)

    ((loss, y), grads), ((loss_alone, ys), grads_alone) = value_and_grad(layer, x)
    _assert_packed_equals_alone(y, ys)
    assert_close(loss, loss_alone)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_close(grads, grads_alone, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_padded_keys_are_ignored(kind):
    layer = make(kind)  # non-causal: every real query reads every real key, none of the padding
    x = inputs(2, 2, 8)
    lengths = [5, 8]
    y = nnx.jit(lambda layer, x, lengths: layer(x, lengths=lengths))(layer, x, jnp.asarray(lengths))
    for b, n in enumerate(lengths):
        assert_close(y[b, :n], forward(layer, x[b : b + 1, :n])[0])


_prefill = nnx.jit(lambda layer, x, cache, lengths: layer(x, mask=masks.causal(), cache=cache, lengths=lengths))
_decode = nnx.jit(lambda layer, x, cache: layer(x, mask=masks.causal(), cache=cache))


@pytest.mark.parametrize("kind, options", [("linear", dict()), ("performer", dict(causal=True)), ("fwp", dict())])
def test_prefill_and_decode_equal_the_causal_forward(kind, options):
    """Rows with prompts of 3 and 6 tokens (right-padded with noise), then 6 decoded tokens each."""
    layer = make(kind, **options)  # LinearAttention is built non-causal: the mask makes it causal, as a stack's does
    x = inputs(3, 2, 12)
    full = nnx.jit(lambda layer, x: layer(x, mask=masks.causal()))(layer, x)
    prompt_lengths = np.array([3, 6])
    prompt = x[:, :6].at[0, 3:].set(inputs(4, 3))  # row 0's padding is noise the layer must not absorb
    cache = layer.init_cache(2, 12, kind="paged")  # the kind changes nothing for a recurrent state
    y, cache = _prefill(layer, prompt, cache, jnp.asarray(prompt_lengths))
    assert isinstance(cache, RecurrentCache)
    assert cache.lengths.tolist() == prompt_lengths.tolist()
    for b, n in enumerate(prompt_lengths):
        assert_close(y[b, :n], full[b, :n])
    for i in range(6):
        token = jnp.stack([x[b, n + i] for b, n in enumerate(prompt_lengths)])[:, None]  # [B, 1, D]
        y, cache = _decode(layer, token, cache)
        for b, n in enumerate(prompt_lengths):
            assert_close(y[b, 0], full[b, n + i])
    assert cache.lengths.tolist() == (prompt_lengths + 6).tolist()


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_call_mask_overrides_the_constructor(kind):
    bidirectional, causal = make(kind), make(kind, causal=True)  # same seed: same parameters and features
    x = inputs(5, 2, 10)
    positions = jnp.arange(10) + 7  # position-free: ignored
    run = nnx.jit(lambda layer, x, p: layer(x, mask=masks.causal(), positions=p, deterministic=True))
    assert_close(run(bidirectional, x, positions), forward(causal, x))
    assert_close(nnx.jit(lambda layer, x: layer(x, mask=masks.full()))(causal, x), forward(bidirectional, x))
    assert not np.allclose(forward(causal, x), forward(bidirectional, x), atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "performer"])
def test_cross_attention_matches_the_formula(kind):
    layer = make(kind)
    x, context = inputs(6, 2, 5), inputs(7, 2, 7)
    y = nnx.jit(lambda layer, x, c: layer(x, c))(layer, x, context)
    q, k, v = (np.asarray(p(a)) for p, a in ((layer.query, x), (layer.key, context), (layer.value, context)))
    if kind == "performer":
        w = np.asarray(layer.projection[...])
        q, k, phi, eps = np_favor(q, w, True), np_favor(k, w, False), (lambda z: z), 0.0
    else:
        phi, eps = np_elu1, 1e-6
    expected = np_linear_attention(q, k, v, causal=False, phi=phi, eps=eps)  # [B, T, N, Hv]
    assert_close(y, layer.out(jnp.asarray(expected, jnp.float32)))


@pytest.mark.parametrize("kind, options", [("linear", dict()), ("performer", dict(causal=True)), ("fwp", dict())])
def test_recorded_weights_reproduce_the_output(kind, options):
    layer = make(kind, **options)
    x = inputs(8, 2, 16)

    @nnx.jit  # one program for the recording call and the oracle's projections
    def run(layer, x, segment_ids):
        with aj.nn.record_attention_weights(layer):
            y, recorded = nnx.capture(layer, nnx.Intermediate)(x, segment_ids=segment_ids)
        (weights,) = recorded["attention_weights"]
        return y, weights, layer.out(weighted_values(weights, layer.value(x)))

    y, weights, reproduced = run(layer, x, jnp.asarray(SEGMENTS))
    chex.assert_shape(weights, (2, 4, 16, 16))
    across = SEGMENTS[:, :, None] != SEGMENTS[:, None, :]
    assert not np.any(np.asarray(weights) * across[:, None]), "weight across documents"
    if kind != "fwp":  # kernel weights are normalised; the delta rule's overwrite (signed, any sum)
        assert_close(weights.sum(-1), jnp.ones((2, 4, 16)))
    assert_close(y, reproduced)


def test_unsupported_arguments_raise_naming_the_module_and_argument():
    x = jnp.ones((2, 4, D))
    linear, causal_linear, fwp = make("linear"), make("linear", causal=True), make("fwp")
    segment_ids = jnp.zeros((2, 4), jnp.int32)
    cases = [
        (linear, dict(mask=masks.sliding_window(2)), "LinearAttention cannot take mask"),
        (make("performer"), dict(mask=jnp.ones((4, 4), bool)), "Performer cannot take mask"),
        (fwp, dict(mask=masks.full()), "FastWeightProgrammer cannot take mask"),
        (fwp, dict(inputs_kv=x), "FastWeightProgrammer cannot take inputs_kv"),
        (causal_linear, dict(inputs_kv=x), "LinearAttention cannot take inputs_kv"),
        (linear, dict(inputs_kv=x, segment_ids=segment_ids), "LinearAttention cannot take segment_ids"),
        (linear, dict(inputs_kv=x, lengths=jnp.array([1, 2])), "LinearAttention cannot take lengths"),
        (linear, dict(cache=linear.init_cache(2, 4)), "LinearAttention cannot take cache"),
        (
            fwp,
            dict(cache=fwp.init_cache(2, 4), segment_ids=segment_ids),
            "FastWeightProgrammer cannot take segment_ids",
        ),
        (causal_linear, dict(cache=fwp.init_cache(2, 4)), "LinearAttention takes the RecurrentCache"),
        (causal_linear, dict(cache=causal_linear.init_cache(3, 4)), "holds 3 rows"),
        (causal_linear, dict(lengths=jnp.ones((2, 1), jnp.int32)), "LinearAttention: lengths"),
        (linear, dict(segment_ids=jnp.zeros((2, 3), jnp.int32)), "segment_ids"),
        (linear, dict(inputs_kv=jnp.ones((2, 4, D + 1))), "inputs_kv"),
    ]
    for layer, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            layer(x, **kwargs)
    with aj.nn.record_attention_weights(causal_linear), pytest.raises(ValueError, match="record_weights"):
        causal_linear(x, cache=causal_linear.init_cache(2, 4))
    with pytest.raises(ValueError, match="kind"):
        linear.init_cache(2, 4, kind="ring")
    assert isinstance(fwp, aj.nn.AttentionLayer) and fwp.record_weights is False
