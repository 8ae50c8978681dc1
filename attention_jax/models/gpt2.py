"""GPT-2 as a configuration of :class:`attention_jax.nn.TransformerLM`, and its Hugging Face checkpoints.

GPT-2 is a pre-norm decoder with LayerNorm, learned absolute positions (``wpe``), biases in every
projection, the tanh GELU (``gelu_new``), a final LayerNorm (``ln_f``) and logits tied to the token
embedding. A checkpoint stores its projections as ``Conv1D`` weights ``[in, out]`` (the transpose of
``torch.nn.Linear``) and fuses queries, keys and values into one ``c_attn`` ``[D, 3D]``; the loader
splits it into ``query``/``key``/``value`` kernels ``[D, N, H]`` and ``c_proj`` into ``out`` ``[N, H, D]``.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = GPT2Config(vocab_size=64, max_positions=32, features=16, num_layers=2, num_heads=2)
>>> model = build(config, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 64)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import nn as ajnn
from attention_jax.models._loading import check_filled, fill, read_config, read_weights, take, unfilled, write_weights

__all__ = ["GPT2Config", "build", "from_pretrained", "to_pretrained", "to_hf_weights"]

# Hugging Face's activation names (``activation_function``) as our MLP kinds.
ACTIVATIONS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2 model.

    Attributes:
      vocab_size: V.
      max_positions: rows of the learned position embedding (``n_positions``).
      features: D (``n_embd``).
      num_layers: blocks (``n_layer``).
      num_heads: N (``n_head``); H = D / N.
      mlp_features: hidden width of the MLP (``n_inner``), default ``4 * D``.
      norm_epsilon: LayerNorm epsilon (``layer_norm_epsilon``).
      mlp: our MLP kind (``"gelu"`` is the tanh GELU, Hugging Face's ``gelu_new``).
      scale_attention: scores scaled by ``1 / sqrt(H)`` (``scale_attn_weights``); else unscaled.
      scale_by_layer: scores of layer ``i`` (1-based) also divided by ``i``
        (``scale_attn_by_inverse_layer_idx``).
      tie_embeddings: logits use the token embedding (``tie_word_embeddings``).
    """

    vocab_size: int = 50257
    max_positions: int = 1024
    features: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_features: int | None = None
    norm_epsilon: float = 1e-5
    mlp: str = "gelu"
    scale_attention: bool = True
    scale_by_layer: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        if self.features % self.num_heads:
            raise ValueError(f"GPT2Config: num_heads must divide features, got {self.num_heads=} {self.features=}.")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GPT2Config:
        """Our config from a Hugging Face ``GPT2Config`` dict (``config.json``)."""
        act = config.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"GPT2Config: activation_function must be one of {tuple(ACTIVATIONS)}, got {act!r}.")
        return cls(
            vocab_size=config["vocab_size"],
            max_positions=config.get("n_positions", 1024),
            features=config["n_embd"],
            num_layers=config["n_layer"],
            num_heads=config["n_head"],
            mlp_features=config.get("n_inner"),
            norm_epsilon=config.get("layer_norm_epsilon", 1e-5),
            mlp=ACTIVATIONS[act],
            scale_attention=config.get("scale_attn_weights", True),
            scale_by_layer=config.get("scale_attn_by_inverse_layer_idx", False),
            tie_embeddings=config.get("tie_word_embeddings", True),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (the reverse of :meth:`from_hf`)."""
        act = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu"}[self.mlp]
        return dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=self.vocab_size,
            n_positions=self.max_positions, n_embd=self.features, n_layer=self.num_layers, n_head=self.num_heads,
            n_inner=self.mlp_features, layer_norm_epsilon=self.norm_epsilon, activation_function=act,
            scale_attn_weights=self.scale_attention, scale_attn_by_inverse_layer_idx=self.scale_by_layer,
            tie_word_embeddings=self.tie_embeddings,
        )  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.features // self.num_heads


def build(config: GPT2Config, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
    """A randomly initialised GPT-2: a :class:`~attention_jax.nn.TransformerLM` configured as ``config``.

    No dropout (a loaded model runs inference or fine-tunes without it).
    """
    h = config.head_dim
    attention = [
        functools.partial(
            ajnn.MultiHeadAttention, num_heads=config.num_heads, use_bias=True, dtype=dtype, param_dtype=param_dtype,
            scale=(h**-0.5 if config.scale_attention else 1.0) / (i + 1 if config.scale_by_layer else 1),
        )  # fmt: skip
        for i in range(config.num_layers)
    ]
    block = ajnn.BlockConfig(
        num_heads=config.num_heads, mlp=config.mlp, mlp_features=config.mlp_features or 4 * config.features,
        mlp_bias=True, norm="layer", norm_epsilon=config.norm_epsilon, norm_position="pre", dtype=dtype,
        param_dtype=param_dtype,
    )  # fmt: skip
    return ajnn.TransformerLM(
        config.vocab_size, config.features, config.num_layers, attention=attention,
        position_embedding=config.max_positions, tie_embeddings=config.tie_embeddings, config=block, rngs=rngs,
    )  # fmt: skip


def _prefix(weights: Mapping[str, np.ndarray]) -> str:
    """``"transformer."`` for ``GPT2LMHeadModel`` checkpoints, ``""`` for a bare ``GPT2Model``."""
    return "transformer." if "transformer.wte.weight" in weights else ""


def assign(param: nnx.Variable, value: np.ndarray, name: str) -> None:
    """Copy checkpoint tensor ``name`` into ``param`` (same shape), in the parameter's dtype."""
    fill(param, np.asarray(value), name)


def load_weights(model: ajnn.TransformerLM, config: GPT2Config, weights: Mapping[str, np.ndarray]) -> None:
    """Copy Hugging Face GPT-2 ``weights`` (name -> array) into ``model`` (built by :func:`build`), in place."""
    p, n, h, d = _prefix(weights), config.num_heads, config.head_dim, config.features

    def put(param, name, fn=lambda w: w):
        assign(param, fn(take(weights, p + name)), p + name)

    put(model.embed.embedding, "wte.weight")  # [V, D]
    put(model.position_embed.embedding, "wpe.weight")  # [P, D]
    for i, block in enumerate(model.stack.blocks):
        g = f"h.{i}."
        put(block.attention_norm.scale, g + "ln_1.weight")
        put(block.attention_norm.bias, g + "ln_1.bias")
        attn = block.attention
        for j, proj in enumerate((attn.query, attn.key, attn.value)):  # c_attn [D, 3D]: q | k | v
            put(proj.kernel, g + "attn.c_attn.weight", lambda w, j=j: w[:, j * d : (j + 1) * d].reshape(d, n, h))
            put(proj.bias, g + "attn.c_attn.bias", lambda b, j=j: b[j * d : (j + 1) * d].reshape(n, h))
        put(attn.out.kernel, g + "attn.c_proj.weight", lambda w: w.reshape(n, h, d))  # [D, D] -> [N, H, D]
        put(attn.out.bias, g + "attn.c_proj.bias")
        put(block.mlp_norm.scale, g + "ln_2.weight")
        put(block.mlp_norm.bias, g + "ln_2.bias")
        put(block.mlp.up.kernel, g + "mlp.c_fc.weight")  # Conv1D [D, F] is nnx.Linear's layout already
        put(block.mlp.up.bias, g + "mlp.c_fc.bias")
        put(block.mlp.down.kernel, g + "mlp.c_proj.weight")  # [F, D]
        put(block.mlp.down.bias, g + "mlp.c_proj.bias")
    put(model.stack.final_norm.scale, "ln_f.weight")
    put(model.stack.final_norm.bias, "ln_f.bias")
    if model.head is not None:  # untied: lm_head is a torch Linear [V, D]
        name = "lm_head.weight"
        assign(model.head.kernel, take(weights, name).T, name)


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ajnn.TransformerLM:
    """GPT-2 from a local Hugging Face checkpoint directory (``config.json`` + safetensors), no torch.

    ``dtype``: parameters and computation (e.g. ``jnp.bfloat16``); LayerNorm and softmax still
    accumulate in float32.
    """
    config = GPT2Config.from_hf(read_config(path))
    model = unfilled(lambda: build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    load_weights(model, config, read_weights(path))
    return check_filled(model)


def to_hf_weights(model: ajnn.TransformerLM, config: GPT2Config) -> dict[str, np.ndarray]:
    """The Hugging Face ``GPT2LMHeadModel`` tensors of ``model`` (the reverse of :func:`load_weights`)."""
    d = config.features

    def get(param) -> np.ndarray:
        return np.asarray(jax.device_get(param[...]))

    out = {"wte.weight": get(model.embed.embedding), "wpe.weight": get(model.position_embed.embedding)}
    for i, block in enumerate(model.stack.blocks):
        g, attn = f"h.{i}.", block.attention
        qkv = (attn.query, attn.key, attn.value)
        out |= {
            g + "ln_1.weight": get(block.attention_norm.scale),
            g + "ln_1.bias": get(block.attention_norm.bias),
            g + "attn.c_attn.weight": np.concatenate([get(x.kernel).reshape(d, d) for x in qkv], axis=1),  # [D, 3D]
            g + "attn.c_attn.bias": np.concatenate([get(x.bias).reshape(d) for x in qkv]),
            g + "attn.c_proj.weight": get(attn.out.kernel).reshape(d, d),
            g + "attn.c_proj.bias": get(attn.out.bias),
            g + "ln_2.weight": get(block.mlp_norm.scale),
            g + "ln_2.bias": get(block.mlp_norm.bias),
            g + "mlp.c_fc.weight": get(block.mlp.up.kernel),
            g + "mlp.c_fc.bias": get(block.mlp.up.bias),
            g + "mlp.c_proj.weight": get(block.mlp.down.kernel),
            g + "mlp.c_proj.bias": get(block.mlp.down.bias),
        }
    out |= {"ln_f.weight": get(model.stack.final_norm.scale), "ln_f.bias": get(model.stack.final_norm.bias)}
    out = {"transformer." + k: v for k, v in out.items()}
    if model.head is not None:
        out["lm_head.weight"] = get(model.head.kernel).T  # [V, D]
    return out


def to_pretrained(model: ajnn.TransformerLM, config: GPT2Config, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face GPT-2 checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, to_hf_weights(model, config), config.to_hf())
