"""Decode attention bodies (XLA, and the Triton body interpreted) against the dense-gather reference.

Every case builds a dense float cache, scatters it into shuffled pages of a larger pool (unused pages
and the slots past each length hold NaN), and compares ``decode_attention`` with
``decode_attention_reference`` (which gathers the pages back) on outputs and logsumexp. Each check is one
jitted program; comparisons run in numpy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mask_info
from pallas_kernels.decode_attention import (
    _decode,
    decode_attention,
    decode_attention_reference,
    dense_as_pages,
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _paged(rng: np.random.Generator, dense: np.ndarray, lengths, page_size: int, spare: int = 3):
    """Scatter ``dense [B, C, K, H]`` into shuffled pages ``[P, ps, K, H]``; NaN everywhere no slot < length reads."""
    b, c = dense.shape[:2]
    m = c // page_size
    pool = b * m + spare
    pages = np.full((pool, page_size, *dense.shape[2:]), np.nan, np.float32)
    perm = rng.permutation(pool)
    table = np.full((b, m), -1, np.int32)
    for i in range(b):
        for j in range(-(-int(lengths[i]) // page_size)):
            page = perm[i * m + j]
            table[i, j] = page
            chunk = dense[i, j * page_size : (j + 1) * page_size].copy()
            chunk[max(0, int(lengths[i]) - j * page_size) :] = np.nan  # written slots only
            pages[page] = chunk
    return pages, table


def _quantize(x: np.ndarray, kind):
    """Per-token-per-head symmetric quantisation: ``(q, scale [..., K])`` with ``x ~= q * scale``."""
    top = 127.0 if kind == jnp.int8 else 448.0
    x = np.nan_to_num(x)  # int8 holds no NaN: unwritten slots quantise to zeros
    amax = np.abs(x).max(axis=-1)
    scale = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
    scaled = x / scale[..., None]
    if kind == jnp.int8:
        q = jnp.asarray(np.clip(np.round(np.nan_to_num(scaled)), -127, 127).astype(np.int8))
    else:
        q = jnp.asarray(np.nan_to_num(scaled), jnp.float32).astype(jnp.float8_e4m3fn)
    return q, jnp.asarray(scale)


def _problem(seed, *, b=3, t=1, n=8, k=2, h=128, hv=128, c=64, ps=8, lengths=(0, 13, 64), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    keys = rng.standard_normal((b, c, k, h)).astype(np.float32)
    values = rng.standard_normal((b, c, k, hv)).astype(np.float32)
    lengths = np.asarray(lengths, np.int32)
    k_pages, table = _paged(np.random.default_rng(seed + 1), keys, lengths, ps)
    v_pages, _ = _paged(np.random.default_rng(seed + 1), values, lengths, ps)
    return dict(
        q=jnp.asarray(q, dtype),
        k_pages=jnp.asarray(k_pages, dtype),
        v_pages=jnp.asarray(v_pages, dtype),
        page_table=jnp.asarray(table),
        lengths=jnp.asarray(lengths),
    )


def _compare(args, tol, kernel="xla", **opts):
    """Run the body and the reference in one jitted program; check shapes, dtype, finiteness and values."""

    @jax.jit
    def both(q, k_pages, v_pages, page_table, lengths, extra):
        kw = dict(opts, **extra)
        out = decode_attention(q, k_pages, v_pages, page_table, lengths, kernel=kernel, interpret=True,
                               return_lse=True, **kw)  # fmt: skip
        ref = decode_attention_reference(q, k_pages, v_pages, page_table, lengths, return_lse=True, **kw)
        return out, ref

    arrays = {name: args[name] for name in ("q", "k_pages", "v_pages", "page_table", "lengths")}
    extra = {name: value for name, value in args.items() if name not in arrays}
    (out, lse), (ref, ref_lse) = both(**arrays, extra=extra)
    assert out.shape == ref.shape and out.dtype == args["q"].dtype
    assert lse.shape == ref_lse.shape and lse.dtype == jnp.float32
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    np.testing.assert_allclose(out, ref, atol=tol, rtol=tol)
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=tol, rtol=tol)
    return out, lse


def _causal(q_pos, kv_pos, q_vals, kv_vals):
    return kv_pos <= q_pos


def _window(left):
    return lambda q_pos, kv_pos, q_vals, kv_vals: (kv_pos <= q_pos) & (kv_pos >= q_pos - left)


KERNELS = ["xla", "triton", "mosaic_tpu"]


@pytest.mark.parametrize("kernel", KERNELS)
def test_ragged_gqa_small_pages(kernel):
    """G = 4, ps 8 < block_k 16, lengths 0 / 13 / full, shuffled pages with NaN around; the empty row is 0."""
    args = _problem(0)
    out, lse = _compare(args, TOL[jnp.float32], kernel, block_k=16, num_splits=2)
    assert (out[0] == 0).all() and np.isneginf(lse[0]).all()


@pytest.mark.parametrize("kernel", KERNELS)
def test_mqa_three_rows_causal_splits(kernel):
    """MQA, T = 3 draft rows under a causal mask, ps == block_k, three splits, softcap."""
    args = _problem(1, t=3, n=4, k=1, ps=16, lengths=(40, 5, 64))
    lengths = np.asarray(args["lengths"])
    args["q_positions"] = jnp.asarray(lengths[:, None] - 3 + np.arange(3)[None, :], jnp.int32)
    _compare(args, TOL[jnp.float32], kernel, block_k=16, num_splits=3, mask_fn=_causal, softcap=2.0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_large_pages_bf16_softcap_offset(kernel):
    """bf16, ps 32 > block_k 16, softcap, a per-sequence kv_offset seen by a causal mask."""
    args = _problem(2, ps=32, lengths=(64, 33, 1), dtype=jnp.bfloat16)
    offset = np.array([5, 0, 100], np.int32)
    args["kv_offset"] = jnp.asarray(offset)
    args["q_positions"] = jnp.asarray((offset + np.asarray(args["lengths"]) - 10)[:, None], jnp.int32)
    _compare(args, TOL[jnp.bfloat16], kernel, block_k=16, softcap=5.0, mask_fn=_causal)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("kind", [jnp.int8, jnp.float8_e4m3fn])
def test_quantized_within_quantisation_error(kernel, kind):
    """int8 / fp8 pages: the body equals the reference over the same quantised cache, and its error
    against the float cache is the quantisation's own (the reference's) error."""
    args = _problem(3, lengths=(64, 20, 37))
    float_out = np.asarray(decode_attention_reference(**args), np.float32)
    k_pages, k_scales = _quantize(np.asarray(args["k_pages"]), kind)
    v_pages, v_scales = _quantize(np.asarray(args["v_pages"]), kind)
    quant = dict(args, k_pages=k_pages, v_pages=v_pages, k_scales=k_scales, v_scales=v_scales)
    out, _ = _compare(quant, TOL[jnp.float32], kernel, block_k=16)
    ref_err = np.abs(np.asarray(decode_attention_reference(**quant), np.float32) - float_out).max()
    err = np.abs(out - float_out).max()
    assert 0 < ref_err < (0.05 if kind == jnp.int8 else 0.3)
    assert err <= ref_err * 1.01 + 1e-6


@pytest.mark.parametrize("kernel", KERNELS)
def test_sliding_window_block_map(kernel):
    """A window of 20 keys over a cache of 128 slots: block_map EMPTY outside the window; the XLA loop
    runs only the window's tiles (counted), and the result equals the reference."""
    b, c, bk, left = 2, 128, 16, 20
    args = _problem(4, b=b, c=c, lengths=(128, 70))
    lengths = np.asarray(args["lengths"])
    q_pos = lengths - 1
    args["q_positions"] = jnp.asarray(q_pos[:, None], jnp.int32)
    dense = (np.arange(c)[None, :] <= q_pos[:, None]) & (np.arange(c)[None, :] >= q_pos[:, None] - left)
    block_map = mask_info.block_map_from_dense(dense[:, None, :], 1, bk)[:, 0, :]  # [B, nk]
    args["block_map"] = jnp.asarray(block_map)
    _compare(args, TOL[jnp.float32], kernel, block_k=bk, mask_fn=_window(left))
    if kernel == "xla":
        window_tiles = int(np.count_nonzero(block_map != mask_info.EMPTY, axis=1).max())
        assert window_tiles == 2 < c // bk
        steps = jax.jit(lambda a: _decode(**a, block_k=bk, mask_fn=_window(left))[2])(args)
        assert int(steps) == window_tiles


