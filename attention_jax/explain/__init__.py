"""Attention maps as explanations: capture weights from any model, roll them out, weight them by gradients, plot.

* Capture: :func:`capture` (weights by module path, fast paths kept), :func:`attention_gradients`,
  :func:`layer_gradients`.
* Maps: :func:`attention_rollout`, :func:`attention_flow`, :func:`gradient_weighted_rollout` (Chefer et al.),
  :func:`grad_cam`, :func:`cdam_scores` (pure functions of the captured arrays).
* Class-discriminative attention maps (CDAM, Brocki & Chung): :func:`cdam`, token relevance for one class.
* Plots: :func:`plot_attention`, :func:`plot_heads`, :func:`plot_patch_overlay` (matplotlib Figures).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> from attention_jax import explain
>>> layers = [aj.nn.MultiHeadAttention(8, num_heads=2, rngs=nnx.Rngs(i)) for i in range(2)]
>>> x = jnp.ones((1, 5, 8))
>>> weights = [explain.capture(layer, x)[1][""] for layer in layers]     # two layers' [B, N, T, T]
>>> explain.attention_rollout(weights).shape
(1, 5, 5)
"""

from attention_jax.explain.capture import attention_gradients, attention_modules, capture, layer_gradients
from attention_jax.explain.cdam import cdam, cdam_scores
from attention_jax.explain.gradients import grad_cam, gradient_weighted_rollout
from attention_jax.explain.plots import plot_attention, plot_heads, plot_patch_overlay
from attention_jax.explain.rollout import HEAD_FUSIONS, attention_flow, attention_rollout, fuse_heads, with_residual

__all__ = [
    "capture",
    "attention_gradients",
    "attention_modules",
    "layer_gradients",
    "attention_rollout",
    "attention_flow",
    "fuse_heads",
    "with_residual",
    "HEAD_FUSIONS",
    "gradient_weighted_rollout",
    "grad_cam",
    "cdam",
    "cdam_scores",
    "plot_attention",
    "plot_heads",
    "plot_patch_overlay",
]
