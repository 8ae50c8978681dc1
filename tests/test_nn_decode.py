"""Decoding equals the full forward: prefill + one token at a time, every module, every cache kind.

Two sequences of different lengths share the batch: the prefill is right-padded with noise (which
must not leak) and each sequence continues from its own length, at its own positions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj

D = 16
PROMPT = (5, 3)  # real prompt lengths of the two sequences
STEPS = 2
WINDOW = 3
# int8 K/V with per-token-per-head scales: outputs agree to this fraction of their largest magnitude.
INT8_RTOL = 3e-2


def _mha(window):
    return aj.nn.MultiHeadAttention(
        D, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(), qk_norm=True, alibi=True, relative_buckets=8,
        relative_max_distance=16, relative_bidirectional=False, softcap=20.0, sinks=True, mask=aj.masks.causal(),
        sliding_window=window, rngs=nnx.Rngs(0),
    )  # fmt: skip


def _mla(window):
    return aj.nn.MultiHeadLatentAttention(
        D, num_heads=4, kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
        mask=aj.masks.causal(), sliding_window=window, rngs=nnx.Rngs(1),
    )  # fmt: skip


def _differential(window):
    return aj.nn.DifferentialAttention(
        D, num_heads=2, num_kv_heads=1, depth=2, rope=aj.positional.RoPE(), mask=aj.masks.causal(),
        sliding_window=window, rngs=nnx.Rngs(2),
    )  # fmt: skip


MODULES = {"mha": _mha, "mla": _mla, "differential": _differential}
# Every module with every cache kind; int8 once per kind.
CASES = [
    ("mha", "dense", False),
    ("mha", "paged", True),
    ("mha", "rolling", False),
    ("mla", "dense", True),
    ("mla", "paged", False),
    ("mla", "rolling", False),
    ("differential", "dense", False),
    ("differential", "paged", False),
    ("differential", "rolling", True),
]


@functools.partial(nnx.jit, static_argnames=("kind", "quantized"))
def _full_and_decode(module, seq, prompt, *, kind, quantized):
    """One compiled program: the full forward, the padded prefill and STEPS single-token steps."""
    b = seq.shape[0]
    lengths = jnp.asarray(PROMPT, jnp.int32)
    full = module(seq)  # [B, P + STEPS, D]
    # Paged: 7 pages of 2 tokens shared by sequences needing 4 and 3, fewer than 2 x 4.
    cache = module.init_cache(b, max(PROMPT) + STEPS, kind=kind, quantized=quantized, page_size=2, num_pages=7)
    first, cache = module(prompt, cache=cache, lengths=lengths)
    steps = []
    for j in range(STEPS):
        token = jnp.take_along_axis(seq, (lengths + j)[:, None, None], axis=1)  # [B, 1, D]
        y, cache = module(token, cache=cache)
        steps.append(y[:, 0])
    return full, first, jnp.stack(steps, axis=1), cache


@pytest.mark.parametrize("name,kind,quantized", CASES)
def test_decode_equals_full_forward(name, kind, quantized):
    module = MODULES[name](WINDOW if kind == "rolling" else None)
    seq = jax.random.normal(jax.random.key(3), (2, max(PROMPT) + STEPS, D))
    prompt = seq[:, : max(PROMPT)]
    noise = 10.0 * jax.random.normal(jax.random.key(4), prompt.shape)
    real = jnp.arange(max(PROMPT))[None, :, None] < jnp.asarray(PROMPT)[:, None, None]
    prompt = jnp.where(real, prompt, noise)  # padding that must not leak

    full, first, steps, cache = _full_and_decode(module, seq, prompt, kind=kind, quantized=quantized)
    cache.check()
    full = np.asarray(full)
    scale = float(np.max(np.abs(full)))
    tol = dict(atol=INT8_RTOL * scale, rtol=0) if quantized else dict(atol=2e-5, rtol=2e-5)
    for b, length in enumerate(PROMPT):
        np.testing.assert_allclose(first[b, :length], full[b, :length], **tol)
        np.testing.assert_allclose(steps[b], full[b, length : length + STEPS], **tol)
    if name == "mla":
        assert cache.elements_per_token == 8 + 2  # kv_lora_rank + qk_rope_head_dim, for 4 heads


def test_rolling_cache_is_the_window():
    module = _mha(WINDOW)
    cache = module.init_cache(1, 100, kind="rolling")
    assert cache.storage.keys.shape[1] == WINDOW  # memory independent of max_length
