"""Seeded property-based fuzz test: every path against one float64 numpy oracle, outputs and gradients.

Random masks (structural, data, ``from_fn`` and their ``&``, ``|``, ``~`` combinations, data masks
mixed with function masks, boolean arrays per head), additive biases, batch >= 2, lengths that are
no multiple of any tile (1 included), offsets (static, traced under ``jit``, per sequence ``[B]``,
negative), float32 and bfloat16, score mods (ALiBi, T5 relative bias, softcap, ``from_fn``),
dropout, and the implementations reference, blockwise and Pallas (interpreted) at *small* tiles,
where tile-boundary defects show (the default CPU tiles cover these whole problems in one tile).
Ring layouts run on the 8 CPU devices of ``conftest.py``.

The oracle (:func:`oracle`) is written here, independently of the library: float64 numpy, an
explicit loop over batch and heads, the dense mask from ``mask.dense``, fully masked rows output 0
with zero gradient, and the backward written out by hand (dS = P (dP - delta) + P dlse).

Every case is a printable description (``Case``); a failure prints it, and ``run_case(Case(...))``
replays it. Hypothesis runs derandomized (a fixed seed), so the cases are the same on every run.
Below the fuzzers, one focused regression test per defect the fuzzing of issue 12 found.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import attention_jax as aj  # noqa: E402
from attention_jax import positional  # noqa: E402
from pallas_kernels import dropout as dropout_lib  # noqa: E402
from pallas_kernels import layouts  # noqa: E402
from pallas_kernels.flash_attention import BlockSizes  # noqa: E402

m = aj.masks
# Backend objects with their own tile sizes (``implementation=Blockwise(block_q=16, ...)``).
backends = getattr(aj.functional, "backends", None)
HAS_BACKENDS = backends is not None and hasattr(backends, "Blockwise") and hasattr(backends, "Pallas")
needs_backends = pytest.mark.skipif(not HAS_BACKENDS, reason="aj.functional.backends (Blockwise, Pallas) missing")

# Each example compiles its own program (about a second): keep the counts small; the slow variants
# draw more. The strategies are unchanged, so the cases keep covering the same space.
MAX_EXAMPLES = {"blockwise": 5, "pallas": 3, "reference": 3}
MAX_EXAMPLES_SLOW, RING_EXAMPLES, RING_EXAMPLES_SLOW = 8, 3, 4


def fuzz_settings(max_examples: int, shrink: bool = False):
    phases = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if shrink else ())
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,  # a fixed seed: the same cases on every run
        database=None,
        phases=phases,
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


# -- masks as printable descriptions -----------------------------------------------------------------

# Mask functions of positions; named so a case prints and replays (and jit caches stay warm).
MASK_FNS = {
    "nothing": lambda i, j: j < -(10**6),  # the repro: sees nothing
    "sum_mod_3": lambda i, j: (i + j) % 3 != 0,
    "band_mod_5": lambda i, j: jnp.abs(i - j) % 5 < 3,
    "recent_7": lambda i, j: j >= i - 7,
    "even_keys": lambda i, j: j % 2 == 0,
}


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng([seed, *salt])


def _put(x, dtype=None) -> jax.Array:
    """A JAX array of ``x`` converted in numpy (``jnp.asarray`` compiles a program per shape and dtype)."""
    return jax.device_put(np.asarray(x, None if dtype is None else jnp.dtype(dtype)))


def build_mask(desc, b: int, t: int, s: int, kv_len: int | None = None):
    """The ``Mask`` of a description tuple; data masks draw their arrays from the description's seed."""
    kind, *args = desc
    if kind == "and":
        return build_mask(args[0], b, t, s, kv_len) & build_mask(args[1], b, t, s, kv_len)
    if kind == "or":
        return build_mask(args[0], b, t, s, kv_len) | build_mask(args[1], b, t, s, kv_len)
    if kind == "not":
        return ~build_mask(args[0], b, t, s, kv_len)
    if kind == "causal":
        return m.causal(*args)
    if kind == "window":
        return m.sliding_window(*args)
    if kind == "chunked":
        return m.chunked(*args)
    if kind == "prefix_lm":
        return m.prefix_lm(*args)
    if kind == "dilated":
        return m.dilated(*args)
    if kind == "random_blocks":
        return m.random_blocks(*args, kv_len=kv_len)
    if kind == "from_fn":
        return m.from_fn(MASK_FNS[args[0]])
    if kind == "segments":
        (seed,) = args
        q_ids = np.sort(_rng(seed, 0).integers(0, 4, (b, t)), axis=1)
        kv_ids = q_ids if s == t else np.sort(_rng(seed, 1).integers(0, 4, (b, s)), axis=1)
        return m.segments(_put(q_ids, jnp.int32), _put(kv_ids, jnp.int32))
    if kind == "array":  # a boolean array [Bm, Nm, T, S] (per head when Nm = N), not a Mask
        seed, bm, nm, density = args
        return _put(_rng(seed, 2).random((bm, nm, t, s)) < density)
    if kind == "padding":
        q_lengths, kv_lengths = args
        as_array = lambda x: None if x is None else _put(x, jnp.int32)
        return m.padding(q_lengths=as_array(q_lengths), kv_lengths=as_array(kv_lengths))
    raise ValueError(f"unknown mask description {desc!r}")


def _has(desc, kind: str) -> bool:
    if desc is None:
        return False
    return desc[0] == kind or any(isinstance(a, tuple) and _has(a, kind) for a in desc[1:])


LEAF_KINDS = ("causal", "window", "chunked", "segments", "padding", "prefix_lm", "dilated", "random_blocks", "from_fn")


