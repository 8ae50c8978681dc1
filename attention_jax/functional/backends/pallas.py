"""``implementation="pallas"``: the Pallas flash kernels of ``pallas_kernels.flash_attention``.

The kernel body follows ``jax.default_backend()``: Triton on GPU (with the Mosaic GPU ``wgmma``
forward and dK/dV kernels on Hopper for the calls they support), Mosaic on TPU, and on CPU the
Triton body in Pallas' interpreter (exact but slow: for tests and small inputs). The spec's block
map is built at :func:`~pallas_kernels.flash_attention.mask_block_shape`, the granularity at which
every kernel skips exactly; masks, boolean arrays, score mods and dropout all run in the kernels.

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

import dataclasses

import jax

from attention_jax.functional.backends.base import Backend, Call
from pallas_kernels.flash_attention import BlockSizes, flash_attention, mask_block_shape, resolve_backend
from pallas_kernels.mask_info import MaskSpec


@dataclasses.dataclass(frozen=True, repr=False)
class Pallas(Backend):
    """Pallas flash attention with ``block_sizes`` (None: ``BlockSizes.for_backend``) and an optional body.

    ``backend`` picks the kernel body (``"gpu"``: Triton, ``"tpu"``: Mosaic TPU; None: the
    default device's); ``interpret`` as in :func:`~pallas_kernels.flash_attention.flash_attention`.
    """

    block_sizes: BlockSizes | None = None
    backend: str | None = None
    interpret: bool | None = None
    name = "pallas"

    def _blocks(self, call: Call) -> BlockSizes:
        if self.block_sizes is not None:
            return self.block_sizes
        body, _ = resolve_backend(self.backend, self.interpret)
        return BlockSizes.for_backend(body, head_dim=call.shape.head_dim)

    def check(self, call: Call) -> None:
        if isinstance(call.scale, jax.Array):
            raise NotImplementedError("the kernels take a static scale, got an array (use a Python float)")

    def block_shape(self, call: Call) -> tuple[int, int]:
        shape = call.shape
        return mask_block_shape(self._blocks(call), shape.q_len, shape.kv_len, shape.group_size)

    def __call__(self, call: Call, spec: MaskSpec):
        body, interpret = resolve_backend(self.backend, self.interpret)
        extra = {}
        if call.dropout_rate > 0:
            extra = dict(dropout_rate=call.dropout_rate, dropout_seed=call.dropout_seed)
        return flash_attention(
            call.query, call.key, call.value, mask=spec, scale=call.scale, softcap=call.softcap, bias=call.bias,
            block_sizes=self._blocks(call), interpret=interpret, return_lse=True, backend=body, **extra,
        )  # fmt: skip
