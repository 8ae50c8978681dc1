"""Llama 3, Mistral, Qwen2 and Qwen3: one decoder-only RoPE family, built as an ``aj.nn.TransformerLM``.

The four share a layout (RMSNorm pre-norm blocks, GQA attention with RoPE, a SwiGLU feed-forward) and
differ in a few conventions, each one field of :class:`LlamaConfig`:

- Llama 3: Llama-3 RoPE scaling (``rope_type: llama3``), untied head (tied in the 1B/3B models).
- Mistral: a sliding window on every layer.
- Qwen2: biases on the query, key and value projections only (``qkv_bias``).
- Qwen3: an RMSNorm per head on queries and keys before RoPE (``qk_norm``).

Sliding windows: Hugging Face configs count ``W`` keys *including* the query; ``aj``'s
``sliding_window=w`` lets a query see itself and the ``w`` previous tokens. The loader stores
``w = W - 1`` in :attr:`LlamaConfig.sliding_window` (mapping ``W`` literally would let every query see
one token too many).

Checkpoint tensors map onto the model as follows (Hugging Face ``nn.Linear`` weights are ``[out, in]``):
``q_proj [N*H, D]`` to ``query.kernel [D, N, H]``, ``k_proj``/``v_proj [K*H, D]`` to ``[D, K, H]``,
``o_proj [D, N*H]`` to ``out.kernel [N, H, D]``, MLP weights to ``nnx.Linear`` kernels ``[in, out]``;
``input_layernorm`` is the attention norm and ``post_attention_layernorm`` the feed-forward's pre-norm.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
...                      num_kv_heads=2, head_dim=4)
>>> model = build(config, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import nn as ajnn
from attention_jax import positional
from attention_jax.models._loading import check_filled, fill, read_config, read_weights, take, unfilled, write_weights

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """One model of the Llama family (Llama 3, Mistral, Qwen2, Qwen3).

    Attributes:
      vocab_size, hidden_size (D), intermediate_size (the SwiGLU width), num_layers.
      num_heads (N), num_kv_heads (K), head_dim (H; default ``D // N``).
      norm_epsilon: of every RMSNorm (``rms_norm_eps``).
      rope: the :class:`~attention_jax.positional.RoPE` of every layer (theta and scaling).
      tie_embeddings: logits from the embedding matrix (no ``lm_head``).
      qkv_bias, out_bias, mlp_bias: biases of the q/k/v projections, the output projection, the MLP.
      qk_norm: RMSNorm over each query and key head before RoPE (Qwen3).
      sliding_window: ``aj``'s count, the tokens before the query that it sees (Hugging Face's
        ``sliding_window`` minus one); None for full attention.
      layer_types: ``"full_attention"`` or ``"sliding_attention"`` per layer; None: every layer
        slides when ``sliding_window`` is set (Mistral).
      max_position_embeddings: the checkpoint's context length (kept for the reverse export, where
        transformers would otherwise assume 2048: its YaRN and dynamic RoPE read it); None: unset.
      model_type: the Hugging Face ``model_type`` (kept for the reverse export).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_epsilon: float = 1e-6
    rope: positional.RoPE = positional.RoPE()
    tie_embeddings: bool = False
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    max_position_embeddings: int | None = None
    model_type: str = "llama"

    def __post_init__(self):
        # Resolve the defaults once, so a config equals its round trip through to_hf / from_hf.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
                raise ValueError(
                    f"LlamaConfig: layer_types must hold num_layers={self.num_layers} entries from {LAYER_TYPES}, "
                    f"got {self.layer_types!r}."
                )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"LlamaConfig: sliding_window counts the tokens before the query and must be >= 1, "
                f"got {self.sliding_window!r} (a Hugging Face window of {self.sliding_window + 1})."
            )

    def window(self, layer: int) -> int | None:
        """``aj``'s sliding window of layer ``layer`` (0-based), or None."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaConfig:
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 layouts of the RoPE fields)."""
        model_type = config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"LlamaConfig.from_hf: model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
        num_heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // num_heads
        window = config.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not config.get("use_sliding_window", False):
            window = None
        layer_types = config.get("layer_types")
        if model_type in ("qwen2", "qwen3") and window is not None and layer_types is None:
            first_full = config.get("max_window_layers", config["num_hidden_layers"])
            layer_types = [
                "sliding_attention" if i >= first_full else "full_attention" for i in range(config["num_hidden_layers"])
            ]
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            norm_epsilon=config.get("rms_norm_eps", 1e-6),
            rope=rope_from_hf(rope_parameters(config), config.get("max_position_embeddings")),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases and no output bias; the others follow attention_bias for all four.
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            out_bias=model_type != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=hf_window(window),
            layer_types=None if window is None or layer_types is None else tuple(layer_types),
            max_position_embeddings=config.get("max_position_embeddings"),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 5 layout) for this config."""
        config = dict(
            model_type=self.model_type,
            architectures=[_ARCHITECTURES[self.model_type]],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.norm_epsilon,
            rope_parameters=rope_to_hf(self.rope),
            tie_word_embeddings=self.tie_embeddings,
            sliding_window=None if self.sliding_window is None else self.sliding_window + 1,
        )
        if self.max_position_embeddings is not None:
            config.update(max_position_embeddings=self.max_position_embeddings)
        if self.model_type in ("llama", "qwen3"):
            config.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type in ("qwen2", "qwen3"):
            config.update(use_sliding_window=self.sliding_window is not None)
            if self.layer_types is not None:
                config.update(layer_types=list(self.layer_types))
        return config


_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_window(window: int | None) -> int | None:
    """Hugging Face's ``sliding_window`` (``W`` keys including the query) as ``aj``'s (``W - 1`` before it)."""
    if window is None:
        return None
    if window < 2:
        raise ValueError(f"sliding_window must be at least 2 keys (the query and one before), got {window!r}.")
    return int(window) - 1


# ---------------------------------------------------------------------------------------------- RoPE


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE fields of a config: transformers 5's ``rope_parameters`` or 4's ``rope_theta`` + ``rope_scaling``."""
    if config.get("rope_parameters"):
        return dict(config["rope_parameters"])
    params = dict(config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10_000.0))
    return params


