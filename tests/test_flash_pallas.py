"""The Pallas flash kernels (interpret mode) against the float32 reference: outputs, lse, gradients.

Cases are a sampled product of masks x head layouts x lengths x block sizes x dtypes x extras
(softcap, bias). The kernel class runs the GPU (Triton) body in Pallas' interpreter; the subclass
re-runs a subset with the TPU (Mosaic) body in the TPU interpreter, which is much slower. Then:
the visit plans (block-map resampling is exact or conservative, never wrong), calls through
``dot_product_attention(implementation="pallas")`` and the ring's block steps ``flash_forward``/``flash_backward``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, random_qkv

import attention_jax as aj
from attention_jax import masks
from pallas_kernels import _flash_plan, mask_info
from pallas_kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
    flash_backward,
    flash_forward,
    mask_block_shape,
)

B = 2
# Two tile configurations (rows x keys per kernel): forward / dk,dv / dq tiles differ on purpose.
BLOCKS_A = BlockSizes(block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16)
BLOCKS_B = BlockSizes(block_q=16, block_k=32, block_q_dkv=32, block_k_dkv=16, block_q_dq=16, block_k_dq=32)


def _segments(t, s):
    q_ids = np.stack([np.repeat([0, 1, 2], [t // 3, t // 3, t - 2 * (t // 3)]), np.zeros(t, int)])
    kv_ids = np.stack(
        [np.repeat([0, 1, 2], [s // 3, s // 3, s - 2 * (s // 3)]), np.repeat([0, 1], [s // 2, s - s // 2])]
    )
    return masks.segments(jnp.asarray(q_ids), jnp.asarray(kv_ids))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mask: object  # (t, s) -> Mask | None
    heads: tuple[int, int] = (4, 4)  # (N, K)
    lengths: tuple[int, int] = (48, 48)  # (T, S)
    dims: tuple[int, int] = (32, 32)  # (H, Hv)
    dtype: object = jnp.float32
    blocks: BlockSizes = BLOCKS_A
    spec_blocks: tuple[int, int] = (16, 16)  # tiles the MaskSpec is built with (resampled by the kernels)
    bias: str | None = None  # "full" [B, N, T, S] or "row" [1, 1, 1, S]
    softcap: float | None = None


CASES = [
    Case(
        "window_gqa_hv",
        lambda t, s: masks.causal() & masks.sliding_window(9),
        (4, 2),
        (40, 40),
        (32, 64),
        blocks=BLOCKS_B,
        spec_blocks=(8, 8),
    ),
    Case("chunked_mqa_bf16", lambda t, s: masks.causal() & masks.chunked(12), (4, 1), (37, 37), dtype=jnp.bfloat16),
    Case(
        "causal_segments_g3",
        lambda t, s: masks.causal(offset=s - t) & _segments(t, s),
        (6, 2),
        (40, 56),
        spec_blocks=(32, 32),
    ),
    Case(
        "padding_empty_rows",
        lambda t, s: masks.padding(jnp.array([t, t - 9]), jnp.array([s - 11, s])),
        (4, 4),
        (33, 47),
        blocks=BLOCKS_B,
    ),
    Case("prefix_lm_bf16", lambda t, s: masks.prefix_lm(10), (4, 2), (48, 48), dtype=jnp.bfloat16, blocks=BLOCKS_B),
    Case("random_blocks", lambda t, s: masks.random_blocks(16, 1, seed=3), (2, 2), (64, 64)),
    Case("from_fn_mqa", lambda t, s: masks.from_fn(lambda q, k: (q * 3 + k) % 7 != 0), (4, 1), (20, 36)),
    Case(
        "combo_bf16",
        lambda t, s: masks.causal() & _segments(t, s) | masks.global_tokens([3]),
        (4, 2),
        (45, 45),
        dtype=jnp.bfloat16,
    ),
    Case("none_bias_softcap", lambda t, s: None, (4, 2), (24, 40), bias="full", softcap=2.5, blocks=BLOCKS_B),
    Case(
        "causal_rowbias_h64",
        lambda t, s: masks.causal(offset=s - t),
        (2, 2),
        (30, 50),
        (64, 64),
        bias="row",
        softcap=3.0,
    ),
]
# The TPU interpreter runs each grid step (B x K x row tiles x key tiles, per kernel) in Python: the
# subset runs with no more heads and length than it takes to keep 2+ tiles on both axes of every kernel.
TPU_CASES = {
    "causal_segments_g3": dict(lengths=(20, 40)),  # EMPTY and PARTIAL tiles, a data mask, G = 3
    "padding_empty_rows": dict(heads=(2, 2)),  # per-sequence data, rows and tiles that see nothing
    "none_bias_softcap": {},  # FULL tiles, a [B, N, T, S] bias, softcap
}


def _inputs(case: Case, seed: int = 0):
    (n, k), (t, s), (h, hv) = case.heads, case.lengths, case.dims
    q, key, v = random_qkv(seed, b=B, t=t, s=s, n=n, k=k, h=h, hv=hv, dtype=case.dtype, host=True)
    if case.bias is None:
        return q, key, v, None
    shape = (B, n, t, s) if case.bias == "full" else (1, 1, 1, s)
    return q, key, v, jnp.asarray(np.random.default_rng(seed + 7).standard_normal(shape, np.float32))


def _jit(f, *args):
    """``jax.jit(f)(*args)`` compiled by XLA at optimisation level 0.

    Interpret mode turns each kernel into XLA loops that are run once, for their values: skipping
    the backend optimisations roughly halves the compile time, which dominates these tests (the
    loop emitters that tests/conftest.py selects take off more).
    """
    return jax.jit(f).lower(*args).compile({"xla_backend_optimization_level": "0"})(*args)


def _loss_and_grads(run, q, key, v, bias):
    """``(out, lse)`` and the gradients of a loss that touches both (so dlse is exercised too)."""

    def loss(q, key, v, bias):
        out, lse = run(q, key, v, bias)
        weights = jnp.cos(jnp.arange(out.shape[-1], dtype=jnp.float32))
        finite_lse = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return jnp.sum(out.astype(jnp.float32) * weights) + 0.3 * jnp.sum(jnp.sin(finite_lse)), (out, lse)

    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
    grads, (out, lse) = _jit(jax.grad(loss, argnums=argnums, has_aux=True), q, key, v, bias)
    return out, lse, grads


def _reference(q, key, v, bias, *, mask, softcap):
    def run(q, key, v, bias):
        return aj.dot_product_attention(
            q, key, v, bias=bias, mask=mask, softcap=softcap, implementation="reference", return_lse=True
        )

    f32 = lambda x: None if x is None else x.astype(jnp.float32)
    return _loss_and_grads(run, f32(q), f32(key), f32(v), bias)


def _assert_matches(out, lse, grads, ref, dtype):
    ref_out, ref_lse, ref_grads = ref
    assert out.dtype == dtype and lse.dtype == jnp.float32
    assert_close(out, ref_out, dtype=dtype)
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref_lse))
    finite = np.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0.0), jnp.where(finite, ref_lse, 0.0), dtype=dtype)
    for g, rg in zip(grads, ref_grads):
        assert np.isfinite(np.asarray(g, np.float32)).all()
        assert_close(g, rg, dtype=dtype, grad=True)


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = metafunc.cls.cases()
        metafunc.parametrize("case", cases, ids=[c.name for c in cases])


class TestFlashKernels:
    """The GPU (Triton) body, interpreted."""

    BACKEND = "gpu"

    @classmethod
    def cases(cls):
        return CASES

    def _run(self, case, q, key, v, bias):
        t, s = case.lengths
        mask = case.mask(t, s)
        spec = None if mask is None else mask.spec(t, s, *case.spec_blocks)

        def run(q, key, v, bias):
            return flash_attention(
                q, key, v, mask=spec, bias=bias, softcap=case.softcap, block_sizes=case.blocks,
                interpret=True, return_lse=True, backend=self.BACKEND,
            )  # fmt: skip

        return _loss_and_grads(run, q, key, v, bias), mask

    def test_matches_reference(self, case):
        q, key, v, bias = _inputs(case)
        (out, lse, grads), mask = self._run(case, q, key, v, bias)
        ref = _reference(q, key, v, bias, mask=mask, softcap=case.softcap)
        _assert_matches(out, lse, grads, ref, case.dtype)
        if case.name == "padding_empty_rows":  # rows past q_lengths see nothing: zeros, -inf, zero grads
            np.testing.assert_array_equal(np.asarray(out[1, -9:]), 0.0)
            assert np.isneginf(np.asarray(lse[1, :, -9:])).all()
            np.testing.assert_array_equal(np.asarray(grads[0][1, -9:]), 0.0)


class TestFlashKernelsTPUInterpret(TestFlashKernels):
    """The same tests with the TPU (Mosaic) body in the TPU interpreter (a subset: it is slow)."""

    BACKEND = "tpu"

    @classmethod
    def cases(cls):
        return [dataclasses.replace(c, **TPU_CASES[c.name]) for c in CASES if c.name in TPU_CASES]


# -- visit plans -----------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("spec_blocks", [(8, 8), (16, 16), (32, 16)])
def test_resampled_block_map_is_exact_or_conservative(group, spec_blocks):
    """Kernel tiles classified from a spec at other tiles: EMPTY/FULL only where the dense mask agrees."""
    t, s, block_rows, block_k = 40, 52, 32, 16
    mask = masks.causal() & masks.sliding_window(13)
    spec = mask.spec(t, s, *spec_blocks)
    bs = BlockSizes(block_q=block_rows, block_k=block_k)
    geom = _flash_plan.make_geometry((1, t, 2 * group, 32), (1, s, 2, 32), (1, s, 2, 32), bs, pad_head_dims=False)
    kind = np.asarray(_flash_plan.kernel_block_map(spec, geom, block_rows, block_k))[0]
    dense = np.asarray(mask.dense(t, s))
    rows_dense = np.repeat(dense, group, axis=0)  # row r = t * G + g
    exact = mask_info.block_map_from_dense(rows_dense, block_rows, block_k)
    pad = kind.shape[0] - exact.shape[0], kind.shape[1] - exact.shape[1]
    exact = np.pad(exact, ((0, pad[0]), (0, pad[1])))  # tiles wholly in the padding are empty
    assert kind.shape == (geom.rows_padded // block_rows, geom.kv_padded // block_k)
    assert np.all((kind == mask_info.EMPTY) <= (exact == mask_info.EMPTY))
    assert np.all((kind == mask_info.FULL) <= (exact == mask_info.FULL))
    if group == 1 and spec_blocks[0] <= block_rows and block_k % spec_blocks[1] == 0:
        np.testing.assert_array_equal(kind, exact)  # kernel tiles are unions of spec tiles: exact


def test_visit_table_orders_full_then_partial():
    kind = jnp.array([[[0, 2, 1, 2, 0], [0, 0, 0, 0, 0]]])
    order, counts = _flash_plan.visit_table(kind)
    np.testing.assert_array_equal(counts[0], [[2, 1], [0, 0]])
    np.testing.assert_array_equal(order[0, 0, :3], [1, 3, 2])


def test_block_sizes_validation_and_defaults():
    with pytest.raises(ValueError, match="block_k_dq must be a power of two"):
        BlockSizes(block_k_dq=24)
    with pytest.raises(ValueError, match="num_warps"):
        BlockSizes(num_warps=3)
    with pytest.raises(ValueError, match="backend"):
        BlockSizes.for_backend("cpu")
    for backend in ("gpu", "tpu"):
        for h in (32, 64, 128, 256):
            assert isinstance(BlockSizes.for_backend(backend, h), BlockSizes)
    assert mask_block_shape(BLOCKS_A, 100, 100, group=2) == (8, 16)


def test_input_errors():
    q, key, v = random_qkv(0, b=1, t=16, n=3, k=2, h=32, host=True)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        flash_attention(q, key, v, interpret=True)
    q, key, v = random_qkv(0, b=1, t=16, n=2, k=2, h=32, host=True)
    with pytest.raises(TypeError, match="MaskSpec"):
        flash_attention(q, key, v, mask=masks.causal(), interpret=True)
    with pytest.raises(ValueError, match="bias must be broadcastable"):
        flash_attention(q, key, v, bias=jnp.zeros((3, 16, 16)), interpret=True)


# -- the adapter behind dot_product_attention ------------------------------------------------------


def test_dot_product_attention_pallas_gqa_mask():
    q, key, v = random_qkv(1, b=B, t=37, s=37, n=4, k=2, h=32, host=True)
    mask = masks.causal() & _segments(37, 37)

    def run(impl):
        return lambda q, key, v: aj.dot_product_attention(q, key, v, mask=mask, implementation=impl, return_lse=True)

    out, lse = _jit(run("pallas"), q, key, v)
    ref_out, ref_lse = _jit(run("reference"), q, key, v)
    assert_close(out, ref_out)
    assert_close(lse, ref_lse)


def test_bool_array_mask_with_bias_and_empty_rows():
    q, key, v = random_qkv(2, b=B, t=24, s=40, n=2, k=1, h=32, host=True)
    dense = np.random.default_rng(0).random((B, 1, 24, 40)) > 0.5
    dense[0, :, 3] = False  # a row that sees nothing
    dense[:, :, :, 16:32] = False  # a band of empty tiles, skipped
    dense = jnp.asarray(dense)
    bias = jnp.asarray(np.random.default_rng(3).standard_normal((1, 2, 24, 40), np.float32))

    def run(impl):
        def f(q, key, v, bias):
            return aj.dot_product_attention(q, key, v, mask=dense, bias=bias, implementation=impl, return_lse=True)

        return _loss_and_grads(f, q, key, v, bias)

    _assert_matches(*run("pallas"), run("reference"), jnp.float32)


def test_traced_offsets_under_jit():
    q, key, v = random_qkv(4, b=1, t=16, s=48, n=2, k=2, h=32, host=True)
    mask = masks.causal() & masks.sliding_window(20)

    def f(q, key, v, offset):  # the kernels take traced offsets (positions are runtime arrays)
        return aj.dot_product_attention(q, key, v, mask=mask, q_offset=offset, implementation="pallas")

    reference = lambda q, key, v: aj.dot_product_attention(
        q, key, v, mask=mask, q_offset=32, implementation="reference"
    )
    ref = _jit(reference, q, key, v)
    assert_close(_jit(f, q, key, v, jnp.int32(32)), ref)


def test_score_mod_and_array_mask_with_softcap():
    """What the kernels once refused: a score mod, and a boolean array under softcap (now a mask tile)."""
    q, key, v = random_qkv(0, b=1, t=20, s=28, n=2, h=32, host=True)
    dense = jnp.asarray(np.random.default_rng(1).random((1, 2, 20, 28)) > 0.4)  # per head

    def run(impl):
        def f(q, key, v):
            return aj.dot_product_attention(
                q, key, v, mask=dense, softcap=5.0, score_mod=aj.score_mods.softcap(3.0), implementation=impl,
                return_lse=True,
            )  # fmt: skip

        return _loss_and_grads(lambda q, key, v, _: f(q, key, v), q, key, v, None)

    _assert_matches(*run("pallas"), run("reference"), jnp.float32)


# -- the ring's block-level fwd / bwd --------------------------------------------------------------


def test_block_fwd_bwd_assemble_the_full_attention():
    """Two K/V halves as two ring steps: merged outputs and summed gradients equal the reference."""
    t, s = 24, 48
    q, key, v = random_qkv(5, b=B, t=t, s=s, n=4, k=2, h=32, hv=16, host=True)
    dout = jnp.asarray(np.random.default_rng(6).standard_normal((B, t, 4, 16), np.float32))
    mask = masks.causal(offset=s - t) & _segments(t, s)
    halves = [(0, 24), (24, 48)]  # equal halves: one compiled kernel serves both steps
    specs = []
    for lo, hi in halves:  # each step's spec: its own key positions and key data
        full = mask.spec(t, s, 8, 8, kv_positions=None)
        specs.append(
            mask_info.MaskSpec(
                fn=full.fn,
                block_map=jnp.asarray(mask.block_map(t, hi - lo, 8, 8, kv_offset=lo), jnp.int32),
                q_positions=full.q_positions,
                kv_positions=full.kv_positions[lo:hi],
                q_vals=full.q_vals,
                kv_vals=tuple(x[:, lo:hi] for x in full.kv_vals),
                block_q=8,
                block_k=8,
            )
        )
    stack = lambda *xs: jnp.stack(xs)
    # A ring step: float32 outputs and gradients, so the ring's merge and sums stay exact.
    step_fwd = lambda q, k, v, sp: flash_forward(q, k, v, mask=sp, out_dtype=jnp.float32, block_sizes=BLOCKS_A,
                                                 interpret=True)  # fmt: skip
    step_bwd = lambda q, k, v, sp, lse, delta, dout: flash_backward(
        q, k, v, lse, delta, dout, mask=sp, grad_dtype=jnp.float32, block_sizes=BLOCKS_A, interpret=True
    )
    kv = jax.tree.map(stack, *[(key[:, lo:hi], v[:, lo:hi], sp) for (lo, hi), sp in zip(halves, specs)])

    def ring(q, kv, dout):  # the steps run in a loop (lax.map), as in a ring: one kernel instance each
        out_i, lse_i = jax.lax.map(lambda x: step_fwd(q, *x), kv)  # [2, B, T, N, Hv], [2, B, N, T]
        lse = jax.nn.logsumexp(lse_i, axis=0)
        weight = jnp.where(jnp.isfinite(lse_i), jnp.exp(lse_i - jnp.where(jnp.isfinite(lse), lse, 0.0)), 0.0)
        out = jnp.sum(out_i * jnp.swapaxes(weight, 2, 3)[..., None], axis=0)
        delta = jnp.einsum("BTNH,BTNH->BNT", out, dout)
        dq_i, dk_i, dv_i = jax.lax.map(lambda x: step_bwd(q, *x, lse, delta, dout), kv)
        merge = lambda d: jnp.concatenate(list(d), axis=1)
        return out_i, out, lse, (dq_i.sum(0), merge(dk_i), merge(dv_i))

    def reference(q, key, v, dout):
        run = lambda q, key, v: aj.dot_product_attention(q, key, v, mask=mask, implementation="reference")
        out, vjp = jax.vjp(run, q, key, v)
        lse = aj.dot_product_attention(q, key, v, mask=mask, implementation="reference", return_lse=True)[1]
        return out, lse, vjp(dout)

    out_i, out, lse, grads = _jit(ring, q, kv, dout)
    ref_out, ref_lse, ref_grads = _jit(reference, q, key, v, dout)
    assert out_i.dtype == jnp.float32  # the steps' outputs and gradients are float32 for the ring's sums
    assert_close(out, ref_out)
    finite = jnp.isfinite(ref_lse)
    assert_close(jnp.where(finite, lse, 0), jnp.where(finite, ref_lse, 0))
    for g, rg in zip(grads, ref_grads):
        assert g.dtype == jnp.float32
        assert_close(g, rg, grad=True)


def test_vmap_checkpoint_grad_compose():
    """``grad(checkpoint(vmap(flash_attention)))`` over an extra leading axis equals the reference's."""
    q, key, v = random_qkv(7, b=3, t=20, s=20, n=2, k=1, h=32, host=True)  # the leading axis is vmapped: B = 1 inside
    q, key, v = (x[:, None] for x in (q, key, v))
    spec = masks.causal().spec(20, 20, 16, 16)

    def loss(attend):
        return lambda q, key, v: jnp.sum(jnp.sin(jax.checkpoint(jax.vmap(attend))(q, key, v)))

    kernel = lambda q, key, v: flash_attention(q, key, v, mask=spec, block_sizes=BLOCKS_A, interpret=True)
    reference = lambda q, key, v: flash_attention_reference(q, key, v, mask=spec)[0]
    grads = _jit(jax.grad(loss(kernel), argnums=(0, 1, 2)), q, key, v)
    ref_grads = _jit(jax.grad(loss(reference), argnums=(0, 1, 2)), q, key, v)
    for g, rg in zip(grads, ref_grads):
        assert_close(g, rg, grad=True)
