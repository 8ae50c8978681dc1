"""Ring attention on 8 CPU devices: outputs, logsumexp and gradients equal the single-device reference."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax import distributed
from pallas_kernels import layouts, mask_info, ring_attention

HIGHEST = jax.lax.Precision.HIGHEST


# -- a dense per-step attention: the ring's step interface written with jnp -----------------------
# (an oracle for the kernel-floor ring, independent of the blockwise step that
# sequence_parallel_attention runs on CPU)


def _dense_scores(q, k, *, scale, softcap):
    """float32 ``[B, N, T, S]`` scores after softcap (query head n reads key head n // G)."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    q5 = q.astype(jnp.float32).reshape(b, t, kh, n // kh, h)  # [B, T, K, G, H]
    scores = scale * jnp.einsum("BTKGH,BSKH->BKGTS", q5, k.astype(jnp.float32), precision=HIGHEST)
    scores = scores.reshape(b, n, t, -1)
    return scores if softcap is None else softcap * jnp.tanh(scores / softcap)


def _visible(spec: mask_info.MaskSpec, shape):
    dense = spec.dense(shape[0])  # [B or 1, 1, T, S] or None
    return jnp.ones(shape, bool) if dense is None else jnp.broadcast_to(dense, shape)


def dense_step_fwd(q, k, v, spec, *, scale, softcap):
    b, t, n, _ = q.shape
    kh = k.shape[2]
    scores = _dense_scores(q, k, scale=scale, softcap=softcap)
    visible = _visible(spec, scores.shape)
    top = jnp.max(jnp.where(visible, scores, -jnp.inf), axis=-1, keepdims=True)
    seen = jnp.isfinite(top)  # rows that see something
    top = jnp.where(seen, top, 0.0)
    weights = jnp.where(visible, jnp.exp(scores - top), 0.0)
    total = jnp.where(seen, weights.sum(axis=-1, keepdims=True), 1.0)
    probs = (weights / total).reshape(b, kh, n // kh, t, -1)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32), precision=HIGHEST).reshape(b, t, n, -1)
    return out, jnp.where(seen, top + jnp.log(total), -jnp.inf)[..., 0]


def dense_step_bwd(q, k, v, spec, lse, delta, dout, *, scale, softcap):
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    scores = _dense_scores(q, k, scale=scale, softcap=softcap)  # [B, N, T, S]
    seen = jnp.isfinite(lse)[..., None]  # [B, N, T, 1]
    visible = seen & _visible(spec, scores.shape)
    probs = jnp.where(visible, jnp.exp(scores - jnp.where(seen, lse[..., None], 0.0)), 0.0)  # global lse
    do = dout.astype(jnp.float32).reshape(b, t, kh, g, -1)  # [B, T, K, G, Hv]
    probs5 = probs.reshape(b, kh, g, t, -1)  # [B, K, G, T, S]
    dv = jnp.einsum("BKGTS,BTKGH->BSKH", probs5, do, precision=HIGHEST)
    dp = jnp.einsum("BTKGH,BSKH->BKGTS", do, v.astype(jnp.float32), precision=HIGHEST).reshape(probs.shape)
    ds = probs * (dp - delta[..., None])
    if softcap is not None:
        ds = ds * (1.0 - (scores / softcap) ** 2)
    ds5 = ds.reshape(b, kh, g, t, -1)
    dq = scale * jnp.einsum("BKGTS,BSKH->BTKGH", ds5, k.astype(jnp.float32), precision=HIGHEST)
    dk = scale * jnp.einsum("BKGTS,BTKGH->BSKH", ds5, q.astype(jnp.float32).reshape(b, t, kh, g, h), precision=HIGHEST)
    return dq.reshape(b, t, n, h), dk, dv


# -- comparison against the single-device reference ----------------------------------------------


def _inputs(seed, b, t, n, k, h, dtype):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (b, t, n, h), jnp.float32).astype(dtype)
    key = jax.random.normal(keys[1], (b, t, k, h), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, k, h), jnp.float32).astype(dtype)
    dout = jax.random.normal(keys[3], (b, t, n, h), jnp.float32)
    dlse = jax.random.normal(keys[4], (b, n, t), jnp.float32)
    return q, key, v, dout, dlse


