"""Tile math shared by the GPU (Triton) and TPU (Mosaic) flash kernels.

Everything here operates on values already loaded from refs, with 2-D shapes only, so the same
code lowers through both backends. Scores live in the base-2 domain: ``s2 = log2(e) * s``, so the
softmax uses ``exp2`` (one instruction on GPUs) and the scale folds into a single multiply.
Statistics (running max ``m``, running sum ``l``, the output accumulator) are float32; the
output is normalised once at the end (deferred normalisation).

Two orientations share the code: *q-major* tiles ``[rows, keys]`` (forward, dq) and *kv-major*
tiles ``[keys, rows]`` (dk/dv). Mask functions are elementwise, so they take positions shaped
``[rows, 1]``/``[1, keys]`` or ``[1, rows]``/``[keys, 1]`` alike.

The score mod (``MaskSpec.score_fn``) enters as ``mod = (fn, params)``: ``fn(score, params)``
closes over the tile's batch, head and position tiles, ``params`` are the per-row parameter
columns. The backward takes its pullback (``jax.vjp``) on the tile: ``ds`` through the mod and,
in the q-major dq kernel, the per-row parameter gradients (summed over the tile's keys).
Dropout regenerates its bits from per-row seeds (``pallas_kernels.dropout``) in every kernel.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import dropout

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
    score_fn: Callable | None = None  # MaskSpec.score_fn
    dropout_rate: float = 0.0
    has_array: bool = False  # MaskSpec.array: a visibility tile in PARTIAL tiles

    @property
    def needs_positions(self) -> bool:
        """Whether every tile (not only PARTIAL ones) reads positions: score mods and dropout do."""
        return self.score_fn is not None or self.dropout_rate > 0.0

    def keep(self, row_seed, kv_pos):
        """Dropout keep-mask of a tile from its per-row seeds and key positions (None: no dropout)."""
        if self.dropout_rate == 0.0:
            return None
        return dropout.keep_from_row_seed(row_seed, kv_pos, self.dropout_rate)

    def score_mod(self, batch, head, q_pos, kv_pos, params):
        """``(fn(score, params), params)`` for a tile whose indices broadcast against it (None: no mod)."""
        if self.score_fn is None:
            return None
        return (lambda score, ps: self.score_fn(score, batch, head, q_pos, kv_pos, tuple(ps))), tuple(params)

    @property
    def precision(self):
        return lax.Precision.HIGHEST if self.f32_inputs else lax.Precision.DEFAULT

    def dot_nt(self, a, b):
        """``a @ b.T`` with a float32 result."""
        return lax.dot_general(a, b, _NT, precision=self.precision, preferred_element_type=jnp.float32)

    def dot_nn(self, a, b):
        """``a @ b`` with a float32 result."""
        return lax.dot_general(a, b, _NN, precision=self.precision, preferred_element_type=jnp.float32)

    def logits(self, a, b, bias=None, mod=None, pullback: str | None = None):
        """Base-2 scores of ``a @ b.T`` (after bias, score mod and softcap), the tanh, the mod's pullback.

        ``bias`` is the additive bias tile in the orientation of the result (or None); ``mod`` is
        :meth:`score_mod`'s pair (or None). ``pullback`` asks for the vjp of the mod: ``"score"``
        (w.r.t. the score only) or ``"params"`` (the score and the parameter columns).
        Returns ``(s2, th, vjp)``; ``th`` is None without softcap, ``vjp`` None unless asked.
        """
        s = self.dot_nt(a, b)
        if self.softcap is None and bias is None and mod is None:
            return s * (self.scale * LOG2E), None, None
        s = s * self.scale
        if bias is not None:
            s = s + bias.astype(jnp.float32)
        vjp = None
        if mod is not None:
            fn, params = mod
            if pullback == "params":
                s, vjp = jax.vjp(fn, s, params)
            elif pullback == "score":
                s, vjp = jax.vjp(lambda x: fn(x, params), s)
            else:
                s = fn(s, params)
            s = s.astype(jnp.float32)
        if self.softcap is None:
            return s * LOG2E, None, vjp
        th = jnp.tanh(s * (1.0 / self.softcap))
        return th * (self.softcap * LOG2E), th, vjp

    def visible(self, q_pos, kv_pos, q_vals, kv_vals, kv_index, shape, array=None):
        """Boolean tile: the mask function AND the array tile AND ``kv_index < kv_len`` (None: all visible).

        ``kv_index`` None: no padded keys; ``array`` an int8 tile (nonzero: visible) or None.
        """
        out = None
        if self.mask_fn is not None:
            out = jnp.broadcast_to(self.mask_fn(q_pos, kv_pos, tuple(q_vals), tuple(kv_vals)), shape)
        if array is not None:
            seen = array.astype(jnp.int32) != 0
            out = seen if out is None else out & seen
        if kv_index is not None:
            in_range = jnp.broadcast_to(kv_index < self.kv_len, shape)
            out = in_range if out is None else out & in_range
        return out

    @staticmethod
    def seen_keys(mask, kv_major: bool, reduce_first: bool = False):
        """``[keys, 1]`` flags: the keys of a PARTIAL tile that some row of the tile sees.

        Key/value rows no row sees are zeroed before the products, so that a NaN behind the mask
        (an uninitialised cache slot) cannot reach ``0 * NaN``. A q-major tile is transposed first,
        or with ``reduce_first`` reduced to ``[keys]`` and then made a column (cheaper in Triton,
        where a vector changes layout more cheaply than a tile; Mosaic prefers the 2-D transpose).
        """
        ones = jnp.where(mask, 1.0, 0.0)
        if kv_major:
            return jnp.max(ones, axis=1, keepdims=True) > 0.0
        if reduce_first:
            return (jnp.max(ones, axis=0) > 0.0)[:, None]
        return jnp.max(ones.T, axis=1, keepdims=True) > 0.0

    # -- forward -------------------------------------------------------------------------------
    def online_softmax(self, s2, mask, m_prev, denom_prev, acc_prev, v, keep=None):
        """One step of the online softmax over a q-major tile ``s2 [rows, keys]``.

        ``m``/``l`` are ``[rows, 1]`` float32, ``acc`` ``[rows, Hv]`` float32. A row whose scores
        are all ``-inf`` so far keeps ``m = -inf`` and ``l = 0``; ``m_safe`` avoids ``inf - inf``.
        ``keep`` (dropout) zeroes weights in the accumulator only: ``l`` and the lse stay undropped
        and :meth:`finalize` rescales by ``1 / (1 - rate)``.
        """
        if mask is not None:
            s2 = jnp.where(mask, s2, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(s2, axis=1, keepdims=True))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m_prev - m_safe)
        p = jnp.exp2(s2 - m_safe)
        denom = alpha * denom_prev + jnp.sum(p, axis=1, keepdims=True)
        if keep is not None:
            p = jnp.where(keep, p, 0.0)
        return m_new, denom, alpha * acc_prev + self.dot_nn(p.astype(v.dtype), v)

    def finalize(self, m, denom, acc):
        """Normalised output ``[rows, Hv]`` and natural-log logsumexp ``[rows, 1]`` (-inf if empty)."""
        empty = denom == 0.0
        safe = jnp.where(empty, 1.0, denom)
        out = acc * (1.0 / safe)
        if self.dropout_rate > 0.0:
            out = out * (1.0 / (1.0 - self.dropout_rate))
        lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(safe)) * LN2)
        return out, lse

    # -- backward ------------------------------------------------------------------------------
    def probs_and_grads(self, s2, th, mask, lse2, dp, delta, keep=None, vjp=None):
        """Weights and score gradients of one tile (either orientation).

        ``lse2`` is the base-2 logsumexp (``+inf`` for rows that see nothing, so ``p = 0``) and
        ``delta = rowsum(out * dout) - dlse``, both broadcast along the key axis; ``dp = dO V^T``.
        ``keep`` is the dropout keep-mask (or None), ``vjp`` the score mod's pullback (or None).
        Returns ``(pd, ds, dparams)``: the dropped, rescaled weights ``pd`` (the operand of dV),
        ``ds = dL/ds`` with respect to the score ``scale * q.k + bias`` before the score mod,
        and the per-row parameter gradients when ``vjp`` takes the parameters (else None).
        """
        if mask is not None:
            s2 = jnp.where(mask, s2, -jnp.inf)
        p = jnp.exp2(s2 - lse2)
        if keep is not None:  # FA2: dP = dO V^T * keep / (1 - rate); dV from the dropped weights
            inv = 1.0 / (1.0 - self.dropout_rate)
            dp = jnp.where(keep, dp * inv, 0.0)
            pd = jnp.where(keep, p * inv, 0.0)
        else:
            pd = p
        ds = p * (dp - delta)
        if th is not None:
            ds = ds * (1.0 - th * th)
        if mask is not None:  # exact zeros where masked (p = 0 there), whatever the masked scores held
            ds = jnp.where(mask, ds, 0.0)
        dparams = None
        if vjp is not None:
            grads = vjp(ds)
            ds = grads[0]
            if len(grads) > 1:
                dparams = grads[1]
        return pd, ds, dparams
