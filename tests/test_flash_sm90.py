"""The Hopper (Mosaic GPU, wgmma) forward kernel: lowering, dispatch, and compiled results on sm90.

Mosaic GPU has no usable CPU interpreter for this kernel (warpgroup MMAs from registers and
transposed shared-memory operands are outside what it simulates), so on this CPU-only machine the
kernel is *lowered* for CUDA, which traces the whole kernel body through the Mosaic GPU pipeline
(layouts, shared-memory budget checks aside), and the dispatch rules are tested directly. The
compiled comparison against the reference runs only on an sm90 GPU (``pytest tests/test_flash_sm90.py``
on the device machine).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from attention_jax import masks
from pallas_kernels import mask_info
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_reference, mask_block_shape

fa = importlib.import_module("pallas_kernels.flash_attention")  # the module (the package exports the function)

MOSAIC_CALL = "custom_call @mosaic_gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"


def _spec(mask, t, s, group, head_dim):
    if mask is None:
        return None
    return mask.spec(t, s, *mask_block_shape(BlockSizes.for_backend("gpu", head_dim), t, s, group=group))


def _lower(*, t=512, s=None, n=4, k=2, h=128, dtype=jnp.bfloat16, mask=None, softcap=None, data=False):
    """Forward and forward+backward of the Mosaic GPU forward, lowered for CUDA."""
    s = t if s is None else s
    args = (
        jax.ShapeDtypeStruct((2, t, n, h), dtype),
        jax.ShapeDtypeStruct((2, s, k, h), dtype),
        jax.ShapeDtypeStruct((2, s, k, h), dtype),
        jax.ShapeDtypeStruct((2, t), jnp.int32),
        jax.ShapeDtypeStruct((2, s), jnp.int32),
    )

    def attention(q, kk, v, seg_q, seg_kv):
        m = masks.segments(seg_q, seg_kv) & mask if data else mask
        return flash_attention(
            q, kk, v, mask=_spec(m, t, s, n // k, h), softcap=softcap, backend="gpu", interpret=False,
            forward_kernel="mosaic_gpu", backward_kernel="mosaic_gpu" if h <= 128 else "triton",
        )  # fmt: skip

    def loss(*a):
        return attention(*a).astype(jnp.float32).sum()

    forward = jax.jit(attention).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return forward, backward


@pytest.mark.parametrize(
    "case",
    [
        dict(h=64, mask=None),
        dict(h=128, mask=masks.causal(), t=333, n=8, k=2),  # ragged T, GQA
        dict(h=256, dtype=jnp.float16, mask=masks.causal() & masks.sliding_window(70), k=4),
        dict(h=64, mask=masks.causal(), data=True, n=8, k=1),  # per-position data (segments), MQA
        dict(h=128, mask=masks.chunked(96), softcap=30.0),
        dict(h=96, t=256, s=1000, mask=None),  # padded head dim, cross attention, padded keys
    ],
    ids=["full-h64", "causal-gqa-ragged", "window-f16-h256", "segments-mqa", "chunked-softcap", "cross-h96"],
)
def test_hopper_kernels_lower(case):
    forward, backward = _lower(**case)
    assert forward.count(MOSAIC_CALL) == 1 and TRITON_CALL not in forward
    # The custom_vjp's forward (residuals) and dK/dV are Mosaic GPU kernels, dQ is Triton's; at H=256
    # dK/dV is Triton's too.
    mosaic_dkv = case["h"] <= 128
    assert backward.count(MOSAIC_CALL) == 1 + mosaic_dkv
    assert backward.count(TRITON_CALL) == 2 - mosaic_dkv


# -- dispatch --------------------------------------------------------------------------------------


def _choice(monkeypatch, *, hopper=True, shape=(1, 512, 4, 128), kv_shape=None, dtype=jnp.bfloat16, bias=None,
            out_dtype=None, grad_dtype=None, requested=None, requested_bwd=None, interpret=False,
            scope=None):  # fmt: skip
    """``(forward body, dK/dV body, block sizes)`` the dispatch picks for a call."""
    monkeypatch.setattr(fa, "_is_hopper", lambda: hopper)
    q = jax.ShapeDtypeStruct(shape, dtype)
    kv = jax.ShapeDtypeStruct(kv_shape or shape, dtype)
    sizes = BlockSizes.for_backend("gpu", shape[-1])
    return fa._gpu_kernels(
        q, kv, kv, bias=bias, forward_kernel=requested, backward_kernel=requested_bwd, backend="gpu",
        interpret=interpret, out_dtype=out_dtype, grad_dtype=grad_dtype, block_sizes=sizes,
        scope_reason=None if scope is None else fa._hopper_scope_reason(*scope),
    )  # fmt: skip


def _scope(kind: str):
    """``(mask spec, dropout rate)`` with one thing the Hopper kernels do not implement."""
    spec = mask_info.MaskSpec(None, jnp.ones((1, 1), jnp.int32), jnp.arange(512), jnp.arange(512), block_q=512,
                              block_k=512)  # fmt: skip
    if kind == "dropout":
        return spec, 0.1
    if kind == "score_mod":
        return dataclasses.replace(spec, score_fn=lambda s, *_: s), 0.0
    if kind == "array":
        return dataclasses.replace(spec, array=jnp.ones((1, 1, 512, 512), bool)), 0.0
    return dataclasses.replace(spec, q_positions=jnp.zeros((1, 512), jnp.int32)), 0.0


@pytest.mark.parametrize("kind", ["dropout", "score_mod", "array", "per_sequence"])
def test_spec_features_out_of_hopper_scope(monkeypatch, kind):
    """Automatic dispatch falls back to Triton; asking for the Hopper kernels names the reason."""
    assert _choice(monkeypatch, scope=_scope(kind))[:2] == ("triton", "triton")
    reason = {"dropout": "dropout", "score_mod": "score mod", "array": "array mask", "per_sequence": "per-sequence"}
    with pytest.raises(ValueError, match=f"forward_kernel='mosaic_gpu' cannot run this call: .*{reason[kind]}"):
        _choice(monkeypatch, scope=_scope(kind), requested="mosaic_gpu")


def test_auto_picks_mosaic_on_hopper_for_supported_calls(monkeypatch):
    fwd, bwd, blocks = _choice(monkeypatch)
    assert (fwd, bwd) == ("mosaic_gpu", "mosaic_gpu")
    assert (blocks.block_q, blocks.block_k, blocks.block_k_dkv) == (128, blocks.block_k_wgmma, 128)
    assert blocks.block_q_dq == BlockSizes.for_backend("gpu", 128).block_q_dq  # dQ stays Triton's
    assert _choice(monkeypatch, dtype=jnp.float16, shape=(1, 512, 4, 96))[:2] == ("mosaic_gpu",) * 2  # H 96 -> 128
    # H = 256: the forward only (two [64, 256] float32 accumulators per warpgroup do not fit in registers).
    fwd, bwd, blocks = _choice(monkeypatch, shape=(1, 512, 4, 256))
    assert (fwd, bwd, blocks.block_k_dkv) == ("mosaic_gpu", "triton", BlockSizes.for_backend("gpu", 256).block_k_dkv)
    # The ring's steps ask for float32 outputs / gradients: Triton there.
    assert _choice(monkeypatch, grad_dtype=jnp.float32)[:2] == ("mosaic_gpu", "triton")
    assert _choice(monkeypatch, out_dtype=jnp.float32)[:2] == ("triton", "mosaic_gpu")


@pytest.mark.parametrize(
    "change",
    [
        dict(hopper=False),
        dict(dtype=jnp.float32),
        dict(shape=(1, 512, 4, 32)),  # head dim below 64
        dict(bias=jnp.zeros((1, 4, 512, 512))),
        dict(shape=(1, 40, 1, 128)),  # fewer rows than one CTA's 128
        dict(interpret=True),
        dict(requested="triton"),
    ],
    ids=["not-hopper", "f32", "h32", "bias", "short", "interpret", "asked-triton"],
)
def test_auto_falls_back_to_triton(monkeypatch, change):
    fwd, _, blocks = _choice(monkeypatch, **change)
    assert (
        fwd == "triton" and blocks.block_q == BlockSizes.for_backend("gpu", change.get("shape", (0, 128))[-1]).block_q
    )


def test_asking_for_mosaic_out_of_scope_names_the_reason(monkeypatch):
    with pytest.raises(ValueError, match="forward_kernel='mosaic_gpu' cannot run this call: dtype float32"):
        _choice(monkeypatch, dtype=jnp.float32, requested="mosaic_gpu")
    with pytest.raises(ValueError, match="an additive bias"):
        _choice(monkeypatch, bias=jnp.zeros((1, 4, 512, 512)), requested="mosaic_gpu")
    with pytest.raises(ValueError, match="no CPU interpreter"):
        _choice(monkeypatch, interpret=True, requested="mosaic_gpu")
    with pytest.raises(ValueError, match="forward_kernel must be None or one of"):
        _choice(monkeypatch, requested="cudnn")
    with pytest.raises(ValueError, match=r"backward_kernel='mosaic_gpu' cannot run this call: head dims H=256"):
        _choice(monkeypatch, shape=(1, 512, 4, 256), requested_bwd="mosaic_gpu")
    with pytest.raises(ValueError, match="S = 40 keys"):
        _choice(monkeypatch, kv_shape=(1, 40, 4, 128), requested_bwd="mosaic_gpu")


def test_default_dispatch_follows_the_device():
    q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
    cfg, _, _ = fa._prepare(q, q, q, mask=None, scale=None, softcap=None, bias=None, block_sizes=None, backend=None,
                         interpret=None)  # fmt: skip
    if fa._is_hopper():
        assert (cfg.forward_body, cfg.dkv_body) == (fa._flash_mosaic_gpu_sm90, fa._flash_mosaic_gpu_sm90_dkv)
    else:  # CPU (interpreted Triton), other GPUs, TPU: never the Hopper kernels
        assert (cfg.forward_kernel, cfg.backward_kernel) == ("triton", "triton")
        assert cfg.forward_body is cfg.dkv_body is cfg.body


@pytest.mark.parametrize("field, value", [("block_k_wgmma", 48), ("stages_wgmma", 1)])
def test_block_sizes_validate_the_wgmma_fields(field, value):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**{field: value})


# -- compiled on an sm90 GPU -----------------------------------------------------------------------

on_hopper = pytest.mark.skipif(not fa._is_hopper(), reason="needs an sm90 GPU (H100/H200)")


@on_hopper
@pytest.mark.parametrize(
    "mask, t, n, k, h, dtype",
    [
        (None, 1024, 4, 4, 64, jnp.bfloat16),
        (masks.causal(), 333, 8, 2, 128, jnp.bfloat16),
        (masks.causal() & masks.sliding_window(70), 600, 4, 4, 256, jnp.float16),
        (masks.chunked(192), 1024, 4, 1, 64, jnp.bfloat16),
    ],
)
def test_compiled_matches_reference(mask, t, n, k, h, dtype):
    keys = jax.random.split(jax.random.key(t + h), 4)
    q = jax.random.normal(keys[0], (2, t, n, h), dtype)
    kv = [jax.random.normal(key, (2, t, k, h), dtype) for key in keys[1:3]]
    spec = _spec(mask, t, t, n // k, h)
    run = jax.jit(lambda q, kk, v, fk: flash_attention(q, kk, v, mask=spec, forward_kernel=fk, return_lse=True),
                  static_argnums=3)  # fmt: skip
    out, lse = run(q, *kv, "mosaic_gpu")
    ref, ref_lse = flash_attention_reference(*(x.astype(jnp.float32) for x in (q, *kv)), mask=spec)
    assert_close(out, ref.astype(dtype), dtype)
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    assert_close(jnp.where(jnp.isfinite(lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0), jnp.float32)
    cot = jax.random.normal(keys[3], out.shape, jnp.float32)

    def loss(attention, *args):
        return jnp.sum(attention(*args).astype(jnp.float32) * cot)

    def hopper(q, kk, v):  # both Hopper kernels (H <= 128), else the Hopper forward and Triton dK/dV
        kernel = "mosaic_gpu" if h <= 128 else "triton"
        return flash_attention(q, kk, v, mask=spec, forward_kernel="mosaic_gpu", backward_kernel=kernel)

    def reference(q, kk, v):
        return flash_attention_reference(q, kk, v, mask=spec)[0]

    got = jax.jit(jax.grad(functools.partial(loss, hopper), argnums=(0, 1, 2)))(q, *kv)
    f32 = [x.astype(jnp.float32) for x in (q, *kv)]
    want = jax.grad(functools.partial(loss, reference), argnums=(0, 1, 2))(*f32)
    for g, w in zip(got, want):
        assert_close(g, w.astype(dtype), dtype, grad=True)
