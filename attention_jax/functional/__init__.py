"""Pure attention functions: no parameters, the math of every variant."""

from attention_jax.functional.dot_product import attention_weights, dot_product_attention

__all__ = ["dot_product_attention", "attention_weights"]
