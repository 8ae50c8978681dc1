"""Masks: dense forms against hand-written predicates, block maps against dense forms, the algebra."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_jax as aj
from attention_jax import masks
from pallas_kernels import mask_info


def grid(t, s, q_offset=0, kv_offset=0):
    i = np.arange(t)[:, None] + q_offset
    j = np.arange(s)[None, :] + kv_offset
    return i, j


# Each structural mask with its definition written out independently, in numpy.
STRUCTURAL = {
    "full": (masks.full(), lambda i, j: np.ones(np.broadcast_shapes(i.shape, j.shape), bool)),
    "causal": (masks.causal(), lambda i, j: j <= i),
    "causal_offset": (masks.causal(offset=3), lambda i, j: j <= i + 3),
    "window": (masks.sliding_window(5), lambda i, j: (j >= i - 5) & (j <= i)),
    "window_two_sided": (masks.sliding_window(3, 2), lambda i, j: (j >= i - 3) & (j <= i + 2)),
    "chunked": (masks.chunked(6), lambda i, j: i // 6 == j // 6),
    "prefix_lm": (masks.prefix_lm(7), lambda i, j: (j < 7) | (j <= i)),
    "global": (masks.global_tokens([0, 9]), lambda i, j: np.isin(i, [0, 9]) | np.isin(j, [0, 9])),
    "dilated": (masks.dilated(8, 2), lambda i, j: (np.abs(i - j) <= 8) & ((i - j) % 2 == 0)),
    "from_fn": (masks.from_fn(lambda q, k: (q * 7 + k) % 5 != 0), lambda i, j: (i * 7 + j) % 5 != 0),
    "causal_and_window": (masks.causal() & masks.sliding_window(4), lambda i, j: (j <= i) & (j >= i - 4)),
    "chunked_or_global": (
        masks.chunked(4) | masks.global_tokens([2]),
        lambda i, j: (i // 4 == j // 4) | (i == 2) | (j == 2),
    ),
    "not_causal": (~masks.causal(), lambda i, j: j > i),
    "causal_minus_window": (masks.causal() & ~masks.sliding_window(2), lambda i, j: (j <= i) & (j < i - 2)),
}


LEAVES = {
    "full",
    "causal",
    "causal_offset",
    "window",
    "window_two_sided",
    "chunked",
    "global",
    "from_fn",
    "random_blocks",
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
@pytest.mark.parametrize("t,s,q_offset,kv_offset", [(13, 13, 0, 0), (9, 20, 0, 0), (5, 17, 12, 0), (16, 8, 3, 5)])
def test_dense_matches_definition(name, t, s, q_offset, kv_offset):
    mask, definition = STRUCTURAL[name]
    dense = np.asarray(mask.dense(t, s, q_offset, kv_offset))
    assert dense.shape == (t, s) and dense.dtype == bool
    np.testing.assert_array_equal(dense, definition(*grid(t, s, q_offset, kv_offset)))


@pytest.mark.parametrize("name", sorted(STRUCTURAL) + ["random_blocks"])
@pytest.mark.parametrize("block_q,block_k", [(4, 4), (3, 5), (8, 2), (16, 16)])
@pytest.mark.parametrize("t,s,q_offset", [(24, 24, 0), (13, 29, 0), (7, 30, 23)])
def test_block_map_agrees_with_dense(name, block_q, block_k, t, s, q_offset):
    mask = masks.random_blocks(4, 2, seed=1) if name == "random_blocks" else STRUCTURAL[name][0]
    expected = mask_info.block_map_from_dense(np.asarray(mask.dense(t, s, q_offset)), block_q, block_k)
    actual = mask.block_map(t, s, block_q, block_k, q_offset)
    assert actual.shape == (-(-t // block_q), -(-s // block_k))
    # Never wrong: EMPTY and FULL claims are always true; a combination may say PARTIAL where the exact
    # map is EMPTY or FULL (the lattice cannot see that two partial tiles do not intersect).
    assert np.all((actual == expected) | (actual == mask_info.PARTIAL))
    if name in LEAVES:  # a single structural mask is exact
        np.testing.assert_array_equal(actual, expected)


def test_block_map_with_strided_positions_is_conservative():
    # A striped ring shard: positions 1, 5, 9, ... Interval bounds may only turn EMPTY/FULL into PARTIAL.
    q_positions, kv_positions = np.arange(1, 64, 4), np.arange(0, 64, 4)
    mask = masks.causal() & masks.sliding_window(30)
    actual = mask.block_map(16, 16, 4, 4, q_positions=q_positions, kv_positions=kv_positions)
    dense = np.asarray(mask.dense(16, 16, q_positions=q_positions, kv_positions=kv_positions))
    exact = mask_info.block_map_from_dense(dense, 4, 4)
    assert np.all((actual == exact) | (actual == mask_info.PARTIAL))
    assert np.any(actual == mask_info.EMPTY) and np.any(actual == mask_info.FULL)


def test_data_masks():
    q_ids = jnp.array([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    kv_ids = jnp.array([[0, 1, 1], [2, 2, 0]])
    seg = np.asarray(masks.segments(q_ids, kv_ids).dense(5, 3))
    np.testing.assert_array_equal(seg, np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :])
    pad = np.asarray(masks.padding(jnp.array([2, 5]), jnp.array([3, 1])).dense(5, 3))
    i, j = grid(5, 3)
    np.testing.assert_array_equal(pad[0], (i < 2) & (j < 3))
    np.testing.assert_array_equal(pad[1], (i < 5) & (j < 1))
    # Data masks are PARTIAL in the block map; & with causal still skips the future.
    combined = masks.causal() & masks.segments(jnp.zeros((1, 8), jnp.int32))
    np.testing.assert_array_equal(combined.block_map(8, 8, 4, 4), [[1, 0], [1, 1]])


def test_random_blocks_exact_count_and_deterministic():
    mask = masks.random_blocks(block=4, num_blocks=3, seed=7)
    dense = np.asarray(mask.dense(32, 40))
    per_query_block = dense.reshape(8, 4, 10, 4)[:, 0, :, 0]  # [query blocks, key blocks]
    assert np.all(per_query_block.sum(-1) == 3)
    np.testing.assert_array_equal(dense, np.asarray(masks.random_blocks(4, 3, seed=7).dense(32, 40)))
    assert not np.array_equal(dense, np.asarray(masks.random_blocks(4, 3, seed=8).dense(32, 40)))


def test_algebra_and_hashing():
    a, b = masks.causal(), masks.sliding_window(3)
    assert a & b == masks.causal() & masks.sliding_window(3)
    assert hash(a & b) == hash(masks.causal() & masks.sliding_window(3))
    assert a != masks.causal(1)
    with pytest.raises(TypeError, match="&"):
        bool(a)
    with pytest.raises(TypeError, match="&"):
        _ = a and b
    with pytest.raises(TypeError):
        a & np.ones((2, 2), bool)


def test_masks_are_jit_friendly():
    ids = jnp.array([[0, 0, 1, 1]])
    traces = []

    @jax.jit
    def f(mask):
        traces.append(1)
        return mask.dense(4, 4)

    first = f(masks.causal() & masks.segments(ids))
    second = f(masks.causal() & masks.segments(ids + 1))
    assert len(traces) == 1  # same static structure, new data: no retrace
    np.testing.assert_array_equal(first, second)
    fn_a = (masks.causal() & masks.segments(ids)).fn(4)
    fn_b = (masks.causal() & masks.segments(ids * 2)).fn(4)
    assert fn_a == fn_b and hash(fn_a) == hash(fn_b)


def test_spec_carries_positions_and_data():
    ids = jnp.array([[3, 3, 4, 4, 4, 5]])
    spec = (masks.causal() & masks.segments(ids)).spec(6, 6, 4, 4, q_offset=2, kv_offset=0)
    np.testing.assert_array_equal(spec.q_positions, np.arange(2, 8))
    np.testing.assert_array_equal(spec.kv_positions, np.arange(6))
    assert len(spec.q_vals) == len(spec.kv_vals) == 1
    tile = spec.fn(
        spec.q_positions[:, None],
        spec.kv_positions[None, :],
        (spec.q_vals[0][0][:, None],),
        (spec.kv_vals[0][0][None, :],),
    )
    i, j = grid(6, 6, 2, 0)
    np.testing.assert_array_equal(tile, (j <= i) & (np.asarray(ids)[0][:, None] == np.asarray(ids)[0][None, :]))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: masks.sliding_window(-1), "left"),
        (lambda: masks.sliding_window(0, 0), "window"),
        (lambda: masks.chunked(0), "size"),
        (lambda: masks.dilated(0, 2), "window"),
        (lambda: masks.dilated(4, 0), "dilation"),
        (lambda: masks.random_blocks(0, 2), "block"),
        (lambda: masks.global_tokens([]), "at least one"),
        (lambda: masks.global_tokens([-1]), "non-negative"),
        (lambda: masks.prefix_lm(-2), "prefix_length"),
        (lambda: masks.segments(jnp.zeros((2, 4, 1), jnp.int32)), "q_segment_ids"),
        (lambda: masks.segments(jnp.zeros((2, 4), jnp.int32), jnp.zeros((3, 4), jnp.int32)), "batch"),
        (lambda: masks.padding(), "q_lengths"),
        (lambda: masks.causal().dense(0, 4), "q_len"),
        (lambda: masks.causal().block_map(4, 4, 0, 2), "block_q"),
        (lambda: masks.segments(jnp.zeros((1, 4), jnp.int32)).dense(5, 4), r"q_segment_ids must have shape \[B, T\]"),
        (lambda: masks.padding(jnp.zeros((2, 1), jnp.int32)).dense(4, 4), "q_lengths must have shape"),
    ],
)
def test_bad_masks_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_all_constructors_compose():
    ids = jnp.zeros((1, 12), jnp.int32)
    pieces = [
        masks.causal(),
        masks.sliding_window(3),
        masks.chunked(4),
        masks.segments(ids),
        masks.padding(jnp.array([9])),
        masks.prefix_lm(2),
        masks.global_tokens([5]),
        masks.dilated(4, 2),
        masks.random_blocks(4, 1),
        masks.full(),
    ]
    for a, b in itertools.combinations(pieces, 2):
        both = np.asarray((a & b).dense(12, 12))
        either = np.asarray((a | b).dense(12, 12))
        da, db = (np.broadcast_to(np.asarray(m.dense(12, 12)), both.shape) for m in (a, b))
        np.testing.assert_array_equal(both, da & db)
        np.testing.assert_array_equal(either, da | db)
    assert isinstance(aj.masks.causal(), aj.masks.Mask)


def test_chunk_index_rounds_down_for_negative_positions():
    # Positions can be negative (offsets); the kernels' division must round down like Python's //.
    x = jnp.arange(-13, 14, dtype=jnp.int32)
    for size in (1, 4, 6):
        np.testing.assert_array_equal(masks._floor_div(x, size), np.arange(-13, 14) // size)
