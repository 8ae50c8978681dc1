"""The cache pytrees on their own: views and positions, paging, eviction, int8, overflow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax.cache import KVCache, PagedKVCache, RollingKVCache

SIZES = dict(num_kv_heads=2, head_dim=4)


@jax.jit
def _update(cache, keys, values, lengths=None):
    """``cache.update`` compiled once per shape: eager dispatch of its small ops is slower to test."""
    return cache.update(keys, values, lengths=lengths)


def _tokens(b, t, start, heads=2, dim=4):
    """Keys whose every entry is the token's position: ``[B, T, K, H]`` with value ``start[b] + i``."""
    pos = np.asarray(start)[:, None] + np.arange(t)[None, :]
    return jnp.broadcast_to(jnp.asarray(pos, jnp.float32)[:, :, None, None], (b, t, heads, dim))


def _positions_seen(view):
    """Per sequence, the positions held in the valid slots (read back from the key values)."""
    keys = np.asarray(view.keys[:, :, 0, 0])
    valid = np.asarray(view.kv_valid)
    return [keys[b][valid[b]].astype(int).tolist() for b in range(keys.shape[0])]


def _check_positions(view):
    """A valid slot s holds position kv_offset + s: the mask's positions are exact."""
    keys, valid = np.asarray(view.keys[:, :, 0, 0]), np.asarray(view.kv_valid)
    slots = np.asarray(view.kv_offset)[:, None] + np.arange(keys.shape[1])[None, :]
    np.testing.assert_array_equal(np.where(valid, keys, -1), np.where(valid, slots, -1))


def test_dense_mixed_lengths_and_positions():
    cache = KVCache.create(2, 8, **SIZES)
    k = _tokens(2, 4, [0, 0])
    cache, view = _update(cache, k, k, jnp.array([4, 2]))
    assert _positions_seen(view) == [[0, 1, 2, 3], [0, 1]]
    assert view.q_offset.tolist() == [0, 0]
    np.testing.assert_array_equal(cache.positions(1), [[4], [2]])
    k = _tokens(2, 1, [4, 2])
    cache, view = _update(cache, k, k)
    assert _positions_seen(view) == [[0, 1, 2, 3, 4], [0, 1, 2]]
    assert view.q_offset.tolist() == [4, 2]
    _check_positions(view)


def test_rolling_evicts_and_orders_by_position():
    cache = RollingKVCache.create(1, 3, **SIZES)
    k = _tokens(1, 5, [0])  # a prefill longer than the window
    cache, view = _update(cache, k, k)
    # The view holds the ring before the update (nothing yet) and all new tokens.
    assert _positions_seen(view) == [[0, 1, 2, 3, 4]]
    for step in range(5, 9):
        k = _tokens(1, 1, [step])
        cache, view = _update(cache, k, k)
        assert _positions_seen(view) == [list(range(step - 3, step + 1))]  # the window and the new token
        _check_positions(view)
    assert int(cache.lengths[0]) == 9 and not bool(cache.overflow[0])


def test_rolling_mixed_lengths():
    cache = RollingKVCache.create(2, 2, **SIZES)
    k = _tokens(2, 3, [0, 0])
    cache, view = _update(cache, k, k, jnp.array([3, 1]))
    k = _tokens(2, 1, [3, 1])
    cache, view = _update(cache, k, k)
    assert _positions_seen(view) == [[1, 2, 3], [0, 1]]
    _check_positions(view)


