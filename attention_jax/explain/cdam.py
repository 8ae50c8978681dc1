"""CDAM, class-discriminative attention maps (Brocki & Chung, 2023): how much each token speaks for a class.

A ViT's last attention layer mixes the tokens into the class token, and the classifier reads only that.
Its attention map says where the class token looks, not whether what it sees is evidence *for* a class.
CDAM scores each token by its contribution to a class score ``s``: with ``x_t [D]`` the token ``t`` as the
last attention layer receives it (after the block's norm),

    CDAM_t = sum_D  x_t * ds/dx_t                    (gradient times input, per token, signed)

Positive scores are evidence for the class, negative ones against; the scores differ from class to class,
which the attention map does not. This is not the gradient-weighted rollout of Chefer et al. (2021),
:func:`attention_jax.explain.gradient_weighted_rollout`, which weights the attention *weights* of every
layer by their gradient and rolls them out; nor Grad-CAM, :func:`attention_jax.explain.grad_cam`, which
averages the gradient over the tokens and keeps the positive part. CDAM needs no attention weights, so it
works with any attention module. Draw a map with
``attention_jax.explain.plot_patch_overlay(images, scores[:, 1:], signed=True)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax.explain.capture import layer_gradients

Array = jax.Array

__all__ = ["cdam", "cdam_scores"]


def cdam_scores(activations: Array, gradients: Array) -> Array:
    """``sum_D x * ds/dx``: the CDAM score of every token, ``[B, T]`` float32, from tokens ``[B, T, D]``.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 2.0], [3.0, -1.0]]])     # [B, T, D]
    >>> g = jnp.array([[[0.5, 0.5], [1.0, 2.0]]])      # d score / d x
    >>> cdam_scores(x, g).tolist()                     # 0.5 + 1, 3 - 2
    [[1.5, 1.0]]
    """
    if jnp.ndim(activations) != 3 or jnp.shape(activations) != jnp.shape(gradients):
        raise ValueError(f"activations and gradients must both be [B, T, D], got {jnp.shape(activations)} and "
                         f"{jnp.shape(gradients)}.")
    x, g = jnp.asarray(activations, jnp.float32), jnp.asarray(gradients, jnp.float32)
    return jnp.sum(x * g, axis=-1)


def cdam(
    model: nnx.Module,
    score_fn: Callable[[Any], Array],
    *args,
    layer: str | None = None,
    call: Callable | None = None,
    **kwargs,
) -> Array:
    """Class-discriminative attention map: the CDAM score ``[B, T]`` of every token entering the last attention layer.

    Args:
      model: any model with an attention module (a module with a ``record_weights`` flag).
      score_fn: the model's output to a scalar class score, e.g. ``lambda logits: logits[:, label].sum()``
        (summing over the batch gives each example its own gradient; pick a class per example with
        ``jnp.sum(logits * jax.nn.one_hot(labels, C))``).
      *args, **kwargs: the model's inputs.
      layer: the path of the attention module whose input tokens are scored (as
        :func:`attention_jax.explain.attention_modules` lists them); default the last one.
      call: run ``call(model, *args, **kwargs)`` instead of ``model(*args, **kwargs)``.

    Returns ``[B, T]`` float32 over all tokens the layer reads; for a ViT drop the class token with ``[:, 1:]``
    and draw the rest with :func:`attention_jax.explain.plot_patch_overlay`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> vit = aj.nn.VisionTransformer(image_size=4, patch_size=2, in_channels=1, num_classes=3, features=8,
    ...                               depth=1, num_heads=2, rngs=nnx.Rngs(0))
    >>> images = jnp.ones((2, 4, 4, 1))
    >>> scores = nnx.jit(lambda vit, images: aj.explain.cdam(vit, lambda logits: logits[:, 1].sum(), images))
    >>> scores(vit, images).shape                                               # class token + 4 patches
    (2, 5)
    """
    activations, gradients = layer_gradients(model, score_fn, *args, layer=layer, at="input", call=call, **kwargs)
    return cdam_scores(activations, gradients)
