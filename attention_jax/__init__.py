"""attention_jax: attention for JAX, from the reference math to Pallas kernels and ring attention.

>>> import jax.numpy as jnp
>>> import attention_jax as aj
>>> x = jnp.ones((1, 4, 2, 8))
>>> aj.dot_product_attention(x, x, x, mask=aj.masks.causal()).shape
(1, 4, 2, 8)
"""

from attention_jax import masks, positional, score_mods
from attention_jax.functional import attention_weights, dot_product_attention

__version__ = "0.1.0"

__all__ = ["dot_product_attention", "attention_weights", "masks", "positional", "score_mods"]
