"""``implementation="cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` on a CUDA GPU.

cuDNN's fused kernel takes no tile function, so this backend asks the mask's public
``Mask.jax_nn_arguments()`` (causal, sliding window, padding lengths, combined with ``&``) or
passes a boolean array through; everything else it cannot serve, and :meth:`Cudnn.check` says why.
"""

from __future__ import annotations

import dataclasses

import jax

from attention_jax import masks as masks_lib
from attention_jax.functional.backends.base import Backend, Call, _static_int
from pallas_kernels.mask_info import MaskSpec


def _mask_arguments(mask) -> dict:
    if mask is None:
        return {}
    if isinstance(mask, masks_lib.Mask):
        try:
            return mask.jax_nn_arguments()
        except ValueError as e:
            raise NotImplementedError(f"cuDNN serves causal, sliding_window and padding masks only: {e}") from None
    return {"mask": mask}


@dataclasses.dataclass(frozen=True, repr=False)
class Cudnn(Backend):
    """cuDNN flash attention through ``jax.nn``; no logsumexp, no score mods, softcap or dropout."""

    name = "cudnn"

    def check(self, call: Call) -> None:
        if jax.default_backend() != "gpu":
            raise NotImplementedError(f"it needs a CUDA GPU, but the default backend is {jax.default_backend()!r}")
        reasons = [
            (call.softcap is not None, "softcap"),
            (call.score_mod is not None, "score_mod"),
            (call.dropout_rate > 0, "dropout"),
            (call.return_lse, "return_lse (cuDNN does not expose the logsumexp)"),
        ]
        for refused, what in reasons:
            if refused:
                raise NotImplementedError(f"it does not support {what}")
        if (_static_int(call.q_offset), _static_int(call.kv_offset)) != (0, 0):
            raise NotImplementedError("it needs q_offset == kv_offset == 0")
        if call.shape.value_head_dim != call.shape.head_dim:
            raise NotImplementedError(
                f"it needs equal query/key and value head dims, got H={call.shape.head_dim} and "
                f"Hv={call.shape.value_head_dim}"
            )
        _mask_arguments(call.mask)

    def __call__(self, call: Call, spec: MaskSpec):
        out = jax.nn.dot_product_attention(
            call.query, call.key, call.value, bias=call.bias, scale=call.scale, implementation="cudnn",
            **_mask_arguments(call.mask),
        )  # fmt: skip
        return out, None
