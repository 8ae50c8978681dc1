"""Tile math shared by the GPU (Triton) and TPU (Mosaic) flash kernels.

Everything here operates on values already loaded from refs, with 2-D shapes only, so the same
code lowers through both backends. Scores live in the base-2 domain: ``s2 = log2(e) * s``, so the
softmax uses ``exp2`` (one instruction on GPUs) and the scale folds into a single multiply.
Statistics (running max ``m``, running sum ``l``, the output accumulator) are float32; the
output is normalised once at the end (deferred normalisation).

Two orientations share the code: *q-major* tiles ``[rows, keys]`` (forward, dq) and *kv-major*
tiles ``[keys, rows]`` (dk/dv). Mask functions are elementwise, so they take positions shaped
``[rows, 1]``/``[1, keys]`` or ``[1, rows]``/``[keys, 1]`` alike.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
from jax import lax

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class TileMath:
    """Static configuration of the per-tile math (hashable)."""

    scale: float
    softcap: float | None
    mask_fn: Callable | None
    kv_len: int  # keys at index >= kv_len are padding
    f32_inputs: bool  # float32 operands: full-precision dots (no TF32)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.f32_inputs else lax.Precision.DEFAULT

    def dot_nt(self, a, b):
        """``a @ b.T`` with a float32 result."""
        return lax.dot_general(a, b, _NT, precision=self.precision, preferred_element_type=jnp.float32)

    def dot_nn(self, a, b):
        """``a @ b`` with a float32 result."""
        return lax.dot_general(a, b, _NN, precision=self.precision, preferred_element_type=jnp.float32)

    def logits(self, a, b, bias=None):
        """Base-2 scores of ``a @ b.T`` (after bias and softcap) and, with softcap, the tanh.

        ``bias`` is the additive bias tile in the orientation of the result (or None).
        """
        s = self.dot_nt(a, b)
        if self.softcap is None and bias is None:
            return s * (self.scale * LOG2E), None
        s = s * self.scale
        if bias is not None:
            s = s + bias.astype(jnp.float32)
        if self.softcap is None:
            return s * LOG2E, None
        th = jnp.tanh(s * (1.0 / self.softcap))
        return th * (self.softcap * LOG2E), th

    def visible(self, q_pos, kv_pos, q_vals, kv_vals, kv_index, shape):
        """Boolean tile: the mask function AND ``kv_index < kv_len`` (kv_index None: no padding)."""
        out = None
        if self.mask_fn is not None:
            out = jnp.broadcast_to(self.mask_fn(q_pos, kv_pos, tuple(q_vals), tuple(kv_vals)), shape)
        if kv_index is not None:
            in_range = jnp.broadcast_to(kv_index < self.kv_len, shape)
            out = in_range if out is None else out & in_range
        return out

    # -- forward -------------------------------------------------------------------------------
    def online_softmax(self, s2, mask, m_prev, denom_prev, acc_prev, v):
        """One step of the online softmax over a q-major tile ``s2 [rows, keys]``.

        ``m``/``l`` are ``[rows, 1]`` float32, ``acc`` ``[rows, Hv]`` float32. A row whose scores
        are all ``-inf`` so far keeps ``m = -inf`` and ``l = 0``; ``m_safe`` avoids ``inf - inf``.
        """
        if mask is not None:
            s2 = jnp.where(mask, s2, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s2, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s2 - m_safe)
        denom = alpha * denom_prev + jnp.sum(p, axis=1, keepdims=True)
        return m_new, denom, alpha * acc_prev + self.dot_nn(p.astype(v.dtype), v)

    @staticmethod
    def finalize(m, denom, acc):
        """Normalised output ``[rows, Hv]`` and natural-log logsumexp ``[rows, 1]`` (-inf if empty)."""
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        out = acc * (1.0 / safe)
        lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(safe)) * LN2)
        return out, lse

    # -- backward ------------------------------------------------------------------------------
    def probs_and_grads(self, s2, th, mask, lse2, dp, delta):
        """Probabilities and score gradients of one tile (either orientation).

        ``lse2`` is the base-2 logsumexp (``+inf`` for rows that see nothing, so ``p = 0``) and
        ``delta = rowsum(out * dout) - dlse``, both broadcast along the key axis. Returns ``p`` and
        ``ds = dL/ds`` with respect to the pre-softcap score ``scale * q.k + bias``.
        """
        if mask is not None:
            s2 = jnp.where(mask, s2, -jnp.inf)
        p = jnp.exp2(s2 - lse2)
        ds = p * (dp - delta)
        if th is not None:
            ds = ds * (1.0 - th * th)
        return p, ds
