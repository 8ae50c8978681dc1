"""The flash kernels lower for GPU (Triton) and TPU (Mosaic) on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=(platform,))`` runs the Pallas lowering of each
kernel body to Triton IR or Mosaic MLIR, forward and backward, so a construct either backend cannot
express fails here rather than on the accelerator. (Compiling the lowered kernels needs the device.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from attention_jax import masks
from pallas_kernels import mask_info
from pallas_kernels.flash_attention import BlockSizes, flash_attention, mask_block_shape

B, N, K = 1, 4, 2  # GQA: two query heads per key/value head
T, S = 512, 488  # S is not a multiple of the blocks: the padded key tile is masked


def _mask(kind: str, seg_q, seg_kv):
    if kind == "causal":
        return masks.causal(offset=S - T)
    if kind == "chunked":  # integer division of positions inside the kernels
        return masks.causal(offset=S - T) & masks.chunked(96)
    return masks.segments(seg_q, seg_kv) & masks.sliding_window(200)


def _lower(platform: str, head_dim: int, kind: str, *, bias: bool = False, softcap=None):
    backend = "tpu" if platform == "tpu" else "gpu"
    bf16 = jnp.bfloat16
    args = (
        jax.ShapeDtypeStruct((B, T, N, head_dim), bf16),
        jax.ShapeDtypeStruct((B, S, K, head_dim), bf16),
        jax.ShapeDtypeStruct((B, S, K, head_dim), bf16),
        jax.ShapeDtypeStruct((1, N, T, S), jnp.float32) if bias else None,
        jax.ShapeDtypeStruct((B, T), jnp.int32),
        jax.ShapeDtypeStruct((B, S), jnp.int32),
    )
    block_sizes = BlockSizes.for_backend(backend, head_dim)

    def attention(q, k, v, bias, seg_q, seg_kv):
        spec = _mask(kind, seg_q, seg_kv).spec(T, S, *mask_block_shape(block_sizes, T, S, group=N // K))
        return flash_attention(
            q, k, v, mask=spec, bias=bias, softcap=softcap, block_sizes=block_sizes, interpret=False, backend=backend
        )

    def loss(*args):
        return attention(*args).astype(jnp.float32).sum()

    forward = jax.jit(attention).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    argnums = (0, 1, 2, 3) if bias else (0, 1, 2)
    backward = jax.jit(jax.grad(loss, argnums=argnums)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    return forward, backward


CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("kind", ["causal", "segments"])
def test_forward_and_backward_lower(platform, head_dim, kind):
    forward, backward = _lower(platform, head_dim, kind)
    assert forward.count(CALL[platform]) == 1  # the forward kernel
    assert backward.count(CALL[platform]) == 3  # forward (residuals), dq, dk/dv


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_bias_softcap_and_odd_head_dim_lower(platform):
    forward, backward = _lower(platform, 96, "causal", bias=True, softcap=30.0)
    assert forward.count(CALL[platform]) == 1
    assert backward.count(CALL[platform]) == 3


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_chunked_mask_lowers(platform):
    forward, backward = _lower(platform, 128, "chunked")
    assert forward.count(CALL[platform]) == 1
    assert backward.count(CALL[platform]) == 3


# -- what a MaskSpec carries beyond a mask function ------------------------------------------------


def _feature_call(feature: str, backend: str):
    """``(attention(*args), args)``: flash attention with one spec feature, on abstract inputs."""
    block_sizes = BlockSizes.for_backend(backend, 64)
    bq, bk = mask_block_shape(block_sizes, T, S, group=N // K)
    nq, nk = -(-T // bq), -(-S // bk)
    batch = 2
    args = (
        jax.ShapeDtypeStruct((batch, T, N, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, S, K, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((batch, S, K, 64), jnp.bfloat16),
        jax.ShapeDtypeStruct((N,), jnp.float32),  # per-head score parameters
        jax.ShapeDtypeStruct((batch, nq, nk), jnp.int32),  # a per-sequence block map
        jax.ShapeDtypeStruct((batch, T), jnp.int32),  # per-sequence query positions
        jax.ShapeDtypeStruct((batch, N, T, S), jnp.bool_),  # a per-head array mask
        jax.ShapeDtypeStruct((), jnp.int32),  # the dropout seed
    )

    def causal(q_pos, kv_pos, q_vals, kv_vals):
        return kv_pos <= q_pos + (S - T)

    def alibi(score, b, h, q_pos, kv_pos, params):
        return score + params[0] * (kv_pos - q_pos).astype(jnp.float32)

    def attention(q, k, v, slopes, block_map, q_pos, array, seed):
        shared_map = jnp.ones((nq, nk), jnp.int32)
        spec = mask_info.MaskSpec(causal, shared_map, jnp.arange(T), jnp.arange(S), block_q=bq, block_k=bk)
        kw = {}
        if feature == "score_mod":
            spec = dataclasses.replace(spec, score_fn=alibi, score_params=(slopes,))
        elif feature == "dropout":
            kw = dict(dropout_rate=0.1, dropout_seed=seed)
        elif feature == "per_sequence":
            spec = dataclasses.replace(spec, block_map=block_map, q_positions=q_pos)
        elif feature == "array_softcap":
            spec = dataclasses.replace(spec, fn=None, array=array)
            kw = dict(softcap=20.0)
        return flash_attention(
            q, k, v, mask=spec, block_sizes=block_sizes, interpret=False, backend=backend, **kw
        ).astype(jnp.float32)

    return attention, args


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("feature", ["score_mod", "dropout", "per_sequence", "array_softcap"])
def test_spec_features_lower(platform, feature):
    """Score mods (their parameters differentiated), dropout, per-sequence positions with a
    ``[B, nq, nk]`` map, and a per-head array mask with softcap: forward and backward lower."""
    attention, args = _feature_call(feature, "tpu" if platform == "tpu" else "gpu")
    loss = lambda *a: attention(*a).sum()
    forward = jax.jit(attention).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).trace(*args).lower(lowering_platforms=(platform,))
    assert forward.count(CALL[platform]) == 1
    assert backward.as_text().count(CALL[platform]) == 3