def rope_from_hf(params: Mapping[str, Any], max_position: int | None = None) -> positional.RoPE:
    """A :class:`~attention_jax.positional.RoPE` from Hugging Face RoPE parameters (default, linear, llama3, yarn).

    ``max_position``: the config's ``max_position_embeddings`` (YaRN's fallback for missing fields).
    """
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", 10_000.0))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"partial_rotary_factor={params['partial_rotary_factor']} is not supported here.")
    if kind == "default":
        return positional.RoPE(theta=theta)
    if kind == "linear":
        return positional.RoPE(theta=theta, scaling=positional.LinearScaling(float(params["factor"])))
    if kind == "llama3":
        scaling = positional.Llama3Scaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
        return positional.RoPE(theta=theta, scaling=scaling)
    if kind == "yarn":
        return positional.RoPE(theta=theta, scaling=_yarn(params, max_position))
    raise ValueError(
        f"rope_type must be 'default', 'linear', 'llama3' or 'yarn' for this loader, got rope_type={kind!r}."
    )


def _yarn(params: Mapping[str, Any], max_position: int | None) -> positional.YaRNScaling:
    """transformers' YaRN parameters (``mscale``/``mscale_all_dim`` folded into the attention factor)."""
    original = params.get("original_max_position_embeddings") or max_position
    if original is None:
        raise ValueError("YaRN RoPE needs original_max_position_embeddings (or max_position_embeddings).")
    factor = params.get("factor") or max_position / original

    def mscale(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None and params.get("mscale") and params.get("mscale_all_dim"):
        attention_factor = mscale(params["mscale"]) / mscale(params["mscale_all_dim"])
    return positional.YaRNScaling(
        factor=float(factor), original_max_position=int(original), beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1), attention_factor=attention_factor,
        truncate=bool(params.get("truncate", True)),
    )  # fmt: skip


def rope_to_hf(rope: positional.RoPE) -> dict[str, Any]:
    """The inverse of :func:`rope_from_hf`."""
    scaling = rope.scaling
    if scaling is None:
        return dict(rope_type="default", rope_theta=rope.theta)
    if isinstance(scaling, positional.LinearScaling):
        return dict(rope_type="linear", rope_theta=rope.theta, factor=scaling.factor)
    if isinstance(scaling, positional.Llama3Scaling):
        return dict(
            rope_type="llama3", rope_theta=rope.theta, factor=scaling.factor, low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor, original_max_position_embeddings=scaling.original_max_position,
        )  # fmt: skip
    if isinstance(scaling, positional.YaRNScaling):
        return dict(
            rope_type="yarn", rope_theta=rope.theta, factor=scaling.factor, beta_fast=scaling.beta_fast,
            beta_slow=scaling.beta_slow, original_max_position_embeddings=scaling.original_max_position,
            attention_factor=scaling.attention_factor, truncate=scaling.truncate,
        )  # fmt: skip
    raise ValueError(f"cannot export RoPE scaling {type(scaling).__name__} to a Hugging Face config.")


# --------------------------------------------------------------------------------------------- model