def _loss(attention, dout, dlse):
    """Sum of out * dout + lse * dlse: exercises both cotangents of the ring's custom_vjp."""

    def loss(q, k, v):
        out, lse = attention(q, k, v)
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(finite_lse * dlse), (out, lse)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


# The single-device results of a static mask, by (mask, inputs): the tests of every layout and ring size
# compare with one reference (a data mask compares equal whatever its arrays, so it is never cached).
_REFERENCES = {}


def _np32(x):
    """float32 numpy (bfloat16 through ml_dtypes): the comparisons run without compiling eager programs."""
    return np.asarray(x).astype(np.float32)


def check_against_reference(mesh, mask, *, layout, b=2, t=128, n=4, k=2, h=16, dtype=jnp.float32, softcap=None, **kw):
    q, key, v, dout, dlse = _inputs(t + n + k, b, t, n, k, h, dtype)
    ring = functools.partial(
        aj.sequence_parallel_attention, mesh=mesh, mask=mask, layout=layout, softcap=softcap, return_lse=True, **kw
    )
    grads, (out, lse) = _loss(ring, dout, dlse)(q, key, v)
    cache_key = (mask, softcap, b, t, n, k, h, jnp.dtype(dtype)) if mask is None or mask is CAUSAL else None
    if cache_key is None or cache_key not in _REFERENCES:
        ref = functools.partial(
            aj.dot_product_attention, mask=mask, softcap=softcap, return_lse=True, implementation="reference"
        )
        ref_grads, (ref_out, ref_lse) = _loss(ref, dout, dlse)(q, key, v)
        dtypes = [x.dtype for x in (ref_out, *ref_grads)]
        _REFERENCES[cache_key] = dtypes, _np32(ref_out), _np32(ref_lse), [_np32(g) for g in ref_grads]
    dtypes, ref_out, ref_lse, ref_grads = _REFERENCES.pop(None) if cache_key is None else _REFERENCES[cache_key]
    assert out.dtype == dtypes[0] == dtype
    assert_close(_np32(out), ref_out, dtype)
    finite = np.isfinite(ref_lse)
    lse = _np32(lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert_close(np.where(finite, lse, 0.0), np.where(finite, ref_lse, 0.0), jnp.float32)
    for grad, ref_dtype, ref_grad in zip(grads, dtypes[1:], ref_grads):
        assert grad.dtype == ref_dtype == dtype
        assert_close(_np32(grad), ref_grad, dtype, grad=True)


def sp_mesh(p):
    return jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))


def _segment_ids(b=2, t=128, seed=0):
    ids = np.sort(np.random.default_rng(seed).integers(0, 5, (b, t)), axis=1)
    return jnp.asarray(ids, jnp.int32)


CAUSAL = aj.masks.causal()
WINDOW = aj.masks.causal() & aj.masks.sliding_window(20)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_causal_every_layout_and_ring_size(p, layout):
    check_against_reference(sp_mesh(p), CAUSAL, layout=layout, axis="sp")


@pytest.mark.parametrize(
    "p, layout, mask_name, dtype, heads",
    [
        (4, "zigzag", "window", jnp.float32, (4, 2)),
        (4, "zigzag", "segments", jnp.float32, (4, 4)),  # MHA
        (8, "contiguous", "segments & window", jnp.float32, (4, 2)),
        (2, "zigzag", "padding", jnp.float32, (4, 2)),
        (4, "striped", "chunked | prefix", jnp.float32, (4, 2)),
        (4, "zigzag", "causal", jnp.bfloat16, (4, 2)),
        (8, "striped", "window", jnp.bfloat16, (4, 1)),  # MQA
        (2, "contiguous", "segments & window", jnp.bfloat16, (8, 2)),
    ],
)
def test_masks_heads_and_dtypes(p, layout, mask_name, dtype, heads):
    segments = aj.masks.segments(_segment_ids())
    mask = {
        "window": WINDOW,
        "causal": CAUSAL,
        "segments": segments,
        "segments & window": segments & WINDOW,
        "padding": aj.masks.padding(q_lengths=jnp.array([100, 128]), kv_lengths=jnp.array([128, 40])) & CAUSAL,
        "chunked | prefix": aj.masks.chunked(24) | aj.masks.prefix_lm(10),
    }[mask_name]
    n, k = heads
    check_against_reference(sp_mesh(p), mask, layout=layout, n=n, k=k, dtype=dtype, axis="sp")