@st.composite
def mask_leaves(draw, b: int, t: int, s: int, kinds=LEAF_KINDS):
    kind = draw(st.sampled_from(kinds))
    if kind == "causal":
        return ("causal", draw(st.integers(-3, 3)))
    if kind == "window":
        left, right = draw(st.integers(0, 20)), draw(st.integers(0, 4))
        return ("window", max(left, 1) if right == 0 else left, right)
    if kind == "chunked":
        return ("chunked", draw(st.integers(1, 24)))
    if kind == "segments":
        return ("segments", draw(st.integers(0, 1000)))
    if kind == "padding":
        q = draw(st.none() | st.tuples(*(st.integers(0, t) for _ in range(b))))
        kv = (
            draw(st.tuples(*(st.integers(0, s) for _ in range(b))))
            if q is None
            else draw(st.none() | st.tuples(*(st.integers(0, s) for _ in range(b))))
        )
        return ("padding", q, kv)
    if kind == "prefix_lm":
        return ("prefix_lm", draw(st.integers(0, 10)))
    if kind == "dilated":
        return ("dilated", draw(st.integers(1, 16)), draw(st.integers(1, 4)))
    if kind == "random_blocks":
        return ("random_blocks", draw(st.sampled_from([4, 8, 16])), draw(st.integers(1, 3)), draw(st.integers(0, 99)))
    return ("from_fn", draw(st.sampled_from(sorted(MASK_FNS))))


@st.composite
def mask_descs(draw, b: int, t: int, s: int, n: int | None = None):
    """None, a leaf, a combination of two levels, (often) a data mask combined with a ``from_fn``
    mask, or, given the heads ``n``, a boolean array ``[1 or B, 1 or N, T, S]``."""
    shape = draw(st.sampled_from(["none", "leaf", "tree", "tree", "data_fn", "data_fn"] + ["array"] * (n is not None)))
    leaf = mask_leaves(b, t, s)
    if shape == "none":
        return None
    if shape == "array":
        density = draw(st.sampled_from([0.1, 0.5, 0.9]))
        return (
            "array",
            draw(st.integers(0, 1000)),
            draw(st.sampled_from([1, b])),
            draw(st.sampled_from([1, n])),
            density,
        )
    if shape == "leaf":
        return draw(leaf)
    if shape == "data_fn":
        data_leaf = draw(mask_leaves(b, t, s, kinds=("segments", "padding")))
        fn_leaf = ("from_fn", draw(st.sampled_from(sorted(MASK_FNS))))
        op = draw(st.sampled_from(["and", "or"]))
        return (op, data_leaf, fn_leaf) if draw(st.booleans()) else (op, fn_leaf, data_leaf)

    def node(depth):
        if depth == 0:
            return leaf
        return st.one_of(
            leaf,
            st.tuples(st.sampled_from(["and", "or"]), node(depth - 1), node(depth - 1)),
            st.tuples(st.just("not"), node(depth - 1)),
        )

    return draw(node(2))


# -- score mods: the library's object and the oracle's float64 form ---------------------------------


def _score_fn(s, b, h, i, j):
    """A user score mod (``score_mods.from_fn``): head- and batch-dependent, derivative ``1 + h / 4``."""
    return s * (1.0 + 0.25 * h) - 0.1 * abs(i - j) + 0.2 * b


T5 = dict(num_buckets=8, max_distance=20)


def score_params(kind: str, n: int, seed: int) -> tuple:
    """The differentiable parameters of a score mod, as float32 arrays."""
    r = _rng(seed, 7)
    if kind in ("alibi", "alibi+softcap"):
        return (_put(r.uniform(0.05, 0.5, n), jnp.float32),)
    if kind == "t5":
        return (_put(r.normal(0.0, 1.0, (T5["num_buckets"], n)), jnp.float32),)
    return ()


def build_score_mod(kind: str | None, params: tuple, bidirectional: bool = True):
    sm = aj.score_mods
    if kind is None:
        return None
    if kind == "alibi":
        return sm.alibi(params[0])
    if kind == "t5":
        return sm.relative_position_bias(params[0], bidirectional=bidirectional, **T5)
    if kind == "softcap":
        return sm.softcap(5.0)
    if kind == "fn":
        return sm.from_fn(_score_fn)
    if kind == "alibi+softcap":
        return sm.compose(sm.alibi(params[0]), sm.softcap(5.0))
    raise ValueError(kind)


@functools.cache
def _t5_bucket_program(bidirectional: bool):
    return jax.jit(functools.partial(positional.t5_relative_buckets, bidirectional=bidirectional, **T5))


def _t5_buckets(rel: np.ndarray, bidirectional: bool) -> np.ndarray:
    # One compiled program per shape, not one eager op at a time.
    return np.asarray(_t5_bucket_program(bidirectional)(_put(rel, jnp.int32)))


def oracle_score(kind, raw, b, n, i, j, params, bidirectional=True):
    """``(score [T, S], d score / d raw [T, S], accumulate(dparams, d score))`` in float64."""
    params = tuple(np.asarray(p, np.float64) for p in params)

    def no_params(dparams, ds):
        return None

    if kind is None:
        return raw, 1.0, no_params
    if kind == "fn":
        return _score_fn(raw, b, n, i, j), 1.0 + 0.25 * n, no_params
    if kind == "softcap":
        th = np.tanh(raw / 5.0)
        return 5.0 * th, 1.0 - th**2, no_params
    rel = (j - i).astype(np.float64)
    if kind in ("alibi", "alibi+softcap"):
        s = raw + params[0][n] * rel

        def acc(dparams, ds):  # ds: gradient at the alibi output
            dparams[0][n] += np.sum(ds * rel)

        if kind == "alibi":
            return s, 1.0, acc
        th = np.tanh(s / 5.0)
        return 5.0 * th, 1.0 - th**2, lambda dparams, ds: acc(dparams, ds * (1.0 - th**2))
    if kind == "t5":
        bucket = _t5_buckets(j - i, bidirectional)

        def acc(dparams, ds):
            np.add.at(dparams[0][:, n], bucket.reshape(-1), ds.reshape(-1))

        return raw + params[0][bucket, n], 1.0, acc
    raise ValueError(kind)


