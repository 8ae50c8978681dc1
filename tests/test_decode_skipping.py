"""Decoding keeps block skipping: per-sequence positions reach the kernels as block maps, not a dense mask.

A decode step has per-sequence offsets (each sequence continues from its own length). Through the
decode kernels (``cached_attention``) the layer's mask becomes a per-sequence block map over the
cache's tiles, so a sliding window over a long cache visits only the tiles of its window (the XLA
body's loop runs that many steps). Calls that keep today's path (a backend object here) resolve a
MaskSpec with ``[B, T]`` positions and a run-time block map, and skip the same way. Neither builds
a ``[B, 1, T, S]`` mask.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import RecordingBackend

import attention_jax as aj
from attention_jax.functional import backends
from attention_jax.functional.cached import resolve_cache_mask
from pallas_kernels.decode_attention import DEFAULT_BLOCK_K, _decode, decode_attention_reference
from pallas_kernels.mask_info import EMPTY

D, WINDOW, CAPACITY, BLOCK_K = 16, 24, 512, 32
PROMPT = (300, 170)


def _layer(implementation):
    return aj.nn.MultiHeadAttention(
        D, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(), mask=aj.masks.causal(), sliding_window=WINDOW,
        implementation=implementation, rngs=nnx.Rngs(0),
    )  # fmt: skip


@nnx.jit
def _prefill(layer, x, cache, lengths):
    return layer(x, cache=cache, lengths=lengths)[1]


def _prefilled(layer, kind):
    cache = layer.init_cache(2, CAPACITY, kind=kind, page_size=32)
    x = jax.random.normal(jax.random.key(1), (2, max(PROMPT), D))
    return _prefill(layer, x, cache, jnp.asarray(PROMPT))  # compiled: run eagerly, the prefill's ops dominate


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_the_kernel_visits_only_the_window(kind):
    layer = _layer(None)
    cache = _prefilled(layer, kind)
    lay = cache.kernel_layout()
    q_positions = cache.lengths[:, None]  # [B, 1]
    mask = aj.masks.causal() & aj.masks.sliding_window(WINDOW)
    mask_fn, q_vals, kv_vals, block_map = resolve_cache_mask(mask, lay, q_positions, BLOCK_K)
    visited = np.asarray((block_map != EMPTY).sum(axis=-1))  # [B]
    assert lay.num_slots >= CAPACITY and np.all(visited <= WINDOW // BLOCK_K + 2), visited
    # The window sits where each sequence is: different tiles for the two sequences.
    assert not np.array_equal(np.asarray(block_map[0]), np.asarray(block_map[1]))
    q = jax.random.normal(jax.random.key(2), (2, 1, 4, D // 4))
    args = (q, lay.k_pages, lay.v_pages, lay.page_table, lay.lengths)
    kwargs = dict(q_positions=q_positions, mask_fn=mask_fn, q_vals=q_vals, kv_vals=kv_vals, block_k=BLOCK_K,
                  **lay.kernel_arguments())  # fmt: skip
    out, _, steps = jax.jit(lambda *a: _decode(*a, block_map=block_map, **kwargs))(*args)
    assert int(steps) == visited.max()  # the loop runs over the window's tiles only
    _, _, all_steps = jax.jit(lambda *a: _decode(*a, **kwargs))(*args)
    assert int(all_steps) == -(-max(PROMPT) // BLOCK_K)  # without the block map: every written tile
    np.testing.assert_allclose(out, decode_attention_reference(*args, block_map=block_map, **kwargs), atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_todays_path_visits_only_the_window(kind):
    rec = RecordingBackend(block_q=16, block_k=BLOCK_K)
    layer = _layer(rec)
    cache = _prefilled(layer, kind)
    rec.specs.clear()
    token = jax.random.normal(jax.random.key(2), (2, 1, D))

    @nnx.jit
    def step(layer, token, cache):  # compiled, returning the run-time block map the backend received
        layer(token, cache=cache)
        (spec,) = rec.specs
        return spec.block_map, spec.q_positions, spec.kv_positions

    block_map, q_positions, kv_positions = step(layer, token, cache)
    block_map = np.asarray(block_map)  # [B, 1, S / BLOCK_K]
    s = kv_positions.shape[-1]
    assert q_positions.shape == (2, 1) and block_map.shape == (2, 1, -(-s // BLOCK_K))
    visited = (block_map != EMPTY).sum(axis=-1)[:, 0]
    assert s >= CAPACITY and np.all(visited <= WINDOW // BLOCK_K + 2), visited
    # The window sits where each sequence is: different tiles for the two sequences.
    assert not np.array_equal(block_map[0], block_map[1])


def _bool_arrays(jaxpr):
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if getattr(aval, "dtype", None) == jnp.bool_:
                yield tuple(aval.shape)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _bool_arrays(sub)


TODAYS_PATH = backends.Blockwise(block_q=16, block_k=BLOCK_K)


@pytest.mark.parametrize(
    "kind,implementation", [("dense", None), ("rolling", None), ("paged", None), ("paged", TODAYS_PATH)]
)
def test_a_decode_step_builds_no_dense_mask(kind, implementation):
    layer = _layer(implementation)
    cache = _prefilled(layer, kind)
    graphdef, state = nnx.split(layer)
    token = jnp.zeros((2, 1, D))

    def step(state, cache, token):
        return nnx.merge(graphdef, state)(token, cache=cache)[0]

    jaxpr = jax.make_jaxpr(step)(state, cache, token).jaxpr
    tile = BLOCK_K if implementation is not None else DEFAULT_BLOCK_K["xla"]  # the kernel's own tiles
    view_len = {"dense": CAPACITY, "paged": CAPACITY, "rolling": None}[kind]
    for shape in _bool_arrays(jaxpr):
        if len(shape) >= 3 and view_len is not None:
            assert shape[-1] != view_len, f"a dense mask over the cache: {shape}"
        assert len(shape) < 4 or shape[-1] <= tile, f"a dense [B, N, T, S] mask: {shape}"
