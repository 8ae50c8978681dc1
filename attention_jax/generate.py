"""Autoregressive generation: prefill the prompt into a cache, then decode under a ``jax.lax`` loop.

``generate`` works with any model called as ``model(tokens, cache=cache, lengths=lengths) ->
(logits, cache)`` that has ``model.init_cache(batch_size, max_length, kind=..., quantized=...)``,
such as :class:`attention_jax.nn.TransformerLM` (any attention layer that decodes, see
:class:`attention_jax.nn.AttentionLayer`). An encoder-decoder passes its encoder output through
``model_inputs`` (e.g. ``{"context": encoder_out}``), given to every call of the model. A model
whose call also takes ``logits_at=[B, P]`` (token indices; ``TransformerLM`` does) gets the prefill's
last token per row only, instead of computing logits for the whole prompt.

**Speculative decoding** (``draft=``, greedy only): a cheaper draft model proposes
``num_draft_tokens = d`` tokens one at a time; the target reads the last token and the ``d`` drafts
in ONE call (``d + 1`` query rows through its caches), keeps the longest run of drafts that equal its
own greedy choices plus its next token after them, and rolls the rejected ones back out of both
models' caches (``cache.rollback``). The tokens are those of plain greedy decoding; each target call
yields 1 to ``d + 1`` of them. Rolling caches get ``max_rollback=d`` extra slots. Caches that cannot
roll back (the recurrent state of linear-attention and state-space layers: the state before the
rejected tokens is gone) are handled by keeping the cache from before the block and re-reading the
accepted tokens into it: one more call per block for that model.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax.cache import RollingKVCache

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
    quantized: bool | str = False,
    cache_options: dict[str, Any] | None = None,
    model_inputs: dict[str, Any] | None = None,
    draft: nnx.Module | None = None,
    num_draft_tokens: int = 4,
    return_stats: bool = False,
) -> Array | tuple[Array, dict[str, int]]:
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
        kind=cache_kind, quantized=quantized, **cache_options)``; ``quantized``: False, True/``"int8"``
        or ``"fp8"``). With a draft, both models' caches hold ``num_draft_tokens`` more.
      model_inputs: more keyword arguments (arrays, or pytrees of them) for every call of the model:
        an encoder-decoder's encoder output (``{"context": encoder_out, "context_lengths": n}``),
        computed once and read at every step.
      draft: a draft model (called and cached like ``model``, same vocabulary) for speculative
        decoding (see the module docstring); greedy only (``temperature=0``).
      num_draft_tokens: d, the tokens the draft proposes per target call.
      return_stats: also return ``{"target_calls", "draft_calls", "accepted"}``: the calls of each
        model (prefill included) and the draft tokens accepted, summed over rows.

    Returns:
      ``[B, max_new_tokens]`` int32 (and the stats when ``return_stats``).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> lm = aj.nn.TransformerLM(16, 16, 1, num_heads=2, rngs=nnx.Rngs(0))
    >>> aj.generate(lm, jnp.zeros((2, 3), jnp.int32), max_new_tokens=4).shape
    (2, 4)
    >>> draft = aj.nn.TransformerLM(16, 8, 1, num_heads=1, rngs=nnx.Rngs(1))
    >>> fast, stats = aj.generate(lm, jnp.zeros((2, 3), jnp.int32), max_new_tokens=4, draft=draft,
    ...                           num_draft_tokens=2, return_stats=True)
    >>> bool((fast == aj.generate(lm, jnp.zeros((2, 3), jnp.int32), max_new_tokens=4)).all())
    True
    >>> 2 <= stats["target_calls"] <= 4
    True
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
    if draft is not None:
        if temperature != 0.0:
            raise ValueError(
                f"speculative decoding (draft=) is greedy only: it needs temperature=0, got {temperature=}."
            )
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be a positive integer, got {num_draft_tokens=!r}.")
    b, t = prompt.shape
    lengths = jnp.full((b,), t, jnp.int32) if prompt_lengths is None else jnp.asarray(prompt_lengths, jnp.int32)
    if lengths.shape != (b,):
        raise ValueError(f"prompt_lengths must have shape [B]=[{b}], got prompt_lengths.shape={lengths.shape}.")
    # A speculative block holds d tokens more than the target keeps.
    extra = 0 if draft is None else num_draft_tokens
    options = dict(kind=cache_kind, quantized=quantized, **(cache_options or {}))
    cache = _allow_rollback(model.init_cache(b, t + max_new_tokens + extra, **options), extra)
    graphdef, state = _frozen(model)
    rng = jax.random.key(0) if rng is None else rng
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    # A model that can compute the logits of chosen tokens only (TransformerLM's logits_at) prefills
    # without the [B, T, V] logits of the whole prompt.
    last_only = "logits_at" in inspect.signature(type(model).__call__).parameters
    model_inputs = dict(model_inputs or {})
    if draft is None:
        tokens, cache = _generate(
            graphdef, state, prompt, lengths, cache, rng, model_inputs, max_new_tokens=max_new_tokens,
            eos_id=eos_id, last_only=last_only, **sampling,
        )  # fmt: skip
        caches = (cache,)
        stats = dict(target_calls=max_new_tokens, draft_calls=0, accepted=0)
    else:
        draft_cache = _allow_rollback(draft.init_cache(b, t + max_new_tokens + extra, **options), extra)
        draft_graphdef, draft_state = _frozen(draft)
        tokens, caches, counts = _speculate(
            (graphdef, draft_graphdef), (state, draft_state), prompt, lengths, (cache, draft_cache), model_inputs,
            max_new_tokens=max_new_tokens, num_draft=num_draft_tokens, last_only=last_only,
            rerun=(not _can_rollback(cache), not _can_rollback(draft_cache)),
        )  # fmt: skip
        if eos_id is not None:  # greedy tokens are what they are: stop each row after its first eos
            tokens = jnp.where(jnp.cumsum(tokens == eos_id, axis=1) - (tokens == eos_id) > 0, eos_id, tokens)
        stats = dict(zip(("target_calls", "draft_calls", "accepted"), (int(c) for c in counts), strict=True))
    for layer_cache in jax.tree.leaves(caches, is_leaf=_is_cache):
        layer_cache.check()
    return (tokens, stats) if return_stats else tokens


def _frozen(model: nnx.Module):
    """A copy of the model in eval mode without recording (dropout off, nothing sown in the loop), split."""
    frozen = nnx.merge(*nnx.split(model))
    frozen.eval()
    frozen.set_attributes(record_weights=False, raise_if_not_found=False)
    return nnx.split(frozen)


def _is_cache(x) -> bool:
    return hasattr(x, "check")


def _can_rollback(cache) -> bool:
    """Whether every layer's cache can take ``rollback`` (KV caches can, recurrent states cannot)."""
    return all(hasattr(c, "rollback") for c in jax.tree.leaves(cache, is_leaf=_is_cache))