def _every_third(i, j):
    return (i + j) % 3 != 0


@pytest.mark.parametrize("traced", [False, True])
def test_data_mask_with_from_fn_in_a_permuted_layout(traced):
    """``from_fn & segments`` in the striped layout: the block-map table pairs each position with its
    own segment id (the data is permuted like the positions), also when the ids are traced."""
    mask_of = lambda ids: aj.masks.segments(ids) & aj.masks.from_fn(_every_third)
    ids = _segment_ids(t=64, seed=4)
    q, key, v, _, _ = _inputs(3, 2, 64, 2, 1, 8, jnp.float32)
    ring = lambda q, k, v, ids: aj.sequence_parallel_attention(
        q, k, v, mesh=sp_mesh(4), axis="sp", mask=mask_of(ids), layout="striped"
    )
    out = jax.jit(ring)(q, key, v, ids) if traced else jax.jit(lambda q, k, v: ring(q, k, v, ids))(q, key, v)
    reference = lambda q, k, v: aj.dot_product_attention(q, k, v, mask=mask_of(ids), implementation="reference")
    assert_close(out, jax.jit(reference)(q, key, v))


def test_softcap_full_attention():
    check_against_reference(sp_mesh(4), None, layout="zigzag", softcap=3.0, axis="sp")


def test_data_and_sequence_parallel_mesh():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
    mask = aj.masks.segments(_segment_ids(b=4)) & CAUSAL
    check_against_reference(mesh, mask, layout="zigzag", b=4, axis="sp", batch_axis="dp")


def test_explicit_mesh_axes_and_output_sharding():
    mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    q, key, v, _, _ = _inputs(0, 2, 64, 4, 2, 16, jnp.float32)
    ring = functools.partial(aj.sequence_parallel_attention, mesh=mesh, axis="sp", mask=CAUSAL, batch_axis="dp")
    out = jax.jit(ring)(q, key, v)
    assert out.sharding.spec[:2] == ("dp", "sp")
    reference = jax.jit(functools.partial(aj.dot_product_attention, mask=CAUSAL, implementation="reference"))
    assert_close(out, reference(q, key, v))


# -- the kernel-floor ring directly --------------------------------------------------------------


