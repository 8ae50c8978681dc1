"""Published architectures built from :mod:`attention_jax.nn`, and loaders for local Hugging Face checkpoints.

Each architecture is a config dataclass plus a model assembled from the library's stacks (a
configuration, not a fork); its module's ``from_pretrained(path)`` reads a checkpoint directory
(``config.json`` + single or sharded safetensors) without torch, and ``to_pretrained`` writes one back.
:func:`~attention_jax.models.auto.from_pretrained` picks the module from ``config.json``'s ``model_type``.

- :mod:`~attention_jax.models.llama`: Llama 3, Mistral, Qwen2, Qwen3.
- :mod:`~attention_jax.models.gemma`: Gemma 2 and Gemma 3.
- :mod:`~attention_jax.models.deepseek`: DeepSeek-V3 (multi-head latent attention, dense layers; MoE
  checkpoints are refused).
- :mod:`~attention_jax.models.gpt_oss`: gpt-oss (attention sinks, local/global layers, a mixture of
  experts; MXFP4 expert weights are expanded on load).
- :mod:`~attention_jax.models.gpt2`: GPT-2.
- :mod:`~attention_jax.models.bert`: BERT (encoder, pooler).
- :mod:`~attention_jax.models.t5`: T5 (encoder-decoder; generate with ``model_inputs``).
- :mod:`~attention_jax.models.vit`: ViT (backbone with pooler, or image classifier).

Hugging Face's ``sliding_window=W`` counts the query among its W keys; ours counts the keys before it,
so the loaders convert ``W`` to ``W - 1``.
"""

from attention_jax.models import auto, bert, deepseek, gemma, gpt2, gpt_oss, llama, t5, vit
from attention_jax.models.auto import from_pretrained
from attention_jax.models.bert import BertConfig, BertModel
from attention_jax.models.deepseek import DeepseekV3Config
from attention_jax.models.gemma import GemmaConfig
from attention_jax.models.gpt2 import GPT2Config
from attention_jax.models.gpt_oss import GptOssConfig
from attention_jax.models.llama import LlamaConfig
from attention_jax.models.t5 import T5Config, T5Model
from attention_jax.models.vit import ViTConfig, ViTModel

__all__ = [
    "BertConfig",
    "BertModel",
    "DeepseekV3Config",
    "GPT2Config",
    "GemmaConfig",
    "GptOssConfig",
    "LlamaConfig",
    "T5Config",
    "T5Model",
    "ViTConfig",
    "ViTModel",
    "auto",
    "bert",
    "deepseek",
    "from_pretrained",
    "gemma",
    "gpt2",
    "gpt_oss",
    "llama",
    "t5",
    "vit",
]
