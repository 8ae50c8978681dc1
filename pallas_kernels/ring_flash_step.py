"""The Pallas flash kernels as a ring-attention step (``pallas_kernels.ring_attention``'s interface).

``step_fwd`` runs the forward kernel alone and ``step_bwd`` the backward kernels alone, both on the
kernel body of ``jax.default_backend()`` (Triton on GPU, Mosaic on TPU, the Triton body in Pallas'
interpreter on CPU: exact but slow, for tests). The block map of a step is a run-time array (the
ring picks it with ``axis_index``); the kernels resample it to their own tiles, so a spec of any
tile size is exact and one of :func:`default_block_sizes` skips exactly.

Kernel floor: imports jax and ``pallas_kernels`` only.

>>> import jax, jax.numpy as jnp
>>> from pallas_kernels import mask_info
>>> q = jax.random.normal(jax.random.key(0), (1, 24, 2, 16))  # [B, T, N, H]
>>> block_q, block_k = default_block_sizes(24, 24)
>>> nq, nk = mask_info.num_blocks(24, block_q), mask_info.num_blocks(24, block_k)
>>> spec = mask_info.MaskSpec(fn=None, block_map=jnp.full((nq, nk), mask_info.PARTIAL), block_q=block_q,
...                           block_k=block_k, q_positions=jnp.arange(24), kv_positions=jnp.arange(24))
>>> out, lse = step_fwd(q, q, q, spec, scale=0.25, softcap=None)
>>> out.dtype, out.shape, lse.shape
(dtype('float32'), (1, 24, 2, 16), (1, 2, 24))
>>> bool(jnp.allclose(out, jax.nn.dot_product_attention(q, q, q, scale=0.25), atol=1e-5))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention import BlockSizes, flash_backward, flash_forward, mask_block_shape, resolve_backend
from pallas_kernels.mask_info import MaskSpec

__all__ = ["step_fwd", "step_bwd", "default_block_sizes"]

Array = jax.Array


def default_block_sizes(q_len: int, kv_len: int, backend: str | None = None) -> tuple[int, int]:
    """``(block_q, block_k)`` for a ring step's MaskSpec: the kernels' tiles on ``backend``.

    ``backend`` ``"gpu"`` or ``"tpu"`` (None or anything else: the body of ``jax.default_backend()``).
    A map at these tiles skips exactly in every kernel under MHA (under GQA it stays
    conservative-correct).

    >>> default_block_sizes(1024, 1024, "tpu")
    (256, 256)
    """
    body, _ = resolve_backend(backend if backend in ("gpu", "tpu") else None)
    return mask_block_shape(BlockSizes.for_backend(body), q_len, kv_len)


def step_fwd(
    q: Array,
    k: Array,
    v: Array,
    spec: MaskSpec,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str | None = None,
    interpret: bool | None = None,
):
    """One ring step: ``(out [B, T, N, Hv] float32 normalised by its own lse, lse [B, N, T] float32)``.

    ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``; ``spec`` the mask of these queries
    against these keys (block map ``[ceil(T / block_q), ceil(S / block_k)]``, any tile size).
    ``backend`` (``"gpu"``/``"tpu"``) and ``interpret`` as in
    :func:`~pallas_kernels.flash_attention.resolve_backend` (bind them with ``functools.partial``,
    e.g. to lower a ring for TPU on a CPU host).
    """
    backend, interpret = resolve_backend(backend, interpret)
    return flash_forward(
        q, k, v, mask=spec, scale=scale, softcap=softcap, backend=backend, interpret=interpret, out_dtype=jnp.float32
    )


def step_bwd(
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
    backend: str | None = None,
    interpret: bool | None = None,
):
    """One ring step's gradient contributions ``(dq, dk, dv)`` (float32) given the global statistics.

    ``lse [B, N, T]`` is the logsumexp of the whole attention (every step) and
    ``delta [B, N, T] = rowsum(out * dout) - dlse`` with the whole output; ``dout [B, T, N, Hv]``;
    ``backend`` and ``interpret`` as in :func:`step_fwd`.
    """
    backend, interpret = resolve_backend(backend, interpret)
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
