"""Attention backends: one interface, a registry by name, and the automatic order per platform.

``dot_product_attention(..., implementation=...)`` takes a name of :data:`BACKENDS`, a
:class:`Backend` instance (e.g. ``Blockwise(block_q=64)``), or None/``"auto"``: then the backends
of :func:`auto_order` are asked in turn and the first whose ``check`` passes runs the call.

* CPU: ``Reference(max_scores=128 * 128)`` (tiny calls), then ``Blockwise()``.
* GPU and TPU: ``Pallas()``, then ``Blockwise()``.

cuDNN is never chosen automatically (it cannot return the logsumexp and serves few masks); ask
for it by name. No backend falls back to a dense computation behind the caller's back: the
blockwise path serves everything the kernels cannot, in linear memory.
"""

from __future__ import annotations

import jax

from attention_jax.functional.backends.base import Backend, Call
from attention_jax.functional.backends.blockwise import Blockwise
from attention_jax.functional.backends.cudnn import Cudnn
from attention_jax.functional.backends.pallas import Pallas
from attention_jax.functional.backends.reference import Reference

__all__ = ["BACKENDS", "Backend", "Blockwise", "Call", "Cudnn", "Pallas", "Reference", "auto_order", "get"]

# Below this many scores per (batch, head) the dense reference compiles faster and runs about as
# fast; from T = S = 256 the blockwise path was 2x faster on CPU (bench_flash_cpu.py crossover, 2026-11-22).
REFERENCE_MAX_SCORES = 128 * 128

BACKENDS: dict[str, Backend] = {
    "reference": Reference(),
    "blockwise": Blockwise(),
    "pallas": Pallas(),
    "cudnn": Cudnn(),
}


def auto_order(platform: str | None = None) -> tuple[Backend, ...]:
    """The backends ``implementation=None`` tries, in order, on ``platform`` (default: JAX's default backend)."""
    platform = platform or jax.default_backend()
    if platform in ("gpu", "tpu"):
        return (BACKENDS["pallas"], BACKENDS["blockwise"])
    return (Reference(max_scores=REFERENCE_MAX_SCORES), BACKENDS["blockwise"])


def get(implementation: str | Backend) -> Backend:
    """The backend named ``implementation`` (or the instance itself)."""
    if isinstance(implementation, Backend):
        return implementation
    if implementation not in BACKENDS:
        raise ValueError(
            f"implementation must be None, 'auto', one of {tuple(BACKENDS)} or a Backend instance, "
            f"got {implementation=!r}."
        )
    return BACKENDS[implementation]
