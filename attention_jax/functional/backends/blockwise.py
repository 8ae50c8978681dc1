"""``implementation="blockwise"``: flash attention in plain XLA (``attention_jax.functional.blockwise``).

The default on CPU and the fallback everywhere: it serves every call (masks, score mods, dropout,
bias, traced offsets and scale) in memory linear in the sequence length.
"""

from __future__ import annotations

import dataclasses

from attention_jax.functional import blockwise
from attention_jax.functional.backends.base import Backend, Call
from pallas_kernels.mask_info import MaskSpec


@dataclasses.dataclass(frozen=True, repr=False)
class Blockwise(Backend):
    """Blockwise XLA attention with ``(block_q, block_k)`` tiles (None: ``blockwise.default_block_sizes``).

    >>> import jax, jax.numpy as jnp
    >>> import attention_jax as aj
    >>> q = jax.random.normal(jax.random.key(0), (2, 50, 4, 16))          # [B, T, N, H]
    >>> small_tiles = aj.functional.backends.Blockwise(block_q=16, block_k=16)
    >>> out = aj.dot_product_attention(q, q, q, mask=aj.masks.causal(), implementation=small_tiles)
    >>> ref = aj.dot_product_attention(q, q, q, mask=aj.masks.causal(), implementation="reference")
    >>> bool(jnp.allclose(out, ref, atol=1e-5))
    True
    """

    block_q: int | None = None
    block_k: int | None = None
    name = "blockwise"

    def __post_init__(self):
        for field in ("block_q", "block_k"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{field} must be a positive integer or None, got {field}={value!r}.")

    def block_shape(self, call: Call) -> tuple[int, int]:
        default_q, default_k = blockwise.default_block_sizes(call.shape.q_len, call.shape.kv_len)
        return self.block_q or default_q, self.block_k or default_k

    def __call__(self, call: Call, spec: MaskSpec):
        return blockwise.attention(
            call.query, call.key, call.value, spec, scale=call.scale, softcap=call.softcap, bias=call.bias,
            dropout_rate=call.dropout_rate, dropout_seed=call.dropout_seed, shape=call.shape,
        )  # fmt: skip
