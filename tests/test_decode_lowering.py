"""The decode kernels lower for GPU (Triton) and TPU (Mosaic) on this CPU-only machine.

``jax.jit(f).trace(...).lower(lowering_platforms=(platform,))`` runs the Pallas lowering of each body
to Triton IR or Mosaic MLIR, so a construct a backend cannot express (the page-table gathers or index
maps, the dequantisation, the mask function on index tiles) fails here rather than on the accelerator.
Compiling the lowered kernels needs the device.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.decode_attention import decode_attention

B, T, N, K, H = 2, 4, 32, 8, 128  # GQA 32/8, four query rows (speculative verification)
P, PS, M = 50, 16, 6  # a pool, table and visit list whose sizes are not powers of two
CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}
KERNEL = {"cuda": "triton", "tpu": "mosaic_tpu"}


def _window(q_pos, kv_pos, q_vals, kv_vals):
    visible = (kv_pos <= q_pos) & (kv_pos > q_pos - 100)
    return visible & (kv_vals[0] == q_vals[0]) if kv_vals else visible


def _lower(
    platform, dtype, *, head_dim=H, value_dim=None, keys_only=False, masked=False, ring=None, softcap=None, kv_heads=K
):
    quantized = jnp.dtype(dtype) in (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
    q_dtype = jnp.bfloat16
    hv = value_dim or head_dim
    pages = jax.ShapeDtypeStruct((P, PS, kv_heads, head_dim), dtype)
    args = dict(
        q=jax.ShapeDtypeStruct((B, T, N, head_dim), q_dtype),
        k_pages=pages,
        v_pages=None if keys_only else jax.ShapeDtypeStruct((P, PS, kv_heads, hv), dtype),
        page_table=jax.ShapeDtypeStruct((B, M), jnp.int32),
        lengths=jax.ShapeDtypeStruct((B,), jnp.int32),
        q_positions=jax.ShapeDtypeStruct((B, T), jnp.int32),
        k_scales=jax.ShapeDtypeStruct((P, PS, kv_heads), jnp.float32) if quantized else None,
        v_scales=jax.ShapeDtypeStruct((P, PS, kv_heads), jnp.float32) if quantized and not keys_only else None,
        q_vals=(jax.ShapeDtypeStruct((B, T), jnp.int32),) if masked else (),
        kv_vals=(jax.ShapeDtypeStruct((B, M * PS), jnp.int32),) if masked and platform == "cuda" else (),
    )
    static = dict(kernel=KERNEL[platform], mask_fn=_window if masked else None, ring=ring, softcap=softcap,
                  value_dim=value_dim if keys_only else None, block_k=32, num_splits=4)  # fmt: skip
    fn = jax.jit(functools.partial(decode_attention, **static))
    return fn.trace(**args).lower(lowering_platforms=(platform,)).as_text().count(CALL[platform])


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.int8, jnp.float8_e4m3fn])
def test_paged_decode_lowers(platform, dtype):
    assert _lower(platform, dtype, masked=True, softcap=30.0) == 1


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_ring_and_keys_only_lower(platform):
    assert _lower(platform, jnp.bfloat16, ring=90) == 1
    # MLA's absorbed latent cache (DeepSeek: 512 latent + 64 RoPE channels, one KV head), bf16 and int8
    for dtype in (jnp.bfloat16, jnp.int8):
        assert _lower(platform, dtype, head_dim=576, value_dim=512, keys_only=True, kv_heads=1) == 1
