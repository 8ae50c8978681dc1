"""Load any supported Hugging Face checkpoint directory: dispatch on its ``config.json``'s ``model_type``.

Each architecture module of :mod:`attention_jax.models` has its own ``from_pretrained``; this one reads
``model_type`` and calls the right one, so a script can take a checkpoint directory of any of them.

>>> import tempfile
>>> from flax import nnx
>>> from attention_jax.models import auto, llama
>>> config = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
...                            num_kv_heads=1, head_dim=8)
>>> path = tempfile.mkdtemp()
>>> llama.to_pretrained(llama.build(config, rngs=nnx.Rngs(0)), config, path)
>>> type(auto.from_pretrained(path)).__name__
'TransformerLM'
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from flax import nnx

from attention_jax.models._loading import read_config

__all__ = ["MODEL_TYPES", "from_pretrained", "loader"]

# model_type -> the module of attention_jax.models whose from_pretrained reads it. Modules are imported on
# first use, so one that is missing or fails to import only fails for its own model types.
_MODULES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma2": "gemma", "gemma3_text": "gemma", "gemma3": "gemma",  # gemma3: the language model of Gemma 3
    "gpt2": "gpt2",
    "bert": "bert",
    "t5": "t5",
    "vit": "vit",
    "deepseek_v3": "deepseek",
    "gpt_oss": "gpt_oss",
}  # fmt: skip
MODEL_TYPES: tuple[str, ...] = tuple(sorted(_MODULES))


def loader(model_type: str):
    """The module of :mod:`attention_jax.models` that loads ``model_type`` (e.g. ``models.llama`` for ``"qwen3"``)."""
    if model_type not in _MODULES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported model types: "
                         f"{', '.join(MODEL_TYPES)}.")  # fmt: skip
    name = f"attention_jax.models.{_MODULES[model_type]}"
    try:
        return importlib.import_module(name)
    except ImportError as error:
        message = f"model_type {model_type!r} is loaded by {name}, which cannot be imported: {error}"
        raise ImportError(message) from error


def from_pretrained(path: str | Path, dtype: Any = None) -> nnx.Module:
    """The model held by the Hugging Face checkpoint directory ``path`` (``config.json`` + safetensors).

    Dispatches on ``config.json``'s ``model_type`` (one of :data:`MODEL_TYPES`) to that architecture's
    ``from_pretrained``: a ``TransformerLM`` for the decoder-only language models, ``T5Model``, ``BertModel``
    or ``ViTModel`` otherwise. ``dtype``: the parameters' dtype (None: that loader's default, float32).
    """
    config = read_config(path)
    if "model_type" not in config:
        raise ValueError(f"the config.json in {path!s} has no model_type; supported model types: "
                         f"{', '.join(MODEL_TYPES)}.")  # fmt: skip
    module = loader(config["model_type"])
    return module.from_pretrained(path) if dtype is None else module.from_pretrained(path, dtype=dtype)
