"""BERT: embeddings + a post-norm :class:`attention_jax.nn.TransformerEncoder` + a pooler, and its checkpoints.

BERT sums word, learned absolute position and token-type embeddings, normalises the sum (LayerNorm),
and runs post-norm blocks (``norm(x + f(x))``) with biases everywhere and the exact (erf) GELU; a
post-norm stack has no final norm, as BERT. The pooler is ``tanh(Linear(h[:, 0]))``. Checkpoint
projections are ``torch.nn.Linear`` weights ``[out, in]``: the loader transposes them and splits
heads (``query``/``key``/``value`` ``[D, N, H]``, ``out`` ``[N, H, D]``).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = BertConfig(vocab_size=64, max_positions=32, features=16, num_layers=2, num_heads=2, mlp_features=32)
>>> model = BertModel(config, rngs=nnx.Rngs(0))
>>> hidden = model(jnp.zeros((2, 5), jnp.int32), lengths=jnp.array([5, 3]))
>>> hidden.shape, model.pool(hidden).shape
((2, 5, 16), (2, 16))
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

from attention_jax import masks as masks_lib
from attention_jax import nn as ajnn
from attention_jax.models._loading import check_filled, read_config, read_weights, take, unfilled, write_weights
from attention_jax.models.gpt2 import assign
from attention_jax.nn import _common

__all__ = ["BertConfig", "BertModel", "build", "from_pretrained", "to_pretrained", "to_hf_weights"]

Array = jax.Array

# Hugging Face's ``hidden_act`` names as our MLP kinds ("gelu" there is the exact erf form).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The shape of a BERT encoder.

    Attributes:
      vocab_size: V.
      max_positions: rows of the position embedding (``max_position_embeddings``).
      features: D (``hidden_size``).
      num_layers: blocks (``num_hidden_layers``).
      num_heads: N (``num_attention_heads``); H = D / N.
      mlp_features: hidden width of the MLP (``intermediate_size``).
      type_vocab_size: token types (segments A/B).
      norm_epsilon: LayerNorm epsilon (``layer_norm_eps``).
      mlp: our MLP kind (``"gelu_exact"``: Hugging Face's ``gelu``).
      pooler: whether the model has the pooler (``BertForMaskedLM`` checkpoints do not).
    """

    vocab_size: int = 30522
    max_positions: int = 512
    features: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_features: int = 3072
    type_vocab_size: int = 2
    norm_epsilon: float = 1e-12
    mlp: str = "gelu_exact"
    pooler: bool = True

    def __post_init__(self):
        if self.features % self.num_heads:
            raise ValueError(f"BertConfig: num_heads must divide features, got {self.num_heads=} {self.features=}.")

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, pooler: bool = True) -> BertConfig:
        """Our config from a Hugging Face ``BertConfig`` dict (``config.json``)."""
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"BertConfig: hidden_act must be one of {tuple(ACTIVATIONS)}, got {act!r}.")
        kind = config.get("position_embedding_type", "absolute")
        if kind != "absolute":
            raise ValueError(
                f"BertConfig: only absolute position embeddings load, got position_embedding_type={kind!r}."
            )
        if config.get("is_decoder", False):
            raise ValueError("BertConfig: a decoder (is_decoder=True) BERT does not load; this is the encoder.")
        return cls(
            vocab_size=config["vocab_size"],
            max_positions=config.get("max_position_embeddings", 512),
            features=config["hidden_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            mlp_features=config["intermediate_size"],
            type_vocab_size=config.get("type_vocab_size", 2),
            norm_epsilon=config.get("layer_norm_eps", 1e-12),
            mlp=ACTIVATIONS[act],
            pooler=pooler,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (the reverse of :meth:`from_hf`)."""
        act = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}[self.mlp]
        return dict(
            architectures=["BertModel"], model_type="bert", vocab_size=self.vocab_size,
            max_position_embeddings=self.max_positions, hidden_size=self.features, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.mlp_features,
            type_vocab_size=self.type_vocab_size, layer_norm_eps=self.norm_epsilon, hidden_act=act,
        )  # fmt: skip

    @property
    def head_dim(self) -> int:
        return self.features // self.num_heads


class BertModel(nnx.Module):
    """BERT's embeddings, encoder and pooler (Hugging Face's ``BertModel``), from :mod:`attention_jax.nn` parts.

    Args:
      config: a :class:`BertConfig`.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: as usual. No dropout: a loaded model runs inference or fine-tunes without it.
    """

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.config = config
        d, dtypes = config.features, dict(dtype=dtype, param_dtype=param_dtype)
        self.word_embed = nnx.Embed(config.vocab_size, d, **dtypes, rngs=rngs)
        self.position_embed = nnx.Embed(config.max_positions, d, **dtypes, rngs=rngs)
        self.token_type_embed = nnx.Embed(config.type_vocab_size, d, **dtypes, rngs=rngs)
        self.embed_norm = nnx.LayerNorm(d, epsilon=config.norm_epsilon, **dtypes, rngs=rngs)
        attention = functools.partial(ajnn.MultiHeadAttention, num_heads=config.num_heads, use_bias=True, **dtypes)
        block = ajnn.BlockConfig(
            num_heads=config.num_heads, mlp=config.mlp, mlp_features=config.mlp_features, mlp_bias=True,
            norm="layer", norm_epsilon=config.norm_epsilon, norm_position="post", **dtypes,
        )  # fmt: skip
        self.encoder = ajnn.TransformerEncoder(config.num_layers, d, attention=attention, config=block, rngs=rngs)
        self.pooler = nnx.Linear(d, d, **dtypes, rngs=rngs) if config.pooler else nnx.data(None)

    def __call__(
        self,
        tokens: Array,
        *,
        token_types: Array | None = None,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        """Hidden states ``[B, T, D]`` of ``tokens [B, T]`` (int).

        ``token_types [B, T]``: segment A/B ids (default 0); ``lengths [B]``: real tokens per row (right
        padding, Hugging Face's ``attention_mask``); ``mask``, ``segment_ids``, ``positions`` and
        ``deterministic`` as in :class:`~attention_jax.nn.TransformerEncoder` (positions default to
        ``arange(T)``, or the position within each segment).
        """
        if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                "BertModel: tokens must be integers of shape [B, T], got "
                f"{jnp.result_type(tokens)} {jnp.shape(tokens)}."
            )
        if token_types is not None and jnp.shape(token_types) != jnp.shape(tokens):
            raise ValueError(
                f"BertModel: token_types must have the shape of tokens {tokens.shape}, got {jnp.shape(token_types)}."
            )
        if positions is None:
            positions = (
                jnp.arange(tokens.shape[1], dtype=jnp.int32)
                if segment_ids is None
                else _common.segment_positions(_common.check_segment_ids(segment_ids, tokens[..., None]))
            )
        x = self.word_embed(tokens) + self.position_embed(positions)  # [B, T, D]
        x = x + self.token_type_embed(jnp.zeros_like(tokens) if token_types is None else token_types)
        x = self.embed_norm(x)
        return self.encoder(
            x, mask=mask, positions=positions, segment_ids=segment_ids, lengths=lengths, deterministic=deterministic
        )

    def pool(self, hidden: Array) -> Array:
        """BERT's pooled output ``tanh(W h[:, 0] + b)`` ``[B, D]`` of hidden states ``[B, T, D]``."""
        if self.pooler is None:
            raise ValueError("BertModel: this model has no pooler (config.pooler=False).")
        return jnp.tanh(self.pooler(hidden[:, 0]))


def build(config: BertConfig, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32) -> BertModel:
    """A randomly initialised :class:`BertModel` of ``config``."""
    return BertModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _prefix(weights: Mapping[str, np.ndarray]) -> str:
    """``"bert."`` for task checkpoints (``BertForMaskedLM``, ...), ``""`` for a bare ``BertModel``."""
    return "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""


def load_weights(model: BertModel, weights: Mapping[str, np.ndarray]) -> None:
    """Copy Hugging Face BERT ``weights`` (name -> array) into ``model``, in place; task heads are ignored."""
    config = model.config
    p, n, h, d = _prefix(weights), config.num_heads, config.head_dim, config.features

    def put(param, name, fn=lambda w: w):
        assign(param, fn(take(weights, p + name)), p + name)

    def linear(layer, name):  # torch Linear [out, in] -> nnx.Linear [in, out]
        put(layer.kernel, name + ".weight", np.transpose)
        put(layer.bias, name + ".bias")

    def layer_norm(norm, name):
        put(norm.scale, name + ".weight")
        put(norm.bias, name + ".bias")

    put(model.word_embed.embedding, "embeddings.word_embeddings.weight")
    put(model.position_embed.embedding, "embeddings.position_embeddings.weight")
    put(model.token_type_embed.embedding, "embeddings.token_type_embeddings.weight")
    layer_norm(model.embed_norm, "embeddings.LayerNorm")
    for i, block in enumerate(model.encoder.blocks):
        g, attn = f"encoder.layer.{i}.", block.attention
        for proj, name in ((attn.query, "query"), (attn.key, "key"), (attn.value, "value")):
            put(proj.kernel, f"{g}attention.self.{name}.weight", lambda w: w.T.reshape(d, n, h))  # [D, N, H]
            put(proj.bias, f"{g}attention.self.{name}.bias", lambda b: b.reshape(n, h))
        put(attn.out.kernel, g + "attention.output.dense.weight", lambda w: w.T.reshape(n, h, d))  # [N, H, D]
        put(attn.out.bias, g + "attention.output.dense.bias")
        layer_norm(block.attention_norm, g + "attention.output.LayerNorm")  # post-norm: norm(x + attention)
        linear(block.mlp.up, g + "intermediate.dense")
        linear(block.mlp.down, g + "output.dense")
        layer_norm(block.mlp_norm, g + "output.LayerNorm")
    if model.pooler is not None:
        linear(model.pooler, "pooler.dense")


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> BertModel:
    """BERT from a local Hugging Face checkpoint directory (``config.json`` + safetensors), no torch.

    Reads the encoder of ``BertModel`` and of task checkpoints (``bert.`` names); the pooler when
    the checkpoint has one. ``dtype``: parameters and computation.
    """
    weights = read_weights(path)
    pooler = _prefix(weights) + "pooler.dense.weight" in weights
    config = BertConfig.from_hf(read_config(path), pooler=pooler)
    model = unfilled(lambda: build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    load_weights(model, weights)
    return check_filled(model)


def to_hf_weights(model: BertModel) -> dict[str, np.ndarray]:
    """The Hugging Face ``BertModel`` tensors of ``model`` (the reverse of :func:`load_weights`)."""
    d = model.config.features
    out: dict[str, np.ndarray] = {}

    def get(param) -> np.ndarray:
        return np.asarray(jax.device_get(param[...]))

    def linear(layer, name, kernel=None):
        out[name + ".weight"] = (get(layer.kernel) if kernel is None else kernel).T  # [out, in]
        out[name + ".bias"] = get(layer.bias).reshape(-1)

    def layer_norm(norm, name):
        out[name + ".weight"], out[name + ".bias"] = get(norm.scale), get(norm.bias)

    out["embeddings.word_embeddings.weight"] = get(model.word_embed.embedding)
    out["embeddings.position_embeddings.weight"] = get(model.position_embed.embedding)
    out["embeddings.token_type_embeddings.weight"] = get(model.token_type_embed.embedding)
    layer_norm(model.embed_norm, "embeddings.LayerNorm")
    for i, block in enumerate(model.encoder.blocks):
        g, attn = f"encoder.layer.{i}.", block.attention
        for proj, name in ((attn.query, "query"), (attn.key, "key"), (attn.value, "value")):
            linear(proj, f"{g}attention.self.{name}", get(proj.kernel).reshape(d, d))
        linear(attn.out, g + "attention.output.dense", get(attn.out.kernel).reshape(d, d))
        layer_norm(block.attention_norm, g + "attention.output.LayerNorm")
        linear(block.mlp.up, g + "intermediate.dense")
        linear(block.mlp.down, g + "output.dense")
        layer_norm(block.mlp_norm, g + "output.LayerNorm")
    if model.pooler is not None:
        linear(model.pooler, "pooler.dense")
    return out


def to_pretrained(model: BertModel, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face ``BertModel`` checkpoint directory (``config.json`` + safetensors)."""
    write_weights(path, to_hf_weights(model), model.config.to_hf())
