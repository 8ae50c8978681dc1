"""The flash kernels (interpret mode) on what a MaskSpec carries beyond a mask function.

Per-sequence positions with a ``[B, nq, nk]`` block map, per-head boolean arrays (with softcap),
score mods with per-head parameters (ALiBi, a T5-style bucket table, a tanh cap, a parameter-free
user function), dropout, and NaNs in key/value rows no query may see. Every case runs the Triton
body (a subset also the Mosaic TPU body) against ``flash_attention_reference`` with the same spec
and seed: outputs, lse and gradients of q, k, v and the score parameters, at the per-dtype
tolerances of ``tests/helpers.py``. Lengths are not multiples of any block and heads are grouped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, naive_attention, random_qkv

from pallas_kernels import mask_info
from pallas_kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
    flash_backward,
    flash_forward,
)

B = 2
BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
SPEC_BLOCK = 8  # tiles the spec's block map is built for (resampled by the kernels)
f32 = jnp.float32


# -- score mods (MaskSpec.score_fn contract: elementwise, after scale * q.k + bias) -----------------


def alibi(score, batch, head, q_pos, kv_pos, params):
    return score + params[0] * (kv_pos - q_pos).astype(f32)


def t5_buckets(score, batch, head, q_pos, kv_pos, params):
    """A relative-position table: one per-head parameter per bucket, selected by a where-chain."""
    d = kv_pos - q_pos
    bias = jnp.where(d < -8, params[0], jnp.where(d < 0, params[1], jnp.where(d == 0, params[2], params[3])))
    return score + bias


def tanh_cap(score, batch, head, q_pos, kv_pos, params):
    return params[0] * jnp.tanh(score / params[0])


def user_fn(score, batch, head, q_pos, kv_pos, params):  # no parameters: batch, head and positions only
    return score - 0.05 * jnp.abs(kv_pos - q_pos).astype(f32) + 0.3 * (head % 2).astype(f32) + 0.2 * batch


def score_mod(name: str, n: int):
    """``(score_fn, score_params)`` of a named mod for ``n`` query heads."""
    heads = jnp.arange(1, n + 1, dtype=f32)
    if name == "alibi":
        return alibi, (0.1 * heads,)  # slopes: older keys lose score
    if name == "t5":
        return t5_buckets, tuple(jnp.sin(heads + i) for i in range(4))
    if name == "tanh":
        return tanh_cap, (1.5 + heads,)
    if name == "user":
        return user_fn, ()
    return None, ()


# -- cases -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    heads: tuple[int, int] = (4, 2)  # (N, K)
    lengths: tuple[int, int] = (24, 40)  # (T, S)
    dtype: object = f32
    window: int | None = None  # a sliding window on top of the causal mask (None: causal only)
    per_sequence: bool = False  # q positions [B, T] (per-sequence offsets), block map [B, nq, nk]
    array: str | None = None  # "head": a per-head [B, N, T, S] array; "shared": [1, 1, T, S]
    softcap: float | None = None
    score: str | None = None
    dropout: float = 0.0
    nan_keys: int = 0  # the last keys are invisible to every query and hold NaN in K and V


CASES = [
    Case("per_sequence_window", (4, 2), (37, 45), per_sequence=True, window=13),
    Case("per_sequence_bf16", (4, 1), (24, 40), dtype=jnp.bfloat16, per_sequence=True),
    Case("array_head_softcap", (4, 2), (24, 40), array="head", softcap=2.0),
    Case("array_shared_bf16", (2, 2), (37, 21), dtype=jnp.bfloat16, array="shared"),
    Case("alibi", (4, 2), (37, 45), score="alibi", window=20),
    Case("t5_per_sequence", (4, 2), (24, 40), score="t5", per_sequence=True),
    Case("tanh_bf16", (4, 1), (24, 40), dtype=jnp.bfloat16, score="tanh"),
    Case("user_softcap_array", (4, 2), (24, 40), score="user", softcap=3.0, array="head"),
    Case("dropout", (4, 2), (37, 45), dropout=0.3),
    Case("dropout_alibi_bf16", (4, 2), (24, 40), dtype=jnp.bfloat16, dropout=0.2, score="alibi"),
    Case("nan_behind_mask", (4, 2), (24, 40), nan_keys=5, softcap=4.0, score="alibi"),
    Case("nan_per_sequence_dropout", (4, 1), (24, 40), nan_keys=5, per_sequence=True, dropout=0.25),
]
# The TPU interpreter runs each grid step (B x K x row tiles x key tiles, per kernel) in Python: the
# subset's queries are no longer than it takes to keep 2+ row tiles in every kernel (64 padded rows),
# and where nothing is per key/value head, one key/value head (the per-head array, dropout's per-head
# bits and the ALiBi slopes still see two).
TPU_CASES = {
    "per_sequence_window": dict(heads=(2, 1), lengths=(29, 45)),
    "array_head_softcap": {},
    "t5_per_sequence": dict(heads=(2, 1)),
    "dropout": dict(lengths=(29, 45)),
    "nan_behind_mask": {},
}


def _spec(case: Case) -> mask_info.MaskSpec:
    """The case's MaskSpec with an exact block map built from its dense mask."""
    (n, _), (t, s) = case.heads, case.lengths
    offset, window, visible_keys = s - t, case.window, s - case.nan_keys

    def fn(q_pos, kv_pos, q_vals, kv_vals):
        out = (kv_pos <= q_pos + offset) & (kv_pos < visible_keys)
        return out if window is None else out & (kv_pos > q_pos + offset - window)

    q_pos, kv_pos = jnp.arange(t, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32)
    if case.per_sequence:  # sequence 1: queries 7 positions behind, keys 2 ahead (sees fewer keys)
        q_pos, kv_pos = jnp.stack([q_pos, q_pos - 7]), jnp.stack([kv_pos, kv_pos + 2])
    array = None
    if case.array is not None:
        shape = (B, n, t, s) if case.array == "head" else (1, 1, t, s)
        array = np.random.default_rng(11).random(shape) > 0.3
        array = jnp.asarray(array & (np.arange(s) < 30))  # whole key tiles hidden by the array: EMPTY for the kernels
    score_fn, params = score_mod(case.score, n)
    spec = mask_info.MaskSpec(
        fn, jnp.zeros((1, 1), jnp.int32), q_pos, kv_pos, block_q=SPEC_BLOCK,
        block_k=SPEC_BLOCK, score_fn=score_fn, score_params=params, array=array,
    )  # fmt: skip
    dense = np.asarray(spec.dense(B))  # [Bm, Nm, T, S]
    block_map = mask_info.shared_block_map(dense, SPEC_BLOCK, SPEC_BLOCK, axis=1)  # [Bm, nq, nk]
    return dataclasses.replace(spec, block_map=jnp.asarray(block_map, jnp.int32))