# -- the float64 oracle -------------------------------------------------------------------------------


def oracle(q, k, v, dout, dlse, *, mask, scale, bias=None, softcap=None, score=None, params=(),
           bidirectional=True, q_pos, kv_pos, keep=None, rate=0.0):  # fmt: skip
    """Outputs and gradients of ``L = sum(out * dout) + sum(finite(lse) * dlse)`` in float64.

    ``mask``: bool broadcastable to ``[B, N, T, S]`` or None; ``q_pos``/``kv_pos`` absolute positions
    ``[T]``/``[S]`` or per sequence ``[B, T]``/``[B, S]`` (score mods read them); ``keep [B, N, T, S]``
    dropout bits at ``rate``. Returns a dict with ``out [B, T, N, Hv]``, ``lse [B, N, T]``, ``dq``,
    ``dk``, ``dv``, ``dparams``.
    """
    q, k, v, dout, dlse = map(_f64, (q, k, v, dout, dlse))
    b_size, t, n_heads, _ = q.shape
    s, kv_heads, hv = k.shape[1], k.shape[2], v.shape[-1]
    group = n_heads // kv_heads
    full = np.broadcast_to(True if mask is None else np.asarray(mask, bool), (b_size, n_heads, t, s))
    q_pos = np.broadcast_to(np.asarray(q_pos, np.int64), (b_size, t))
    kv_pos = np.broadcast_to(np.asarray(kv_pos, np.int64), (b_size, s))
    out, lse = np.zeros((b_size, t, n_heads, hv)), np.full((b_size, n_heads, t), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dparams = [np.zeros(np.shape(p)) for p in params]
    full_bias = 0.0 if bias is None else np.broadcast_to(_f64(bias), (b_size, n_heads, t, s))
    dbias = np.zeros((b_size, n_heads, t, s))
    for bi in range(b_size):
        i, j = q_pos[bi][:, None], kv_pos[bi][None, :]
        for n in range(n_heads):
            kh = n // group
            raw = scale * q[bi, :, n] @ k[bi, :, kh].T + (0.0 if bias is None else full_bias[bi, n])  # [T, S]
            s1, dmod, acc = oracle_score(score, raw, bi, n, i, j, params, bidirectional)
            s2 = softcap * np.tanh(s1 / softcap) if softcap else s1
            visible = full[bi, n]
            rows = visible.any(axis=1)  # [T]
            top = np.where(rows, np.max(np.where(visible, s2, -np.inf), axis=1, initial=-np.inf), 0.0)
            e = np.where(visible, np.exp(np.where(visible, s2, 0.0) - top[:, None]), 0.0)
            z = e.sum(axis=1)
            p = e / np.where(rows, z, 1.0)[:, None]
            lse[bi, n] = np.where(rows, top + np.log(np.where(rows, z, 1.0)), -np.inf)
            kp = 1.0 if keep is None else np.asarray(keep[bi, n], np.float64) / (1.0 - rate)
            pd = p * kp
            o = pd @ v[bi, :, kh]
            out[bi, :, n] = o
            do = dout[bi, :, n]
            dv[bi, :, kh] += pd.T @ do
            dp = (do @ v[bi, :, kh].T) * kp
            delta = np.sum(do * o, axis=1)
            ds2 = p * (dp - delta[:, None]) + p * np.where(rows, dlse[bi, n], 0.0)[:, None]
            ds1 = ds2 * (1.0 - np.tanh(s1 / softcap) ** 2) if softcap else ds2
            acc(dparams, ds1)
            draw = ds1 * dmod
            dbias[bi, n] = draw
            dq[bi, :, n] = scale * draw @ k[bi, :, kh]
            dk[bi, :, kh] += scale * draw.T @ q[bi, :, n]
    if bias is not None:  # summed over the axes the bias broadcasts along
        axes = tuple(a for a, size in enumerate(np.shape(bias)) if size == 1)
        dbias = dbias.sum(axis=axes, keepdims=True)
    return dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv, dparams=tuple(dparams), dbias=dbias)


def _f64(x) -> np.ndarray:
    """float64 numpy of a JAX or numpy array of any float dtype (bfloat16 included, through ml_dtypes)."""
    return np.asarray(x).astype(np.float64)


def dense_mask(mask, t, s, q_offset=0, kv_offset=0):
    """``mask.dense`` as numpy ``[B or 1, 1, T, S]`` (None: everything visible)."""
    if mask is None:
        return None
    if not isinstance(mask, m.Mask):  # a boolean array [Bm, Nm, T, S]
        return np.asarray(mask)
    dense = np.asarray(jax.jit(lambda: mask.dense(t, s, q_offset, kv_offset))())  # one program, not eager ops
    return dense[:, None] if dense.ndim == 3 else dense[None, None]


# Relative to max(1, max |oracle|): float32 matches to float noise, bfloat16 to its 8-bit mantissa.
TOLERANCE = {"float32": (1e-4, 5e-4), "bfloat16": (4e-2, 1e-1)}  # (outputs, gradients)


def assert_matches(name, got, want, dtype, grad=False):
    got = _f64(got)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, expected {want.shape}"
    assert np.isfinite(got).all(), f"{name}: {np.sum(~np.isfinite(got))} non-finite values"
    tol = TOLERANCE[dtype][int(grad)]
    err = np.max(np.abs(got - want), initial=0.0) / max(1.0, np.max(np.abs(want), initial=0.0))
    assert err <= tol, f"{name}: max error {err:.3g} (relative to max |oracle|) > {tol}"


