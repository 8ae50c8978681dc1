"""cached_attention: a decode step through the decode kernels equals attention over the whole token stream.

Each case writes a ragged prompt into a cache, then attends ``T`` new queries (one token, a block of
drafts) through :func:`attention_jax.functional.cached_attention`; the oracle is a float64 loop over
each sequence's stream of keys (as the cache stores them: int8/fp8 round-tripped) written here.
A decode step of a layer with a paged int8 cache keeps its attention temporaries flat when the cache
grows 4x (the dense-gather path's grow with it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.functional import backends
from attention_jax.functional.cached import cached_attention, decode_kernel, fallback_reason

B, K, G, H = 2, 2, 2, 16
N = K * G
PROMPT = np.array([7, 3])


def _cache(kind, quantized, capacity, value_dim=H, max_rollback=0, window=None, dtype=jnp.float32):
    sizes = dict(num_kv_heads=K, head_dim=H, value_head_dim=value_dim, quantized=quantized, dtype=dtype)
    if kind == "dense":
        return aj.cache.KVCache.create(B, capacity, **sizes)
    if kind == "paged":  # a pool smaller than B * max_pages: sequences interleave pages
        return aj.cache.PagedKVCache.create(B, num_pages=7, page_size=4, max_pages=4, **sizes)
    return aj.cache.RollingKVCache.create(B, window, max_rollback=max_rollback, **sizes)


def _reference(q, stream_k, stream_v, q_pos, *, window, softcap, sinks, scale):
    """float64: query row ``t`` of sequence ``b`` over its stream's keys at positions ``0 .. len - 1``."""
    q = np.asarray(q.astype(jnp.float32), np.float64)
    b, t, n, _ = q.shape
    out = np.zeros((b, t, n, stream_v[0].shape[-1]))
    for i in range(b):
        k, v = np.asarray(stream_k[i], np.float64), np.asarray(stream_v[i], np.float64)  # [S, K, H]
        pos = np.arange(k.shape[0])
        for j in range(t):
            p = q_pos[i, j]
            visible = (pos <= p) & ((pos >= p - window) if window is not None else True)
            for h in range(n):
                kv_head = h // (n // k.shape[1])
                s = k[:, kv_head] @ q[i, j, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                s = np.where(visible, s, -np.inf)
                logits = s if sinks is None else np.append(s, sinks[h])
                w = np.exp(logits - logits.max())
                w = w / w.sum()
                out[i, j, h] = w[: len(s)] @ v[:, kv_head]
    return out


CASES = [  # kind, quantized, window, T, max_rollback, softcap, sinks, dtype
    ("dense", False, None, 1, 0, None, False, "float32"),
    ("paged", "int8", 5, 3, 0, 20.0, True, "float32"),
    ("rolling", False, 5, 2, 0, None, True, "float32"),
    ("rolling", "fp8", 4, 3, 2, None, False, "float32"),
    ("paged", False, 5, 2, 0, None, True, "bfloat16"),
]
TOLERANCE = {"float32": 2e-5, "bfloat16": 2e-2}


@pytest.mark.parametrize("kind,quantized,window,t,max_rollback,softcap,sinks,dtype", CASES)
def test_decode_step_equals_attention_over_the_stream(kind, quantized, window, t, max_rollback, softcap, sinks,
                                                      dtype):  # fmt: skip
    r = np.random.default_rng(0)
    p = int(PROMPT.max())
    kp, vp = (jnp.asarray(r.normal(size=(B, p, K, H)), dtype) for _ in range(2))
    kn, vn = (jnp.asarray(r.normal(size=(B, t, K, H)), dtype) for _ in range(2))
    q = jnp.asarray(r.normal(size=(B, t, N, H)), dtype)
    sink = jnp.asarray(r.normal(size=(N,)), jnp.float32) if sinks else None
    cache = _cache(kind, quantized, 16, max_rollback=max_rollback, window=window, dtype=dtype)
    cache, _ = cache.update(kp, vp, lengths=jnp.asarray(PROMPT))
    if max_rollback:  # decode after rolling back drafts == never having written them
        drafts = jnp.asarray(r.normal(size=(B, max_rollback, K, H)), dtype)
        cache, _ = cache.update(drafts, drafts)
        cache = cache.rollback(max_rollback)
    mask = aj.masks.causal() if window is None else aj.masks.causal() & aj.masks.sliding_window(window)
    assert fallback_reason(q, cache, mask=mask) is None
    out, new_cache = cached_attention(q, kn, vn, cache, mask=mask, softcap=softcap, sinks=sink)
    new_cache.check()
    assert out.shape == (B, t, N, H) and out.dtype == q.dtype
    st = cache.storage
    stored = lambda x: np.asarray(st.roundtrip(x), np.float64)
    stream_k = [np.concatenate([stored(kp)[i, : PROMPT[i]], stored(kn)[i]]) for i in range(B)]
    stream_v = [np.concatenate([stored(vp)[i, : PROMPT[i]], stored(vn)[i]]) for i in range(B)]
    q_pos = PROMPT[:, None] + np.arange(t)
    want = _reference(q, stream_k, stream_v, q_pos, window=window, softcap=softcap, scale=H**-0.5,
                      sinks=None if sink is None else np.asarray(sink))  # fmt: skip
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=tol, rtol=tol)
    assert new_cache.lengths.tolist() == (PROMPT + t).tolist()