def _inputs(case: Case):
    (n, k), (t, s) = case.heads, case.lengths
    q, key, v = random_qkv(3, b=B, t=t, s=s, n=n, k=k, h=32, dtype=case.dtype, host=True)
    return q, *_set_last_keys(case, key, v, value=np.nan)


def _set_last_keys(case: Case, *arrays, value):
    """``arrays`` [B, S, ...] with the last ``case.nan_keys`` keys set to ``value`` (set in numpy: no compile)."""
    if not case.nan_keys:
        return arrays
    out = tuple(np.array(x) for x in arrays)
    for x in out:
        x[:, x.shape[1] - case.nan_keys :] = value
    return tuple(jnp.asarray(x) for x in out)


def _jit(f, *args):
    """``jax.jit(f)(*args)`` compiled by XLA at optimisation level 0.

    Interpret mode turns each kernel into XLA loops that are run once, for their values: skipping
    the backend optimisations roughly halves the compile time, which dominates these tests (the
    loop emitters that tests/conftest.py selects take off more).
    """
    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": "0"})(*args)


def _loss_and_grads(run, spec, q, key, v):
    """``(out, lse)`` and the gradients w.r.t. q, k, v and the score parameters of a loss on both."""

    def loss(q, key, v, params):
        out, lse = run(q, key, v, dataclasses.replace(spec, score_params=params))
        weights = jnp.cos(jnp.arange(out.shape[-1], dtype=f32))
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(f32) * weights) + 0.3 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

    grads, (out, lse) = _jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True), q, key, v, spec.score_params)
    return out, lse, grads


def _kernel_run(case: Case, backend: str):
    seed = jnp.int32(1234) if case.dropout else None

    def run(q, key, v, spec):
        return flash_attention(
            q, key, v, mask=spec, softcap=case.softcap, block_sizes=BLOCKS, interpret=True, return_lse=True,
            backend=backend, dropout_rate=case.dropout, dropout_seed=seed,
        )  # fmt: skip

    return run