def assert_lse_matches(name, got, want, dtype):
    got = np.asarray(got, np.float64)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=f"{name}: rows that see nothing differ")
    assert_matches(name, np.where(finite, got, 0.0), np.where(finite, want, 0.0), dtype)


# -- one case -----------------------------------------------------------------------------------------

IMPLEMENTATIONS = ("reference", "blockwise", "pallas", "auto")


@dataclasses.dataclass(frozen=True)
class Case:
    """One fuzz case; ``run_case(case)`` replays it. ``block`` is the tile size of blockwise/Pallas."""

    b: int = 2
    t: int = 17
    s: int = 17
    heads: tuple = (2, 1)  # (N, K)
    h: int = 16
    hv: int = 16
    dtype: str = "float32"
    mask: tuple | None = None
    offsets: str = "none"  # "none", "static", "traced" (under jit) or "per_sequence" ([B], traced)
    q_offset: int | tuple = 0  # a tuple of B offsets for "per_sequence"
    kv_offset: int | tuple = 0
    score: str | None = None  # None, "alibi", "t5", "softcap", "fn", "alibi+softcap"
    bidirectional: bool = True
    softcap: float | None = None
    bias: tuple | None = None  # the shape of an additive bias, e.g. (1, N, T, S), or None
    traced_data: bool = False  # the mask's arrays as jit arguments (traced) instead of constants
    dropout: float = 0.0
    implementation: str = "blockwise"
    block: int = 16
    seed: int = 0


def _implementation(case: Case):
    if case.implementation == "auto":
        return None
    if case.implementation == "blockwise" and HAS_BACKENDS:
        return backends.Blockwise(block_q=case.block, block_k=case.block)
    if case.implementation == "pallas" and HAS_BACKENDS:
        block = max(case.block, 16)
        return backends.Pallas(block_sizes=BlockSizes(block, block, block, block, block, block))
    return case.implementation


def case_inputs(case: Case):
    n, kh = case.heads
    r = _rng(case.seed, 1)
    dtype = jnp.dtype(case.dtype)
    # Rounded to the dtype in numpy (ml_dtypes, round to nearest even as XLA): no eager programs.
    normal = lambda shape, dtype=jnp.float32: _put(r.standard_normal(shape).astype(np.float32), dtype)
    q = normal((case.b, case.t, n, case.h), dtype)
    k = normal((case.b, case.s, kh, case.h), dtype)
    v = normal((case.b, case.s, kh, case.hv), dtype)
    dout = normal((case.b, case.t, n, case.hv))
    dlse = normal((case.b, n, case.t))
    return q, k, v, dout, dlse


def _note(case) -> None:
    """Print the case with a failure (inside hypothesis; a direct replay prints nothing)."""
    try:
        note(repr(case))
    except hypothesis.errors.InvalidArgument:
        pass


def _loss(out, lse, dout, dlse):
    return jnp.sum(out.astype(jnp.float32) * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * dlse)


def run_case(case: Case) -> None:
    """Run ``case`` on its implementation and compare outputs, logsumexp and gradients with the oracle."""
    _note(case)
    n, _ = case.heads
    q, k, v, dout, dlse = case_inputs(case)
    params = score_params(case.score, n, case.seed)
    scale = 1.0 / np.sqrt(case.h)
    traced = case.offsets in ("traced", "per_sequence")
    q_offsets = np.broadcast_to(np.asarray(case.q_offset), (case.b,))  # [B]
    kv_offsets = np.broadcast_to(np.asarray(case.kv_offset), (case.b,))
    kv_len = max(1, int(kv_offsets.max()) + case.s) if traced else None  # random_blocks needs it then
    mask = None if case.mask is None else build_mask(case.mask, case.b, case.t, case.s, kv_len)
    rng = jax.random.key(case.seed) if case.dropout else None
    implementation = _implementation(case)

    bias = None if case.bias is None else _put(_rng(case.seed, 3).standard_normal(case.bias), jnp.float32)

    def attention(q, k, v, params, bias, mask, q_offset, kv_offset):
        out, lse = aj.dot_product_attention(
            q, k, v, mask=mask, bias=bias, scale=scale, softcap=case.softcap,
            score_mod=build_score_mod(case.score, params, case.bidirectional),
            q_offset=q_offset, kv_offset=kv_offset, implementation=implementation, return_lse=True,
            **(dict(dropout_rate=case.dropout, dropout_rng=rng) if case.dropout else {}),
        )  # fmt: skip
        return _loss(out, lse, dout, dlse), (out, lse)

    grad = jax.grad(attention, argnums=(0, 1, 2, 3, 4), has_aux=True)
    # Traced (jit arguments) or static (closed over): the offsets, and the mask's data (segment ids,
    # lengths, a boolean array), which then only the run-time paths of the backends can read.
    offsets = (case.q_offset, case.kv_offset)
    if traced:
        offsets = tuple(_put(x, jnp.int32) for x in offsets)
    dynamic, static = {}, {}
    (dynamic if case.traced_data else static)["mask"] = mask
    (dynamic if traced else static).update(q_offset=offsets[0], kv_offset=offsets[1])
    run = jax.jit(lambda q, k, v, params, bias, dynamic: grad(q, k, v, params, bias, **dynamic, **static))
    grads, (out, lse) = run(q, k, v, params, bias, dynamic)

    q_pos = q_offsets[:, None] + np.arange(case.t)  # [B, T]
    kv_pos = kv_offsets[:, None] + np.arange(case.s)  # [B, S]
    keep = None
    if case.dropout:
        seed = dropout_lib.seed_from_key(rng)
        bi, hi = np.arange(case.b)[:, None, None, None], np.arange(n)[None, :, None, None]
        keep_mask = jax.jit(dropout_lib.keep_mask, static_argnums=5)  # one program, not one eager op at a time
        keep = keep_mask(seed, bi, hi, q_pos[:, None, :, None], kv_pos[:, None, None, :], case.dropout)
        keep = np.asarray(keep)  # [B, N, T, S]
    dense = None
    if mask is not None:  # per sequence: row b of the mask at sequence b's offsets
        rows = [dense_mask(mask, case.t, case.s, int(qo), int(ko)) for qo, ko in zip(q_offsets, kv_offsets)]
        dense = np.concatenate([r[min(b, r.shape[0] - 1)][None] for b, r in enumerate(rows)])
    want = oracle(
        q, k, v, dout, dlse, mask=dense, scale=scale, bias=bias,
        softcap=case.softcap, score=case.score, params=params, bidirectional=case.bidirectional, q_pos=q_pos,
        kv_pos=kv_pos, keep=keep, rate=case.dropout,
    )  # fmt: skip
    assert out.dtype == q.dtype, f"out dtype {out.dtype}, expected {q.dtype}"
    assert_matches("out", out, want["out"], case.dtype)
    assert_lse_matches("lse", lse, want["lse"], case.dtype)
    for name, g in zip(("dq", "dk", "dv"), grads[:3]):
        assert g.dtype == q.dtype, f"{name} dtype {g.dtype}"
        assert_matches(name, g, want[name], case.dtype, grad=True)
    for i, (g, w) in enumerate(zip(grads[3], want["dparams"])):
        assert_matches(f"d score_params[{i}]", g, w, case.dtype, grad=True)
    if bias is not None:
        assert_matches("dbias", grads[4], want["dbias"], case.dtype, grad=True)