@pytest.mark.parametrize("implementation", ["reference", backends.Blockwise(block_k=16)])
def test_keys_only_cache_and_other_implementations(implementation):
    """MLA's latent cache (values = the keys' first channels) through the reference body and today's path."""
    r = np.random.default_rng(1)
    hv = 8
    cache = aj.cache.PagedKVCache.create(B, num_pages=7, page_size=4, max_pages=4, num_kv_heads=1, head_dim=H,
                                         value_head_dim=0)  # fmt: skip
    kp = jnp.asarray(r.normal(size=(B, 7, 1, H)), jnp.float32)
    kn = jnp.asarray(r.normal(size=(B, 1, 1, H)), jnp.float32)
    q = jnp.asarray(r.normal(size=(B, 1, N, H)), jnp.float32)
    cache, _ = cache.update(kp, None, lengths=jnp.asarray(PROMPT))
    fast, _ = cached_attention(q, kn, None, cache, mask=aj.masks.causal(), value_dim=hv, return_lse=True)
    other, _ = cached_attention(q, kn, None, cache, mask=aj.masks.causal(), value_dim=hv, return_lse=True,
                                implementation=implementation)  # fmt: skip
    stream = [np.concatenate([kp[i, : PROMPT[i]], kn[i]]) for i in range(B)]
    want = _reference(q, stream, [s[..., :hv] for s in stream], PROMPT[:, None], window=None, softcap=None,
                      sinks=None, scale=H**-0.5)  # fmt: skip
    for out, _ in (fast, other):
        np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(fast[1]), np.asarray(other[1]), atol=2e-5, rtol=2e-5)


def test_fallbacks_are_named():
    q = jnp.zeros((B, 1, N, H))
    cache = _cache("dense", False, 16)
    assert decode_kernel(None, "cpu") == "xla" and decode_kernel("pallas", "gpu") == "triton"
    assert decode_kernel("pallas", "cpu") is None and decode_kernel(backends.Blockwise()) is None
    assert fallback_reason(q, cache, score_mod=aj.score_mods.alibi(jnp.ones(N))) is None  # on the tiles
    assert "boolean-array" in fallback_reason(q, cache, mask=jnp.ones((1, 1, 1, 16), bool))
    assert "prefill" in fallback_reason(jnp.zeros((B, 17, N, H)), cache)
    assert "Blockwise" in fallback_reason(q, cache, implementation=backends.Blockwise())
    assert fallback_reason(q, cache, mask=aj.masks.causal()) is None


