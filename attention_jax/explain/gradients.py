"""Class-discriminative maps from gradients: gradient-weighted attention rollout and Grad-CAM.

The pure functions here take the attention weights (or activations) and the gradient of a class score
with respect to them; :mod:`attention_jax.explain.capture` computes those for a model. CDAM, the third
class-discriminative map, lives in :mod:`attention_jax.explain.cdam`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.explain.rollout import _check_square, layer_list

Array = jax.Array

__all__ = ["gradient_weighted_rollout", "grad_cam"]


def gradient_weighted_rollout(weights, gradients) -> Array:
    """Relevance ``R [B, T, T]`` of Chefer et al. (2021), "Generic Attention-model Explainability".

    Per layer, ``A_bar = mean_heads(max(dscore/dA * A, 0))``: attention kept only where raising it
    raises the class score. Layers are rolled out with the residual as an identity,
    ``R <- R + A_bar @ R`` from ``R = I``, first layer first. ``R[:, 0]`` is the class token's map.

    Args:
      weights: per-layer self-attention weights ``[B, N, T, T]`` (a sequence, a mapping or ``[L, ...]``).
      gradients: the gradient of the score with respect to each, same structure and shapes.

    >>> import jax.numpy as jnp
    >>> w = jnp.full((1, 1, 2, 2), 0.5)
    >>> g = jnp.array([[[[1.0, -1.0], [0.0, 0.0]]]])     # only token 0's row matters, and only key 0
    >>> gradient_weighted_rollout([w], [g]).tolist()      # I + A_bar
    [[[1.5, 0.0], [0.0, 1.0]]]
    """
    layers, grads = layer_list(weights), layer_list(gradients, "gradients")
    if len(layers) != len(grads) or layers[0].shape != grads[0].shape:
        raise ValueError(f"weights and gradients must match: got {len(layers)} layers of {layers[0].shape} and "
                         f"{len(grads)} of {grads[0].shape}.")
    _check_square(layers[0], "weights")
    b, _, t, _ = layers[0].shape
    relevance = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32), (b, t, t))
    for w, g in zip(layers, grads):
        a_bar = jnp.mean(jnp.maximum(g * w, 0.0), axis=1)  # [B, T, T]
        relevance = relevance + jnp.einsum("BTU,BUS->BTS", a_bar, relevance, precision="highest")
    return relevance


def grad_cam(activations: Array, gradients: Array) -> Array:
    """Grad-CAM over tokens: ``relu(sum_D mean_T(dscore/dx) * x)``, ``[B, T]`` float32.

    ``activations [B, T, D]`` are a layer's output tokens (for a ViT, the last attention layer's,
    with the class token sliced off) and ``gradients`` the class score's gradient with respect to
    them. Channel weights are the gradient averaged over the ``T`` tokens given.

    >>> import jax.numpy as jnp
    >>> x = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])    # [B, T, D]
    >>> g = jnp.array([[[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]]])
    >>> grad_cam(x, g).tolist()                                  # channel weights (1, -1)
    [[1.0, 0.0, 0.0]]
    """
    if jnp.ndim(activations) != 3 or jnp.shape(activations) != jnp.shape(gradients):
        raise ValueError(f"activations and gradients must both be [B, T, D], got {jnp.shape(activations)} and "
                         f"{jnp.shape(gradients)}.")
    x, g = jnp.asarray(activations, jnp.float32), jnp.asarray(gradients, jnp.float32)
    channel_weights = jnp.mean(g, axis=1, keepdims=True)  # [B, 1, D]
    return jax.nn.relu(jnp.sum(channel_weights * x, axis=-1))
