"""generate: greedy decoding equals re-running the full model, for every cache kind; sampling filters."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.generate import sample_logits

V, D, NEW = 24, 16, 4


@functools.cache
def _lm(window=None):
    attention = functools.partial(aj.nn.MultiHeadAttention, num_heads=2, num_kv_heads=1, rope=aj.positional.RoPE(),
                                  sliding_window=window)  # fmt: skip
    return aj.nn.TransformerLM(V, D, 2, attention=attention, rngs=nnx.Rngs(0))


# One jitted forward for every oracle run: tests of the same model (and shape) reuse its compiled program.
_run = nnx.jit(lambda m, t: m(t))


def _greedy_by_full_forward(lm, prompt, lengths, forward=None):
    """The oracle: append the argmax of the last real position and re-run the whole sequence."""
    if forward is None:
        forward = lambda t: _run(lm, t)
    out = []
    for b, length in enumerate(lengths):
        seq = list(np.asarray(prompt[b, :length]))
        for _ in range(NEW):
            logits = forward(jnp.asarray(seq + [0] * (max(lengths) + NEW - len(seq)))[None])  # fixed shape
            seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
        out.append(seq[length:])
    return np.asarray(out)


PROMPT = jax.random.randint(jax.random.key(1), (2, 5), 0, V)
LENGTHS = (5, 3)


@pytest.mark.parametrize("kind,window", [("dense", None), ("paged", None), ("rolling", 2)])
def test_greedy_equals_full_forward(kind, window):
    lm = _lm(window)
    tokens = aj.generate(lm, PROMPT, max_new_tokens=NEW, prompt_lengths=jnp.asarray(LENGTHS), cache_kind=kind,
                         cache_options=dict(page_size=2))  # fmt: skip
    assert tokens.shape == (2, NEW) and tokens.dtype == jnp.int32
    np.testing.assert_array_equal(tokens, _greedy_by_full_forward(lm, PROMPT, LENGTHS))


def test_sampling_and_eos():
    lm = _lm()
    a = aj.generate(lm, PROMPT, max_new_tokens=NEW, temperature=1.0, top_k=5, rng=jax.random.key(0))
    b = aj.generate(lm, PROMPT, max_new_tokens=NEW, temperature=1.0, top_k=5, rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)  # reproducible from the key
    greedy = _greedy_by_full_forward(lm, PROMPT, (5, 5))
    eos = int(greedy[0, 1])
    stopped = np.asarray(aj.generate(lm, PROMPT, max_new_tokens=NEW, eos_id=eos))
    assert np.all(stopped[0, 1:] == eos)


def test_sample_logits_filters():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]] * 2000))
    keys = jax.random.key(0)
    top_k = np.asarray(sample_logits(logits, keys, temperature=1.0, top_k=2))
    assert set(top_k.tolist()) == {0, 1}
    freq = np.bincount(top_k, minlength=4) / len(top_k)
    np.testing.assert_allclose(freq[:2], [0.4 / 0.7, 0.3 / 0.7], atol=0.05)
    top_p = np.asarray(sample_logits(logits, keys, temperature=1.0, top_p=0.75))  # 0.4 + 0.3 < 0.75: three kept
    assert set(top_p.tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(sample_logits(logits[:1], keys, temperature=1.0, top_k=1), [0])
    np.testing.assert_array_equal(sample_logits(logits[:1], None), [0])


def test_errors():
    lm = _lm()
    with pytest.raises(ValueError, match="needs rng"):
        aj.generate(lm, PROMPT, max_new_tokens=2, temperature=0.5)
    with pytest.raises(ValueError, match=r"prompt must be integers of shape \[B, T\]"):
        aj.generate(lm, jnp.ones((2, 3)), max_new_tokens=2)
    with pytest.raises(ValueError, match="top_p must lie in"):
        aj.generate(lm, PROMPT, max_new_tokens=2, top_p=0.0)
    # A pool too small for the generation (int8 pages here): the overflow flag set under jit becomes the error.
    with pytest.raises(ValueError, match="PagedKVCache overflowed"):
        aj.generate(lm, PROMPT, max_new_tokens=NEW, cache_kind="paged", quantized=True,
                    cache_options=dict(page_size=2, num_pages=4))  # fmt: skip


class _Seq2Seq(nnx.Module):
    """A user's encoder-decoder: the encoder runs once, its output reaches every decoding step."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.encoder = aj.nn.TransformerEncoder(1, D, num_heads=2, rngs=rngs)
        self.decoder = aj.nn.TransformerDecoder(1, D, num_heads=2, rngs=rngs)

    def encode(self, source):
        return self.encoder(self.embed(source))

    def __call__(self, tokens, *, context, cache=None, lengths=None):
        out = self.decoder(self.embed(tokens), context, cache=cache, lengths=lengths)
        h, cache = out if cache is not None else (out, None)
        logits = self.embed.attend(h)
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch_size, max_length, **options):
        return self.decoder.init_cache(batch_size, max_length, **options)


def test_encoder_decoder_generates_with_model_inputs():
    model = _Seq2Seq(nnx.Rngs(0))
    source = jax.random.randint(jax.random.key(2), (2, 7), 0, V)
    context = model.encode(source)
    tokens = aj.generate(model, PROMPT, max_new_tokens=NEW, prompt_lengths=jnp.asarray(LENGTHS),
                         model_inputs={"context": context})  # fmt: skip
    run = nnx.jit(lambda m, t, c: m(t, context=c))
    expected = [  # the oracle runs one row (and its own encoder output) at a time
        _greedy_by_full_forward(None, PROMPT[b : b + 1], LENGTHS[b : b + 1],
                                forward=lambda t, b=b: run(model, t, context[b : b + 1]))  # fmt: skip
        for b in range(2)
    ]
    np.testing.assert_array_equal(tokens, np.concatenate(expected))
