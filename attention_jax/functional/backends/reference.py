"""``implementation="reference"``: dense ``jnp`` attention, the oracle (and the CPU choice for tiny calls)."""

from __future__ import annotations

import dataclasses

from attention_jax.functional import reference
from attention_jax.functional.backends.base import Backend, Call
from pallas_kernels.mask_info import MaskSpec


@dataclasses.dataclass(frozen=True, repr=False)
class Reference(Backend):
    """Materialises ``[B, N, T, S]`` scores. ``max_scores`` (``T * S``) bounds the calls it accepts.

    The automatic order on CPU starts with ``Reference(max_scores=128 * 128)``: below that one
    fused dense computation compiles faster and runs about as fast as any loop.
    """

    max_scores: int | None = None
    name = "reference"

    def check(self, call: Call) -> None:
        scores = call.shape.q_len * call.shape.kv_len
        if self.max_scores is not None and scores > self.max_scores:
            raise NotImplementedError(f"T * S = {scores} scores per head exceed max_scores={self.max_scores}")

    def __call__(self, call: Call, spec: MaskSpec):
        return reference.attention(
            call.query, call.key, call.value, spec, scale=call.scale, softcap=call.softcap, bias=call.bias,
            dropout_rate=call.dropout_rate, dropout_seed=call.dropout_seed,
        )  # fmt: skip
