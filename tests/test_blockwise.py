"""The blockwise XLA path against a dense float32 oracle built from the same MaskSpec.

The oracle (``dense_attention``) materialises ``spec.dense``, applies the bias, the spec's score
function, the softcap and ``pallas_kernels.dropout.keep_mask`` on the whole ``[B, N, T, S]``
score matrix: outputs, logsumexp and every gradient (q, k, v, bias, score params, scale) must
agree. Cases are a sampled product of masks x head layouts x lengths x tiles x dtypes x extras at
batch 2 with lengths that are not multiples of the tiles, plus targeted tests: per-sequence
positions (decoding), run-time block maps, NaN in unseen value rows, fully masked rows, the
ring's block-level ``fwd``/``bwd``, visited tiles, and compiled memory linear in T.
"""

import dataclasses
import functools
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_qkv

from attention_jax import masks
from attention_jax.functional import blockwise
from pallas_kernels import dropout as dropout_lib
from pallas_kernels import mask_info
from pallas_kernels.mask_info import MaskSpec

B = 2
HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------------
# The dense oracle
# ---------------------------------------------------------------------------------------------------


def dense_attention(q, k, v, spec, *, scale, softcap=None, bias=None, dropout_rate=0.0, seed=None):
    """``(out [B, T, N, Hv] float32, lse [B, N, T])`` from whole score matrices (the semantics of the contract)."""
    b, t, n, _ = q.shape
    g = n // k.shape[2]
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)  # [B, S, N, H]
    s = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=HIGHEST) * scale
    if bias is not None:
        s = s + bias
    q_pos, kv_pos = spec.positions(b)  # [B, T], [B, S]
    batch = jnp.arange(b, dtype=jnp.int32)[:, None, None, None]
    head = jnp.arange(n, dtype=jnp.int32)[None, :, None, None]
    q_pos, kv_pos = q_pos[:, None, :, None], kv_pos[:, None, None, :]
    if spec.score_fn is not None:
        params = tuple(jnp.reshape(p, (1, n, 1, 1)) for p in spec.score_params)
        s = spec.score_fn(s, batch, head, q_pos, kv_pos, params)
    if softcap is not None:
        s = softcap * jnp.tanh(s / softcap)
    visible = spec.dense(b)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)  # -inf for rows that see nothing
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    if dropout_rate:
        keep = dropout_lib.keep_mask(seed, batch, head, q_pos, kv_pos, dropout_rate)
        p = jnp.where(keep, p / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("BNTS,BSNH->BTNH", p, v, precision=HIGHEST), lse


def _host_spec(spec: MaskSpec) -> MaskSpec:
    """The spec with a numpy block map: the schedule is built at trace time."""
    return dataclasses.replace(spec, block_map=np.asarray(spec.block_map))


def _full_spec(t, s, bq, bk, q_offset=0, kv_offset=0):
    return masks.full().spec(t, s, bq, bk, q_offset, kv_offset)


def _segments(t, s):
    q_ids = np.stack([np.repeat([0, 1, 2], [t // 3, t // 3, t - 2 * (t // 3)]), np.zeros(t, int)])
    kv_ids = np.stack(
        [np.repeat([0, 1, 2], [s // 3, s // 3, s - 2 * (s // 3)]), np.repeat([0, 1], [s // 2, s - s // 2])]
    )
    return masks.segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))


MASKS = {
    "none": lambda t, s: masks.full(),
    "causal": lambda t, s: masks.causal(offset=s - t),
    "window_two_sided": lambda t, s: masks.sliding_window(5, 7),
    "chunked": lambda t, s: masks.causal() & masks.chunked(12),
    "segments": _segments,
    "padding": lambda t, s: masks.padding(jnp.array([t, t - 5]), jnp.array([s - 9, s])),
    "prefix_lm": lambda t, s: masks.prefix_lm(10),
    "random_blocks": lambda t, s: masks.random_blocks(8, 2, seed=4),
    "from_fn": lambda t, s: masks.from_fn(lambda q, k: (q * 3 + k) % 7 != 0),
    "causal&segments|global": lambda t, s: masks.causal() & _segments(t, s) | masks.global_tokens([3]),
    "window&~chunked": lambda t, s: masks.sliding_window(20) & ~masks.chunked(16),
}
HEADS = [(4, 4), (4, 2), (4, 1)]  # (N, K): MHA, GQA, MQA
LENGTHS = [(48, 48), (37, 53), (64, 29)]  # (T, S): multiples of the tiles and not
BLOCKS = [(16, 16), (16, 32), (32, 16)]
EXTRAS = ["plain", "softcap", "bias", "alibi", "dropout", "array", "bias_row", "score_fn+softcap"]


def _alibi(score, batch, head, q_pos, kv_pos, params):
    return score + params[0] * (kv_pos - q_pos).astype(score.dtype)


def _two_params(score, batch, head, q_pos, kv_pos, params):
    """Reads every index: a per-batch shift, per-head parameters, both positions."""
    rel = (kv_pos - q_pos).astype(score.dtype)
    return score * params[1] + params[0] * jnp.tanh(rel / 8) + 0.1 * batch - 0.05 * (head % 3)


def _extras(extra, seed, n, t, s, spec):
    """``(spec, bias, softcap, dropout_rate)`` for an extra."""
    key = jax.random.key(seed + 7)
    bias, softcap, rate = None, None, 0.0
    if extra == "softcap":
        softcap = 2.5
    elif extra == "bias":
        bias = jax.random.normal(key, (B, n, t, s), jnp.float32)
    elif extra == "bias_row":  # broadcast over batch and queries: a key-padding style bias
        bias = jax.random.normal(key, (1, 1, 1, s), jnp.float32)
    elif extra == "alibi":
        spec = dataclasses.replace(spec, score_fn=_alibi, score_params=(0.5 ** jnp.arange(1.0, n + 1),))
    elif extra == "score_fn+softcap":
        params = (jax.random.normal(key, (n,)), 1.0 + 0.1 * jnp.arange(n, dtype=jnp.float32))
        spec = dataclasses.replace(spec, score_fn=_two_params, score_params=params)
        softcap = 3.0
    elif extra == "dropout":
        rate = 0.3
    elif extra == "array":  # a per-head boolean array ANDed with the mask; works with softcap
        array = jnp.asarray(np.random.default_rng(seed).random((B, n, t, s)) > 0.3)
        dense = np.asarray(array) & np.asarray(masks_dense(spec, B))
        block_map = mask_info.shared_block_map(dense, spec.block_q, spec.block_k, axis=(0, 1))
        spec = dataclasses.replace(spec, array=array, block_map=block_map)
        softcap = 4.0
    return spec, bias, softcap, rate


def masks_dense(spec, batch):
    visible = jax.jit(lambda: spec.dense(batch))()  # one program, not one eager op at a time
    t, s = spec.q_positions.shape[-1], spec.kv_positions.shape[-1]
    return np.ones((1, 1, t, s), bool) if visible is None else np.asarray(visible)


def _cases(names, seed):
    """One case per mask name: heads, lengths, tiles and extras rotate; f32 and bf16 in turn."""
    rng = random.Random(seed)
    offsets = [rng.randrange(12) for _ in range(4)]
    cases = []
    for i, name in enumerate(names):
        heads = HEADS[(i + offsets[0]) % len(HEADS)]
        lengths = LENGTHS[(i + offsets[1]) % len(LENGTHS)]
        blocks = BLOCKS[(i // 3 + offsets[2]) % len(BLOCKS)]
        extra = EXTRAS[(i + offsets[3]) % len(EXTRAS)]
        dtype = (jnp.float32, jnp.bfloat16)[i % 2]
        case_id = f"{name}-N{heads[0]}K{heads[1]}-T{lengths[0]}S{lengths[1]}-b{blocks[0]}x{blocks[1]}-"
        case_id += f"{jnp.dtype(dtype).name}-{extra}"
        cases.append(pytest.param(name, heads, lengths, blocks, dtype, extra, id=case_id))
    return cases


def _loss(out, lse):
    """Touches out and lse, so that the lse cotangent path is exercised too."""
    weights = jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32))
    finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
    return jnp.sum(out.astype(jnp.float32) * weights) + 0.3 * jnp.sum(jnp.sin(finite_lse))


def check_against_dense(
    q, k, v, spec, *, scale, softcap=None, bias=None, rate=0.0, seed=None, traced_spec=False, also_host_spec=False
):
    """Outputs, lse and gradients (q, k, v, bias, score params, array scale) against the dense oracle.

    ``traced_spec``: the spec is a jit argument (its block map traced: the run-time schedule);
    ``also_host_spec``: also run the spec with a numpy block map (the trace-time schedule) against
    the same oracle. Returns the first run's ``(out, lse, grads)``.
    """
    dtype = q.dtype
    seed = None if not rate else jnp.int32(seed if seed is not None else 1234)

    def ours(q, k, v, bias, params, scale, spec):
        spec = dataclasses.replace(spec, score_params=params)
        kw = dict(scale=scale, softcap=softcap, bias=bias, dropout_rate=rate, dropout_seed=seed)
        return blockwise.attention(q, k, v, spec, **kw)

    def oracle(q, k, v, bias, params, scale, spec):
        spec = dataclasses.replace(spec, score_params=params)
        return dense_attention(q, k, v, spec, scale=scale, softcap=softcap, bias=bias, dropout_rate=rate, seed=seed)

    args = (q, k, v, bias, tuple(spec.score_params), jnp.float32(scale))
    argnums = (0, 1, 2, 3, 4, 5)

    def grads_of(f, *args, jit_spec):
        def loss(*a):
            out, lse = f(*a)
            return _loss(out, lse), (out, lse)

        if jit_spec:  # the spec is a jit argument: its block map is traced (run-time schedule)
            return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args)
        return jax.jit(jax.grad(lambda *a: loss(*a, spec), argnums=argnums, has_aux=True))(*args[:-1])

    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    ref_args = (f32(q), f32(k), f32(v)) + args[3:]
    want, (ref_out, ref_lse) = grads_of(oracle, *ref_args, spec, jit_spec=False)
    # The checks run in numpy: eager jnp ops would each compile a program.
    np32 = lambda x: np.asarray(x).astype(np.float32)
    ref_out, ref_lse = np32(ref_out), np32(ref_lse)
    finite = np.isfinite(ref_lse)
    names = ("dq", "dk", "dv", "dbias", "dparams", "dscale")

    runs = [(spec, traced_spec)] + [(_host_spec(spec), False)] * also_host_spec
    results = [grads_of(ours, *args, run_spec, jit_spec=jit_spec) for run_spec, jit_spec in runs]
    for grads, (out, lse) in results:
        assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == jnp.float32
        assert_close(np32(out), ref_out, dtype=dtype)
        lse = np32(lse)
        np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
        assert_close(np.where(finite, lse, 0.0), np.where(finite, ref_lse, 0.0), dtype=dtype)
        for name, g, w, primal in zip(names, grads, want, args):
            if primal is None:
                continue
            for g_leaf, w_leaf, p_leaf in zip(jax.tree.leaves(g), jax.tree.leaves(w), jax.tree.leaves(primal)):
                assert g_leaf.dtype == p_leaf.dtype, name
                g_leaf, w_leaf = np32(g_leaf), np32(w_leaf)
                assert np.isfinite(g_leaf).all(), name
                # Parameter and scale gradients sum over every score: scale the tolerance by their size.
                norm = 1.0 if name in ("dq", "dk", "dv", "dbias") else max(1.0, float(np.abs(w_leaf).max()))
                assert_close(g_leaf / norm, w_leaf / norm, dtype=dtype, grad=True)
    grads, (out, lse) = results[0]
    return out, lse, grads


@pytest.mark.parametrize("mask_name,heads,lengths,blocks,dtype,extra", _cases(sorted(MASKS), seed=0))
def test_matches_dense_oracle(mask_name, heads, lengths, blocks, dtype, extra):
    (n, kv_heads), (t, s), (bq, bk) = heads, lengths, blocks
    seed = len(mask_name) + t
    q, k, v = random_qkv(seed, b=B, t=t, s=s, n=n, k=kv_heads, h=16, hv=12, dtype=dtype)
    spec = MASKS[mask_name](t, s).spec(t, s, bq, bk)
    spec, bias, softcap, rate = _extras(extra, seed, n, t, s, spec)
    check_against_dense(q, k, v, spec, scale=0.25, softcap=softcap, bias=bias, rate=rate)


def _with_extras(extras, seed, n, t, s, spec):
    """``_extras`` of several extras at once (each sets a different field)."""
    bias, softcap, rate = None, None, 0.0
    for extra in extras:
        spec, bias_i, softcap_i, rate_i = _extras(extra, seed, n, t, s, spec)
        bias, softcap, rate = bias if bias_i is None else bias_i, softcap or softcap_i, rate or rate_i
    return spec, bias, softcap, rate


# The run-time schedule plain, and with dropout and a score function (+ softcap) in one program.
@pytest.mark.parametrize("extras", [("plain",), ("dropout", "score_fn+softcap")], ids="+".join)
def test_traced_block_map_runs_the_runtime_schedule(extras):
    """A spec passed through jit (its block map traced) gives the same results as a static one."""
    t, s, n = 45, 51, 4
    q, k, v = random_qkv(3, b=B, t=t, s=s, n=n, k=2, h=16, hv=8)
    spec = (masks.causal(offset=6) & masks.padding(kv_lengths=jnp.array([40, 51]))).spec(t, s, 16, 16)
    spec, bias, softcap, rate = _with_extras(extras, 3, n, t, s, spec)
    assert len(extras) == 1 or (rate and softcap and spec.score_fn is not None)
    check_against_dense(
        q, k, v, spec, scale=0.3, softcap=softcap, bias=bias, rate=rate, traced_spec=True, also_host_spec=True
    )


# ---------------------------------------------------------------------------------------------------
# Per-sequence positions: decoding with per-sequence cache offsets, packed batches
# ---------------------------------------------------------------------------------------------------


def _per_sequence_spec(mask, t, s, bq, bk, q_offsets, kv_offset=0):
    """``q_positions [B, T]`` from per-sequence offsets and a per-sequence block map ``[B, nq, nk]``."""
    maps = [np.asarray(mask.block_map(t, s, bq, bk, int(o), kv_offset)) for o in q_offsets]
    q_pos = jnp.asarray(np.asarray(q_offsets)[:, None] + np.arange(t), jnp.int32)
    return MaskSpec(
        fn=mask.fn(kv_offset + s),
        block_map=np.stack(maps),
        q_positions=q_pos,
        kv_positions=kv_offset + jnp.arange(s, dtype=jnp.int32),
        block_q=bq,
        block_k=bk,
    )


# Each extra reads the per-sequence positions its own way; the dtypes take turns.
@pytest.mark.parametrize(
    "extra, dtype",
    [("plain", jnp.bfloat16), ("alibi", jnp.float32), ("dropout", jnp.bfloat16)],
    ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name,
)
def test_per_sequence_positions(extra, dtype):
    """Decode-style chunk: each sequence's queries sit at their own cache offset (sliding window)."""
    t, s, n = 7, 90, 4
    mask = masks.causal() & masks.sliding_window(24)
    spec = _per_sequence_spec(mask, t, s, 16, 16, q_offsets=[20, 75])
    q, k, v = random_qkv(5, b=B, t=t, s=s, n=n, k=1, h=16, dtype=dtype)
    spec, bias, softcap, rate = _extras(extra, 5, n, t, s, spec)
    check_against_dense(q, k, v, spec, scale=0.25, bias=bias, softcap=softcap, rate=rate)
    # The merged schedule visits the tiles some sequence needs: 5 of the 6 key tiles (not tile 2).
    sched = blockwise.schedule_for(spec)
    assert int(sched.count[0]) == 5 and 2 not in np.asarray(sched.idx[0, :5]).tolist()


def test_per_sequence_offsets_traced():
    """Offsets traced under jit (a decode step): positions and block map are run-time arrays."""
    t, s, bq, bk = 5, 64, 8, 16
    mask = masks.causal()
    q, k, v = random_qkv(6, b=B, t=t, s=s, n=2, h=8)

    @jax.jit
    def step(q, k, v, offsets):
        q_pos = offsets[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
        kv_pos = jnp.arange(s, dtype=jnp.int32)
        dense = q_pos[:, :, None] >= kv_pos[None, None, :]
        block_map = mask_info.block_map_from_dense(dense, bq, bk)  # [B, nq, nk], traced
        spec = MaskSpec(mask.fn(s), block_map, q_pos, kv_pos, block_q=bq, block_k=bk)
        return blockwise.attention(q, k, v, spec, scale=0.3)

    offsets = jnp.array([3, 40], jnp.int32)
    out, lse = step(q, k, v, offsets)
    spec = _per_sequence_spec(mask, t, s, bq, bk, q_offsets=[3, 40])
    ref_out, ref_lse = jax.jit(lambda q, k, v: dense_attention(q, k, v, spec, scale=0.3))(q, k, v)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


# ---------------------------------------------------------------------------------------------------
# Gradients of score parameters and an array scale; dropout bits
# ---------------------------------------------------------------------------------------------------


def test_score_params_and_an_array_scale_get_gradients():
    n, t = 4, 40
    q, k, v = random_qkv(3, b=B, t=t, n=n, k=2, h=16)
    spec = masks.causal().spec(t, t, 16, 8)
    params = (jnp.array([0.5, -0.25, 0.125, 0.0625]), jnp.array([1.0, 0.9, 1.1, 1.2]))
    spec = dataclasses.replace(spec, score_fn=_two_params, score_params=params)
    _, _, grads = check_against_dense(q, k, v, spec, scale=0.3)
    dparams, dscale = grads[4], grads[5]
    assert all(d.shape == (n,) for d in dparams) and dscale.shape == ()
    assert float(jnp.abs(dparams[0]).min()) > 0 and float(jnp.abs(dscale)) > 0


def test_dropout_bits_follow_the_seed():
    t = 33
    q, k, v = random_qkv(4, b=B, t=t, n=2, h=8)
    spec = masks.causal().spec(t, t, 16, 16)
    dropped = jax.jit(lambda seed: blockwise.attention(q, k, v, spec, scale=0.3, dropout_rate=0.5, dropout_seed=seed))
    out_a, lse_a = dropped(jnp.int32(1))
    out_b, lse_b = dropped(jnp.int32(2))
    plain, lse = jax.jit(lambda: blockwise.attention(q, k, v, spec, scale=0.3))()
    assert not np.allclose(out_a, out_b)
    assert_close(lse_a, lse)  # dropout acts on the normalised weights: the lse is unchanged
    assert_close(lse_b, lse)
    with pytest.raises(ValueError, match="dropout_seed"):
        blockwise.attention(q, k, v, spec, scale=0.3, dropout_rate=0.1)
    with pytest.raises(ValueError, match="dropout_rate"):
        blockwise.attention(q, k, v, spec, scale=0.3, dropout_rate=1.0, dropout_seed=jnp.int32(0))


# ---------------------------------------------------------------------------------------------------
# Masked rows, unseen values
# ---------------------------------------------------------------------------------------------------


def test_fully_masked_rows_give_zeros_and_finite_zero_gradients():
    t, s = 20, 24
    q, k, v = random_qkv(6, b=B, t=t, s=s, n=4, k=2, h=8)
    # Queries 0..5 see nothing (causal with a negative offset); batch 1 pads its last 7 queries.
    mask = masks.causal(offset=-6) & masks.padding(q_lengths=jnp.array([t, t - 7]))
    out, lse, grads = check_against_dense(q, k, v, mask.spec(t, s, 8, 8), scale=0.3)
    out, lse, dq = np.asarray(out), np.asarray(lse), np.asarray(grads[0])
    assert float(np.abs(out[:, :6]).max()) == 0.0 and float(np.abs(out[1, t - 7 :]).max()) == 0.0
    assert np.isneginf(lse[:, :, :6]).all() and np.isneginf(lse[1, :, t - 7 :]).all()
    assert np.isfinite(lse[0, :, 6:]).all()
    assert float(np.abs(dq[:, :6]).max()) == 0.0 and float(np.abs(dq[1, t - 7 :]).max()) == 0.0


@pytest.mark.parametrize("rate", [0.0, 0.2])
def test_nan_in_unseen_value_rows_stays_out(rate):
    """Cache slots never written (NaN) past each sequence's length: finite outputs and gradients."""
    t, s = 24, 40
    lengths = jnp.array([13, 29])
    q, k, v = random_qkv(7, b=B, t=t, s=s, n=4, k=2, h=8)
    unwritten = np.arange(s)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
    k, v = (jnp.asarray(np.where(unwritten, np.nan, x)) for x in (k, v))
    spec = masks.padding(kv_lengths=lengths).spec(t, s, 8, 16)  # key tiles 0..2 are PARTIAL

    def loss(q, k, v):
        out, _ = blockwise.attention(q, k, v, spec, scale=0.3, dropout_rate=rate, dropout_seed=jnp.int32(3))
        return jnp.sum(out**2), out

    (dq, dk, dv), out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    dq, dk, dv = np.asarray(dq), np.asarray(dk), np.asarray(dv)
    assert np.isfinite(np.asarray(out)).all() and np.isfinite(dq).all()
    seen = ~unwritten[..., 0, 0]
    assert np.isfinite(dk[seen]).all() and np.isfinite(dv[seen]).all()
    clean = lambda x: jnp.asarray(np.where(unwritten, 0.0, x), jnp.float32)
    oracle = lambda q, k, v: dense_attention(q, k, v, spec, scale=0.3, dropout_rate=rate, seed=jnp.int32(3))[0]
    assert_close(out, jax.jit(oracle)(q, clean(k), clean(v)))


# ---------------------------------------------------------------------------------------------------
# Transformations
# ---------------------------------------------------------------------------------------------------


COMPOSITIONS_MASK = masks.causal() & masks.sliding_window(10)


@functools.cache
def _compositions_oracle():
    """The dense oracle's loss and gradients, compiled once for both transforms."""
    spec = COMPOSITIONS_MASK.spec(32, 32, 8, 8)
    oracle = lambda q, k, v: jnp.sum(jnp.tanh(dense_attention(q, k, v, spec, scale=8**-0.5)[0]))
    return jax.jit(jax.value_and_grad(oracle, argnums=(0, 1, 2)))


@pytest.mark.parametrize("transform", ["vmap", "checkpoint"])
def test_compositions(transform):
    """jax.jit around everything; jax.grad through jax.vmap and jax.checkpoint."""
    q, k, v = random_qkv(8, b=3, t=32, n=4, k=2, h=8)
    spec = COMPOSITIONS_MASK.spec(32, 32, 8, 8)
    attend = lambda q, k, v: blockwise.attention(q, k, v, spec, scale=8**-0.5)[0]
    if transform == "vmap":  # over the batch: each example as a B=1 call
        one = lambda q, k, v: attend(q[None], k[None], v[None])[0]
        loss = lambda q, k, v: jnp.sum(jnp.tanh(jax.vmap(one)(q, k, v)))
    else:
        loss = jax.checkpoint(lambda q, k, v: jnp.sum(jnp.tanh(attend(q, k, v))))
    val, got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    want_val, want = _compositions_oracle()(q, k, v)
    assert_close(val, want_val)
    for g, w in zip(got, want):
        assert_close(g, w, grad=True)


# ---------------------------------------------------------------------------------------------------
# The ring's block-level step: fwd / bwd with a run-time block map
# ---------------------------------------------------------------------------------------------------


step_fwd = jax.jit(blockwise.fwd, static_argnames=("scale", "softcap"))
step_bwd = jax.jit(blockwise.bwd, static_argnames=("scale", "softcap"))


def _ring_spec(mask, t, s, kv_total, kv_offset, bq, bk):
    """The spec a ring step sees: the mask function of the whole sequence, this shard's positions."""
    return MaskSpec(
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


@functools.cache
def _step_programs():
    """Compiled once for both parametrizations: merging two halves, and the dense oracle's outputs,
    lse and vjp over the whole key range (eager, each of their ops would compile on its own)."""

    @jax.jit
    def merge(outs, dout):
        lse = jnp.logaddexp(outs[0][1], outs[1][1])  # [B, N, T]
        weight = lambda lse_i: jnp.where(jnp.isfinite(lse_i), jnp.exp(lse_i - lse), 0.0)
        out = sum(o * jnp.swapaxes(weight(lse_i), 1, 2)[..., None] for o, lse_i in outs)
        return out, lse, jnp.einsum("BTNH,BTNH->BNT", out, dout)  # delta

    whole = STEP_MASK.spec(STEP_T, STEP_S, STEP_BQ, STEP_BK)

    @jax.jit
    def oracle(q, k, v, dout):
        attend = lambda q, k, v: dense_attention(q, k, v, whole, scale=0.5, softcap=3.0)
        (ref_out, ref_lse), vjp = jax.vjp(attend, q, k, v)
        return ref_out, ref_lse, vjp((dout, jnp.zeros_like(ref_lse)))

    return merge, oracle


@pytest.mark.parametrize("per_sequence", [False, True])
def test_step_halves_combine_to_the_whole(per_sequence):
    """Two key halves merged through their lse give the whole.

    ``bwd`` of each half with the global lse and delta gives gradients that sum to the full ones.
    Per-sequence positions (``[B, T]``, ``[B, S]``) give the same answer as shared ones.
    """
    t, s, half = STEP_T, STEP_S, STEP_HALF
    q, k, v = random_qkv(12, b=B, t=t, s=s, n=4, k=2, h=8, hv=6)
    parts = []
    for lo in (0, half):
        spec = _ring_spec(STEP_MASK, t, half, s, lo, STEP_BQ, STEP_BK)
        if per_sequence:
            spec = dataclasses.replace(
                spec,
                q_positions=jnp.broadcast_to(spec.q_positions, (B, t)),
                kv_positions=jnp.broadcast_to(spec.kv_positions, (B, half)),
            )
        parts.append((spec, k[:, lo : lo + half], v[:, lo : lo + half]))
    outs = [step_fwd(q, k_i, v_i, spec, scale=0.5, softcap=3.0) for spec, k_i, v_i in parts]
    assert outs[0][0].dtype == jnp.float32 and outs[0][1].dtype == jnp.float32
    merge, oracle = _step_programs()
    dout = jax.random.normal(jax.random.key(13), outs[0][0].shape)
    out, lse, delta = merge(outs, dout)
    ref_out, ref_lse, (want_dq, want_dk, want_dv) = oracle(q, k, v, dout)
    assert_close(out, ref_out)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    finite = np.isfinite(ref_lse)
    assert_close(np.where(finite, lse, 0.0), np.where(finite, ref_lse, 0.0))

    grads = [step_bwd(q, k_i, v_i, spec, lse, delta, dout, scale=0.5, softcap=3.0) for spec, k_i, v_i in parts]
    grads = [[np.asarray(g) for g in half] for half in grads]
    assert_close(grads[0][0] + grads[1][0], want_dq, grad=True)
    assert_close(np.concatenate([grads[0][1], grads[1][1]], axis=1), want_dk, grad=True)
    assert_close(np.concatenate([grads[0][2], grads[1][2]], axis=1), want_dv, grad=True)


def test_step_with_an_all_empty_block_map_outputs_zeros():
    t, half = STEP_T, STEP_HALF
    q, k, v = random_qkv(14, b=B, t=t, s=half, n=4, k=2, h=8, hv=6)
    spec = _ring_spec(STEP_MASK, t, half, STEP_S, 0, STEP_BQ, STEP_BK)
    # Keys far in the future: the block map is all EMPTY (same mask function: the compiled step is reused).
    spec = dataclasses.replace(spec, kv_positions=spec.kv_positions + 500, block_map=jnp.zeros_like(spec.block_map))
    out, lse = step_fwd(q, k, v, spec, scale=0.5, softcap=3.0)
    assert float(np.abs(np.asarray(out)).max()) == 0.0 and np.isneginf(np.asarray(lse)).all()
    zeros, ones = jnp.asarray(np.zeros(lse.shape, np.float32)), jnp.asarray(np.ones(out.shape, np.float32))
    dq, dk, dv = step_bwd(q, k, v, spec, lse, zeros, ones, scale=0.5, softcap=3.0)
    for g in (dq, dk, dv):
        assert float(np.abs(np.asarray(g)).max()) == 0.0


# ---------------------------------------------------------------------------------------------------
# Empty tiles are skipped, not masked; memory is linear in T
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mask,t,visible",
    [(masks.causal(), 64, 10), (masks.sliding_window(7), 64, 7), (masks.causal() & masks.chunked(16), 64, 4)],
)
def test_schedule_visits_only_visible_tiles(mask, t, visible):
    spec = _host_spec(mask.spec(t, t, 16, 16))
    sched = blockwise.schedule_for(spec)
    block_map = np.asarray(spec.block_map)
    assert int(sched.count.sum()) == mask_info.count_visible_blocks(block_map) == visible
    listed = [(i, int(sched.idx[i, n])) for i in range(len(block_map)) for n in range(int(sched.count[i]))]
    assert sorted(listed) == sorted(zip(*np.nonzero(block_map)))
    assert int((sched.kinds() == mask_info.FULL).sum()) == int((block_map == mask_info.FULL).sum())


def test_nan_in_an_empty_key_block_never_reaches_the_output():
    t, bq, bk = 64, 16, 16
    q, k, v = random_qkv(15, b=1, t=t, n=2, h=8)
    spec = (masks.causal() & masks.sliding_window(10)).spec(t, t, bq, bk)
    # Key block 3 (positions 48..63) is EMPTY for query blocks 0..2: masking alone would give 0 * NaN.
    k, v = (jnp.asarray(np.where(np.arange(t)[None, :, None, None] >= 48, np.nan, x)) for x in (k, v))

    def loss(q, k, v):
        out, _ = blockwise.attention(q, k, v, spec, scale=0.3)
        return jnp.sum(out[:, :48] ** 2), out

    (dq, dk, dv), out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    out, dq, dk = np.asarray(out), np.asarray(dq), np.asarray(dk)
    assert np.isfinite(out[:, :48]).all() and not np.isfinite(out[:, 48:]).any()
    assert np.isfinite(dq[:, :48]).all() and np.isfinite(dk[:, :32]).all()


def test_compiled_memory_is_linear_in_t():
    """A causal forward + backward at T=8192 with dropout and ALiBi (one program: either feature
    holding a T x T buffer would show) compiles to far less than one T x T float32 buffer."""
    t, n, h = 8192, 2, 32
    q = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
    spec = masks.causal().spec(t, t, *blockwise.default_block_sizes(t, t))
    spec, _, _, rate = _with_extras(("dropout", "alibi"), 0, n, t, t, spec)
    assert rate and spec.score_fn is _alibi

    def loss(q, k, v, params):
        s = dataclasses.replace(spec, score_params=params)
        out, _ = blockwise.attention(q, k, v, s, scale=h**-0.5, dropout_rate=rate, dropout_seed=jnp.int32(5))
        return jnp.sum(out)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    compiled = grad.trace(q, q, q, spec.score_params).lower().compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < t * t * 4 / 16, f"{temp / 2**20:.0f} MiB of temporaries"


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------


def test_spec_is_validated_and_blocks_are_fitted():
    q, k, v = random_qkv(16, b=1, t=10, n=2, h=8)
    spec = _full_spec(10, 10, 4, 4)
    with pytest.raises(ValueError, match="block_map"):
        blockwise.attention(q, k, v, dataclasses.replace(spec, block_q=8), scale=1.0)
    with pytest.raises(ValueError, match="score_params"):
        blockwise.attention(q, k, v, dataclasses.replace(spec, score_fn=_alibi, score_params=(jnp.ones(3),)), scale=1.0)
    assert blockwise.default_block_sizes(1000, 100, "cpu") == (500, 100)


def test_a_hand_built_spec_without_a_mask_function():
    """``fn=None`` and an all-FULL map over a ragged S: the padding columns are still masked."""
    t, s, bq, bk = 21, 27, 8, 8
    q, k, v = random_qkv(17, b=B, t=t, s=s, n=2, h=8)
    nq, nk = mask_info.num_blocks(t, bq), mask_info.num_blocks(s, bk)
    spec = MaskSpec(
        fn=None,
        block_map=np.full((nq, nk), mask_info.FULL, np.int8),
        q_positions=jnp.arange(t, dtype=jnp.int32),
        kv_positions=jnp.arange(s, dtype=jnp.int32),
        block_q=bq,
        block_k=bk,
    )
    check_against_dense(q, k, v, spec, scale=0.3)
