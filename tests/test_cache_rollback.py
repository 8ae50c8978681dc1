"""Rolling back caches (rollback then re-decode == never having decoded those tokens) and copy-on-write pages."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.cache import KVCache, PagedKVCache, RollingKVCache

SIZES = dict(num_kv_heads=1, head_dim=4)
B, D, WINDOW = 2, 16, 3


@functools.cache
def _layer(window=None):
    return aj.nn.MultiHeadAttention(D, num_heads=2, num_kv_heads=1, rope=aj.positional.RoPE(), mask=aj.masks.causal(),
                                    sliding_window=window, rngs=nnx.Rngs(0))  # fmt: skip


_call = nnx.jit(lambda layer, x, cache, lengths: layer(x, cache=cache, lengths=lengths))


@jax.jit
def _update(cache, keys, values):
    return cache.update(keys, values)


def _make(kind, max_rollback=4, head_dim=4):
    sizes = dict(num_kv_heads=1, head_dim=head_dim)
    return {
        "dense": lambda: KVCache.create(B, 16, **sizes),
        "paged": lambda: PagedKVCache.create(B, num_pages=12, page_size=2, max_pages=8, **sizes),
        "rolling": lambda: RollingKVCache.create(B, WINDOW, max_rollback=max_rollback, **sizes),
    }[kind]()


def _views_by_position(view):
    """Per sequence: {position: key vector} over the valid slots (the view's layout may differ, its content not)."""
    keys, valid = np.asarray(view.keys), np.asarray(view.kv_valid)
    pos = np.asarray(view.kv_offset)[:, None] + np.arange(keys.shape[1])[None, :]
    return [{int(p): keys[b, s].tolist() for s, p in enumerate(pos[b]) if valid[b, s]} for b in range(B)]


def _ref_counts_are_exact(cache):
    table = np.asarray(cache.page_table)
    expected = np.bincount(table[table >= 0], minlength=cache.num_pages)
    np.testing.assert_array_equal(np.asarray(cache.ref_counts), expected)


@pytest.mark.parametrize("kind", ["dense", "paged", "rolling"])
def test_rollback_then_decode_equals_never_decoding(kind):
    """Layer outputs and cache views after a ragged rollback equal those of a cache that never saw the tokens."""
    window = WINDOW if kind == "rolling" else None
    layer = _layer(window)
    x = jax.random.normal(jax.random.key(0), (B, 12, D))
    prompt, block, after = x[:, :5], x[:, 5:9], x[:, 9:12]
    kept = jnp.array([1, 3])  # of the block's 4 tokens: roll back 3 and 1
    # With the rollback: prefill, read the whole block, roll back its rejected tail (traced n, under jit).
    _, cache = _call(layer, prompt, _make(kind, head_dim=D // 2), None)
    _, cache = _call(layer, block, cache, None)
    cache = jax.jit(lambda c, n: c.rollback(n))(cache, 4 - kept)
    y, cache = _call(layer, after, cache, None)
    # Never: prefill, then only the kept tokens of the block.
    _, never = _call(layer, prompt, _make(kind, head_dim=D // 2), None)
    _, never = _call(layer, block, never, kept)
    y_never, never = _call(layer, after, never, None)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_never), rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == never.lengths.tolist() == [9, 11] and not bool(jnp.any(cache.overflow))
    probe = jnp.ones((B, 1, *cache.storage.keys.shape[-2:]))
    assert _views_by_position(_update(cache, probe, probe)[1]) == _views_by_position(_update(never, probe, probe)[1])
    if kind == "paged":  # the pages of the rolled-back tail went back to the pool
        assert int(cache.num_free_pages) == int(never.num_free_pages)
        _ref_counts_are_exact(cache)


def test_rollback_limits():
    cache = _make("dense")
    cache, _ = _update(cache, jnp.ones((B, 3, 1, 4)), jnp.ones((B, 3, 1, 4)))
    with pytest.raises(ValueError, match=r"n must lie in \[0, lengths\]"):
        cache.rollback(4)
    with pytest.raises(ValueError, match=r"n must be an int or ints of shape \[B\]=\[2\]"):
        cache.rollback(jnp.array([1, 1, 1]))
    assert jax.jit(lambda c: c.rollback(jnp.array([5, 1])))(cache).lengths.tolist() == [0, 2]  # clipped under jit
    # A rolling cache can go back at most max_rollback below the furthest length reached.
    ring = _make("rolling", max_rollback=2)
    ring, _ = _update(ring, jnp.ones((B, 7, 1, 4)), jnp.ones((B, 7, 1, 4)))
    assert ring.rollback(2).lengths.tolist() == [5, 5]
    with pytest.raises(ValueError, match=r"cannot roll back \[3, 3\] tokens.*larger max_rollback"):
        ring.rollback(3)
    lost = jax.jit(lambda c: c.rollback(jnp.array([3, 1])))(ring)  # under jit: the flag, as for an overflow
    assert lost.overflow.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"RollingKVCache overflowed: sequences \[0\] were rolled back"):
        lost.check()


def test_fork_diverge_and_free():
    """Forked sequences share pages, each reads what it wrote, pages return when their last holder lets go."""
    cache = PagedKVCache.create(3, num_pages=8, page_size=2, max_pages=4, **SIZES)
    tokens = lambda b, t, start, offset=0.0: jnp.broadcast_to(
        (offset + start + jnp.arange(t, dtype=jnp.float32))[None, :, None, None], (b, t, 1, 4)
    )  # keys holding their position (plus an offset per sequence)
    cache, _ = _update(cache, tokens(3, 5, 0), tokens(3, 5, 0))
    cache = cache.free(jnp.array([False, True, True]))
    cache = cache.fork(0, jnp.array([1, 2]))  # both share sequence 0's three pages
    assert cache.page_table[:, :3].tolist() == [[0, 1, 2]] * 3 and cache.lengths.tolist() == [5, 5, 5]
    assert cache.ref_counts[:3].tolist() == [3, 3, 3] and int(cache.num_free_pages) == 5
    # Every sequence writes position 5 into the shared, half-full page 2: the first keeps it, the others copy.
    offsets = jnp.array([0.0, 100.0, 200.0])[:, None, None, None]
    new = tokens(3, 1, 5) + offsets
    cache, view = _update(cache, new, new)
    assert cache.page_table[:, :3].tolist() == [[0, 1, 2], [0, 1, 3], [0, 1, 4]]
    _ref_counts_are_exact(cache)
    keys, valid = np.asarray(view.keys[:, :, 0, 0]), np.asarray(view.kv_valid)
    for b, offset in enumerate((0, 100, 200)):
        assert keys[b][valid[b]].tolist() == [0, 1, 2, 3, 4, 5 + offset]
    # Sequence 1 rolls back into the shared page 1 and writes: only that page is copied.
    cache = cache.rollback(jnp.array([0, 3, 0]))
    _ref_counts_are_exact(cache)
    assert cache.page_table[1].tolist() == [0, 1, -1, -1] and int(cache.ref_counts[3]) == 0
    cache, view = jax.jit(lambda c, k: c.update(k, k, lengths=jnp.array([0, 1, 0])))(cache, tokens(3, 1, 3) + offsets)
    assert cache.page_table[:, :2].tolist() == [[0, 1], [0, 3], [0, 1]]
    assert np.asarray(view.keys[:, :, 0, 0])[1][np.asarray(view.kv_valid)[1]].tolist() == [0, 1, 2, 103]
    assert np.asarray(view.keys[:, :, 0, 0])[0][:4].tolist() == [0, 1, 2, 3]  # sequence 0's page 1 untouched
    _ref_counts_are_exact(cache)
    # Freeing returns only the pages nobody else holds; the last holder returns the shared ones.
    held = int(cache.num_free_pages)
    cache = cache.free(jnp.array([True, False, False]))
    assert int(cache.num_free_pages) == held + 1  # page 2 (sequence 0's own); pages 0 and 1 are still held
    _ref_counts_are_exact(cache)
    cache = cache.free(jnp.array([False, True, True]))
    assert int(cache.num_free_pages) == 8 and cache.ref_counts.tolist() == [0] * 8


def test_fork_errors():
    cache = PagedKVCache.create(2, num_pages=4, page_size=2, **SIZES)
    with pytest.raises(ValueError, match="dst must be distinct sequences that are not sources"):
        cache.fork(0, 0)
    with pytest.raises(ValueError, match=r"must lie in \[0, B=2\)"):
        cache.fork(0, 2)
