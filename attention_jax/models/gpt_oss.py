"""gpt-oss: GQA attention with learned sinks, local/global layers and a mixture-of-experts feed-forward.

Built as an ``aj.nn.TransformerLM`` of RMSNorm pre-norm blocks whose parts are:

- attention: ``MultiHeadAttention`` with biases on all four projections and one learned sink logit per
  head (``sinks=True``: a virtual key every query sees, with a zero value); layers alternate between a
  sliding window and full attention (``layer_types``, local first);
- RoPE with YaRN scaling whose ramp ends are not rounded (``YaRNScaling(truncate=False)``);
- feed-forward: :class:`MixtureOfExperts` (given to the blocks as ``BlockConfig.feed_forward``): a
  router picks the top-k of E experts per token and weighs them by a softmax over the selected logits;
  each expert is a clamped SwiGLU with biases,
  ``(clip(up, -l, l) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, l)``.

The experts are computed densely: every token runs through all E experts and the router's weights
(zero for unselected experts) mix the results. Exact, simple, and E / k times the work of a sparse
dispatch; fine for small models and tests, not for serving the 20B/120B models fast.

Sliding windows: Hugging Face configs count ``W`` keys *including* the query (transformers' mask is
``q - W < k <= q``); ``aj``'s ``sliding_window=w`` lets a query see itself and the ``w`` previous
tokens, so :attr:`GptOssConfig.sliding_window` holds ``W - 1``.

Checkpoint tensors: attention and head as in :mod:`attention_jax.models.llama` plus
``self_attn.sinks [N]``; ``mlp.router.weight [E, D]`` to ``router.kernel [D, E]``;
``mlp.experts.gate_up_proj [E, D, 2F]`` (gate and up columns interleaved: gate ``0::2``, up ``1::2``),
``down_proj [E, F, D]`` and their biases as they are. Released checkpoints store the experts'
matrices in MXFP4 (``*_blocks`` + ``*_scales``); :func:`dequantize_mxfp4` expands them on load.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> config = GptOssConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_layers=2, num_heads=4,
...                       num_kv_heads=2, head_dim=4, num_experts=4, experts_per_token=2, sliding_window=3)
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

import jax
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
    rope_from_hf,
    rope_parameters,
    rope_to_hf,
    same,
    transpose,
)

Array = jax.Array

LAYER_TYPES = ("full_attention", "sliding_attention")
# transformers' defaults for a config.json that omits them (the released models' values).
DEFAULT_THETA = 150_000.0
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)  # fmt: skip


# ------------------------------------------------------------------------------------ mixture of experts


def route(logits: Array, top_k: int) -> Array:
    """Per-expert weights ``[..., E]`` from router ``logits [..., E]``: a softmax over the top-k logits, zero elsewhere.

    The softmax runs in float32; the weights come back in float32.

    >>> route(jnp.array([0.0, 2.0, 1.0, 2.0]), 2).tolist()
    [0.0, 0.5, 0.0, 0.5]
    """
    top, index = jax.lax.top_k(logits, top_k)  # [..., k]
    probs = jax.nn.softmax(top.astype(jnp.float32), axis=-1)  # [..., k]
    one_hot = jax.nn.one_hot(index, logits.shape[-1], dtype=jnp.float32)  # [..., k, E]
    return jnp.einsum("...k,...kE->...E", probs, one_hot)


def clamped_swiglu(gate_up: Array, *, alpha: float, limit: float) -> Array:
    """gpt-oss's gated unit on interleaved ``gate_up [..., 2F]`` (gate ``0::2``, up ``1::2``) to ``[..., F]``.

    ``(clip(up, -limit, limit) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``.
    """
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]  # [..., F] each
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * gate * jax.nn.sigmoid(alpha * gate)


def mixture_of_experts(
    x: Array,
    *,
    router_kernel: Array,
    router_bias: Array,
    gate_up: Array,
    gate_up_bias: Array,
    down: Array,
    down_bias: Array,
    top_k: int,
    alpha: float,
    limit: float,
) -> Array:
    """``x [..., D]`` through the top-k of E clamped-SwiGLU experts, computed densely, to ``[..., D]``.

    Shapes: ``router_kernel [D, E]``, ``router_bias [E]``, ``gate_up [E, D, 2F]`` (interleaved),
    ``gate_up_bias [E, 2F]``, ``down [E, F, D]``, ``down_bias [E, D]``. Every expert runs on every
    token; the router's weights (zero off the top-k) mix their outputs.
    """
    weights = route(x @ router_kernel + router_bias, top_k).astype(x.dtype)  # [..., E]
    h = jnp.einsum("...D,EDF->...EF", x, gate_up) + gate_up_bias  # [..., E, 2F]
    y = jnp.einsum("...EF,EFD->...ED", clamped_swiglu(h, alpha=alpha, limit=limit), down) + down_bias  # [..., E, D]
    return jnp.einsum("...E,...ED->...D", weights, y)


class MixtureOfExperts(nnx.Module):
    """gpt-oss's feed-forward: a top-k router over ``num_experts`` clamped-SwiGLU experts with biases.

    Parameters: ``router`` (``nnx.Linear`` ``[D, E]`` with bias), ``gate_up [E, D, 2F]`` (gate and up
    columns interleaved, the checkpoints' layout), ``gate_up_bias [E, 2F]``, ``down [E, F, D]``,
    ``down_bias [E, D]``. Computed densely (see :func:`mixture_of_experts`).

    >>> moe = MixtureOfExperts(8, 4, num_experts=4, top_k=2, rngs=nnx.Rngs(0))
    >>> moe(jnp.ones((2, 3, 8))).shape
    (2, 3, 8)
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        num_experts: int,
        top_k: int,
        alpha: float = 1.702,
        limit: float = 7.0,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must lie in [1, num_experts={num_experts}], got {top_k=}.")
        self.top_k, self.alpha, self.limit, self.dtype = top_k, alpha, limit, dtype
        self.router = nnx.Linear(features, num_experts, use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        e, d, f = num_experts, features, hidden_features
        self.gate_up = nnx.Param(init(rngs.params(), (e, d, 2 * f), param_dtype))
        self.gate_up_bias = nnx.Param(jnp.zeros((e, 2 * f), param_dtype))
        self.down = nnx.Param(init(rngs.params(), (e, f, d), param_dtype))
        self.down_bias = nnx.Param(jnp.zeros((e, d), param_dtype))

    def __call__(self, x: Array) -> Array:
        """``x [..., D]`` to ``[..., D]``."""
        dtype = self.dtype or x.dtype
        return mixture_of_experts(
            x.astype(dtype), router_kernel=self.router.kernel[...].astype(dtype),
            router_bias=self.router.bias[...].astype(dtype), gate_up=self.gate_up[...].astype(dtype),
            gate_up_bias=self.gate_up_bias[...].astype(dtype), down=self.down[...].astype(dtype),
            down_bias=self.down_bias[...].astype(dtype), top_k=self.top_k, alpha=self.alpha, limit=self.limit,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """One gpt-oss model.

    Attributes:
      vocab_size, hidden_size (D), intermediate_size (F, each expert's width), num_layers.
      num_heads (N), num_kv_heads (K), head_dim (H).
      num_experts (E, ``num_local_experts``), experts_per_token (top-k, ``num_experts_per_tok``).
      swiglu_alpha, swiglu_limit: the experts' sigmoid gain and clamp.
      norm_epsilon: of every RMSNorm.
      rope: RoPE of every layer (the released models: YaRN, factor 32, ``truncate=False``).
      sliding_window: ``aj``'s count (Hugging Face's ``sliding_window`` minus one); None: every layer full.
      layer_types: ``"sliding_attention"`` or ``"full_attention"`` per layer (default: alternating,
        local first).
      attention_bias: biases on the q/k/v/o projections.
      tie_embeddings: logits from the embedding matrix (no ``lm_head``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = 32
    experts_per_token: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    norm_epsilon: float = 1e-5
    rope: positional.RoPE = positional.RoPE(theta=DEFAULT_THETA)
    sliding_window: int | None = 127
    layer_types: tuple[str, ...] | None = None
    attention_bias: bool = True
    tie_embeddings: bool = False

    def __post_init__(self):
        # Resolve the defaults once, so a config equals its round trip through to_hf / from_hf.
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.layer_types is None:
            alternating = tuple(LAYER_TYPES[(i + 1) % 2] for i in range(self.num_layers))  # local, global, ...
            object.__setattr__(self, "layer_types", alternating)
        if len(self.layer_types) != self.num_layers or set(self.layer_types) - set(LAYER_TYPES):
            raise ValueError(
                f"GptOssConfig: layer_types must hold num_layers={self.num_layers} entries from {LAYER_TYPES}, "
                f"got {self.layer_types!r}."
            )
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"GptOssConfig: experts_per_token must lie in [1, num_experts={self.num_experts}], "
                f"got {self.experts_per_token!r}."
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(
                f"GptOssConfig: sliding_window counts the tokens before the query and must be >= 1, "
                f"got {self.sliding_window!r} (a Hugging Face window of {self.sliding_window + 1})."
            )

    def window(self, layer: int) -> int | None:
        """``aj``'s sliding window of layer ``layer`` (0-based), or None."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GptOssConfig:
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 layouts of the RoPE fields)."""
        if config.get("model_type") != "gpt_oss":
            raise ValueError(f"GptOssConfig.from_hf: model_type must be 'gpt_oss', got {config.get('model_type')!r}.")
        theta = config.get("rope_theta", DEFAULT_THETA)  # gpt-oss's default base, not the usual 10k
        if config.get("rope_parameters") or config.get("rope_scaling"):
            params = rope_parameters(dict(config, rope_theta=theta))
        else:  # transformers fills in the released models' YaRN
            params = dict(DEFAULT_ROPE)
        params.setdefault("rope_theta", theta)
        layer_types = config.get("layer_types")
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            num_kv_heads=config.get("num_key_value_heads"),
            head_dim=config.get("head_dim"),
            num_experts=config["num_local_experts"],
            experts_per_token=config["num_experts_per_tok"],
            swiglu_alpha=float(config.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(config.get("swiglu_limit", 7.0)),
            norm_epsilon=config.get("rms_norm_eps", 1e-5),
            rope=rope_from_hf(params, config.get("max_position_embeddings")),
            sliding_window=hf_window(config.get("sliding_window")),
            layer_types=None if layer_types is None else tuple(layer_types),
            attention_bias=bool(config.get("attention_bias", True)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 5 layout) for this config."""
        rope = rope_to_hf(self.rope)
        scaling = self.rope.scaling
        return dict(
            model_type="gpt_oss",
            architectures=["GptOssForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.experts_per_token,
            swiglu_alpha=self.swiglu_alpha,
            swiglu_limit=self.swiglu_limit,
            rms_norm_eps=self.norm_epsilon,
            rope_parameters=rope,
            # YaRN reads the original context from here when its own field is missing.
            max_position_embeddings=(
                int(scaling.factor * scaling.original_max_position)
                if isinstance(scaling, positional.YaRNScaling)
                else 131_072
            ),
            sliding_window=None if self.sliding_window is None else self.sliding_window + 1,
            layer_types=list(self.layer_types),
            attention_bias=self.attention_bias,
            tie_word_embeddings=self.tie_embeddings,
        )


# ------------------------------------------------------------------------------------------- model


def build(config: GptOssConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> ajnn.TransformerLM:
    """A freshly initialised ``TransformerLM`` with the architecture of ``config`` (parameters in ``dtype``)."""
    experts = functools.partial(
        MixtureOfExperts, hidden_features=config.intermediate_size, num_experts=config.num_experts,
        top_k=config.experts_per_token, alpha=config.swiglu_alpha, limit=config.swiglu_limit, dtype=dtype,
        param_dtype=dtype,
    )  # fmt: skip
    block = ajnn.BlockConfig(
        num_heads=config.num_heads, feed_forward=experts, norm="rms", norm_epsilon=config.norm_epsilon,
        norm_position="pre", deterministic=True, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    attention = [
        functools.partial(
            ajnn.MultiHeadAttention, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim, rope=config.rope, sinks=True, sliding_window=config.window(i),
            use_bias=config.attention_bias, dtype=dtype, param_dtype=dtype,
        )  # fmt: skip
        for i in range(config.num_layers)
    ]
    return ajnn.TransformerLM(
        config.vocab_size, config.hidden_size, config.num_layers, attention=attention,
        tie_embeddings=config.tie_embeddings, config=block, rngs=rngs,
    )  # fmt: skip


def moe_entries(prefix: str, moe: MixtureOfExperts) -> Iterator[Entry]:
    """Router and experts of one layer, ``prefix`` e.g. ``model.layers.0.mlp``."""
    yield f"{prefix}.router.weight", moe.router.kernel, transpose, transpose
    yield f"{prefix}.router.bias", moe.router.bias, same, same
    yield f"{prefix}.experts.gate_up_proj", moe.gate_up, same, same
    yield f"{prefix}.experts.gate_up_proj_bias", moe.gate_up_bias, same, same
    yield f"{prefix}.experts.down_proj", moe.down, same, same
    yield f"{prefix}.experts.down_proj_bias", moe.down_bias, same, same


def entries(model: ajnn.TransformerLM, config: GptOssConfig) -> Iterator[Entry]:
    """Every tensor of a gpt-oss checkpoint against the model's variables."""
    del config  # the layout is the same for every gpt-oss config (kept for the loaders' common signature)
    yield from head_entries(model)
    for i, block in enumerate(model.stack.blocks):
        prefix = f"model.layers.{i}"
        yield f"{prefix}.input_layernorm.weight", block.attention_norm.scale, same, same
        yield from attention_entries(f"{prefix}.self_attn", block.attention)
        yield f"{prefix}.self_attn.sinks", block.attention.sinks, same, same
        yield f"{prefix}.post_attention_layernorm.weight", block.mlp_norm.scale, same, same
        yield from moe_entries(f"{prefix}.mlp", block.mlp)


# The 16 values of an FP4 (E2M1) code, low nibble first in each byte.
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)  # fmt: skip


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An MXFP4 expert matrix as float32: ``blocks [E, R, G, 16]`` (uint8, two FP4 codes each, low nibble
    first) and ``scales [E, R, G]`` (uint8 exponents biased by 127, one per 32 values) to ``[E, G * 32, R]``.

    The result is transposed as the dense checkpoints store it (``gate_up_proj [E, D, 2F]`` from
    ``R = 2F`` rows of ``D = 32 G`` values).
    """
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales)
    if blocks.ndim != 4 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks [E, R, G, B] need scales [E, R, G], got blocks.shape={blocks.shape}, "
            f"scales.shape={scales.shape}."
        )
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], axis=-1)  # [E, R, G, B, 2]
    exponents = scales.astype(np.int32) - 127  # [E, R, G]
    values = np.ldexp(values, exponents[..., None, None])
    e, r = blocks.shape[:2]
    return values.reshape(e, r, -1).transpose(0, 2, 1)  # [E, G * 2B, R]


def dequantized(weights: Mapping[str, np.ndarray], dtype: Any = None) -> dict[str, np.ndarray]:
    """``weights`` with every ``X_blocks`` + ``X_scales`` pair (MXFP4) replaced by a dense ``X``."""
    out = dict(weights)
    for name in [k for k in weights if k.endswith("_blocks")]:
        base = name[: -len("_blocks")]
        scales = out.pop(base + "_scales", None)
        if scales is None:
            raise ValueError(f"the checkpoint has {name!r} but no {base + '_scales'!r} (MXFP4 needs both).")
        dense = dequantize_mxfp4(out.pop(name), scales)
        out[base] = dense if dtype is None else dense.astype(dtype)
    return out


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ajnn.TransformerLM:
    """A ``TransformerLM`` holding the weights of the gpt-oss checkpoint directory ``path``.

    ``path`` holds ``config.json`` and safetensors weights (sharded or not; dense or MXFP4 experts);
    the parameters are cast to ``dtype``. ``GptOssConfig.from_hf(read_config(path))`` is its config.
    """
    config = GptOssConfig.from_hf(read_config(path))
    model = unfilled(lambda: build(config, dtype=dtype, rngs=nnx.Rngs(0)))  # no random init to overwrite
    load(entries(model, config), dequantized(read_weights(path)))
    return check_filled(model)


def to_pretrained(model: ajnn.TransformerLM, config: GptOssConfig, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + dense ``model.safetensors``)."""
    write_weights(path, export(entries(model, config)), config.to_hf())