def test_ring_attention_skips_empty_steps():
    """A step that poisons its output whenever its block map is all EMPTY never reaches the result."""

    def poisoned_fwd(q, k, v, spec, *, scale, softcap):
        out, lse = dense_step_fwd(q, k, v, spec, scale=scale, softcap=softcap)
        empty = jnp.all(spec.block_map == mask_info.EMPTY)
        return jnp.where(empty, jnp.nan, out), jnp.where(empty, jnp.nan, lse)

    p, t, block = 4, 64, 8
    positions = layouts.layout_positions(t, p, "contiguous")
    block_maps = distributed.ring_block_maps(CAUSAL, positions, positions, block, block)
    assert not (block_maps != mask_info.EMPTY).any(axis=(2, 3)).all()  # some steps are empty
    q, key, v, _, _ = _inputs(1, 1, t, 4, 2, 16, jnp.float32)

    def local(q, k, v, block_maps):
        spec = mask_info.MaskSpec(
            fn=CAUSAL.fn(t),
            block_map=block_maps[0],  # this device's row of the [P, P, nq, nk] table
            q_positions=layouts.shard_positions("sp", t, "contiguous"),
            kv_positions=layouts.shard_positions("sp", t, "contiguous"),
            block_q=block,
            block_k=block,
        )
        return ring_attention(
            q, k, v, spec, axis_name="sp", step_fwd=poisoned_fwd, step_bwd=dense_step_bwd, return_lse=True
        )

    seq = P(None, "sp")
    in_specs = (seq, seq, seq, P("sp"))
    run = jax.jit(jax.shard_map(local, mesh=sp_mesh(p), in_specs=in_specs, out_specs=(seq, P(None, None, "sp"))))
    out, lse = run(q, key, v, block_maps)
    reference = functools.partial(aj.dot_product_attention, mask=CAUSAL, implementation="reference", return_lse=True)
    ref_out, ref_lse = jax.jit(reference)(q, key, v)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def _direct_ring(p, mask, t, block, step_fwd, step_bwd, *, layout="contiguous", spec_change=None):
    """``ring_attention`` itself inside ``shard_map`` over ``p`` devices: ``f(q, k, v) -> (out, lse)`` on
    global arrays already in ``layout`` order (the mask's data permuted the same way)."""
    positions = layouts.layout_positions(t, p, layout)
    block_maps = distributed.ring_block_maps(mask, positions, positions, block, block)
    q_vals, kv_vals = mask.arrays(t, t)
    q_vals = tuple(layouts.to_layout(jnp.broadcast_to(x, (2, t)), p, layout) for x in q_vals)
    kv_vals = tuple(layouts.to_layout(jnp.broadcast_to(x, (2, t)), p, layout) for x in kv_vals)

    def local(q, k, v, block_maps, q_vals, kv_vals):
        spec = mask_info.MaskSpec(
            fn=mask.fn(t),
            block_map=block_maps[0],
            q_positions=layouts.shard_positions("sp", t, layout),
            kv_positions=layouts.shard_positions("sp", t, layout),
            q_vals=q_vals,
            kv_vals=kv_vals,
            block_q=block,
            block_k=block,
        )
        if spec_change is not None:
            spec = spec_change(spec)
        return ring_attention(q, k, v, spec, axis_name="sp", step_fwd=step_fwd, step_bwd=step_bwd, return_lse=True)

    seq, vals = P(None, "sp"), P(None, "sp")
    in_specs = (seq, seq, seq, P("sp"), (vals,) * len(q_vals), (vals,) * len(kv_vals))
    run = jax.shard_map(
        local, mesh=sp_mesh(p), in_specs=in_specs, out_specs=(seq, P(None, None, "sp")), check_vma=False
    )
    return lambda q, k, v: run(q, k, v, block_maps, q_vals, kv_vals)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_ring_attention_with_the_pallas_step(layout):
    """The kernel-floor ring with the Pallas step (interpreted on CPU): data masks travel with their shard."""
    from pallas_kernels.ring_flash_step import step_bwd, step_fwd

    p, t, block = 2, 64, 16
    mask = aj.masks.segments(_segment_ids(t=t, seed=3)) & CAUSAL
    q, key, v, dout, dlse = _inputs(2, 2, t, 4, 2, 16, jnp.float32)
    ring = _direct_ring(p, mask, t, block, step_fwd, step_bwd, layout=layout)
    to = lambda x, axis=1: layouts.to_layout(x, p, layout, axis=axis)
    back = lambda x, axis=1: layouts.from_layout(x, p, layout, axis=axis)

    def ring_global(q, k, v):
        out, lse = ring(to(q), to(k), to(v))
        return back(out), back(lse, axis=2)

    ref = functools.partial(aj.dot_product_attention, mask=mask, return_lse=True, implementation="reference")
    grads, (out, lse) = _loss(ring_global, dout, dlse)(q, key, v)
    ref_grads, (ref_out, ref_lse) = _loss(ref, dout, dlse)(q, key, v)
    assert_close(out, ref_out)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, grad=True)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda s: dataclasses.replace(s, block_map=s.block_map[:1]), ValueError, "spec.block_map must have shape"),
        (lambda s: dataclasses.replace(s, kv_positions=s.kv_positions[:-1]), ValueError, "spec.q_positions and"),
        (lambda s: dataclasses.replace(s, kv_vals=(s.kv_vals[0][:1],)), ValueError, "each of spec.kv_vals"),
        (lambda s: dataclasses.replace(s, score_fn=lambda x, *_: x), ValueError, "takes no score mod"),
        (lambda s: dataclasses.replace(s, array=jnp.ones((1, 1, 32, 32), bool)), ValueError, "no boolean-array"),
        (lambda s: "causal", TypeError, "spec must be a pallas_kernels.mask_info.MaskSpec"),
    ],
)
def test_ring_attention_checks_its_spec(change, error, message):
    mask = aj.masks.segments(_segment_ids(t=64)) & CAUSAL
    ring = _direct_ring(2, mask, 64, 16, dense_step_fwd, dense_step_bwd, spec_change=change)
    q, key, v, _, _ = _inputs(0, 2, 64, 4, 2, 16, jnp.float32)
    with pytest.raises(error, match=message):
        ring(q, key, v)