@pytest.mark.parametrize("kind", ["paged", "rolling"])
def test_score_mods_decode_on_the_kernel_path(kind):
    """ALiBi and a T5 bias run on the decode kernel's tiles: == today's path (cache view + the core op)."""
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.standard_normal((B, 2, N, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, 2, K, H)), jnp.float32) for _ in range(2))
    q5 = jnp.asarray(rng.standard_normal((B, 5, N, H)), jnp.float32)
    k5, v5 = (jnp.asarray(rng.standard_normal((B, 5, K, H)), jnp.float32) for _ in range(2))
    table = jnp.asarray(rng.standard_normal((8, N)), jnp.float32)  # [buckets, N]
    alibi = aj.score_mods.alibi(jnp.linspace(0.1, 0.8, N))
    t5_bias = aj.score_mods.relative_position_bias(table, 8, 16, bidirectional=False)
    for score_mod in (alibi, t5_bias):
        cache = _cache(kind, False, 16, window=6)
        window = aj.masks.sliding_window(6) if kind == "rolling" else aj.masks.full()
        kw = dict(mask=aj.masks.causal() & window, score_mod=score_mod)
        _, cache = cached_attention(q5, k5, v5, cache, **kw)  # a prompt of 5 first: the ring wraps
        fast, _ = cached_attention(q, k, v, cache, **kw)
        slow, _ = cached_attention(q, k, v, cache, **kw, implementation=backends.Reference())
        np.testing.assert_allclose(np.asarray(fast), np.asarray(slow), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="score_mod"):
        cached_attention(q, k, v, cache, score_mod="alibi")


def _layer(implementation, capacity):
    layer = aj.nn.MultiHeadAttention(32, num_heads=N, num_kv_heads=K, mask=aj.masks.causal(), sliding_window=64,
                                     implementation=implementation, rngs=nnx.Rngs(0))  # fmt: skip
    return layer, layer.init_cache(B, capacity, kind="paged", quantized="int8", page_size=16)


def _temp_bytes(fn, *args) -> int:
    return jax.jit(fn).trace(*args).lower().compile().memory_analysis().temp_size_in_bytes