LENGTHS = st.sampled_from([1, 2, 5, 15, 17, 31, 33, 47, 50, 67])


@st.composite
def cases(draw, implementations=IMPLEMENTATIONS):
    b = draw(st.integers(2, 3))
    t, s = draw(LENGTHS), draw(LENGTHS)
    offsets = draw(st.sampled_from(["none", "static", "traced", "per_sequence"]))
    offset = st.integers(-12, 40)
    if offsets == "none":
        q_offset, kv_offset = 0, 0
    elif offsets == "per_sequence":  # decoding with a cache: each sequence at its own position
        q_offset, kv_offset = draw(st.tuples(*[offset] * b)), draw(st.tuples(*[offset] * b))
    else:
        q_offset, kv_offset = draw(offset), draw(offset)
    heads = draw(st.sampled_from([(2, 1), (2, 2), (4, 2)]))
    h = draw(st.sampled_from([8, 16]))
    score = draw(st.sampled_from([None, None, "alibi", "t5", "softcap", "fn", "alibi+softcap"]))
    n = heads[0]
    bias = draw(st.sampled_from([None, None, None, (1, 1, t, s), (b, n, t, s), (1, n, 1, s), (b, 1, t, 1)]))
    return Case(
        b=b, t=t, s=s, heads=heads, h=h, hv=draw(st.sampled_from([h, 8])),
        dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        mask=draw(mask_descs(b, t, s, n)), offsets=offsets, q_offset=q_offset, kv_offset=kv_offset,
        score=score, bidirectional=draw(st.booleans()), softcap=draw(st.sampled_from([None, None, 4.0])), bias=bias,
        traced_data=draw(st.booleans()),
        dropout=draw(st.sampled_from([0.0, 0.0, 0.0, 0.3])),
        implementation=draw(st.sampled_from(implementations)), block=draw(st.sampled_from([8, 16])),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


# -- the fuzzers --------------------------------------------------------------------------------------

# One fuzzer per implementation, so each gets its share of the cases (the interpreted Pallas
# kernels are the slowest to compile). Hypothesis tries the smallest case first (T = S = 1).


@needs_backends
@fuzz_settings(MAX_EXAMPLES["blockwise"])
@given(case=cases(("blockwise",)))
def test_fuzz_blockwise_small_tiles(case):
    run_case(case)


@needs_backends
@fuzz_settings(MAX_EXAMPLES["pallas"])
@given(case=cases(("pallas",)))
def test_fuzz_pallas_small_tiles(case):
    run_case(case)


@fuzz_settings(MAX_EXAMPLES["reference"])
@given(case=cases(("reference", "auto")))
def test_fuzz_reference_and_default(case):
    run_case(case)


@pytest.mark.slow
@needs_backends
@fuzz_settings(MAX_EXAMPLES_SLOW, shrink=True)
@given(case=cases())
def test_fuzz_single_device_long(case):
    run_case(case)


@dataclasses.dataclass(frozen=True)
class RingCase:
    """One ring fuzz case: ``sequence_parallel_attention`` over ``p`` of the 8 CPU devices."""

    p: int = 2
    layout: str = "zigzag"
    b: int = 2
    t: int = 16
    s: int = 16
    heads: tuple = (2, 1)
    h: int = 8
    dtype: str = "float32"
    mask: tuple | None = None
    softcap: float | None = None
    implementation: str = "blockwise"
    traced_data: bool = False  # the mask's arrays as jit arguments
    seed: int = 0


def run_ring_case(case: RingCase) -> None:
    _note(case)
    base = Case(b=case.b, t=case.t, s=case.s, heads=case.heads, h=case.h, hv=case.h, dtype=case.dtype,
                seed=case.seed)  # fmt: skip
    q, k, v, dout, dlse = case_inputs(base)
    mask = None if case.mask is None else build_mask(case.mask, case.b, case.t, case.s)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[: case.p]), ("sp",))

    def attention(q, k, v, mask):
        out, lse = aj.sequence_parallel_attention(
            q, k, v, mesh=mesh, axis="sp", mask=mask, layout=case.layout, softcap=case.softcap,
            implementation=case.implementation, return_lse=True,
        )  # fmt: skip
        return _loss(out, lse, dout, dlse), (out, lse)

    grad = jax.grad(attention, argnums=(0, 1, 2), has_aux=True)
    if case.traced_data:
        grads, (out, lse) = jax.jit(grad)(q, k, v, mask)
    else:
        grads, (out, lse) = jax.jit(lambda q, k, v: grad(q, k, v, mask))(q, k, v)
    want = oracle(
        q, k, v, dout, dlse, mask=dense_mask(mask, case.t, case.s), scale=1.0 / np.sqrt(case.h),
        softcap=case.softcap, q_pos=np.arange(case.t), kv_pos=np.arange(case.s),
    )  # fmt: skip
    assert_matches("out", out, want["out"], case.dtype)
    assert_lse_matches("lse", lse, want["lse"], case.dtype)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_matches(name, g, want[name], case.dtype, grad=True)


