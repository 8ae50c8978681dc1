"""Pytree dataclasses carry their class in the tree structure, so jit never mixes two of them up.

``jax.tree_util.register_dataclass`` structures of different classes with the same children compare
equal (JAX 0.10); the jit cache then may run one class's program on the other (seen as a rolling cache
returning a dense cache's view). ``attention_jax._pytree.register_dataclass`` fixes that for every class.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np

from attention_jax.cache import KVCache, PagedKVCache, RollingKVCache

SIZES = dict(num_kv_heads=2, head_dim=4)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _structure(tree):
    return jax.tree_util.tree_structure(tree)


def test_caches_of_equal_leaf_shapes_have_distinct_structures():
    dense, rolling = KVCache.create(1, 8, **SIZES), RollingKVCache.create(1, 8, **SIZES)
    assert [x.shape for x in jax.tree.leaves(dense)] == [x.shape for x in jax.tree.leaves(rolling)]
    assert _structure(dense) != _structure(rolling)
    assert _structure(dense) == _structure(KVCache.create(1, 8, **SIZES))


def test_roundtrip_keeps_class_static_fields_and_key_paths():
    cache = PagedKVCache.create(2, num_pages=3, page_size=4, quantized=True, **SIZES)
    leaves, treedef = jax.tree_util.tree_flatten(cache)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(again) is PagedKVCache and again.storage.dtype == cache.storage.dtype
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(cache)[0]]
    assert ".storage.keys" in paths and ".page_table" in paths


def test_jit_runs_each_cache_class_its_own_program():
    @jax.jit
    def update(cache, k, v):
        return cache.update(k, v)

    k = jax.random.normal(jax.random.key(0), (1, 5, 2, 4))
    sizes = {}
    for cache in (KVCache.create(1, 8, **SIZES), RollingKVCache.create(1, 8, **SIZES)):
        _, view = update(cache, k, k)
        sizes[type(cache).__name__] = view.keys.shape[1]
    assert sizes == {"KVCache": 8, "RollingKVCache": 13}
    np.testing.assert_array_equal(update(RollingKVCache.create(1, 8, **SIZES), k, k)[1].keys[0, 8:], k[0])


def test_no_module_registers_through_jax_register_dataclass():
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("attention_jax", "pallas_kernels")
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "_pytree.py" and "tree_util.register_dataclass" in path.read_text()
    ]
    assert offenders == []