def _allow_rollback(cache, n: int):
    """The caches with every (empty) rolling cache given ``max_rollback=n`` extra slots."""
    if n == 0:
        return cache

    def widen(c):
        if not isinstance(c, RollingKVCache):
            return c
        st = c.storage
        return RollingKVCache.create(
            c.batch_size, c.window, num_kv_heads=st.num_kv_heads, head_dim=st.head_dim,
            value_head_dim=st.value_head_dim, dtype=st.dtype, quantized=st.quantization or False,
            max_rollback=max(n, c.max_rollback),
        )  # fmt: skip

    return jax.tree.map(widen, cache, is_leaf=_is_cache)


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


@functools.partial(jax.jit, static_argnames=("graphdefs", "max_new_tokens", "num_draft", "last_only", "rerun"))
def _speculate(graphdefs, states, prompt, lengths, caches, model_inputs, *, max_new_tokens, num_draft, last_only,
               rerun):  # fmt: skip
    """Greedy speculative decoding: returns ``(tokens [B, M], caches, (target calls, draft calls, accepted))``."""
    b, m, d = prompt.shape[0], max_new_tokens, num_draft
    rows = jnp.arange(b)

    def call(which, tokens, cache, lengths, **kwargs):
        model = nnx.merge(graphdefs[which], states[which])
        return model(tokens, cache=cache, lengths=lengths, **model_inputs, **kwargs)  # [B, T, V]

    # Prefill both models; the target's greedy token after the prompt is the first output.
    last_at = (jnp.maximum(lengths, 1) - 1)[:, None]  # [B, 1]
    if last_only:
        logits, target_cache = call(0, prompt, caches[0], lengths, logits_at=last_at)
        first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
    else:
        logits, target_cache = call(0, prompt, caches[0], lengths)
        first = jnp.argmax(jnp.take_along_axis(logits, last_at[..., None], axis=1)[:, 0], axis=-1).astype(jnp.int32)
    _, draft_cache = call(1, prompt, caches[1], lengths)
    out = jnp.zeros((b, m), jnp.int32).at[:, 0].set(first)
    # The caches hold every output but the last, ``token``, which the next block starts with.
    count = jnp.ones((b,), jnp.int32)  # [B] outputs so far
    counters = jnp.array([1, 1, 0], jnp.int32)  # target calls, draft calls, accepted drafts

    def keep_accepted(which, cache, before, block, kept, active):
        """The cache holding the block's first ``kept [B]`` tokens, and whether the model was called again: roll
        back the rest, or (a cache that cannot) re-read the kept tokens into the cache from before the block."""
        rejected = jnp.where(active, block.shape[1] - kept, 0)
        if not rerun[which]:
            return jax.tree.map(lambda c: c.rollback(rejected), cache, is_leaf=_is_cache), 0
        reread = lambda: call(which, block, before, jnp.where(active, kept, 0))[1]
        if which == 1:  # the draft has not read its last proposal: it always reads the block again
            return reread(), 1
        # The target already holds the whole block when nothing was rejected.
        again = jnp.any(rejected > 0)
        return jax.lax.cond(again, reread, lambda: cache), again.astype(jnp.int32)

    def body(carry):
        out, count, token, target_cache, draft_cache, counters = carry
        active = count < m  # [B]
        one = active.astype(jnp.int32)

        def draft_step(i, inner):
            x, cache, drafts = inner
            logits, cache = call(1, x[:, None], cache, one)  # [B, 1, V]
            x = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            return x, cache, drafts.at[:, i].set(x)

        drafts = jnp.zeros((b, d), jnp.int32)
        _, new_draft_cache, drafts = jax.lax.fori_loop(0, d, draft_step, (token, draft_cache, drafts))
        block = jnp.concatenate([token[:, None], drafts], axis=1)  # [B, d + 1]
        if not rerun[1]:  # the draft reads its last proposal too, so that it holds the same block as the target
            _, new_draft_cache = call(1, drafts[:, -1:], new_draft_cache, one)

        # Verify: the target reads the whole block in one call; greedy[:, i] follows block[:, :i + 1].
        logits, new_target_cache = call(0, block, target_cache, jnp.where(active, d + 1, 0))  # [B, d + 1, V]
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, d + 1]
        agree = jnp.cumprod((drafts == greedy[:, :d]).astype(jnp.int32), axis=1)  # [B, d]
        accepted = jnp.where(active, jnp.sum(agree, axis=1), 0)  # [B] drafts kept
        # Outputs: the accepted drafts (equal to greedy) and the target's token after them.
        j = jnp.arange(d + 1, dtype=jnp.int32)[None, :]
        slot = jnp.where(active[:, None] & (j <= accepted[:, None]), count[:, None] + j, m)  # m: dropped
        out = out.at[rows[:, None], slot].set(greedy, mode="drop")
        token = jnp.where(active, greedy[rows, accepted], token)
        count = count + jnp.where(active, accepted + 1, 0)

        target_cache, target_rerun = keep_accepted(0, new_target_cache, target_cache, block, accepted + 1, active)
        draft_cache, _ = keep_accepted(1, new_draft_cache, draft_cache, block, accepted + 1, active)
        counters = counters + jnp.array([1 + target_rerun, d + 1, 0], jnp.int32)
        counters = counters.at[2].add(jnp.sum(accepted))
        return out, count, token, target_cache, draft_cache, counters

    carry = (out, count, first, target_cache, draft_cache, counters)
    out, _, _, target_cache, draft_cache, counters = jax.lax.while_loop(
        lambda carry: jnp.any(carry[1] < m), body, carry
    )
    return out, (target_cache, draft_cache), counters
