"""Attention for convolutional networks (NHWC) and the patch step of vision transformers.

* Squeeze-and-Excitation (Hu et al., 2018): ``x * sigmoid(W2 relu(W1 avgpool(x) + b1) + b2)``.
* Efficient Channel Attention (Wang et al., 2020): ``x * sigmoid(conv1d_k(avgpool(x)))`` over the channel axis,
  ``k`` odd and adaptive to C (:func:`eca_kernel_size`).
* CBAM (Woo et al., 2018): channel attention ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with one shared MLP,
  then spatial attention ``sigmoid(conv_{7x7}([mean_C(x); max_C(x)]))``.

Images are ``[B, H, W, C]``; every op returns an array of the input's shape and dtype.

>>> import jax.numpy as jnp
>>> x = jnp.ones((1, 4, 4, 8))
>>> y = efficient_channel_attention(x, kernel=jnp.zeros(3))  # zero kernel: every gate is sigmoid(0)
>>> float(y[0, 0, 0, 0])
0.5
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "squeeze_excitation",
    "eca_kernel_size",
    "efficient_channel_attention",
    "channel_attention",
    "spatial_attention",
    "cbam",
    "patchify",
]


def _check_image(x: Array) -> None:
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must be an NHWC image batch [B, H, W, C], got x.shape={jnp.shape(x)}.")


def _mlp(pooled: Array, w_reduce, b_reduce, w_expand, b_expand) -> Array:
    """``W2 relu(W1 p + b1) + b2`` on pooled channels ``[B, C]``, float32."""
    f32 = jnp.float32
    hidden = jax.nn.relu(jnp.matmul(pooled, jnp.asarray(w_reduce, f32), precision=_HI) + jnp.asarray(b_reduce, f32))
    return jnp.matmul(hidden, jnp.asarray(w_expand, f32), precision=_HI) + jnp.asarray(b_expand, f32)


def _check_mlp(channels: int, w_reduce, b_reduce, w_expand, b_expand) -> None:
    r = jnp.shape(w_reduce)[-1] if jnp.ndim(w_reduce) == 2 else -1
    expected = ((channels, r), (r,), (r, channels), (channels,))
    got = tuple(jnp.shape(w) for w in (w_reduce, b_reduce, w_expand, b_expand))
    if got != expected:
        raise ValueError(
            f"w_reduce, b_reduce, w_expand, b_expand must be [C, R], [R], [R, C], [C] with C={channels}, got {got}."
        )


def squeeze_excitation(x: Array, *, w_reduce: Array, b_reduce: Array, w_expand: Array, b_expand: Array) -> Array:
    """Squeeze-and-Excitation: rescale channels by ``sigmoid(W2 relu(W1 mean_HW(x) + b1) + b2)``.

    Args:
      x: ``[B, H, W, C]``.
      w_reduce, b_reduce: ``[C, R]``, ``[R]`` (R = C / reduction).
      w_expand, b_expand: ``[R, C]``, ``[C]``.
    """
    _check_image(x)
    _check_mlp(x.shape[-1], w_reduce, b_reduce, w_expand, b_expand)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]
    gate = jax.nn.sigmoid(_mlp(pooled, w_reduce, b_reduce, w_expand, b_expand))  # [B, C]
    return (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)


def eca_kernel_size(channels: int, *, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive kernel size ``k = |log2(C) / gamma + b / gamma|``, rounded to the nearest odd integer above."""
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive integer, got {channels=!r}.")
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


def efficient_channel_attention(x: Array, *, kernel: Array) -> Array:
    """ECA: rescale channels by ``sigmoid(conv1d(mean_HW(x), kernel))``, zero-padded ('same') over channels.

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[k]`` with k odd (no bias, as in the paper).
    """
    _check_image(x)
    if jnp.ndim(kernel) != 1 or kernel.shape[0] % 2 == 0:
        raise ValueError(f"kernel must be one-dimensional with an odd size, got kernel.shape={jnp.shape(kernel)}.")
    k = kernel.shape[0]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, C]
    padded = jnp.pad(pooled, [(0, 0), (k // 2, k // 2)])
    c = x.shape[-1]
    windows = jnp.stack([padded[:, i : i + c] for i in range(k)], axis=-1)  # [B, C, k]
    gate = jax.nn.sigmoid(jnp.einsum("BCk,k->BC", windows, jnp.asarray(kernel, jnp.float32), precision=_HI))
    return (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)


def channel_attention(x: Array, *, w_reduce: Array, b_reduce: Array, w_expand: Array, b_expand: Array) -> Array:
    """CBAM channel attention: ``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, one shared MLP."""
    _check_image(x)
    _check_mlp(x.shape[-1], w_reduce, b_reduce, w_expand, b_expand)
    xf = x.astype(jnp.float32)
    params = (w_reduce, b_reduce, w_expand, b_expand)
    logits = _mlp(jnp.mean(xf, axis=(1, 2)), *params) + _mlp(jnp.max(xf, axis=(1, 2)), *params)
    return (xf * jax.nn.sigmoid(logits)[:, None, None, :]).astype(x.dtype)


def spatial_attention(x: Array, *, kernel: Array, bias: Array | None = None) -> Array:
    """CBAM spatial attention: ``x * sigmoid(conv([mean_C(x); max_C(x)]))``, a 'same' 2-D convolution.

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[k, k, 2, 1]`` (HWIO; input channel 0 reads the mean, 1 the max).
      bias: ``[1]`` or None.
    """
    _check_image(x)
    if jnp.ndim(kernel) != 4 or kernel.shape[2:] != (2, 1):
        raise ValueError(f"kernel must have shape [k, k, 2, 1], got kernel.shape={jnp.shape(kernel)}.")
    xf = x.astype(jnp.float32)
    descriptor = jnp.stack([jnp.mean(xf, axis=-1), jnp.max(xf, axis=-1)], axis=-1)  # [B, H, W, 2]
    logits = jax.lax.conv_general_dilated(
        descriptor,
        jnp.asarray(kernel, jnp.float32),
        window_strides=(1, 1),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=_HI,
    )  # [B, H, W, 1]
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    return (xf * jax.nn.sigmoid(logits)).astype(x.dtype)


def cbam(
    x: Array,
    *,
    w_reduce: Array,
    b_reduce: Array,
    w_expand: Array,
    b_expand: Array,
    spatial_kernel: Array,
    spatial_bias: Array | None = None,
) -> Array:
    """CBAM: :func:`channel_attention`, then :func:`spatial_attention` on its output."""
    x = channel_attention(x, w_reduce=w_reduce, b_reduce=b_reduce, w_expand=w_expand, b_expand=b_expand)
    return spatial_attention(x, kernel=spatial_kernel, bias=spatial_bias)


def patchify(images: Array, patch_size: int) -> Array:
    """``[B, H, W, C] -> [B, (H/P)(W/P), P*P*C]``: non-overlapping P x P patches in row-major order."""
    _check_image(images)
    b, h, w, c = images.shape
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive integer, got {patch_size=!r}.")
    if h % patch_size or w % patch_size:
        raise ValueError(f"patch_size must divide the image height and width, got {patch_size=}, H={h}, W={w}.")
    p = patch_size
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return patches.reshape(b, (h // p) * (w // p), p * p * c)