def test_ring_steps_are_objects():
    """Each implementation's step is a RingStep referencing its functions (no module-name strings)."""
    from attention_jax.functional import blockwise
    from pallas_kernels import ring_flash_step

    blockwise_step, pallas_step = distributed.ring_step("blockwise"), distributed.ring_step("pallas")
    assert (blockwise_step.fwd, blockwise_step.bwd) == (blockwise.fwd, blockwise.bwd)
    assert blockwise_step.check_vma
    assert (pallas_step.fwd, pallas_step.bwd) == (ring_flash_step.step_fwd, ring_flash_step.step_bwd)
    assert not pallas_step.check_vma  # pallas_call does not annotate how outputs vary over mesh axes
    assert distributed.ring_step(None) is blockwise_step  # on CPU
    with pytest.raises(dataclasses.FrozenInstanceError):
        pallas_step.check_vma = True


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ring_with_the_pallas_step_lowers(platform):
    """The whole ring (forward and backward) with the Pallas step lowers for GPU (Triton) and TPU (Mosaic)."""
    from pallas_kernels import ring_flash_step

    backend = "tpu" if platform == "tpu" else "gpu"
    step = {"backend": backend, "interpret": False}
    p, t, n, k, h = 2, 512, 4, 2, 128
    block_q, block_k = ring_flash_step.default_block_sizes(t // p // 2, t // p // 2, backend)
    positions = layouts.layout_positions(t, p, "zigzag")
    block_maps = distributed.ring_block_maps(CAUSAL, positions, positions, block_q, block_k)

    def local(q, k, v, block_maps):
        spec = mask_info.MaskSpec(
            fn=CAUSAL.fn(t),
            block_map=block_maps[0],
            q_positions=layouts.shard_positions("sp", t, "zigzag"),
            kv_positions=layouts.shard_positions("sp", t, "zigzag"),
            block_q=block_q,
            block_k=block_k,
        )
        return ring_attention(
            q,
            k,
            v,
            spec,
            axis_name="sp",
            step_fwd=functools.partial(ring_flash_step.step_fwd, **step),
            step_bwd=functools.partial(ring_flash_step.step_bwd, **step),
        )

    seq = P(None, "sp")
    ring = jax.shard_map(local, mesh=sp_mesh(p), in_specs=(seq, seq, seq, P("sp")), out_specs=seq, check_vma=False)
    loss = lambda q, k, v, maps: ring(q, k, v, maps).astype(jnp.float32).sum()
    args = (
        jax.ShapeDtypeStruct((1, t, n, h), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, t, k, h), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, t, k, h), jnp.bfloat16),
        block_maps,
    )
    call = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}[platform]
    forward = jax.jit(ring).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert forward.count(call) == 1  # the forward kernel, once in the ring's loop body
    assert backward.count(call) == 3  # forward ring (residuals), then dq and dk/dv in the backward ring


def test_merge_is_stable_for_large_and_empty_rows():
    from pallas_kernels.ring_attention import _merge

    out = jnp.ones((1, 3, 1, 2))
    lse = jnp.array([[[1e4, -jnp.inf, -jnp.inf]]])  # huge, nothing seen, nothing seen
    out_i = 3.0 * jnp.ones((1, 3, 1, 2))
    lse_i = jnp.array([[[1e4, 5.0, -jnp.inf]]])
    merged, merged_lse = _merge(out, lse, out_i, lse_i)
    np.testing.assert_allclose(merged[0, :, 0, 0], [2.0, 3.0, 0.0])
    np.testing.assert_allclose(merged_lse[0, 0], [1e4 + np.log(2.0), 5.0, -np.inf])


