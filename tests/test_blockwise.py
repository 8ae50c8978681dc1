"""The blockwise XLA path against the float32 reference: outputs, logsumexp and every gradient.

Cases are a sampled product of masks x head layouts x lengths x block sizes x dtypes x extras,
plus targeted tests: fully masked rows, jit/vmap/grad/checkpoint, the ring's block-level
``fwd``/``bwd``, and proof that empty tiles are skipped rather than masked.
"""

import dataclasses
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_qkv

import attention_jax as aj
from attention_jax import masks, score_mods
from attention_jax.functional import _checks, blockwise
from pallas_kernels import mask_info

B = 2


def _segments(t, s):
    q_ids = np.stack([np.repeat([0, 1, 2], [t // 3, t // 3, t - 2 * (t // 3)]), np.zeros(t, int)])
    kv_ids = np.stack(
        [np.repeat([0, 1, 2], [s // 3, s // 3, s - 2 * (s // 3)]), np.repeat([0, 1], [s // 2, s - s // 2])]
    )
    return masks.segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))


MASKS = {
    "none": lambda t, s: None,
    "causal": lambda t, s: masks.causal(offset=s - t),
    "window": lambda t, s: masks.sliding_window(9),
    "window_two_sided": lambda t, s: masks.sliding_window(5, 7),
    "chunked": lambda t, s: masks.causal() & masks.chunked(12),
    "segments": _segments,
    "padding": lambda t, s: masks.padding(jnp.array([t, t - 5]), jnp.array([s - 9, s])),
    "prefix_lm": lambda t, s: masks.prefix_lm(10),
    "random_blocks": lambda t, s: masks.random_blocks(8, 2, seed=4),
    "from_fn": lambda t, s: masks.from_fn(lambda q, k: (q * 3 + k) % 7 != 0),
    "causal&segments|global": lambda t, s: masks.causal() & _segments(t, s) | masks.global_tokens([3]),
    "window&~chunked": lambda t, s: masks.sliding_window(20) & ~masks.chunked(16),
    "bool_array": lambda t, s: jnp.asarray(np.random.default_rng(t).random((B, 1, t, s)) > 0.4),
}
HEADS = [(4, 4), (4, 2), (4, 1)]  # (N, K): MHA, GQA, MQA
LENGTHS = [(48, 48), (37, 53), (64, 29)]  # (T, S): multiples of the blocks and not
BLOCKS = [(16, 16), (8, 32), (32, 8)]
EXTRAS = ["plain", "softcap", "bias", "bias_row"]


def _cases(names, seed, marks=()):
    """One case per mask name: heads, lengths, blocks and extras rotate; f32, bf16 and f16 in turn."""
    rng = random.Random(seed)
    offsets = [rng.randrange(12) for _ in range(4)]
    dtypes = (jnp.float32, jnp.bfloat16, jnp.float32, jnp.float16)
    cases = []
    for i, name in enumerate(names):
        heads = HEADS[(i + offsets[0]) % len(HEADS)]
        lengths = LENGTHS[(i + offsets[1]) % len(LENGTHS)]
        blocks = BLOCKS[(i // 3 + offsets[2]) % len(BLOCKS)]
        extra = EXTRAS[(i + offsets[3]) % len(EXTRAS)]
        dtype = dtypes[i % len(dtypes)]
        case_id = f"{name}-N{heads[0]}K{heads[1]}-T{lengths[0]}S{lengths[1]}-b{blocks[0]}x{blocks[1]}-"
        case_id += f"{jnp.dtype(dtype).name}-{extra}"
        cases.append(pytest.param(name, heads, lengths, blocks, dtype, extra, id=case_id, marks=marks))
    return cases


# The quick set: every mask family at least once (window, causal and combinations recur below).
QUICK = [
    "causal&segments|global",
    "padding",
    "bool_array",
    "from_fn",
    "prefix_lm",
    "random_blocks",
    "chunked",
    "window&~chunked",
    "none",
]


def _inputs(seed, n, k, t, s, dtype, extra, hv=12):
    q, key, v = random_qkv(seed, b=B, t=t, s=s, n=n, k=k, h=16, hv=hv, dtype=dtype)
    bias = None
    if extra == "bias":
        bias = jax.random.normal(jax.random.key(seed + 7), (B, n, t, s), jnp.float32)
    elif extra == "bias_row":  # broadcast over batch and queries: a key-padding style bias
        bias = jax.random.normal(jax.random.key(seed + 7), (1, 1, 1, s), jnp.float32)
    softcap = 2.5 if extra == "softcap" else None
    return q, key, v, bias, softcap


def _loss_and_grads(impl, q, key, v, bias, *, mask, softcap, score_mod=None, block_q=None, block_k=None):
    """``(out, lse)`` and the gradients of a loss that touches both (so dlse is exercised too)."""
    hv = v.shape[-1]

    def run(q, key, v, bias):
        shape = _checks.check_qkv(q, key, v)
        scale = _checks.check_scale(None, shape.head_dim)
        if impl == "reference":
            return aj.dot_product_attention(
                q,
                key,
                v,
                bias=bias,
                mask=mask,
                softcap=softcap,
                score_mod=score_mod,
                implementation="reference",
                return_lse=True,
            )
        return blockwise.attention(
            q,
            key,
            v,
            shape=shape,
            scale=scale,
            mask=mask,
            bias=bias,
            softcap=softcap,
            score_mod=score_mod,
            block_q=block_q,
            block_k=block_k,
        )

    def loss(q, key, v, bias):
        out, lse = run(q, key, v, bias)
        weights = jnp.cos(jnp.arange(hv, dtype=jnp.float32))
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * weights) + 0.3 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(q, key, v, bias)
    return out, lse, grads


def _check_against_reference(q, key, v, bias, *, mask, softcap, dtype, score_mod=None, block_q=None, block_k=None):
    out, lse, grads = _loss_and_grads(
        "blockwise", q, key, v, bias, mask=mask, softcap=softcap, score_mod=score_mod, block_q=block_q, block_k=block_k
    )
    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    ref_out, ref_lse, ref_grads = _loss_and_grads(
        "reference", f32(q), f32(key), f32(v), bias, mask=mask, softcap=softcap, score_mod=score_mod
    )
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(out, ref_out, dtype=dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0), dtype=dtype)
    for name, g, want, primal in zip(("dq", "dk", "dv", "dbias"), grads, ref_grads, (q, key, v, bias)):
        assert g.dtype == primal.dtype, name
        assert bool(jnp.isfinite(g.astype(jnp.float32)).all()), name
        assert_close(g, want, dtype=dtype, grad=True)
    return out, lse, grads


@pytest.mark.parametrize(
    "mask_name,heads,lengths,blocks,dtype,extra",
    _cases(QUICK, seed=0) + _cases(sorted(MASKS) * 2, seed=1, marks=pytest.mark.slow),
)
def test_matches_reference(mask_name, heads, lengths, blocks, dtype, extra):
    (n, k), (t, s), (bq, bk) = heads, lengths, blocks
    q, key, v, bias, softcap = _inputs(len(mask_name) + t, n, k, t, s, dtype, extra)
    _check_against_reference(
        q, key, v, bias, mask=MASKS[mask_name](t, s), softcap=softcap, dtype=dtype, block_q=bq, block_k=bk
    )


def test_score_mod_parameters_and_an_array_scale_get_gradients():
    n, t = 4, 40
    q, key, v = random_qkv(3, b=B, t=t, n=n, k=2, h=16)
    table = jax.random.normal(jax.random.key(4), (8, n))
    slopes = jnp.array([0.5, 0.25, 0.125, 0.0625])

    def loss(impl, slopes, table, scale, q):
        mod = score_mods.compose(score_mods.alibi(slopes), score_mods.relative_position_bias(table, 8, 32))
        shape = _checks.check_qkv(q, key, v)
        if impl == "reference":
            out = aj.dot_product_attention(
                q, key, v, mask=masks.causal(), scale=scale, score_mod=mod, implementation="reference"
            )
        else:
            out = blockwise.attention(
                q, key, v, shape=shape, scale=scale, mask=masks.causal(), score_mod=mod, block_q=16, block_k=8
            )[0]
        return jnp.sum(out * jnp.sin(jnp.arange(16.0)))

    args = (slopes, table, jnp.float32(0.3), q)
    got = jax.jit(jax.grad(lambda *a: loss("blockwise", *a), argnums=(0, 1, 2, 3)))(*args)
    want = jax.grad(lambda *a: loss("reference", *a), argnums=(0, 1, 2, 3))(*args)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        assert_close(g, w, grad=True)


def test_fully_masked_rows_give_zeros_and_finite_zero_gradients():
    t, s = 20, 24
    q, key, v = random_qkv(6, b=B, t=t, s=s, n=4, k=2, h=8)
    # Queries 0..5 see nothing (causal with a negative offset); batch 1 pads its last 7 queries.
    mask = masks.causal(offset=-6) & masks.padding(q_lengths=jnp.array([t, t - 7]))
    out, lse, (dq, dk, dv) = _check_against_reference(
        q, key, v, None, mask=mask, softcap=None, dtype=jnp.float32, block_q=8, block_k=8
    )
    assert float(jnp.abs(out[:, :6]).max()) == 0.0 and float(jnp.abs(out[1, t - 7 :]).max()) == 0.0
    assert bool(jnp.isneginf(lse[:, :, :6]).all()) and bool(jnp.isneginf(lse[1, :, t - 7 :]).all())
    assert bool(jnp.isfinite(lse[0, :, 6:]).all())
    assert float(jnp.abs(dq[:, :6]).max()) == 0.0 and float(jnp.abs(dq[1, t - 7 :]).max()) == 0.0


@pytest.mark.parametrize("transform", ["vmap", "checkpoint", "dispatch"])
def test_compositions(transform):
    """jax.jit around everything; jax.grad through jax.vmap, jax.checkpoint and the dispatcher."""
    q, key, v = random_qkv(8, b=3, t=32, n=4, k=2, h=8)
    mask = masks.causal() & masks.sliding_window(10)

    def attend(impl, q, key, v):
        if impl == "reference":
            return aj.dot_product_attention(q, key, v, mask=mask, implementation="reference")
        if impl == "dispatch":
            return aj.dot_product_attention(q, key, v, mask=mask, implementation="blockwise")
        shape = _checks.check_qkv(q, key, v)
        return blockwise.attention(q, key, v, shape=shape, scale=8**-0.5, mask=mask, block_q=8, block_k=8)[0]

    if transform == "vmap":  # over the batch: each example as a B=1 call
        one = lambda q, key, v: attend("blockwise", q[None], key[None], v[None])[0]
        loss = lambda q, key, v: jnp.sum(jnp.tanh(jax.vmap(one)(q, key, v)))
    elif transform == "checkpoint":
        loss = jax.checkpoint(lambda q, key, v: jnp.sum(jnp.tanh(attend("blockwise", q, key, v))))
    else:
        loss = lambda q, key, v: jnp.sum(jnp.tanh(attend("dispatch", q, key, v)))
    val, got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, key, v)
    want_val, want = jax.value_and_grad(lambda *a: jnp.sum(jnp.tanh(attend("reference", *a))), argnums=(0, 1, 2))(
        q, key, v
    )
    assert_close(val, want_val)
    for g, w in zip(got, want):
        assert_close(g, w, grad=True)


def test_traced_boolean_mask_under_jit():
    t, s = 30, 40
    q, key, v = random_qkv(9, b=B, t=t, s=s, n=2, h=8)
    mask = jnp.asarray(np.random.default_rng(1).random((B, 2, t, s)) > 0.5).at[:, :, :, 16:32].set(False)
    shape = _checks.check_qkv(q, key, v)
    f = jax.jit(lambda q, m: blockwise.attention(q, key, v, shape=shape, scale=0.3, mask=m, block_q=8, block_k=16))
    out, lse = f(q, mask)
    ref_out, ref_lse = aj.dot_product_attention(
        q, key, v, mask=mask, scale=0.3, implementation="reference", return_lse=True
    )
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


# ---------------------------------------------------------------------------------------------------
# The ring's block-level step: fwd / bwd with a run-time block map
# ---------------------------------------------------------------------------------------------------


step_fwd = jax.jit(blockwise.fwd, static_argnames=("scale", "softcap"))
step_bwd = jax.jit(blockwise.bwd, static_argnames=("scale", "softcap"))


def _ring_spec(mask, t, s, kv_total, kv_offset, bq, bk):
    """The spec a ring step sees: the mask function of the whole sequence, this shard's positions."""
    return mask_info.MaskSpec(
        fn=mask.fn(kv_total),
        block_map=jnp.asarray(mask.block_map(t, s, bq, bk, kv_offset=kv_offset), jnp.int32),
        q_positions=jnp.arange(t, dtype=jnp.int32),
        kv_positions=kv_offset + jnp.arange(s, dtype=jnp.int32),
        q_vals=tuple(mask.q_arrays(t)),
        kv_vals=tuple(a[:, kv_offset : kv_offset + s] for a in mask.kv_arrays(kv_total)),
        block_q=bq,
        block_k=bk,
    )


STEP_T, STEP_S, STEP_HALF, STEP_BQ, STEP_BK = 24, 40, 20, 8, 16
STEP_MASK = masks.causal(offset=STEP_S - STEP_T) & _segments(STEP_T, STEP_S) | masks.global_tokens([30])


def test_step_halves_combine_to_the_whole():
    """Two key halves merged through their lse give the whole.

    ``bwd`` of each half with the global lse and delta gives gradients that sum to the full ones.
    """
    t, s, half = STEP_T, STEP_S, STEP_HALF
    q, key, v = random_qkv(12, b=B, t=t, s=s, n=4, k=2, h=8, hv=6)
    parts = []
    for lo in (0, half):
        spec = _ring_spec(STEP_MASK, t, half, s, lo, STEP_BQ, STEP_BK)
        parts.append((spec, key[:, lo : lo + half], v[:, lo : lo + half]))
    outs = [step_fwd(q, k_i, v_i, spec, scale=0.5, softcap=3.0) for spec, k_i, v_i in parts]
    assert outs[0][0].dtype == jnp.float32 and outs[0][1].dtype == jnp.float32
    lse = jnp.logaddexp(outs[0][1], outs[1][1])  # [B, N, T]
    weight = lambda lse_i: jnp.where(jnp.isfinite(lse_i), jnp.exp(lse_i - lse), 0.0)
    out = sum(o * jnp.swapaxes(weight(lse_i), 1, 2)[..., None] for o, lse_i in outs)
    attend = lambda q, key, v: aj.dot_product_attention(
        q, key, v, mask=STEP_MASK, scale=0.5, softcap=3.0, implementation="reference", return_lse=True
    )
    (ref_out, ref_lse), vjp = jax.vjp(attend, q, key, v)
    assert_close(out, ref_out)
    finite = jnp.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0))

    dout = jax.random.normal(jax.random.key(13), out.shape)
    delta = jnp.einsum("BTNH,BTNH->BNT", out, dout)
    grads = [step_bwd(q, k_i, v_i, spec, lse, delta, dout, scale=0.5, softcap=3.0) for spec, k_i, v_i in parts]
    want_dq, want_dk, want_dv = vjp((dout, jnp.zeros_like(ref_lse)))
    assert_close(grads[0][0] + grads[1][0], want_dq, grad=True)
    assert_close(jnp.concatenate([grads[0][1], grads[1][1]], axis=1), want_dk, grad=True)
    assert_close(jnp.concatenate([grads[0][2], grads[1][2]], axis=1), want_dv, grad=True)


def test_step_with_an_all_empty_block_map_outputs_zeros():
    t, half = STEP_T, STEP_HALF
    q, key, v = random_qkv(14, b=B, t=t, s=half, n=4, k=2, h=8, hv=6)
    spec = _ring_spec(STEP_MASK, t, half, STEP_S, 0, STEP_BQ, STEP_BK)
    # Keys far in the future: the block map is all EMPTY (same mask function: the compiled step is reused).
    spec = dataclasses.replace(spec, kv_positions=spec.kv_positions + 500, block_map=jnp.zeros_like(spec.block_map))
    out, lse = step_fwd(q, key, v, spec, scale=0.5, softcap=3.0)
    assert float(jnp.abs(out).max()) == 0.0 and bool(jnp.isneginf(lse).all())
    dq, dk, dv = step_bwd(q, key, v, spec, lse, jnp.zeros_like(lse), jnp.ones_like(out), scale=0.5, softcap=3.0)
    for g in (dq, dk, dv):
        assert float(jnp.abs(g).max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# Empty tiles are skipped, not masked
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,t,visible",
    [(masks.causal(), 64, 10), (masks.sliding_window(7), 64, 7), (masks.causal() & masks.chunked(16), 64, 4)],
)
def test_schedule_visits_only_visible_tiles(mask, t, visible):
    sched = blockwise.schedule_for(mask, t, t, 16, 16)
    block_map = mask.block_map(t, t, 16, 16)
    assert int(sched.count.sum()) == mask_info.count_visible_blocks(block_map) == visible
    listed = [(i, int(sched.idx[i, n])) for i in range(len(block_map)) for n in range(int(sched.count[i]))]
    assert sorted(listed) == sorted(zip(*np.nonzero(block_map)))
    kinds = [int(sched.kind[i, n]) for i in range(len(block_map)) for n in range(int(sched.count[i]))]
    assert kinds.count(mask_info.FULL) == int((block_map == mask_info.FULL).sum())


def test_nan_in_an_empty_key_block_never_reaches_the_output():
    t, bq, bk = 64, 16, 16
    q, key, v = random_qkv(15, b=1, t=t, n=2, h=8)
    mask = masks.causal() & masks.sliding_window(10)
    # Key block 3 (positions 48..63) is EMPTY for query blocks 0..2: masking alone would give 0 * NaN.
    key = key.at[:, 48:].set(jnp.nan)
    v = v.at[:, 48:].set(jnp.nan)
    shape = _checks.check_qkv(q, key, v)

    def loss(q, key, v):
        out, _ = blockwise.attention(q, key, v, shape=shape, scale=0.3, mask=mask, block_q=bq, block_k=bk)
        return jnp.sum(out[:, :48] ** 2), out

    (dq, dk, dv), out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, key, v)
    assert bool(jnp.isfinite(out[:, :48]).all()) and not bool(jnp.isfinite(out[:, 48:]).any())
    assert bool(jnp.isfinite(dq[:, :48]).all()) and bool(jnp.isfinite(dk[:, :32]).all())


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def test_block_sizes_are_validated_and_fitted():
    q, key, v = random_qkv(16, b=1, t=10, n=2, h=8)
    shape = _checks.check_qkv(q, key, v)
    with pytest.raises(ValueError, match="block_q"):
        blockwise.attention(q, key, v, shape=shape, scale=1.0, block_q=0)
    assert blockwise.default_block_sizes(1000, 100, "cpu") == (500, 100)
    assert blockwise.default_block_sizes(4096, 4096, "cpu") == (512, 256)
