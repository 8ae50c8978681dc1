"""Ring attention on 8 CPU devices: outputs, logsumexp and gradients equal the single-device reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax import distributed
from attention_jax.functional import _checks, reference
from pallas_kernels import layouts, mask_info, ring_attention

HIGHEST = jax.lax.Precision.HIGHEST


# -- a dense per-step attention: the ring's step interface written from the reference -------------
# (an oracle for the kernel-floor ring, independent of the blockwise step that
# sequence_parallel_attention runs on CPU)


def _spec_mask(spec: mask_info.MaskSpec):
    """The spec's mask on the full ``[T, S]`` position grid (``[B, 1, T, S]`` with data), or None."""
    if spec.fn is None:
        return None
    q_vals = tuple(x[:, :, None] for x in spec.q_vals)  # [B, T, 1]
    kv_vals = tuple(x[:, None, :] for x in spec.kv_vals)  # [B, 1, S]
    dense = spec.fn(spec.q_positions[:, None], spec.kv_positions[None, :], q_vals, kv_vals)
    return dense[:, None] if dense.ndim == 3 else dense


def dense_step_fwd(q, k, v, spec, *, scale, softcap):
    shape = _checks.check_qkv(q, k, v)
    f32 = lambda x: x.astype(jnp.float32)
    return reference.attention(f32(q), f32(k), f32(v), shape=shape, scale=scale, softcap=softcap, mask=_spec_mask(spec))


def dense_step_bwd(q, k, v, spec, lse, delta, dout, *, scale, softcap):
    shape = _checks.check_qkv(q, k, v)
    b, t, n, h = q.shape
    kh, g = shape.num_kv_heads, shape.group_size
    scores = reference.dense_scores(q, k, shape=shape, scale=scale, softcap=softcap)  # [B, N, T, S]
    seen = jnp.isfinite(lse)[..., None]  # [B, N, T, 1]
    mask = _spec_mask(spec)
    visible = seen if mask is None else seen & mask
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


def check_against_reference(mesh, mask, *, layout, b=2, t=128, n=4, k=2, h=16, dtype=jnp.float32, softcap=None, **kw):
    q, key, v, dout, dlse = _inputs(t + n + k, b, t, n, k, h, dtype)
    ring = functools.partial(
        aj.sequence_parallel_attention, mesh=mesh, mask=mask, layout=layout, softcap=softcap, return_lse=True, **kw
    )
    ref = functools.partial(
        aj.dot_product_attention, mask=mask, softcap=softcap, return_lse=True, implementation="reference"
    )
    grads, (out, lse) = _loss(ring, dout, dlse)(q, key, v)
    ref_grads, (ref_out, ref_lse) = _loss(ref, dout, dlse)(q, key, v)
    assert out.dtype == ref_out.dtype == dtype
    assert_close(out, ref_out, dtype)
    finite = np.isfinite(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    assert_close(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0), jnp.float32)
    for grad, ref_grad in zip(grads, ref_grads):
        assert grad.dtype == ref_grad.dtype == dtype
        assert_close(grad, ref_grad, dtype, grad=True)


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
    assert_close(out, aj.dot_product_attention(q, key, v, mask=CAUSAL, implementation="reference"))


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
        return ring_attention(
            q,
            k,
            v,
            axis_name="sp",
            step_fwd=poisoned_fwd,
            step_bwd=dense_step_bwd,
            block_maps=block_maps[0],  # this device's row of the [P, P, nq, nk] table
            block_q=block,
            block_k=block,
            q_positions=layouts.shard_positions("sp", t, "contiguous"),
            kv_positions=layouts.shard_positions("sp", t, "contiguous"),
            mask_fn=CAUSAL.fn(t),
            return_lse=True,
        )

    seq = P(None, "sp")
    in_specs = (seq, seq, seq, P("sp"))
    run = jax.jit(jax.shard_map(local, mesh=sp_mesh(p), in_specs=in_specs, out_specs=(seq, P(None, None, "sp"))))
    out, lse = run(q, key, v, block_maps)
    ref_out, ref_lse = aj.dot_product_attention(q, key, v, mask=CAUSAL, implementation="reference", return_lse=True)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


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