def build(config: LlamaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> ajnn.TransformerLM:
    """A freshly initialised ``TransformerLM`` with the architecture of ``config`` (parameters in ``dtype``)."""
    block = ajnn.BlockConfig(
        num_heads=config.num_heads, mlp="swiglu", mlp_features=config.intermediate_size, mlp_bias=config.mlp_bias,
        norm="rms", norm_epsilon=config.norm_epsilon, norm_position="pre", deterministic=True, dtype=dtype,
        param_dtype=dtype,
    )  # fmt: skip
    attention = [
        functools.partial(
            ajnn.MultiHeadAttention, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, rope=config.rope, qk_norm=config.qk_norm, norm_epsilon=config.norm_epsilon,
            sliding_window=config.window(i), qkv_bias=config.qkv_bias, out_bias=config.out_bias, dtype=dtype,
            param_dtype=dtype,
        )  # fmt: skip
        for i in range(config.num_layers)
    ]
    return ajnn.TransformerLM(
        config.vocab_size, config.hidden_size, config.num_layers, attention=attention,
        tie_embeddings=config.tie_embeddings, config=block, rngs=rngs,
    )  # fmt: skip


# A tensor: Hugging Face name, the model's variable, HF array -> ours, ours -> HF array.
Entry = tuple[str, nnx.Variable, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def same(w: np.ndarray) -> np.ndarray:
    return w


def transpose(w: np.ndarray) -> np.ndarray:
    return w.T


def attention_entries(prefix: str, attention: ajnn.MultiHeadAttention) -> Iterator[Entry]:
    """The q/k/v/o projections (and biases) of one attention layer, ``prefix`` e.g. ``model.layers.0.self_attn``."""
    d = attention.in_features
    for name, proj in (("q", attention.query), ("k", attention.key), ("v", attention.value)):
        heads = proj.kernel.shape[1:]  # (N, H) or (K, H)
        yield (
            f"{prefix}.{name}_proj.weight", proj.kernel,
            lambda w, heads=heads: w.T.reshape(d, *heads), lambda k: k.reshape(d, -1).T,
        )  # fmt: skip
        if proj.bias is not None:
            yield f"{prefix}.{name}_proj.bias", proj.bias, lambda b, heads=heads: b.reshape(heads), lambda b: b.ravel()
    out = attention.out
    heads = out.kernel.shape[:2]  # (N, Hv)
    yield (
        f"{prefix}.o_proj.weight", out.kernel,
        lambda w: w.T.reshape(*heads, -1), lambda k: k.reshape(heads[0] * heads[1], -1).T,
    )  # fmt: skip
    if out.bias is not None:
        yield f"{prefix}.o_proj.bias", out.bias, same, same


def mlp_entries(prefix: str, mlp) -> Iterator[Entry]:
    """``gate_proj``, ``up_proj``, ``down_proj`` (``[out, in]``) onto ``FeedForward``'s ``nnx.Linear`` kernels."""
    for name, linear in (("gate", mlp.gate), ("up", mlp.up), ("down", mlp.down)):
        yield f"{prefix}.{name}_proj.weight", linear.kernel, transpose, transpose
        if linear.bias is not None:
            yield f"{prefix}.{name}_proj.bias", linear.bias, same, same


def head_entries(model: ajnn.TransformerLM) -> Iterator[Entry]:
    """Embedding, final norm and (untied) head."""
    yield "model.embed_tokens.weight", model.embed.embedding, same, same
    yield "model.norm.weight", model.stack.final_norm.scale, same, same
    if model.head is not None:
        yield "lm_head.weight", model.head.kernel, transpose, transpose


def entries(model: ajnn.TransformerLM, config: LlamaConfig) -> Iterator[Entry]:
    """Every tensor of a Llama-family checkpoint against the model's variables."""
    yield from head_entries(model)
    for i, block in enumerate(model.stack.blocks):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", block.attention_norm.scale, same, same
        yield from attention_entries(f"{prefix}.self_attn", block.attention)
        if config.qk_norm:
            yield f"{prefix}.self_attn.q_norm.weight", block.attention.query_norm.scale, same, same
            yield f"{prefix}.self_attn.k_norm.weight", block.attention.key_norm.scale, same, same
        yield f"{prefix}.post_attention_layernorm.weight", block.mlp_norm.scale, same, same
        yield from mlp_entries(f"{prefix}.mlp", block.mlp)


def load(entries_: Iterator[Entry], weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` (by Hugging Face name) into the entries' variables, checking every shape."""
    for name, variable, to_ours, _ in entries_:
        fill(variable, to_ours(np.asarray(take(weights, name))), name)


def export(entries_: Iterator[Entry]) -> dict[str, np.ndarray]:
    """The entries' variables as Hugging Face tensors."""
    return {name: np.ascontiguousarray(to_hf(np.asarray(variable[...]))) for name, variable, _, to_hf in entries_}


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ajnn.TransformerLM:
    """A ``TransformerLM`` holding the weights of the Llama/Mistral/Qwen2/Qwen3 checkpoint directory ``path``.

    ``path`` holds ``config.json`` and safetensors weights (sharded or not, any float dtype); the
    parameters are cast to ``dtype``. ``LlamaConfig.from_hf(read_config(path))`` is its config.
    """
    config = LlamaConfig.from_hf(read_config(path))
    model = unfilled(lambda: build(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load(entries(model, config), read_weights(path))
    return check_filled(model)


def to_pretrained(model: ajnn.TransformerLM, config: LlamaConfig, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, export(entries(model, config)), config.to_hf())