def test_paged_allocation_sharing_and_free():
    cache = PagedKVCache.create(2, num_pages=5, page_size=2, max_pages=4, **SIZES)
    k = _tokens(2, 5, [0, 0])
    cache, view = _update(cache, k, k, jnp.array([5, 2]))
    assert cache.page_table.tolist() == [[0, 1, 2, -1], [3, -1, -1, -1]]
    assert _positions_seen(view) == [list(range(5)), [0, 1]]
    _check_positions(view)
    k = _tokens(2, 1, [5, 2])
    cache, view = _update(cache, k, k)  # sequence 1 needs a page, 0 fits in its third page
    assert cache.page_table.tolist() == [[0, 1, 2, -1], [3, 4, -1, -1]]
    assert int(cache.num_free_pages) == 0
    assert _positions_seen(view) == [list(range(6)), [0, 1, 2]]
    # The pool is dry: sequence 0's next page cannot be had.
    with pytest.raises(ValueError, match="PagedKVCache cannot take"):
        cache.update(_tokens(2, 1, [6, 3]), _tokens(2, 1, [6, 3]))
    # Freeing sequence 0 returns its pages; they are reused lowest first.
    cache = cache.free(jnp.array([True, False]))
    assert int(cache.num_free_pages) == 3 and cache.lengths.tolist() == [0, 3]
    k = _tokens(2, 1, [0, 3])
    cache, view = _update(cache, k, k)
    assert cache.page_table.tolist() == [[0, -1, -1, -1], [3, 4, -1, -1]]
    assert _positions_seen(view) == [[0], [0, 1, 2, 3]]


def test_paged_allocate_ahead():
    cache = PagedKVCache.create(2, num_pages=6, page_size=4, **SIZES).allocate(jnp.array([9, 1]))
    assert cache.page_table[:, :3].tolist() == [[0, 1, 2], [3, -1, -1]]
    assert cache.lengths.tolist() == [0, 0]


@pytest.mark.parametrize("kind", ["dense", "rolling", "paged"])
def test_int8_roundtrip_and_bytes(kind):
    make = {
        "dense": lambda q: KVCache.create(1, 8, quantized=q, **SIZES),
        "rolling": lambda q: RollingKVCache.create(1, 8, quantized=q, **SIZES),
        "paged": lambda q: PagedKVCache.create(1, num_pages=2, page_size=4, quantized=q, **SIZES),
    }[kind]
    k = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    v = jax.random.normal(jax.random.key(1), (1, 5, 2, 4))
    plain, quant = make(False), make(True)
    assert plain.bytes_per_token == 2 * (4 + 4) * 4 and quant.bytes_per_token == 2 * (4 + 4) + 2 * 2 * 4
    assert quant.storage.keys.dtype == jnp.int8
    _, view = _update(quant, k, v)
    _, exact = _update(plain, k, v)
    valid = np.asarray(view.kv_valid[0])
    # Per-token-per-head scales: error at most half a step, max|x| / 254, of that token and head.
    bound = np.max(np.abs(np.asarray(k)), axis=-1, keepdims=True) / 254 + 1e-7
    assert np.all(np.abs(np.asarray(view.keys[0])[valid] - np.asarray(exact.keys[0])[valid]) <= bound[0])


@pytest.mark.parametrize("kind", ["dense", "rolling", "paged"])
def test_fp8_roundtrip_and_bytes(kind):
    make = {
        "dense": lambda q: KVCache.create(1, 8, quantized=q, **SIZES),
        "rolling": lambda q: RollingKVCache.create(1, 8, quantized=q, **SIZES),
        "paged": lambda q: PagedKVCache.create(1, num_pages=2, page_size=4, quantized=q, **SIZES),
    }[kind]
    k = jax.random.normal(jax.random.key(0), (1, 5, 2, 4)) * jnp.array([1e-3, 1.0, 10.0, 100.0])  # wide range
    plain, fp8, int8 = make(False), make("fp8"), make("int8")
    assert fp8.storage.keys.dtype == jnp.float8_e4m3fn and fp8.storage.quantization == "fp8"
    assert fp8.bytes_per_token == int8.bytes_per_token == 2 * (4 + 4) + 2 * 2 * 4
    _, exact = _update(plain, k, k)
    for cache, step in ((fp8, None), (int8, 254)):
        _, view = _update(cache, k, k)
        valid = np.asarray(view.kv_valid[0])
        error = np.abs(np.asarray(view.values[0])[valid] - np.asarray(exact.values[0])[valid])
        x = np.asarray(exact.values[0])[valid]
        top = np.max(np.abs(x), axis=-1, keepdims=True)
        if step is None:
            # e4m3 keeps 3 mantissa bits: half a step is 2**-4 of the entry; below the normal range (2**-6 of the
            # scale unit) the subnormal step is 2**-9 units, scale = max|x| / 448.
            bound = np.maximum(np.abs(x) * 2.0**-4, top / 448 * 2.0**-10) * (1 + 1e-6)
        else:
            bound = top / step * (1 + 1e-6)
        assert np.all(error <= bound), (kind, step)
    with pytest.raises(ValueError, match="quantized must be False, True, 'int8' or 'fp8'"):
        make("int4")