# -- layouts and balance -------------------------------------------------------------------------


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
@pytest.mark.parametrize("p", [2, 4, 8])
def test_layout_round_trip_and_in_place_conversion(layout, p):
    t = 8 * p * p
    x = jnp.arange(2 * t * 3).reshape(2, t, 3)  # [B, T, C]
    permuted = layouts.to_layout(x, p, layout)
    np.testing.assert_array_equal(layouts.from_layout(permuted, p, layout), x)
    np.testing.assert_array_equal(
        permuted[0, :, 0].reshape(p, -1) // 3, layouts.layout_positions(t, p, layout)
    )  # every shard knows its original positions
    mesh, seq = sp_mesh(p), P(None, "sp")
    there = jax.jit(
        jax.shard_map(lambda a: layouts.shard_to_layout(a, "sp", layout), mesh=mesh, in_specs=seq, out_specs=seq)
    )
    back = jax.jit(
        jax.shard_map(lambda a: layouts.shard_from_layout(a, "sp", layout), mesh=mesh, in_specs=seq, out_specs=seq)
    )
    np.testing.assert_array_equal(there(x), permuted)
    np.testing.assert_array_equal(back(there(x)), x)
    positions = jax.shard_map(
        lambda: layouts.shard_positions("sp", t, layout), mesh=mesh, in_specs=(), out_specs=P("sp")
    )
    np.testing.assert_array_equal(jax.jit(positions)(), layouts.layout_permutation(t, p, layout))


def test_zigzag_holds_chunks_i_and_2p_minus_1_minus_i():
    positions = layouts.layout_positions(32, 4, "zigzag")  # 8 chunks of 4
    chunks = positions.reshape(4, 2, 4)[:, :, 0] // 4
    np.testing.assert_array_equal(chunks, [[0, 7], [1, 6], [2, 5], [3, 4]])


@pytest.mark.parametrize("t, p", [(4096, 8), (2048, 4), (256, 2)])
def test_causal_balance(t, p):
    """Non-empty blocks computed per device, max over mean: <= 1.1 for zigzag and striped."""
    ratios = {}
    for layout in layouts.LAYOUTS:
        counts = distributed.blocks_per_device(CAUSAL, t, p, layout, block=128)
        assert counts.shape == (p,)
        ratios[layout] = counts.max() / counts.mean()
    print(f"T={t} P={p} causal balance (max / mean blocks per device): {ratios}")
    assert ratios["zigzag"] <= 1.1
    assert ratios["striped"] <= 1.1
    assert ratios["contiguous"] >= 2 * p / (p + 1) - 0.05  # the imbalance the other layouts remove


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, shapes, message",
    [
        (dict(layout="zigzag"), ((1, 36, 4, 8), (1, 36, 2, 8)), "divisible by 2 \\* P = 8"),
        (dict(layout="contiguous"), ((1, 30, 4, 8), (1, 30, 2, 8)), "divisible by P = 4"),
        (dict(layout="striped"), ((1, 40, 4, 8), (1, 40, 2, 8)), "P\\*\\*2 = 16"),
        (dict(layout="diagonal"), ((1, 32, 4, 8), (1, 32, 2, 8)), "layout must be one of"),
        (dict(axis="tp"), ((1, 32, 4, 8), (1, 32, 2, 8)), "mesh has no axis axis='tp'"),
        (dict(batch_axis="dp"), ((1, 32, 4, 8), (1, 32, 2, 8)), "mesh has no axis batch_axis='dp'"),
        (dict(), ((1, 32, 4, 8), (1, 32, 3, 8)), "multiple of key/value heads K=3"),
        (dict(implementation="reference"), ((1, 32, 4, 8), (1, 32, 2, 8)), "runs each ring step with"),
    ],
)
def test_bad_input(kwargs, shapes, message):
    q = jnp.zeros(shapes[0])
    kv = jnp.zeros(shapes[1])
    kwargs = dict(dict(mesh=sp_mesh(4), axis="sp"), **kwargs)
    with pytest.raises(ValueError, match=message):
        aj.sequence_parallel_attention(q, kv, kv, **kwargs)


def test_batch_must_divide_the_data_axis():
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "sp"))
    q = jnp.zeros((3, 32, 4, 8))
    with pytest.raises(ValueError, match="B=3 must be divisible by the 2 devices"):
        aj.sequence_parallel_attention(q, q, q, mesh=mesh, axis="sp", batch_axis="dp")