def _reference_run(case: Case):
    seed = jnp.int32(1234) if case.dropout else None

    def run(q, key, v, spec):
        q, key, v = (x.astype(f32) for x in (q, key, v))
        return flash_attention_reference(
            q, key, v, mask=spec, softcap=case.softcap, dropout_rate=case.dropout, dropout_seed=seed
        )

    return run


def _clean(case: Case, key, v):
    """K/V with the NaN rows zeroed: what the reference sees (the kernels must not need it)."""
    return _set_last_keys(case, key, v, value=0)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.cases()
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])


class TestTriton:
    BACKEND = "gpu"

    @classmethod
    def cases(cls):
        return CASES

    def test_matches_reference(self, case):
        spec = _spec(case)
        q, key, v = _inputs(case)
        out, lse, grads = _loss_and_grads(_kernel_run(case, self.BACKEND), spec, q, key, v)
        ref_out, ref_lse, ref_grads = _loss_and_grads(_reference_run(case), spec, q, *_clean(case, key, v))
        assert out.dtype == case.dtype and lse.dtype == f32
        assert_close(out, ref_out, dtype=case.dtype)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        finite = np.isfinite(ref_lse)
        assert_close(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0), dtype=case.dtype)
        for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert np.isfinite(np.asarray(g, np.float32)).all()
            assert_close(g, rg, dtype=case.dtype, grad=True)
        if case.nan_keys:  # keys nobody sees get exactly zero gradients
            s = case.lengths[1]
            np.testing.assert_array_equal(np.asarray(grads[1][:, s - case.nan_keys :], np.float32), 0.0)
            np.testing.assert_array_equal(np.asarray(grads[2][:, s - case.nan_keys :], np.float32), 0.0)


class TestMosaicTPU(TestTriton):
    """The Mosaic TPU body in the TPU interpreter (a subset: it is slow)."""

    BACKEND = "tpu"

    @classmethod
    def cases(cls):
        return [dataclasses.replace(c, **TPU_CASES[c.name]) for c in CASES if c.name in TPU_CASES]


# -- the reference's own semantics -----------------------------------------------------------------


def test_reference_score_mod_matches_the_naive_oracle():
    """ALiBi through the spec equals the float64 loop oracle with the same per-head slopes."""
    case = Case("alibi", (4, 2), (20, 28), score="alibi")
    spec = _spec(case)
    q, key, v = _inputs(case)
    slopes = np.asarray(spec.score_params[0])
    out, lse = _jit(lambda q, key, v: flash_attention_reference(q, key, v, mask=spec), q, key, v)
    want_out, want_lse = naive_attention(
        q, key, v, mask=np.asarray(spec.dense(B)), score_fn=lambda s, b, n, i, j: s + slopes[n] * (j - i)
    )
    assert_close(out, jnp.asarray(want_out, f32))
    finite = np.isfinite(want_lse)
    assert_close(jnp.where(finite, lse, 0.0), jnp.asarray(np.where(finite, want_lse, 0.0), f32))


def test_dropout_keeps_the_expected_fraction():
    """One-hot values expose every kept weight: a fraction 1 - rate survives, scaled by 1 / (1 - rate)."""
    t, s, rate = 32, 64, 0.25
    q = jnp.zeros((B, t, 2, 16))  # uniform weights 1 / S
    key = jnp.zeros((B, s, 1, 16))
    v = jnp.broadcast_to(jnp.eye(s)[None, :, None, :], (B, s, 1, s))  # value j = e_j
    kernel = lambda q, key, v, seed: flash_attention(
        q, key, v, block_sizes=BLOCKS, interpret=True, dropout_rate=rate, dropout_seed=seed
    )
    out = np.asarray(_jit(kernel, q, key, v, jnp.int32(5)))  # [B, T, N, S]: keep_ij / (S (1 - rate))
    kept = out > 0
    assert abs(kept.mean() - (1 - rate)) < 0.02
    np.testing.assert_allclose(out[kept], 1.0 / (s * (1 - rate)), rtol=1e-5)
    reference = lambda q, key, v, seed: flash_attention_reference(q, key, v, dropout_rate=rate, dropout_seed=seed)[0]
    ref = _jit(reference, q, key, v, jnp.int32(5))
    np.testing.assert_array_equal(kept, np.asarray(ref) > 0)  # the same bits


