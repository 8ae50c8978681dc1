"""What every attention backend shares: the validated call it receives and the interface it implements.

``dot_product_attention`` validates a call once into a :class:`Call`, picks a :class:`Backend`,
resolves the mask and the score mod once into a ``MaskSpec`` at that backend's tile size
(:func:`attention_jax.functional.resolve.resolve_spec`), and runs the backend on the call and the
spec. A backend reads the mask and the score mod *only* through the spec; it never sees a
``Mask`` object, a boolean array, offsets or a ``ScoreMod`` (cuDNN, whose fused kernel takes no
tile function, is the one exception: it asks the mask's public ``jax_nn_arguments()``).

A backend that cannot serve a call says so in :meth:`Backend.check` by raising
``NotImplementedError`` with the reason: ``implementation=None`` then tries the next backend of
the platform's order, and an explicit request turns the reason into a ``ValueError``.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax

from attention_jax.functional._checks import AttentionShape
from pallas_kernels.mask_info import MaskSpec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Call:
    """One validated call of ``dot_product_attention`` (arrays ``[B, T, N, H]``, ``[B, S, K, H]``, ``[B, S, K, Hv]``).

    Attributes:
      query, key, value: the operands.
      shape: their sizes.
      mask: the mask as given (a ``Mask``, a boolean array or None); backends read the resolved spec.
      bias: additive, broadcastable to ``[B, N, T, S]``, or None.
      scale: a float or a float scalar array.
      softcap: a positive float or None.
      score_mod: a ``ScoreMod`` or None (resolved into the spec's ``score_fn``/``score_params``).
      q_offset, kv_offset: ints, traced scalars or ``[B]`` arrays.
      dropout_rate: static rate in ``[0, 1)``; dropout_seed: int32 scalar when the rate is positive.
      return_lse: whether the caller needs the logsumexp.
    """

    query: Array
    key: Array
    value: Array
    shape: AttentionShape
    mask: Any = None
    bias: Array | None = None
    scale: Any = 1.0
    softcap: float | None = None
    score_mod: Any = None
    q_offset: Any = 0
    kv_offset: Any = 0
    dropout_rate: float = 0.0
    dropout_seed: Array | None = None
    return_lse: bool = False


def _static_int(x) -> int | None:
    try:
        return int(x) if not isinstance(x, jax.core.Tracer) and jax.numpy.ndim(x) == 0 else None
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


class Backend(abc.ABC):
    """One implementation of ``dot_product_attention``.

    Subclasses set ``name``, implement :meth:`__call__`, and override :meth:`check` for the calls
    they cannot serve and :meth:`block_shape` for the tiles their spec's block map should use.
    Instances are configuration (tile sizes, limits): pass one as ``implementation=`` to run it.
    """

    name: str = ""

    def check(self, call: Call) -> None:
        """Raise ``NotImplementedError`` with the reason if this backend cannot serve ``call``."""
        return None  # the default: serves every call

    def block_shape(self, call: Call) -> tuple[int, int]:
        """``(block_q, block_k)``: the tiles of the block map in the spec this backend receives."""
        return max(call.shape.q_len, 1), max(call.shape.kv_len, 1)

    @abc.abstractmethod
    def __call__(self, call: Call, spec: MaskSpec) -> tuple[Array, Array | None]:
        """``(out [B, T, N, Hv] in the query dtype, lse [B, N, T] float32 or None)``."""

    def __repr__(self) -> str:
        fields = getattr(self, "__dataclass_fields__", {})
        args = ", ".join(f"{f}={getattr(self, f)!r}" for f in fields)
        return f"{type(self).__name__}({args})"
