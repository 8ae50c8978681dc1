"""The attention modules of ``aj.nn`` and what each promises under the layer protocol (the test matrix's rows).

Shared by ``test_protocol_matrix_*.py`` (split in two files so that pytest-xdist runs them on both cores).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import attention_jax as aj

V, D, T = 32, 16, 16  # vocabulary, width, sequence length of every row of the matrix
DOCS = (6, 10)  # a packed row: two documents of these lengths


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    factory: Callable
    decodes: bool = True  # causal decoding with a cache
    causal: bool = True  # runs under the LM's causal mask; else the LM is built with masks.full()
    segments: str = "equal"  # "equal": packed == documents one by one; "isolated": no flow across; "raises"


def _p(cls, **kw):
    return functools.partial(cls, **kw)


ROWS = [
    Row("MultiHeadAttention", _p(aj.nn.MultiHeadAttention, num_heads=2, num_kv_heads=1, rope=aj.positional.RoPE())),
    Row("DifferentialAttention", _p(aj.nn.DifferentialAttention, num_heads=2, rope=aj.positional.RoPE())),
    Row(
        "MultiHeadLatentAttention",
        _p(aj.nn.MultiHeadLatentAttention, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4,
           v_head_dim=8),
    ),  # fmt: skip
    Row("LinearAttention", _p(aj.nn.LinearAttention, num_heads=2, chunk_size=4)),
    Row("FastWeightProgrammer", _p(aj.nn.FastWeightProgrammer, num_heads=2, chunk_size=4)),
    Row("Performer", _p(aj.nn.Performer, num_heads=2, num_features=16, chunk_size=4)),
    Row("Linformer", _p(aj.nn.Linformer, num_heads=2, max_length=T, projected_length=4), False, False, "raises"),
    Row("Nystromformer", _p(aj.nn.Nystromformer, num_heads=2, num_landmarks=4), False, False, "raises"),
    # Translation-invariant patterns: a packed document gets exactly its own result.
    Row("LongformerAttention", _p(aj.nn.LongformerAttention, num_heads=2, window=3, rope=aj.positional.RoPE())),
    Row("SparseTransformerAttention", _p(aj.nn.SparseTransformerAttention, num_heads=2, pattern="strided", stride=4)),
    # BigBird's blocks sit at absolute positions of the packed row: documents stay isolated.
    Row("BigBirdAttention", _p(aj.nn.BigBirdAttention, num_heads=2, block=4, max_length=T), segments="isolated"),
    Row(
        "NativeSparseAttention",
        _p(aj.nn.NativeSparseAttention, num_heads=2, num_kv_heads=1, compress_block=4, compress_stride=2,
           select_block=4, num_selected=2, window=4),
        segments="raises",
    ),  # fmt: skip
    Row("PositionalAttention", _p(aj.nn.PositionalAttention, num_heads=2, max_length=T, gated=True)),
    # State-space layers: the same protocol, a constant-size cache (convolution window and scan state).
    Row("Mamba", _p(aj.nn.Mamba, state_dim=4)),
    Row("Mamba2", _p(aj.nn.Mamba2, head_dim=8, state_dim=4, chunk_size=4)),
]
BY_NAME = {row.name: row for row in ROWS}


def model(row: Row, seed: int = 0, num_layers: int = 1) -> aj.nn.TransformerLM:
    """A tiny LM around the row's module, untied so the logits do not echo the embedding."""
    mask = None if row.causal else aj.masks.full()
    return aj.nn.TransformerLM(
        V, D, num_layers, attention=row.factory, mask=mask, num_heads=2, tie_embeddings=False, rngs=nnx.Rngs(seed)
    )


