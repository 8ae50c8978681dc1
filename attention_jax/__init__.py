"""attention_jax: attention for JAX, from the reference math to Pallas kernels and ring attention.

>>> import jax.numpy as jnp
>>> import attention_jax as aj
>>> x = jnp.ones((1, 4, 2, 8))
>>> aj.dot_product_attention(x, x, x, mask=aj.masks.causal()).shape
(1, 4, 2, 8)

Submodules: ``masks``, ``score_mods``, ``positional``, ``functional`` (every variant as a pure
function), ``nn`` (Flax NNX modules), ``cache`` (KV caches), ``sparse_patterns`` (Longformer,
BigBird, Sparse Transformer masks), ``explain`` (attention maps) and ``models`` (Llama, Mistral,
Qwen, Gemma, GPT-2, BERT, T5 from Hugging Face checkpoints), both imported on first use.
"""

from attention_jax import cache, functional, masks, nn, positional, score_mods, sparse_patterns
from attention_jax.distributed import SequenceParallel, sequence_parallel_attention
from attention_jax.functional import attention_weights, dot_product_attention
from attention_jax.generate import generate

__version__ = "0.1.0"

__all__ = [
    "SequenceParallel",
    "attention_weights",
    "cache",
    "dot_product_attention",
    "functional",
    "generate",
    "masks",
    "nn",
    "positional",
    "score_mods",
    "sequence_parallel_attention",
    "sparse_patterns",
]


def __getattr__(name: str):
    # explain and models are loaded on first use (``aj.explain.capture``, ``aj.models.llama``): a plain
    # ``import attention_jax`` stays lean.
    if name in ("checkpoint", "explain", "models"):
        import importlib

        return importlib.import_module(f"attention_jax.{name}")
    raise AttributeError(f"module 'attention_jax' has no attribute {name!r}")