@pytest.mark.parametrize("kernel", KERNELS)
def test_ring_layout(kernel):
    """A rolling cache of W = 24 slots filled from a token stream (position p in slot p % W): sequences that
    wrapped (lengths 50, 24) and one that did not (9), under a window as wide as the ring; checked against float64
    attention over the stream itself, not over the ring."""
    w, left, b, k, g, h = 24, 23, 3, 2, 2, 128
    lengths = np.array([50, 24, 9])
    rng = np.random.default_rng(5)
    stream = rng.standard_normal((b, 50, k, h))
    q = rng.standard_normal((b, 1, k * g, h))
    ring = np.full((b, w, k, h), np.nan)
    for i, length in enumerate(lengths):
        for pos in range(length):
            ring[i, pos % w] = stream[i, pos]
    pages, table = _paged(rng, ring, np.minimum(lengths, w), 8)
    args = dict(
        q=jnp.asarray(q, jnp.float32),
        k_pages=jnp.asarray(pages, jnp.float32),
        v_pages=jnp.asarray(pages, jnp.float32),
        page_table=jnp.asarray(table),
        lengths=jnp.asarray(lengths, jnp.int32),
        q_positions=jnp.asarray(lengths[:, None] - 1, jnp.int32),
    )
    out, _ = _compare(args, TOL[jnp.float32], kernel, block_k=16, ring=w, mask_fn=_window(left))
    for i, length in enumerate(lengths):
        seen = stream[i, max(0, length - 1 - left) : length]  # [S, K, H]
        s = np.einsum("kgh,skh->kgs", q[i, 0].reshape(k, g, h), seen) / np.sqrt(h)
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("kgs,skh->kgh", p / p.sum(-1, keepdims=True), seen).reshape(k * g, h)
        np.testing.assert_allclose(out[i, 0], ref, atol=2e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_mla_keys_only(kernel):
    """MLA's latent cache: K = 1, keys of 64 + 16 channels (latent + RoPE), values the first 64."""
    args = _problem(6, n=4, k=1, h=80, lengths=(64, 30, 7))
    args["v_pages"] = None
    _compare(args, TOL[jnp.float32], kernel, block_k=16, value_dim=64, scale=0.1)


def test_dense_cache_as_pages():
    """A dense [B, C, K, H] cache served through a free reshape equals attention over the cache."""
    rng = np.random.default_rng(7)
    q = jnp.asarray(rng.standard_normal((2, 1, 4, 16)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((2, 48, 2, 16)), jnp.float32)
    pages, table = dense_as_pages(cache, 16)
    lengths = jnp.asarray([48, 20], jnp.int32)
    out = jax.jit(functools.partial(decode_attention, block_k=32))(q, pages, pages, table, lengths)
    qf = np.asarray(q).reshape(2, 2, 2, 16)
    keys = np.asarray(cache, np.float64)
    for i, length in enumerate([48, 20]):
        s = np.einsum("kgh,skh->kgs", qf[i], keys[i, :length]) / 4.0
        p = np.exp(s - s.max(-1, keepdims=True))
        ref = np.einsum("kgs,skh->kgh", p / p.sum(-1, keepdims=True), keys[i, :length]).reshape(4, 16)
        np.testing.assert_allclose(np.asarray(out[i, 0]), ref, atol=2e-5)


def test_errors_name_the_argument():
    args = _problem(0)
    with pytest.raises(ValueError, match="k_scales"):
        int8 = {name: args[name].astype(jnp.int8) for name in ("k_pages", "v_pages")}
        decode_attention(**dict(args, **int8))
    with pytest.raises(ValueError, match="page_table"):
        decode_attention(**dict(args, page_table=args["page_table"][:1]))
    with pytest.raises(ValueError, match="value_dim"):
        decode_attention(**dict(args, v_pages=None))
    with pytest.raises(ValueError, match="block_map"):
        decode_attention(**args, block_k=16, block_map=jnp.zeros((3, 2), jnp.int8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int8, jnp.float8_e4m3fn])
def test_xla_temporaries_do_not_scale_with_the_pool_or_the_cache(dtype):
    """The XLA body's compiled temporaries are per tile: the same for a pool of 64 or 4096 pages, and
    far below one dense gather of the keys at a long cache (which the reference needs). 16-bit and fp8
    pools too: XLA:CPU would otherwise convert the whole pool to float32 before the loop."""
    b, n, k, h, ps = 2, 4, 2, 64, 16
    quantized = jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))

    def temp_bytes(pool, max_pages):
        scales = jax.ShapeDtypeStruct((pool, ps, k), jnp.float32) if quantized else None
        args = (
            jax.ShapeDtypeStruct((b, 1, n, h), jnp.float32 if quantized else dtype),
            jax.ShapeDtypeStruct((pool, ps, k, h), dtype),
            jax.ShapeDtypeStruct((pool, ps, k, h), dtype),
            jax.ShapeDtypeStruct((b, max_pages), jnp.int32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            scales,
        )
        fn = lambda q, kp, vp, table, lengths, sc: decode_attention(q, kp, vp, table, lengths, k_scales=sc,
                                                                     v_scales=sc, block_k=64)  # fmt: skip
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(64, 8), temp_bytes(4096, 8)
    assert small == large
    long_cache = temp_bytes(4096, 256)  # 32x the cache length: only the per-tile plan grows
    dense_keys = b * 256 * ps * k * h * jnp.dtype(dtype).itemsize
    assert long_cache - large < dense_keys / 100
    assert long_cache < dense_keys / 4


def test_pallas_bodies_name_what_they_cannot_serve():
    """Head dims a body cannot tile raise a ValueError naming the kernel, before anything runs."""
    odd = _problem(0, h=72, hv=72)  # not a multiple of 16: Triton would need a padded copy of the pool
    with pytest.raises(ValueError, match="kernel='triton'"):
        decode_attention(**odd, kernel="triton", interpret=True)
    narrow = _problem(0, h=64, hv=64)  # K = 2 heads of 64 lanes: not a (8, 128) block of the pool
    with pytest.raises(ValueError, match="kernel='mosaic_tpu'"):
        decode_attention(**narrow, kernel="mosaic_tpu", interpret=True)
    with pytest.raises(ValueError, match="kv_vals"):
        segments = jnp.zeros((3, 64), jnp.int32)
        decode_attention(**_problem(0), kernel="mosaic_tpu", interpret=True, mask_fn=_causal,
                         q_positions=jnp.zeros((3, 1), jnp.int32), kv_vals=(segments,))  # fmt: skip


def _alibi(score, batch, head, q_pos, kv_pos, params):
    return score + params[0] * (kv_pos - q_pos).astype(score.dtype)


def test_score_fn_alibi_matches_a_float64_loop():
    """ALiBi through score_fn on the XLA body == a float64 computation written here; Pallas bodies refuse it."""
    args = _problem(7, t=2, n=4, k=2, h=32, hv=32, c=48, ps=8, lengths=(48, 20, 7))
    lengths = np.asarray(args["lengths"])
    q_pos = lengths[:, None] - 2 + np.arange(2)[None, :]
    slopes = np.asarray([0.5, 0.25, 0.125, 0.0625], np.float32)
    extra = dict(q_positions=jnp.asarray(q_pos, jnp.int32), mask_fn=_causal, score_fn=_alibi,
                 score_params=(jnp.asarray(slopes),), block_k=16, num_splits=2)  # fmt: skip
    out = np.asarray(jax.jit(lambda a: decode_attention(**a, **extra))(args), np.float64)
    ref = np.asarray(decode_attention_reference(**args, **extra), np.float64)
    # The oracle: dense keys gathered in numpy, scores + slope * (kv_pos - q_pos), causal, float64 softmax.
    table, kp, vp = (np.asarray(args[k], np.float64) for k in ("page_table", "k_pages", "v_pages"))
    q = np.asarray(args["q"], np.float64)
    expected = np.zeros_like(out)
    for b in range(3):
        keys = np.concatenate([kp[int(p)] for p in table[b] if p >= 0])[: lengths[b]]  # [S, K, H]
        values = np.concatenate([vp[int(p)] for p in table[b] if p >= 0])[: lengths[b]]
        for t in range(2):
            for n in range(4):
                kv = n // 2
                s = keys[:, kv] @ q[b, t, n] / np.sqrt(32) + slopes[n] * (np.arange(lengths[b]) - q_pos[b, t])
                s = np.where(np.arange(lengths[b]) <= q_pos[b, t], s, -np.inf)
                w = np.exp(s - s.max())
                expected[b, t, n] = (w / w.sum()) @ values[:, kv]
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(ref, expected, atol=1e-5)
    for kernel in ("triton", "mosaic_tpu"):
        with pytest.raises(ValueError, match="score_fn"):
            decode_attention(**args, **extra, kernel=kernel, interpret=True)