def tokens(seed: int, b: int = 2, t: int = T) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def loss_fn(lm, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(lm(x), y).mean()


def train_step_lowers_loss(row: Row) -> tuple[float, float]:
    """Two jitted optax steps on a copy task (predict the previous token): the loss before and after the first."""
    lm = model(row)
    opt = nnx.Optimizer(lm, optax.adam(3e-2), wrt=nnx.Param)
    x = tokens(1)
    y = jnp.roll(x, 1, axis=1)

    @nnx.jit
    def step(lm, opt, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(lm, x, y)
        opt.update(lm, grads)
        return loss, grads

    before, grads = step(lm, opt, x, y)
    grads = [np.asarray(leaf) for leaf in jax.tree.leaves(grads)]  # numpy: no eager op per leaf shape
    for leaf in grads:
        assert np.all(np.isfinite(leaf))
    assert any(np.abs(g).max() > 0 for g in grads), "no gradient reaches the parameters"
    after, _ = step(lm, opt, x, y)  # the loss of the updated model (one compilation for both)
    return float(before), float(after)


def packed_and_separate(row: Row):
    """Logits of a packed row (two documents) and of the documents run one by one, concatenated."""
    lm = model(row)
    x = tokens(2, b=1)
    seg = jnp.asarray(np.repeat(np.arange(len(DOCS)), DOCS))[None]
    bounds = np.cumsum((0,) + DOCS)

    @nnx.jit  # one program for the packed row and the documents
    def run(m, t, s):
        packed = m(t, segment_ids=s)  # first: a module that refuses segment_ids raises here
        separate = [m(t[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return packed, jnp.concatenate(separate, axis=1)

    return run(lm, x, seg)


def cross_document_gradient(row: Row) -> float:
    """Largest gradient of the first document's logits with respect to the second document's embeddings."""
    lm = model(row)
    x = tokens(3, b=1)
    seg = jnp.asarray(np.repeat(np.arange(len(DOCS)), DOCS))[None]
    emb = lm.embed(x)

    def first_doc(e):
        h = lm.stack.run(e, mask=lm.mask, segment_ids=seg)
        return lm.head(h)[:, : DOCS[0]].sum()

    g = jax.jit(jax.grad(first_doc))(emb)
    return float(jnp.abs(g[:, DOCS[0] :]).max())


def decode_against_full(row: Row, prompt_lengths=(5, 9), steps: int = 4):
    """Prefill right-padded prompts of different lengths, decode ``steps`` tokens one at a time, and
    return ``(decoded logits [B, steps + 1, V], full-forward logits at the same positions)``."""
    lm = model(row)
    b = len(prompt_lengths)
    x = tokens(4, b=b)
    lengths = jnp.asarray(prompt_lengths, jnp.int32)
    prompt = x[:, : max(prompt_lengths)]
    rows = jnp.arange(b)

    @nnx.jit  # one program: the full forward, the prefill and the decode step (traced once, in a scan)
    def run(m, x, prompt, lengths):
        logits, cache = m(prompt, cache=m.init_cache(b, T), lengths=lengths)

        def step(cache, i):
            logits, cache = m(x[rows, lengths + i][:, None], cache=cache)
            return cache, logits[:, 0]

        _, decoded = jax.lax.scan(step, cache, jnp.arange(steps))
        return logits[rows, lengths - 1], jnp.moveaxis(decoded, 0, 1), m(x)

    first, decoded, full = run(lm, x, prompt, lengths)
    positions = lengths[:, None] - 1 + jnp.arange(steps + 1)[None]
    return jnp.concatenate([first[:, None], decoded], axis=1), full[rows[:, None], positions]


# -- the checks, one per column of the matrix ----------------------------------------------------


def _raises_naming(row: Row, argument: str, fn) -> None:
    import pytest

    with pytest.raises(ValueError, match=rf"{row.factory.func.__name__}.*{argument}|{argument}.*"
                       rf"{row.factory.func.__name__}"):  # fmt: skip
        fn()


def check_trains(row: Row) -> None:
    before, after = train_step_lowers_loss(row)
    assert np.isfinite(before) and after < before, (row.name, before, after)


def check_segments(row: Row) -> None:
    if row.segments == "raises":
        _raises_naming(row, "segment_ids", lambda: packed_and_separate(row))
        return
    if row.segments == "equal":  # equal results imply isolation
        packed, separate = packed_and_separate(row)
        np.testing.assert_allclose(np.asarray(packed), np.asarray(separate), atol=2e-5, rtol=2e-5)
    else:
        assert cross_document_gradient(row) == 0.0


def check_decoding(row: Row) -> None:
    if not row.decodes:
        _raises_naming(row, "cache|decode", lambda: model(row).init_cache(2, T))
        return
    decoded, full = decode_against_full(row)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(full), atol=5e-5, rtol=5e-5)
