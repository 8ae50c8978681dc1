"""The short causal depthwise convolution that Mamba, Mamba-2 and other recurrent layers put before their scan.

``y_t = bias + sum_{j < W} weight[W - 1 - j] * x_{t - j}`` per channel, over the token and the ``W - 1`` before
it. Taps never cross a packed document's start (``segment_ids``), and the ``W - 1`` inputs before the first
token come from ``state`` (a decoding cache's window; zeros by default), so prefilling a prompt and feeding
tokens one at a time equal the convolution of the whole sequence.

>>> import jax.numpy as jnp
>>> x = jnp.arange(1.0, 6.0).reshape(1, 5, 1)            # [B, T, C]
>>> weight = jnp.ones((3, 1))                            # [W, C]: a running sum of 3 tokens
>>> causal_conv1d(x, weight)[0, :, 0].tolist()
[1.0, 3.0, 6.0, 9.0, 12.0]
>>> y, state = causal_conv1d(x[:, :3], weight, return_state=True)
>>> causal_conv1d(x[:, 3:], weight, state=state)[0, :, 0].tolist()   # continues from the window
[9.0, 12.0]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.functional.linear import check_packing, segment_runs

Array = jax.Array

__all__ = ["causal_conv1d"]


def causal_conv1d(
    x: Array,
    weight: Array,
    bias: Array | None = None,
    *,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
    state: Array | None = None,
    return_state: bool = False,
):
    """Depthwise causal convolution of ``x [B, T, C]`` with ``weight [W, C]`` (tap ``W - 1`` is the current token).

    Args:
      x: ``[B, T, C]``.
      weight: ``[W, C]`` per-channel taps, oldest first (a PyTorch ``Conv1d(groups=C)`` weight ``[C, 1, W]``
        transposed).
      bias: ``[C]`` or None.
      segment_ids: int ``[B, T]`` packed documents: a token reads no input of an earlier document (``state``
        continues the first).
      lengths: int ``[B]`` real tokens per row (right padding); the returned state holds the ``W - 1``
        inputs before the first padded token.
      state: ``[B, W - 1, C]`` the inputs before ``x`` (oldest first); default zeros.
      return_state: also return the ``W - 1`` last (real) inputs, the next call's ``state``.

    Returns:
      ``y [B, T, C]`` in the dtype of ``x`` (accumulated in float32), and the state when ``return_state``.
    """
    if jnp.ndim(x) != 3:
        raise ValueError(f"x must be [B, T, C], got shape {jnp.shape(x)}.")
    batch, length, channels = x.shape
    if jnp.ndim(weight) != 2 or jnp.shape(weight)[1] != channels:
        raise ValueError(f"weight must be [W, C] with C={channels}, got shape {jnp.shape(weight)}.")
    width = weight.shape[0]
    if bias is not None and jnp.shape(bias) != (channels,):
        raise ValueError(f"bias must be [C]=[{channels}], got shape {jnp.shape(bias)}.")
    if state is not None and jnp.shape(state) != (batch, width - 1, channels):
        raise ValueError(f"state must be [B, W - 1, C]={[batch, width - 1, channels]}, got shape {jnp.shape(state)}.")
    check_packing(segment_ids, lengths, batch, length, length)
    if state is None:
        state = jnp.zeros((batch, width - 1, channels), x.dtype)
    padded = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, W - 1 + T, C]
    xf = padded.astype(jnp.float32)
    wf = jnp.asarray(weight, jnp.float32)
    runs = None if segment_ids is None else segment_runs(jnp.asarray(segment_ids))  # [B, T]
    y = jnp.zeros((batch, length, channels), jnp.float32)
    for j in range(width):  # tap j reads the token j steps back; W is small (4)
        tap = xf[:, width - 1 - j : width - 1 - j + length]  # x_{t - j}
        if runs is not None and j > 0:
            before = jnp.pad(runs, ((0, 0), (j, 0)), mode="edge")[:, :length]  # run of t - j (state: the first)
            tap = jnp.where((before == runs)[..., None], tap, 0.0)
        y = y + wf[width - 1 - j] * tap
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    y = y.astype(x.dtype)
    if not return_state:
        return y
    end = length if lengths is None else jnp.asarray(lengths, jnp.int32)  # [B] or scalar
    index = jnp.broadcast_to(jnp.asarray(end)[..., None] + jnp.arange(width - 1), (batch, width - 1))
    new_state = jnp.take_along_axis(padded, index[..., None], axis=1)  # the W - 1 inputs before position `end`
    return y, new_state