def test_keys_only_cache():
    cache = KVCache.create(1, 4, num_kv_heads=1, head_dim=20, value_head_dim=0)
    assert cache.elements_per_token == 20 and cache.storage.values is None
    cache, view = _update(cache, jnp.ones((1, 2, 1, 20)), None)
    assert view.values is None
    with pytest.raises(ValueError, match="keys only"):
        cache.update(jnp.ones((1, 1, 1, 20)), jnp.ones((1, 1, 1, 20)))


def test_overflow_raises_eagerly_and_flags_under_jit():
    cache = KVCache.create(2, 4, **SIZES)
    k = jnp.ones((2, 3, 2, 4))
    cache, _ = cache.update(k, k)
    with pytest.raises(ValueError, match=r"\[3, 3\] more tokens.*capacity=4"):
        cache.update(k, k)

    @jax.jit
    def write(cache):
        return cache.update(k, k, lengths=jnp.array([3, 1]))[0]

    cache = write(cache)  # nothing raises under jit: the flag is set, the extra tokens dropped
    assert cache.overflow.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"sequences \[0\]"):
        cache.check()
    # Nothing wrapped around: slot 0 still holds the first token of sequence 0.
    assert float(cache.storage.keys[0, 0, 0, 0]) == 1.0 and cache.lengths.tolist() == [6, 4]


def test_paged_overflow_under_jit():
    cache = PagedKVCache.create(2, num_pages=3, page_size=2, **SIZES)
    k = jnp.ones((2, 4, 2, 4))
    cache = jax.jit(lambda c: c.update(k, k)[0])(cache)  # 4 pages wanted, 3 in the pool
    assert cache.overflow.tolist() == [False, True]
    with pytest.raises(ValueError, match="overflowed"):
        cache.check()


def test_bad_updates_raise_with_shapes():
    cache = KVCache.create(2, 4, **SIZES)
    with pytest.raises(ValueError, match=r"\[2, 1, 2, 4\].*\(2, 1, 3, 4\)"):
        cache.update(jnp.ones((2, 1, 3, 4)), jnp.ones((2, 1, 3, 4)))
    with pytest.raises(ValueError, match="values must have shape"):
        cache.update(jnp.ones((2, 1, 2, 4)), jnp.ones((2, 1, 2, 5)))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T=1\]"):
        cache.update(jnp.ones((2, 1, 2, 4)), jnp.ones((2, 1, 2, 4)), lengths=jnp.array([2, 0]))
    with pytest.raises(ValueError, match="capacity must be a positive integer"):
        KVCache.create(2, 0, **SIZES)


def test_caches_are_pytrees_through_jit():
    for cache in (
        KVCache.create(1, 4, quantized=True, **SIZES),
        RollingKVCache.create(1, 2, **SIZES),
        PagedKVCache.create(1, num_pages=2, page_size=2, **SIZES),
    ):
        k = jnp.ones((1, 1, 2, 4))
        out, view = _update(cache, k, k)
        assert type(out) is type(cache) and out.lengths.tolist() == [1]
        assert jax.tree.structure(out) == jax.tree.structure(cache)


def test_exported_names():
    assert aj.cache.KVCache is KVCache and aj.cache.quantize is not None
