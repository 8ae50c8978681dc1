"""Autoregressive generation: prefill the prompt into a cache, then decode under a ``jax.lax`` loop.

``generate`` works with any model called as ``model(tokens, cache=cache, lengths=lengths) ->
(logits, cache)`` that has ``model.init_cache(batch_size, max_length, kind=..., quantized=...)``,
such as :class:`attention_jax.nn.TransformerLM` (any attention layer that decodes, see
:class:`attention_jax.nn.AttentionLayer`). An encoder-decoder passes its encoder output through
``model_inputs`` (e.g. ``{"context": encoder_out}``), given to every call of the model. A model
whose call also takes ``logits_at=[B, P]`` (token indices; ``TransformerLM`` does) gets the prefill's
last token per row only, instead of computing logits for the whole prompt.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

__all__ = ["generate", "sample_logits"]


def sample_logits(
    logits: Array,
    rng: Array | None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Array:
    """Pick one token per row of ``logits [B, V]``: greedy at ``temperature == 0``, else sample.

    ``top_k`` keeps the k most likely tokens; ``top_p`` the smallest set whose probability
    reaches p (nucleus sampling; the most likely token is always kept).

    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    >>> sample_logits(logits, None).tolist()
    [0]
    >>> sorted({int(sample_logits(logits, jax.random.key(i), temperature=1.0, top_p=0.7)[0]) for i in range(50)})
    [0, 1]
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        keep = before < top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model: nnx.Module,
    prompt: Array,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    rng: Array | None = None,
    prompt_lengths: Array | None = None,
    eos_id: int | None = None,
    cache_kind: str = "dense",
    quantized: bool = False,
    cache_options: dict[str, Any] | None = None,
    model_inputs: dict[str, Any] | None = None,
) -> Array:
    """Generate ``max_new_tokens`` tokens after ``prompt [B, T]``.

    Args:
      model: see the module docstring; run in eval mode (no dropout) and without recording.
      prompt: int ``[B, T]``, right-padded when ``prompt_lengths`` is given.
      max_new_tokens: how many tokens to generate.
      temperature, top_k, top_p: see :func:`sample_logits` (``temperature=0``: greedy).
      rng: a PRNG key, needed when ``temperature > 0``.
      prompt_lengths: ``[B]`` real prompt tokens per row (default all ``T``); each row continues
        from its own length, at its own positions.
      eos_id: once a row emits it, the row's later tokens are ``eos_id`` too.
      cache_kind, quantized, cache_options: the caches (``model.init_cache(B, T + max_new_tokens,
        kind=cache_kind, quantized=quantized, **cache_options)``).
      model_inputs: more keyword arguments (arrays, or pytrees of them) for every call of the model:
        an encoder-decoder's encoder output (``{"context": encoder_out, "context_lengths": n}``),
        computed once and read at every step.

    Returns:
      ``[B, max_new_tokens]`` int32.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> lm = aj.nn.TransformerLM(16, 16, 1, num_heads=2, rngs=nnx.Rngs(0))
    >>> aj.generate(lm, jnp.zeros((2, 3), jnp.int32), max_new_tokens=4).shape
    (2, 4)
    """
    if jnp.ndim(prompt) != 2 or not jnp.issubdtype(jnp.result_type(prompt), jnp.integer):
        raise ValueError(f"prompt must be integers of shape [B, T], got {jnp.result_type(prompt)} {jnp.shape(prompt)}.")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens=!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature=}.")
    if temperature > 0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...).")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer, got {top_k=!r}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p=}.")
    b, t = prompt.shape
    lengths = jnp.full((b,), t, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape [B]=[{b}], got prompt_lengths.shape={lengths.shape}.")
    cache = model.init_cache(b, t + max_new_tokens, kind=cache_kind, quantized=quantized, **(cache_options or {}))

    # A copy of the model in eval mode without recording: dropout off, nothing sown in the loop.
    frozen = nnx.merge(*nnx.split(model))
    frozen.eval()
    frozen.set_attributes(record_weights=False, raise_if_not_found=False)
    graphdef, state = nnx.split(frozen)
    rng = jax.random.key(0) if rng is None else rng
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    # A model that can compute the logits of chosen tokens only (TransformerLM's logits_at) prefills
    # without the [B, T, V] logits of the whole prompt.
    last_only = "logits_at" in inspect.signature(type(model).__call__).parameters
    tokens, cache = _generate(
        graphdef, state, prompt, lengths, cache, rng, dict(model_inputs or {}), max_new_tokens=max_new_tokens,
        eos_id=eos_id, last_only=last_only, **sampling,
    )  # fmt: skip
    for layer_cache in jax.tree.leaves(cache, is_leaf=lambda c: hasattr(c, "check")):
        layer_cache.check()
    return tokens


_STATIC = ("graphdef", "max_new_tokens", "eos_id", "last_only", "temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate(graphdef, state, prompt, lengths, cache, rng, model_inputs, *, max_new_tokens, eos_id, last_only,
              **sampling):  # fmt: skip
    b = prompt.shape[0]

    def step(tokens, cache, lengths, **kwargs):
        model = nnx.merge(graphdef, state)
        return model(tokens, cache=cache, lengths=lengths, **model_inputs, **kwargs)  # [B, T, V]

    last_at = (jnp.maximum(lengths, 1) - 1)[:, None]  # [B, 1]: each row's last prompt token
    if last_only:
        logits, cache = step(prompt, cache, lengths, logits_at=last_at)  # prefill, [B, 1, V]
        last = logits[:, 0]
    else:
        logits, cache = step(prompt, cache, lengths)  # prefill, [B, T, V]
        last = jnp.take_along_axis(logits, last_at[..., None], axis=1)[:, 0]  # [B, V]
    rng, sub = jax.random.split(rng)
    first = sample_logits(last, sub, **sampling)  # [B]
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id

    def body(i, carry):
        out, token, cache, rng, done = carry
        logits, cache = step(token[:, None], cache, None)  # [B, 1, V]
        rng, sub = jax.random.split(rng)
        token = sample_logits(logits[:, 0], sub, **sampling)
        if eos_id is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        return out.at[:, i].set(token), token, cache, rng, done

    out, _, cache, _, _ = jax.lax.fori_loop(1, max_new_tokens, body, (out, first, cache, rng, done))
    return out, cache
