"""The per-chunk math of the SSD scan kernels, shared by the Triton and Mosaic TPU bodies.

One chunk of ``L`` tokens of one head, the state kept transposed (``h [F, H]`` float32, so every
product is a plain 2-D matmul). Per token the bodies hand in columns ``[L, 1]`` and rows ``[1, L]``:
``cum`` the running sum of ``dt * A`` from the chunk start, ``enter`` the factor with which the
token reads the state before the chunk (``exp(cum)``, or 0 outside the run that state belongs to),
``leave`` the factor with which it reaches the state at the chunk end (``exp(cum_last - cum)``, or
0 outside the chunk's last run), ``runs`` the index of its packed document. In the forward

    P = (c b^T) * exp(cum_t - cum_s)  on s <= t in one run, else 0          [L, L]
    y = P v + enter * (c h)                                                 [L, H]
    h' = enter_last * h + (leave * b)^T v                                   [F, H]

with ``v = dt * x`` (the caller folds ``dt`` in). The backward differentiates these three lines for
one chunk given ``dy`` and ``dh'``, and hands back ``dh`` for the chunk before.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class ChunkMath:
    """Static configuration of the chunk math (hashable): the chunk length and the dots' precision."""

    chunk: int
    f32_inputs: bool  # float32 operands: full-precision dots (no TF32 / bf16 passes)

    def _dot(self, a, b, dims):
        precision = lax.Precision.HIGHEST if self.f32_inputs else lax.Precision.DEFAULT
        return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)

    def _decay(self, cum_col, cum_row, runs_col, runs_row):
        """``exp(cum_t - cum_s)`` on causal same-run pairs, 0 elsewhere (masked before ``exp``) ``[L, L]``."""
        shape = (self.chunk, self.chunk)
        causal = lax.broadcasted_iota(jnp.int32, shape, 0) >= lax.broadcasted_iota(jnp.int32, shape, 1)
        visible = causal & (runs_col == runs_row)
        return jnp.exp(jnp.where(visible, cum_col - cum_row, -jnp.inf))

    def _last(self, col):
        """The last entry of a column ``[L, 1]`` as ``[1, 1]`` (a masked sum: no scalar reads of vectors)."""
        last = lax.broadcasted_iota(jnp.int32, col.shape, 0) == self.chunk - 1
        return jnp.sum(jnp.where(last, col, 0.0), axis=0, keepdims=True)

    def forward(self, v, b, c, cum_col, cum_row, enter, leave, runs_col, runs_row, h):
        """``(y [L, H] float32, h' [F, H] float32)`` for ``v [L, H]``, ``b, c [L, F]``, ``h [F, H]``."""
        y = self.output(v, b, c, cum_col, cum_row, enter, runs_col, runs_row, h)
        return y, self._last(enter) * h + self.own_state(v, b, leave)

    def output(self, v, b, c, cum_col, cum_row, enter, runs_col, runs_row, h):
        """``y [L, H]`` float32: the chunk's own tokens (attention-like) and the state ``h`` before it."""
        decay = self._decay(cum_col, cum_row, runs_col, runs_row)  # [L, L]
        probs = self._dot(c, b, _NT) * decay  # [L, L]
        return self._dot(probs.astype(v.dtype), v, _NN) + enter * self._dot(c, h.astype(c.dtype), _NN)

    def own_state(self, v, b, leave):
        """``(leave * b)^T v [F, H]`` float32: what the chunk's tokens add to the state at its end."""
        return self._dot((leave * b).astype(v.dtype), v, _TN)

    def state_grad(self, c, enter, dy):
        """``(enter * c)^T dy [F, H]`` float32: the gradient of the state before the chunk through ``y``."""
        return self._dot((enter * c).astype(dy.dtype), dy, _TN)

    def backward(self, v, b, c, cum_col, cum_row, enter, leave, runs_col, runs_row, h, dy, dh_next, with_dh=True):
        """Gradients of one chunk: ``dv [L, H]``, ``db, dc [L, F]``, ``dcum`` as a column ``[L, 1]`` (the
        ``t`` side) plus a row ``[1, L]`` (the ``s`` side), ``denter, dleave [L, 1]`` and ``dh [F, H]``
        (None unless ``with_dh``), all float32; ``h`` is the state before the chunk, ``dh_next`` the
        gradient of the state after it."""
        dtype = v.dtype
        decay = self._decay(cum_col, cum_row, runs_col, runs_row)  # [L, L]
        scores = self._dot(c, b, _NT)  # [L, L]
        probs = scores * decay
        dprobs = self._dot(dy, v, _NT)  # [L, L]
        dh_low = dh_next.astype(dtype)
        dv = self._dot(probs.astype(dtype), dy, _TN) + self._dot((leave * b).astype(dtype), dh_low, _NN)
        dlog = dprobs * probs  # d exp(gap) * exp(gap): the gradient of the gap cum_t - cum_s
        dcum_col = jnp.sum(dlog, axis=1, keepdims=True)  # [L, 1]
        dcum_row = -jnp.sum(dlog, axis=0, keepdims=True)  # [1, L]
        dscores = (dprobs * decay).astype(dtype)  # [L, L]
        state_read = self._dot(c, h.astype(c.dtype), _NN)  # [L, H]
        dc = self._dot(dscores, b, _NN) + enter * self._dot(dy, h.astype(dtype), _NT)
        dbl = self._dot(v, dh_low, _NT)  # [L, F] the gradient of leave * b
        db = self._dot(dscores, c, _TN) + leave * dbl
        dleave = jnp.sum(b.astype(jnp.float32) * dbl, axis=1, keepdims=True)
        dpass = jnp.sum(jnp.sum(dh_next * h, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]
        last = lax.broadcasted_iota(jnp.int32, enter.shape, 0) == self.chunk - 1
        denter = jnp.sum(dy.astype(jnp.float32) * state_read, axis=1, keepdims=True) + jnp.where(last, dpass, 0.0)
        dh = self._last(enter) * dh_next + self.state_grad(c, enter, dy) if with_dh else None
        return dv, db, dc, dcum_col, dcum_row, denter, dleave, dh
