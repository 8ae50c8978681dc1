"""Gemma 2 and Gemma 3 (text), built as an ``aj.nn.TransformerLM``.

Both use sandwich norms (``x + norm(f(norm(x)))``) with Gemma's ``(1 + w)`` RMSNorm, a GeGLU
feed-forward (tanh GELU), an embedding scaled by ``sqrt(D)``, a tied head, a score scale of
``query_pre_attn_scalar ** -0.5`` and local (sliding-window) layers between global ones:

- Gemma 2: local and global layers alternate; scores are soft-capped (``attn_logit_softcapping``)
  and so are the final logits (``final_logit_softcapping``).
- Gemma 3: five local layers per global one (``from_pretrained`` also reads the language model of a
  multimodal checkpoint, ``Gemma3ForConditionalGeneration``); a ``(1 + w)`` RMSNorm per query and key head before
  RoPE; local layers have their own RoPE base (10k) while global ones may scale theirs. As in
  transformers, Gemma 3 applies no attention softcap.

Sliding windows: Hugging Face configs count ``W`` keys *including* the query; ``aj``'s
``sliding_window=w`` lets a query see itself and the ``w`` previous tokens, so
:attr:`GemmaConfig.sliding_window` holds ``W - 1``.

Tensor layouts are those of :mod:`attention_jax.models.llama`; the four norms of a layer map as
``input_layernorm`` to ``attention_norm``, ``post_attention_layernorm`` to ``post_attention_norm``,
``pre_feedforward_layernorm`` to ``mlp_norm`` and ``post_feedforward_layernorm`` to ``post_mlp_norm``.
Gemma 3's ``q_norm``/``k_norm`` store ``w`` of a ``(1 + w)`` scale: the loader writes ``1 + w`` into
the attention's plain RMSNorm scale (and the export subtracts one).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
...                      num_kv_heads=1, head_dim=8, sliding_window=3)
>>> model = build(config, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 32)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import nn as ajnn
from attention_jax import positional
from attention_jax.models._loading import check_filled, read_config, read_weights, unfilled, write_weights
from attention_jax.models.llama import (
    Entry,
    attention_entries,
    export,
    head_entries,
    hf_window,
    load,
    mlp_entries,
    rope_from_hf,
    rope_parameters,
    rope_to_hf,
    same,
)

MODEL_TYPES = ("gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
ACTIVATIONS = {"gelu_pytorch_tanh": "geglu", "gelu": "geglu_exact"}


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma 2 or Gemma 3 text model.

    Attributes:
      vocab_size, hidden_size (D), intermediate_size (the GeGLU width), num_layers.
      num_heads (N), num_kv_heads (K), head_dim (H, 256 in the released models).
      norm_epsilon: of every RMSNorm.
      query_pre_attn_scalar: scores are scaled by ``query_pre_attn_scalar ** -0.5`` (default H).
      attn_softcap, final_softcap: soft caps of the scores and of the logits (None: off).
      sliding_window: ``aj``'s count (Hugging Face's ``sliding_window`` minus one).
      layer_types: ``"sliding_attention"`` or ``"full_attention"`` per layer (default: Gemma 2's
        alternation, local first).
      rope: RoPE of the global layers; local_rope: of the local layers (default ``rope``).
      qk_norm: ``(1 + w)`` RMSNorm on query and key heads (Gemma 3).
      mlp: ``"geglu"`` (tanh GELU, ``gelu_pytorch_tanh``) or ``"geglu_exact"``.
      attention_bias: biases on the four projections.
      model_type: ``"gemma2"`` or ``"gemma3_text"``.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    norm_epsilon: float = 1e-6
    query_pre_attn_scalar: float | None = None
    attn_softcap: float | None = 50.0
    final_softcap: float | None = 30.0
    sliding_window: int | None = 4095
    layer_types: tuple[str, ...] | None = None
    rope: positional.RoPE = positional.RoPE()
    local_rope: positional.RoPE | None = None
    qk_norm: bool = False
    mlp: str = "geglu"
    attention_bias: bool = False
    model_type: str = "gemma2"

    def __post_init__(self):
        # Resolve the defaults once, so a config equals its round trip through to_hf / from_hf.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.query_pre_attn_scalar is None:
            object.__setattr__(self, "query_pre_attn_scalar", self.head_dim)
        if self.layer_types is None:
            alternating = tuple(LAYER_TYPES[(i + 1) % 2] for i in range(self.num_layers))  # local, global, ...
            object.__setattr__(self, "layer_types", alternating)
        if self.local_rope is None:
            object.__setattr__(self, "local_rope", self.rope)
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"GemmaConfig: model_type must be one of {MODEL_TYPES}, got {self.model_type!r}.")
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(
                f"GemmaConfig: layer_types must hold num_layers={self.num_layers} entries from {LAYER_TYPES}, "
                f"got {self.layer_types!r}."
            )
        if self.mlp not in ACTIVATIONS.values():
            raise ValueError(f"GemmaConfig: mlp must be one of {tuple(ACTIVATIONS.values())}, got {self.mlp!r}.")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"GemmaConfig: sliding_window must be >= 1, got {self.sliding_window!r}.")

    def sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and self.layer_types[layer] == "sliding_attention"

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GemmaConfig:
        """From a Hugging Face ``config.json`` dict of a Gemma 2 or Gemma 3 (text) model, transformers 4 or 5."""
        if "text_config" in config:  # a multimodal Gemma 3: its language model
            config = dict(config["text_config"])
            config.setdefault("model_type", "gemma3_text")
        model_type = config.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"GemmaConfig.from_hf: model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
        if config.get("use_bidirectional_attention"):
            raise ValueError("GemmaConfig.from_hf: use_bidirectional_attention=True (an encoder) is not supported.")
        activation = config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"
        if activation not in ACTIVATIONS:
            raise ValueError(f"GemmaConfig.from_hf: hidden_activation must be one of {tuple(ACTIVATIONS)}, "
                             f"got {activation!r}.")  # fmt: skip
        n = config["num_hidden_layers"]
        layer_types = config.get("layer_types")
        if layer_types is None and model_type == "gemma3_text":  # transformers 4: every pattern-th layer is global
            pattern = config.get("sliding_window_pattern", 6)
            layer_types = [LAYER_TYPES[(i + 1) % pattern != 0] for i in range(n)]
        rope, local_rope = _ropes(config, model_type)
        gemma3 = model_type == "gemma3_text"
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=n,
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            norm_epsilon=config.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=config.get("query_pre_attn_scalar"),
            attn_softcap=None if gemma3 else config.get("attn_logit_softcapping"),  # transformers ignores it in 3
            final_softcap=config.get("final_logit_softcapping"),
            sliding_window=hf_window(config.get("sliding_window")),
            layer_types=None if layer_types is None else tuple(layer_types),
            rope=rope,
            local_rope=local_rope,
            qk_norm=gemma3,
            mlp=ACTIVATIONS[activation],
            attention_bias=bool(config.get("attention_bias", False)),
            model_type=model_type,
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 5 layout) for this config."""
        gemma3 = self.model_type == "gemma3_text"
        if not gemma3 and self.local_rope != self.rope:
            raise ValueError("Gemma 2 has one RoPE for every layer; this config has a different local_rope.")
        if gemma3 and self.attn_softcap is not None:
            raise ValueError("transformers' Gemma 3 applies no attention softcap; set attn_softcap=None to export.")
        rope = (
            dict(full_attention=rope_to_hf(self.rope), sliding_attention=rope_to_hf(self.local_rope))
            if gemma3
            else rope_to_hf(self.rope)
        )
        return dict(
            model_type=self.model_type,
            architectures=["Gemma3ForCausalLM" if gemma3 else "Gemma2ForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_activation={v: k for k, v in ACTIVATIONS.items()}[self.mlp],
            rms_norm_eps=self.norm_epsilon,
            query_pre_attn_scalar=self.query_pre_attn_scalar,
            attn_logit_softcapping=self.attn_softcap,
            final_logit_softcapping=self.final_softcap,
            sliding_window=None if self.sliding_window is None else self.sliding_window + 1,
            layer_types=list(self.layer_types),
            rope_parameters=rope,
            attention_bias=self.attention_bias,
            tie_word_embeddings=True,
        )


def _ropes(config: Mapping[str, Any], model_type: str) -> tuple[positional.RoPE, positional.RoPE]:
    """(global, local) RoPE: transformers 5 keys Gemma 3's ``rope_parameters`` by layer type; 4 has
    ``rope_theta`` + ``rope_scaling`` for global layers and ``rope_local_base_freq`` for local ones."""
    params = config.get("rope_parameters")
    if params and "full_attention" in params:
        full = rope_from_hf(params["full_attention"])
        return full, rope_from_hf(params.get("sliding_attention") or params["full_attention"])
    full = rope_from_hf(rope_parameters(config))
    if model_type == "gemma3_text" and "rope_local_base_freq" in config:
        return full, positional.RoPE(theta=float(config["rope_local_base_freq"]))
    return full, full


def build(config: GemmaConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> ajnn.TransformerLM:
    """A freshly initialised ``TransformerLM`` with the architecture of ``config`` (parameters in ``dtype``)."""
    block = ajnn.BlockConfig(
        num_heads=config.num_heads, mlp=config.mlp, mlp_features=config.intermediate_size, norm="rms_offset",
        norm_epsilon=config.norm_epsilon, norm_position="sandwich", deterministic=True, dtype=dtype,
        param_dtype=dtype,
    )  # fmt: skip
    attention = [
        functools.partial(
            ajnn.MultiHeadAttention, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, rope=config.local_rope if config.sliding(i) else config.rope,
            sliding_window=config.sliding_window if config.sliding(i) else None, softcap=config.attn_softcap,
            scale=config.query_pre_attn_scalar**-0.5, qk_norm=config.qk_norm, norm_epsilon=config.norm_epsilon,
            use_bias=config.attention_bias, dtype=dtype, param_dtype=dtype,
        )  # fmt: skip
        for i in range(config.num_layers)
    ]
    return ajnn.TransformerLM(
        config.vocab_size, config.hidden_size, config.num_layers, attention=attention, tie_embeddings=True,
        embedding_scale=config.hidden_size**0.5, logit_softcap=config.final_softcap, config=block, rngs=rngs,
    )  # fmt: skip


def _plus_one(w):
    return w.astype(np.float32) + 1.0  # in float32 as transformers does (a bfloat16 sum would round)


def _minus_one(w):
    return w - 1.0


def entries(model: ajnn.TransformerLM, config: GemmaConfig) -> Iterator[Entry]:
    """Every tensor of a Gemma 2/3 checkpoint against the model's variables."""
    yield from head_entries(model)
    for i, block in enumerate(model.stack.blocks):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", block.attention_norm.scale, same, same
        yield f"{prefix}.post_attention_layernorm.weight", block.post_attention_norm.scale, same, same
        yield f"{prefix}.pre_feedforward_layernorm.weight", block.mlp_norm.scale, same, same
        yield f"{prefix}.post_feedforward_layernorm.weight", block.post_mlp_norm.scale, same, same
        yield from attention_entries(f"{prefix}.self_attn", block.attention)
        if config.qk_norm:  # stored as w of (1 + w); the attention's RMSNorm multiplies by its scale
            yield f"{prefix}.self_attn.q_norm.weight", block.attention.query_norm.scale, _plus_one, _minus_one
            yield f"{prefix}.self_attn.k_norm.weight", block.attention.key_norm.scale, _plus_one, _minus_one
        yield from mlp_entries(f"{prefix}.mlp", block.mlp)


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ajnn.TransformerLM:
    """A ``TransformerLM`` holding the weights of the Gemma 2 / Gemma 3 (text) checkpoint directory ``path``.

    ``GemmaConfig.from_hf(read_config(path))`` is its config.
    """
    config = GemmaConfig.from_hf(read_config(path))
    model = unfilled(lambda: build(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load(entries(model, config), text_weights(read_weights(path)))
    return check_filled(model)


# Where a multimodal Gemma 3 checkpoint keeps its language model (transformers 4 names, and 5's own).
TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                 ("model.language_model.", "model."))  # fmt: skip


def text_weights(weights: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's tensors under text-model names (a multimodal checkpoint's others are dropped)."""
    if "model.embed_tokens.weight" in weights:
        return weights
    renamed = {}
    for name, value in weights.items():
        for old, new in TEXT_PREFIXES:
            if name.startswith(old):
                renamed[new + name[len(old):]] = value
                break
    return renamed


def to_pretrained(model: ajnn.TransformerLM, config: GemmaConfig, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, export(entries(model, config)), config.to_hf())
