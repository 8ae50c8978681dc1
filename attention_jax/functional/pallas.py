"""``implementation="pallas"``: the Pallas flash kernels of ``pallas_kernels.flash_attention``.

The kernel body follows ``jax.default_backend()``: Triton on GPU (with the Mosaic GPU ``wgmma``
forward and dK/dV kernels on Hopper, sm90, for the calls they support), Mosaic on TPU, and on CPU the Triton body in
Pallas' interpreter (exact but slow: for tests and small inputs).

Masks reach the kernels as a ``MaskSpec`` (block map + elementwise function):

* a :class:`~attention_jax.masks.Mask` through ``mask.spec`` at the tile size that lets every
  kernel skip exactly (``pallas_kernels.flash_attention.mask_block_shape``); with traced offsets
  the structure is unknown at trace time, so every tile is PARTIAL (still exact, nothing skipped);
* a boolean array as an additive ``0 / -inf`` bias, with a block map computed from the array so
  that all-False tiles are still skipped (not with ``softcap``, which would turn ``-inf`` finite).

``score_mod`` is not supported by the kernels: such calls raise and ``implementation=None`` never
routes them here. Besides ``attention`` the module provides the ring-attention step ``fwd``/``bwd``
(see ``pallas_kernels.ring_attention``).

>>> import jax, jax.numpy as jnp
>>> import attention_jax as aj
>>> q = jax.random.normal(jax.random.key(0), (1, 40, 4, 32))    # [B, T, N, H]
>>> kv = jax.random.normal(jax.random.key(1), (1, 40, 2, 32))   # [B, S, K, H]
>>> out = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), implementation="pallas")
>>> ref = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), implementation="reference")
>>> bool(jnp.allclose(out, ref, atol=1e-5))
True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks
from pallas_kernels import mask_info
from pallas_kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_backward,
    flash_forward,
    mask_block_shape,
    resolve_backend,
)
from pallas_kernels.mask_info import MaskSpec

__all__ = ["attention", "fwd", "bwd", "mask_spec"]

Array = jax.Array


def attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    shape: _checks.AttentionShape,
    scale: float | Array,
    mask: masks_lib.Mask | Array | None = None,
    bias: Array | None = None,
    score_mod: Any = None,
    softcap: float | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    block_sizes: BlockSizes | None = None,
) -> tuple[Array, Array]:
    """Flash attention: ``(out [B, T, N, Hv] in query.dtype, lse [B, N, T] float32)``.

    Arguments as in ``dot_product_attention`` (validated there); ``block_sizes`` overrides the
    kernels' defaults for the backend. Differentiable in ``query``, ``key``, ``value`` and ``bias``.
    """
    if score_mod is not None:
        raise ValueError(
            "implementation='pallas' does not support score_mod (the kernels take a mask, a bias and softcap); "
            "use implementation='blockwise' or 'reference', or pass the modification as a bias."
        )
    backend, interpret = resolve_backend()
    if block_sizes is None:
        block_sizes = BlockSizes.for_backend(backend, head_dim=shape.head_dim)
    spec, bias = mask_spec(mask, shape, block_sizes, q_offset=q_offset, kv_offset=kv_offset, bias=bias, softcap=softcap)
    return flash_attention(
        query,
        key,
        value,
        mask=spec,
        scale=scale,
        softcap=softcap,
        bias=bias,
        block_sizes=block_sizes,
        interpret=interpret,
        return_lse=True,
        backend=backend,
    )


def mask_spec(
    mask: masks_lib.Mask | Array | None,
    shape: _checks.AttentionShape,
    block_sizes: BlockSizes,
    *,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    bias: Array | None = None,
    softcap: float | None = None,
) -> tuple[MaskSpec | None, Array | None]:
    """``(spec, bias)`` for the kernels: a boolean-array mask is folded into the returned bias."""
    t, s = shape.q_len, shape.kv_len
    block_q, block_k = mask_block_shape(block_sizes, t, s, shape.group_size)
    if mask is None:
        return None, bias
    if isinstance(mask, masks_lib.Mask):
        return _spec_of_mask(mask, shape, block_q, block_k, q_offset, kv_offset), bias
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {jnp.result_type(mask)}.")
    if softcap is not None:
        raise ValueError(
            "implementation='pallas' applies a boolean-array mask as a -inf bias, which softcap would make finite; "
            "pass an attention_jax.masks.Mask (e.g. masks.from_fn) or use implementation='blockwise'."
        )
    _checks.check_broadcastable("mask", mask, shape)
    mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + tuple(jnp.shape(mask)))  # [Bm, Nm, Tm, Sm]
    mask_bias = jnp.where(mask, 0.0, -jnp.inf).astype(jnp.bfloat16)  # 0 and -inf are exact in bf16
    bias = mask_bias if bias is None else bias + mask_bias
    spec = MaskSpec(
        fn=None,
        # One map per batch entry (computed at run time), shared by the heads.
        block_map=mask_info.shared_block_map(jnp.broadcast_to(mask, mask.shape[:2] + (t, s)), block_q, block_k, 1),
        q_positions=mask_info.contiguous_positions(t, q_offset),
        kv_positions=mask_info.contiguous_positions(s, kv_offset),
        block_q=block_q,
        block_k=block_k,
    )
    return spec, bias


def _spec_of_mask(mask: masks_lib.Mask, shape, block_q: int, block_k: int, q_offset, kv_offset) -> MaskSpec:
    t, s = shape.q_len, shape.kv_len
    try:
        q_offset, kv_offset = int(q_offset), int(kv_offset)
    except (TypeError, jax.errors.ConcretizationTypeError):  # traced offsets: structure unknown here
        q_vals, kv_vals = mask.arrays(t, s)
        nq, nk = mask_info.num_blocks(t, block_q), mask_info.num_blocks(s, block_k)
        return MaskSpec(
            fn=mask.fn(s),
            block_map=jnp.full((nq, nk), mask_info.PARTIAL, jnp.int32),
            q_positions=mask_info.contiguous_positions(t, q_offset),
            kv_positions=mask_info.contiguous_positions(s, kv_offset),
            q_vals=tuple(q_vals),
            kv_vals=tuple(kv_vals),
            block_q=block_q,
            block_k=block_k,
        )
    with jax.ensure_compile_time_eval():  # from_fn / random_blocks evaluate jnp on the host
        return mask.spec(t, s, block_q, block_k, q_offset, kv_offset)


# -- ring attention step (pallas_kernels.ring_attention's per-block interface) ---------------------


def default_block_sizes(q_len: int, kv_len: int, backend: str | None = None) -> tuple[int, int]:
    """``(block_q, block_k)`` for a ring step's MaskSpec: the forward kernel's tiles on ``backend``.

    The kernels resample a spec's map to each of their tiles, so other sizes stay correct; these
    skip exactly in the forward kernel (MHA; under GQA the map stays conservative-correct).
    """
    body, _ = resolve_backend(backend if backend in ("gpu", "tpu") else None)
    return mask_block_shape(BlockSizes.for_backend(body), q_len, kv_len)


def fwd(q: Array, k: Array, v: Array, spec: MaskSpec, *, scale: float | None = None, softcap: float | None = None):
    """One ring step: ``(out [B, T, N, Hv] float32 normalised by its own lse, lse [B, N, T] float32)``.

    ``spec`` may have any tile size (the kernels resample its run-time block map); tiles from
    :func:`pallas_kernels.flash_attention.mask_block_shape` skip exactly.
    """
    backend, interpret = resolve_backend()
    return flash_forward(
        q, k, v, mask=spec, scale=scale, softcap=softcap, backend=backend, interpret=interpret, out_dtype=jnp.float32
    )


def bwd(
    q: Array,
    k: Array,
    v: Array,
    spec: MaskSpec,
    lse: Array,
    delta: Array,
    dout: Array,
    *,
    scale: float | None = None,
    softcap: float | None = None,
):
    """One ring step's gradient contributions ``(dq, dk, dv)`` (float32) given the global ``lse`` and ``delta``."""
    backend, interpret = resolve_backend()
    return flash_backward(
        q,
        k,
        v,
        lse,
        delta,
        dout,
        mask=spec,
        scale=scale,
        softcap=softcap,
        backend=backend,
        interpret=interpret,
        grad_dtype=jnp.float32,
    )