@st.composite
def ring_cases(draw, implementations=("blockwise",)):
    p = draw(st.sampled_from([2, 4, 8]))
    layout = draw(st.sampled_from(layouts.LAYOUTS))
    unit = {"contiguous": p, "zigzag": 2 * p, "striped": p * p}[layout]  # in-place conversion needs these
    lengths = st.integers(1, max(1, 64 // unit)).map(lambda c: c * unit)
    b = draw(st.integers(2, 3))
    t, s = draw(lengths), draw(lengths)
    return RingCase(
        p=p, layout=layout, b=b, t=t, s=s, heads=draw(st.sampled_from([(2, 1), (2, 2), (4, 2)])),
        h=draw(st.sampled_from([8, 16])), dtype=draw(st.sampled_from(["float32", "float32", "bfloat16"])),
        mask=draw(mask_descs(b, t, s)), softcap=draw(st.sampled_from([None, None, 4.0])),
        implementation=draw(st.sampled_from(implementations)), traced_data=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )  # fmt: skip


# Found by this fuzzer: the block-map table of a permuted layout read another position's segment id.
STRIPED_FROM_FN_SEGMENTS = RingCase(
    p=4, layout="striped", t=16, s=16, mask=("and", ("from_fn", "band_mod_5"), ("segments", 0))
)


@fuzz_settings(RING_EXAMPLES)
@given(case=ring_cases())
@hypothesis.example(case=STRIPED_FROM_FN_SEGMENTS)
def test_fuzz_ring(case):
    run_ring_case(case)


@pytest.mark.slow
@fuzz_settings(RING_EXAMPLES_SLOW, shrink=True)
@given(case=ring_cases(("blockwise", "blockwise", "pallas")))  # STRIPED_FROM_FN_SEGMENTS runs in test_fuzz_ring
def test_fuzz_ring_long(case):
    run_ring_case(case)


def test_the_oracle_against_a_hand_computed_case():
    """Two keys, one query: out = softmax([0, log 3]) . v = (v0 + 3 v1) / 4, by hand."""
    q = jnp.array([[[[1.0]]]])  # [B=1, T=1, N=1, H=1]
    k = jnp.array([[[[0.0]], [[np.log(3.0)]]]])  # [1, S=2, 1, 1]
    v = jnp.array([[[[4.0]], [[8.0]]]])
    got = oracle(q, k, v, jnp.ones((1, 1, 1, 1)), jnp.zeros((1, 1, 1)), mask=None, scale=1.0, q_pos=[0], kv_pos=[0, 1])
    np.testing.assert_allclose(got["out"].reshape(-1), [7.0])
    np.testing.assert_allclose(got["lse"].reshape(-1), [np.log(4.0)])
    np.testing.assert_allclose(got["dv"].reshape(-1), [0.25, 0.75])
    masked = oracle(q, k, v, jnp.ones((1, 1, 1, 1)), jnp.ones((1, 1, 1)), mask=np.zeros((1, 1, 1, 2), bool),
                    scale=1.0, q_pos=[0], kv_pos=[0, 1])  # fmt: skip
    assert masked["lse"][0, 0, 0] == -np.inf and not masked["out"].any() and not masked["dq"].any()


def test_the_oracle_against_numerical_gradients():
    """The oracle's hand-written backward (bias, softcap, ALiBi, T5, user mod, dropout) against finite differences."""
    r = np.random.default_rng(0)
    b, t, s, n, kh, h = 2, 5, 6, 2, 1, 3
    q, k, v = r.standard_normal((b, t, n, h)), r.standard_normal((b, s, kh, h)), r.standard_normal((b, s, kh, h))
    bias = r.standard_normal((b, 1, 1, s))  # broadcast over heads and queries: its gradient sums over them
    dout, dlse = r.standard_normal((b, t, n, h)), r.standard_normal((b, n, t))
    mask = r.random((b, 1, t, s)) < 0.7
    keep = r.random((b, n, t, s)) < 0.7
    for score in (None, "alibi+softcap", "t5", "fn"):
        params = tuple(np.asarray(p, np.float64) for p in score_params(score, n, 3))
        kw = dict(mask=mask, scale=0.7, softcap=3.0, score=score, bidirectional=False, q_pos=np.arange(t) + 3,
                  kv_pos=np.arange(s), keep=keep, rate=0.3)  # fmt: skip

        def loss(q, k, v, bias, *params, kw=kw):
            got = oracle(q, k, v, dout, dlse, bias=bias, params=params, **kw)  # numpy float64 end to end
            lse = got["lse"]
            return np.sum(got["out"] * dout) + np.sum(np.where(np.isfinite(lse), lse, 0.0) * dlse)

        want = oracle(q, k, v, dout, dlse, bias=bias, params=params, **kw)
        args = [q, k, v, bias, *params]
        analytic = [want["dq"], want["dk"], want["dv"], want["dbias"], *want["dparams"]]
        for index, grad in enumerate(analytic):
            for e in r.choice(grad.size, size=min(grad.size, 6), replace=False):
                bumped, lowered = [a.copy() for a in args], [a.copy() for a in args]
                bumped[index].reshape(-1)[e] += 1e-6
                lowered[index].reshape(-1)[e] -= 1e-6
                numeric = (loss(*bumped) - loss(*lowered)) / 2e-6
                np.testing.assert_allclose(grad.reshape(-1)[e], numeric, rtol=1e-5, atol=1e-6, err_msg=f"arg {index}")


# -- regression tests: one per defect the fuzzing of issue 12 found -------------------------------------

SMALL = ("blockwise", "pallas", "auto")  # small tiles where the backend takes them (see _implementation)


def _run(implementation, q, k, v, **kw):
    """``(out, lse)`` and the gradients of a fixed loss, on ``implementation`` at small tiles."""
    impl = _implementation(Case(implementation=implementation, block=16))
    n, t = q.shape[2], q.shape[1]
    r = _rng(5, 5)
    dout = _put(r.standard_normal(q.shape[:3] + (v.shape[-1],)), jnp.float32)
    dlse = _put(r.standard_normal((q.shape[0], n, t)), jnp.float32)

    def loss(q, k, v):
        out, lse = aj.dot_product_attention(q, k, v, implementation=impl, return_lse=True, **kw)
        return _loss(out, lse, dout, dlse), (out, lse)

    grads, (out, lse) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, lse, grads, dout, dlse


def _check_against_oracle(implementation, q, k, v, mask, q_offset=0, kv_offset=0, **kw):
    out, lse, grads, dout, dlse = _run(implementation, q, k, v, mask=mask, q_offset=q_offset, kv_offset=kv_offset, **kw)
    t, s = q.shape[1], k.shape[1]
    want = oracle(
        q, k, v, dout, dlse, mask=dense_mask(mask, t, s, q_offset, kv_offset), scale=1.0 / np.sqrt(q.shape[-1]),
        q_pos=q_offset + np.arange(t), kv_pos=kv_offset + np.arange(s),
    )  # fmt: skip
    assert_matches("out", out, want["out"], "float32")
    assert_lse_matches("lse", lse, want["lse"], "float32")
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert_matches(name, g, want[name], "float32", grad=True)


@pytest.mark.parametrize("data", ["padding", "segments"])
@pytest.mark.parametrize("implementation", SMALL)
def test_from_fn_with_data_masks_at_batch_2(implementation, data):
    """Defect: a data-free ``from_fn`` block map was a dense union over the batch, so a tile FULL for
    one sequence skipped the mask of the other (errors 0.5-1.6). The issue's repro (``pad | from_fn``,
    there at T = 300 and the default tiles) and its ``&`` twin with segments, at small tiles."""
    if implementation != "auto" and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    t = 96
    q = _put(_rng(0).standard_normal((2, t, 2, 16)), jnp.float32)
    if data == "padding":
        mask = m.padding(kv_lengths=jnp.array([t // 3, t])) | m.from_fn(MASK_FNS["nothing"])
    else:
        ids = np.repeat(np.array([[0, 1], [0, 0]]), [t // 2, t - t // 2], axis=1)
        mask = m.segments(_put(ids, jnp.int32)) & m.from_fn(MASK_FNS["recent_7"])
    _check_against_oracle(implementation, q, q, q, mask)


@pytest.mark.parametrize("implementation", ["blockwise", "pallas"])
def test_from_fn_with_data_masks_on_the_ring(implementation):
    """The same defect through the ring: its block-map table came from the same union over the batch."""
    mask = m.padding(kv_lengths=jnp.array([20, 64])) | m.from_fn(MASK_FNS["nothing"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("sp",))
    q = _put(_rng(1).standard_normal((2, 64, 2, 8)), jnp.float32)
    ring = lambda q: aj.sequence_parallel_attention(
        q, q, q, mesh=mesh, axis="sp", mask=mask, implementation=implementation
    )
    out = jax.jit(ring)(q)
    want = oracle(q, q, q, jnp.zeros_like(q), jnp.zeros((2, 2, 64)), mask=dense_mask(mask, 64, 64),
                  scale=1.0 / np.sqrt(8), q_pos=np.arange(64), kv_pos=np.arange(64))  # fmt: skip
    assert_matches("out", out, want["out"], "float32")


@pytest.mark.parametrize("implementation", SMALL)
def test_random_blocks_traced_offsets_match_static(implementation):
    """Defect: ``random_blocks(8, 2, 5)`` gave another pattern under jit-traced offsets (error 2.0).
    Traced offsets must give the static result, or a ValueError asking for ``kv_len``."""
    if implementation != "auto" and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    impl = _implementation(Case(implementation=implementation, block=16))
    q = _put(_rng(2).standard_normal((2, 40, 2, 16)), jnp.float32)
    mask = m.random_blocks(8, 2, 5)
    attend = lambda q, qo, ko: aj.dot_product_attention(q, q, q, mask=mask, q_offset=qo, kv_offset=ko,
                                                        implementation=impl)  # fmt: skip
    static = jax.jit(lambda q: attend(q, 60, 30))(q)
    want = oracle(q, q, q, jnp.zeros_like(q), jnp.zeros((2, 2, 40)), mask=dense_mask(mask, 40, 40, 60, 30),
                  scale=0.25, q_pos=60 + np.arange(40), kv_pos=30 + np.arange(40))  # fmt: skip
    assert_matches("static offsets", static, want["out"], "float32")
    try:
        traced = jax.jit(attend)(q, jnp.int32(60), jnp.int32(30))
    except ValueError as e:
        assert "kv_len" in str(e)
    else:
        assert_matches("traced offsets", traced, want["out"], "float32")
    # With kv_len given, traced offsets are exact.
    mask = m.random_blocks(8, 2, 5, kv_len=70)
    traced = jax.jit(attend)(q, jnp.int32(60), jnp.int32(30))
    assert_matches("traced offsets, kv_len given", traced, want["out"], "float32")


@pytest.mark.parametrize("implementation", ("reference",) + SMALL)
def test_random_blocks_with_negative_offset(implementation):
    """Defect: ``kv_offset=-7`` with ``S=7`` (every key before position 0, as a rolling cache makes)
    raised ZeroDivisionError."""
    if implementation not in ("auto", "reference") and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    q = _put(_rng(3).standard_normal((2, 7, 2, 16)), jnp.float32)
    _check_against_oracle(implementation, q, q, q, m.random_blocks(8, 2, 5), q_offset=0, kv_offset=-7)
    _check_against_oracle(implementation, q, q, q, m.random_blocks(8, 2, 5) | m.causal(), q_offset=3, kv_offset=-5)


def test_default_path_takes_traced_offsets_above_128x128():
    """Defect: ``implementation=None`` sent a traced ``q_offset`` with a Mask above 128 x 128 scores to
    blockwise, which refused it; decoding and ring steps need traced offsets on the fast path."""
    q = _put(_rng(4).standard_normal((2, 150, 2, 16)), jnp.float32)
    mask = m.causal() & m.sliding_window(40)
    out = jax.jit(lambda q, qo: aj.dot_product_attention(q, q, q, mask=mask, q_offset=qo))(q, jnp.int32(9))
    want = oracle(q, q, q, jnp.zeros_like(q), jnp.zeros((2, 2, 150)), mask=dense_mask(mask, 150, 150, 9, 0),
                  scale=0.25, q_pos=9 + np.arange(150), kv_pos=np.arange(150))  # fmt: skip
    assert_matches("out", out, want["out"], "float32")


@pytest.mark.parametrize("implementation", ("reference",) + SMALL)
@pytest.mark.parametrize("t, s", [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths_give_empty_or_zero_outputs(implementation, t, s):
    """Defect: ``T=0`` or ``S=0`` crashed differently per backend. Now one behaviour everywhere: empty
    output for ``T == 0``; zeros (lse -inf, zero gradients) for ``S == 0``."""
    if implementation not in ("auto", "reference") and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    q, k = jnp.ones((2, t, 2, 8)), jnp.ones((2, s, 1, 8))
    out, lse, grads, _, _ = _run(implementation, q, k, k, mask=m.causal())
    assert out.shape == (2, t, 2, 8) and lse.shape == (2, 2, t)
    assert not np.asarray(out).any() and np.all(np.isneginf(np.asarray(lse)))
    for g, x in zip(grads, (q, k, k)):
        assert g.shape == x.shape and not np.asarray(g).any()


@pytest.mark.parametrize("scale", ["0.5", jnp.array([0.5, 1.0]), True])
def test_bad_scale_is_named(scale):
    """Defect: ``scale="0.5"`` and ``scale=jnp.array([.5, 1.])`` gave internal errors not naming ``scale``."""
    q = jnp.ones((2, 4, 2, 8))
    with pytest.raises(ValueError, match="scale"):
        aj.dot_product_attention(q, q, q, scale=scale)


@pytest.mark.parametrize("implementation", ("reference",) + SMALL)
def test_numpy_scalar_softcap_is_accepted(implementation):
    """Defect: ``softcap=np.float32(5.0)`` was refused though valid."""
    if implementation not in ("auto", "reference") and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    impl = _implementation(Case(implementation=implementation, block=16))
    q = _put(_rng(6).standard_normal((2, 20, 2, 16)), jnp.float32) * 4
    got = jax.jit(lambda q: aj.dot_product_attention(q, q, q, softcap=np.float32(5.0), implementation=impl))(q)
    want = jax.jit(lambda q: aj.dot_product_attention(q, q, q, softcap=5.0, implementation=impl))(q)
    assert_matches("out", got, np.asarray(want, np.float64), "float32")


@pytest.mark.parametrize("implementation", ("reference",) + SMALL)
def test_nan_in_invisible_values_stays_out(implementation):
    """Defect: a NaN in a value row no query may see (an uninitialised cache page) turned every output
    row into NaN (0 x NaN in P V). Outputs and gradients must stay finite and exact."""
    if implementation not in ("auto", "reference") and not HAS_BACKENDS:
        pytest.skip("aj.functional.backends missing")
    r = _rng(7)
    q = _put(r.standard_normal((2, 24, 2, 16)), jnp.float32)
    k = _put(r.standard_normal((2, 40, 1, 16)), jnp.float32)
    v = np.asarray(r.standard_normal((2, 40, 1, 16)), np.float32)
    lengths = np.array([21, 33])
    for b, n in enumerate(lengths):
        v[b, n:] = np.nan  # the keys past each sequence's length: no query sees them
    v = _put(v)
    mask = m.padding(kv_lengths=_put(lengths, jnp.int32)) & m.causal(offset=16)
    out, lse, grads, dout, dlse = _run(implementation, q, k, v, mask=mask)
    clean = jnp.where(jnp.isnan(v), 0.0, v)
    want = oracle(q, k, clean, dout, dlse, mask=dense_mask(mask, 24, 40), scale=0.25, q_pos=np.arange(24),
                  kv_pos=np.arange(40))  # fmt: skip
    assert_matches("out", out, want["out"], "float32")
    assert_matches("dq", grads[0], want["dq"], "float32", grad=True)
    assert_matches("dk", grads[1], want["dk"], "float32", grad=True)
    assert_matches("dv", grads[2], want["dv"], "float32", grad=True)