def test_decode_step_temporaries_do_not_grow_with_the_cache():
    """Attention's temporaries (a layer step's minus its cache write's) stay flat when the cache and pool grow 4x."""
    token = jnp.zeros((B, 1, 32))
    grown = {}
    for name, impl in (("kernel", None), ("dense view", backends.Blockwise())):
        temps = []
        for capacity in (256, 1024):
            layer, cache = _layer(impl, capacity)
            graphdef, state = nnx.split(layer)
            step = lambda state, cache, token: nnx.merge(graphdef, state)(token, cache=cache)  # noqa: B023
            write = lambda cache, token: cache.update(*(2 * [jnp.zeros((B, 1, K, 32 // N))]))[0]
            temps.append(_temp_bytes(step, state, cache, token) - _temp_bytes(write, cache, token))
        grown[name] = temps
    # int8 K/V of 256 more slots per sequence, dequantised to float32: what a dense view costs.
    dense_bytes = B * (1024 - 256) * K * (2 * 32 // N) * 4
    assert grown["kernel"][1] <= grown["kernel"][0] + 4096, grown
    assert grown["dense view"][1] - grown["dense view"][0] >= dense_bytes, grown


def test_one_sequence_decode_step_writes_its_dense_cache_in_place():
    """B=1, T=1: XLA turns the cache write into a dynamic-update-slice. Read through a reshape of the pool,
    that write was performed twice, each on its own copy of the whole cache (4 copies per layer step);
    the kernel's gather reads the written cache as it is, so the donated step needs no cache-sized buffer."""
    layer = aj.nn.MultiHeadAttention(32, num_heads=N, num_kv_heads=K, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    cache = layer.init_cache(1, 2048)
    graphdef, state = nnx.split(layer)
    step = jax.jit(lambda state, cache, token: nnx.merge(graphdef, state)(token, cache=cache), donate_argnums=1)
    temp = step.trace(state, cache, jnp.zeros((1, 1, 32))).lower().compile().memory_analysis().temp_size_in_bytes
    assert temp < cache.storage.keys.nbytes, (temp, cache.storage.keys.nbytes)


def _triton_step(q, kn, vn, cache, interpret):
    mask = aj.masks.causal() & aj.masks.sliding_window(5)
    return cached_attention(q, kn, vn, cache, mask=mask, kernel="triton", interpret=interpret)[0]


def test_triton_body_interpreted_and_lowered_for_cuda():
    r = np.random.default_rng(2)
    kp, kn, vn = (jnp.asarray(r.normal(size=(B, s, K, H)), jnp.float32) for s in (7, 2, 2))
    q = jnp.asarray(r.normal(size=(B, 2, N, H)), jnp.float32)
    cache, _ = _cache("paged", "int8", 16).update(kp, kp, lengths=jnp.asarray(PROMPT))
    got = jax.jit(_triton_step, static_argnums=4)(q, kn, vn, cache, True)
    want = cached_attention(q, kn, vn, cache, mask=aj.masks.causal() & aj.masks.sliding_window(5))[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    lowered = jax.jit(_triton_step, static_argnums=4).trace(q, kn, vn, cache, False).lower(lowering_platforms=("cuda",))
    assert "triton" in lowered.as_text().lower()


def test_mosaic_tpu_body_interpreted_and_lowered_for_tpu():
    r = np.random.default_rng(3)
    h = 128  # the TPU body's lanes
    cache = aj.cache.PagedKVCache.create(B, num_pages=8, page_size=32, max_pages=4, num_kv_heads=K, head_dim=h,
                                         quantized="int8")  # fmt: skip
    kp, kn = (jnp.asarray(r.normal(size=(B, s, K, h)), jnp.float32) for s in (40, 2))
    q = jnp.asarray(r.normal(size=(B, 2, N, h)), jnp.float32)
    cache, _ = cache.update(kp, kp, lengths=jnp.asarray([40, 23]))
    mask = aj.masks.causal() & aj.masks.sliding_window(20)

    def step(q, kn, cache, interpret):
        return cached_attention(q, kn, kn, cache, mask=mask, kernel="mosaic_tpu", interpret=interpret)[0]

    got = jax.jit(step, static_argnums=3)(q, kn, cache, True)
    want = cached_attention(q, kn, kn, cache, mask=mask, implementation="reference")[0]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    lowered = jax.jit(step, static_argnums=3).trace(q, kn, cache, False).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_layer_decode_through_the_kernel_equals_the_full_forward():
    """A sliding-window GQA layer with sinks and softcap: a rolling cache, a prefill and a 3-token verify block."""
    layer = aj.nn.MultiHeadAttention(
        32, num_heads=N, num_kv_heads=K, rope=aj.positional.RoPE(), softcap=20.0, sinks=True, mask=aj.masks.causal(),
        sliding_window=3, rngs=nnx.Rngs(0),
    )  # fmt: skip
    layer.sinks[...] = jnp.linspace(-1.0, 1.0, N)
    seq = jax.random.normal(jax.random.key(3), (B, 9, 32))

    @nnx.jit
    def run(layer, seq):
        cache = layer.init_cache(B, 16, kind="rolling")
        first, cache = layer(seq[:, :6], cache=cache, lengths=jnp.asarray([6, 6]))
        block, cache = layer(seq[:, 6:9], cache=cache)
        return layer(seq), first, block

    full, first, block = run(layer, seq)
    assert fallback_reason(jnp.zeros((B, 3, N, 8)), layer.init_cache(B, 16, kind="rolling")) is None
    np.testing.assert_allclose(np.asarray(first), np.asarray(full[:, :6]), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(block), np.asarray(full[:, 6:9]), atol=2e-5, rtol=2e-5)