def test_dropout_needs_a_seed():
    q, key, v = random_qkv(0, b=1, t=16, n=2, h=16, host=True)
    with pytest.raises(ValueError, match="dropout_seed"):
        flash_attention(q, key, v, interpret=True, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_rate"):
        flash_attention(q, key, v, interpret=True, dropout_rate=1.0, dropout_seed=jnp.int32(0))


# -- the ring's block steps ------------------------------------------------------------------------


def test_block_steps_with_positions_score_mod_and_dropout():
    """Two K/V halves as two ring steps (per-sequence positions, ALiBi, dropout): merged outputs and
    summed gradients, the score parameters' included, equal the reference of the whole call."""
    case = Case("ring", (4, 2), (24, 48), per_sequence=True, score="alibi", dropout=0.2)
    spec = _spec(case)
    q, key, v = _inputs(case)
    dout = jnp.asarray(np.random.default_rng(6).standard_normal(q.shape[:3] + (v.shape[-1],), np.float32))
    seed = jnp.int32(77)
    kw = dict(block_sizes=BLOCKS, interpret=True, dropout_rate=case.dropout, dropout_seed=seed)

    def half(lo, hi):  # a step's spec: its own keys; the tiles of its map are resampled from the full map
        block_map = spec.block_map[..., lo // SPEC_BLOCK : hi // SPEC_BLOCK]
        kv_pos = spec.kv_positions[..., lo:hi]
        array = None if spec.array is None else spec.array[..., lo:hi]
        return dataclasses.replace(spec, block_map=block_map, kv_positions=kv_pos, array=array)

    steps = [(0, 24), (24, 48)]  # equal halves: one compiled kernel serves both steps
    kv = jax.tree.map(lambda *xs: jnp.stack(xs), *[(key[:, lo:hi], v[:, lo:hi], half(lo, hi)) for lo, hi in steps])

    def ring(q, kv, dout):  # the steps run in a loop (lax.map), as in a ring: one kernel instance each
        step_fwd = lambda x: flash_forward(q, x[0], x[1], mask=x[2], out_dtype=f32, **kw)
        out_i, lse_i = jax.lax.map(step_fwd, kv)  # [2, B, T, N, H], [2, B, N, T]
        lse = jax.nn.logsumexp(lse_i, axis=0)
        weight = jnp.where(jnp.isfinite(lse_i), jnp.exp(lse_i - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
        out = jnp.sum(out_i * jnp.swapaxes(weight, 2, 3)[..., None], axis=0)
        delta = jnp.einsum("BTNH,BTNH->BNT", out, dout)
        step_bwd = lambda x: flash_backward(
            q, x[0], x[1], lse, delta, dout, mask=x[2], grad_dtype=f32, return_score_param_grads=True, **kw
        )
        dq_i, dk_i, dv_i, dparams_i = jax.lax.map(step_bwd, kv)
        merge = lambda d: jnp.concatenate(list(d), axis=1)
        return out, lse, (dq_i.sum(0), merge(dk_i), merge(dv_i), jax.tree.map(lambda d: d.sum(0), dparams_i))

    def reference(q, key, v, dout):
        def run(q, key, v, params):
            spec_p = dataclasses.replace(spec, score_params=params)
            return flash_attention_reference(q, key, v, mask=spec_p, dropout_rate=case.dropout, dropout_seed=seed)

        (out, lse), vjp = jax.vjp(run, q, key, v, spec.score_params)
        return out, lse, vjp((dout, jnp.zeros_like(lse)))

    out, lse, grads = _jit(ring, q, kv, dout)
    ref_out, ref_lse, ref_grads = _jit(reference, q, key, v, dout)
    assert_close(out, ref_out)
    finite = jnp.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0), jnp.where(finite, ref_lse, 0))
    for g, rg in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert_close(g, rg, grad=True)


def test_spec_shape_errors_name_the_field():
    case = Case("errors", (4, 2), (24, 40), score="alibi", array="head")
    spec = _spec(case)
    q, key, v = _inputs(case)
    bad = {
        "score_params": dataclasses.replace(spec, score_params=(jnp.zeros(3),)),
        "mask.array": dataclasses.replace(spec, array=jnp.ones((B, 3, 24, 40), bool)),
        "mask.q_positions": dataclasses.replace(spec, q_positions=jnp.zeros((3, 24), jnp.int32)),
        "mask.kv_positions": dataclasses.replace(spec, kv_positions=jnp.zeros((39,), jnp.int32)),
    }
    for name, bad_spec in bad.items():
        with pytest.raises(ValueError, match=name):
            flash_attention(q, key, v, mask=bad_spec, block_sizes=BLOCKS, interpret=True)
