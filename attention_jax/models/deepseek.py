"""DeepSeek-V3 (dense layers), built as an ``aj.nn.TransformerLM`` of multi-head latent attention layers.

Each layer is RMSNorm pre-norm :class:`~attention_jax.nn.MultiHeadLatentAttention` (MLA) plus a
SwiGLU feed-forward. MLA compresses keys and values into a latent ``c [L = kv_lora_rank]`` and one
shared RoPE key ``[R = qk_rope_head_dim]``; queries go through a low-rank ``q_lora_rank`` path with
its own RMSNorm (or one full projection when it is None). Conventions the loader converts:

- ``rope_interleave`` (the default of DeepSeek's configs): RoPE rotates the interleaved pairs
  ``(2i, 2i + 1)`` of the R channels. transformers writes the rotated pairs back de-interleaved (evens
  then odds) for queries and keys alike; scores only see the dot product, which any common channel
  order keeps, so the model uses ``RoPE(layout="interleaved")`` and the weights load unchanged.
- YaRN: the RoPE ``attention_factor`` multiplies cos and sin (so the R channels' scores by its
  square), and ``mscale_all_dim`` multiplies the softmax scale ``(Hn + R) ** -0.5`` by
  ``(0.1 * mscale_all_dim * ln(factor) + 1) ** 2`` (:attr:`DeepseekV3Config.scale`, MLA's ``scale=``).
- The query/latent norms (``q_a_layernorm``, ``kv_a_layernorm``) use epsilon 1e-6 whatever
  ``rms_norm_eps`` says, as transformers builds them.

Mixture-of-experts layers are not built: the loader accepts checkpoints whose layers are all dense
(``first_k_dense_replace >= num_hidden_layers``, or no routed experts) and raises a ``ValueError``
otherwise, as it does for quantised (fp8) checkpoints and ``attention_bias``. The multi-token
prediction layers of a checkpoint (past ``num_hidden_layers``) are ignored, as transformers does.

Checkpoint tensors map onto the model as follows (Hugging Face ``nn.Linear`` weights are ``[out, in]``;
``Hq = Hn + R``): ``q_proj [N*Hq, D]`` or ``q_b_proj [N*Hq, Q]`` to ``q_up.kernel [D or Q, N, Hq]``,
``q_a_proj [Q, D]`` to ``q_down.kernel``, ``q_a_layernorm`` to ``q_norm``, ``kv_a_proj_with_mqa
[L + R, D]`` to ``kv_down.kernel``, ``kv_a_layernorm`` to ``kv_norm``, ``kv_b_proj [N*(Hn + Hv), L]``
(per head: Hn key rows then Hv value rows) to ``w_uk [L, N, Hn]`` and ``w_uv [L, N, Hv]``, ``o_proj
[D, N*Hv]`` to ``out.kernel [N, Hv, D]``; norms and MLP as in :mod:`attention_jax.models.llama`.

Use: ``model = from_pretrained(path)`` gives a ``TransformerLM`` (``model(tokens)`` are the logits;
``aj.generate(model, prompt, ...)`` decodes with the latent-only cache); ``build(config, rngs=...)`` a fresh one.

>>> from flax import nnx
>>> config = DeepseekV3Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
...                           kv_lora_rank=8, q_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)
>>> DeepseekV3Config.from_hf(config.to_hf()) == config
True
>>> model = nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))  # shapes only (build() initialises)
>>> attention = model.stack.blocks[0].attention
>>> attention.w_uk.shape, attention.w_uv.shape  # kv_b_proj's key and value rows, [L, N, Hn] and [L, N, Hv]
((8, 2, 4), (8, 2, 4))
>>> attention.cache_shape()  # one latent + RoPE key of L + R channels per token, shared by every head
(1, 12, 0)
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
from attention_jax.models import llama
from attention_jax.models._loading import check_filled, fill, read_config, read_weights, take, unfilled, write_weights

MODEL_TYPE = "deepseek_v3"
# transformers builds q_a_layernorm and kv_a_layernorm with the RMSNorm default, not rms_norm_eps.
LATENT_NORM_EPSILON = 1e-6


def _mscale(factor: float, mscale: float) -> float:
    """YaRN's magnitude ``0.1 * mscale * ln(factor) + 1`` (1 for ``factor <= 1``)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class DeepseekV3Config:
    """A dense DeepSeek-V3 model (MLA attention, SwiGLU feed-forward in every layer).

    Attributes:
      vocab_size, hidden_size (D), intermediate_size (the SwiGLU width), num_layers.
      num_heads (N); kv_lora_rank (L); q_lora_rank (the query's low rank; None: a full projection).
      qk_nope_head_dim (Hn), qk_rope_head_dim (R), v_head_dim (Hv).
      norm_epsilon: of the block and final RMSNorms (``rms_norm_eps``).
      rope: the :class:`~attention_jax.positional.RoPE` of the R channels; ``layout="interleaved"``
        is Hugging Face's ``rope_interleave=True``.
      mscale_all_dim: YaRN's ``mscale_all_dim`` (scales the softmax, see :attr:`scale`); None when
        unset or without RoPE scaling.
      tie_embeddings: logits from the embedding matrix (no ``lm_head``).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    norm_epsilon: float = 1e-6
    rope: positional.RoPE = positional.RoPE(layout="interleaved")
    mscale_all_dim: float | None = None
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.mscale_all_dim is not None and not hasattr(self.rope.scaling, "factor"):
            raise ValueError(
                f"DeepseekV3Config: mscale_all_dim={self.mscale_all_dim!r} needs a scaled RoPE (one with a factor), "
                f"got rope.scaling={self.rope.scaling!r}."
            )

    @property
    def scale(self) -> float:
        """The softmax scale: ``(Hn + R) ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` when set."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        if self.mscale_all_dim:
            scale *= _mscale(self.rope.scaling.factor, self.mscale_all_dim) ** 2
        return scale

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> DeepseekV3Config:
        """From a Hugging Face ``config.json`` dict (transformers 4 or 5 layouts of the RoPE fields)."""
        _check_supported(config)
        params = llama.rope_parameters(config)
        rope = llama.rope_from_hf(params, config.get("max_position_embeddings"))
        # transformers' `if config.rope_interleave` (default True; a stored null means the half layout).
        interleave = bool(config.get("rope_interleave", True))
        rope = dataclasses.replace(rope, layout="interleaved" if interleave else "rotate_half")
        kind = params.get("rope_type", params.get("type", "default"))
        mscale_all_dim = params.get("mscale_all_dim") if kind != "default" else None
        return cls(
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=config["num_attention_heads"],
            kv_lora_rank=config["kv_lora_rank"],
            qk_nope_head_dim=config["qk_nope_head_dim"],
            qk_rope_head_dim=config["qk_rope_head_dim"],
            v_head_dim=config["v_head_dim"],
            q_lora_rank=config.get("q_lora_rank"),
            norm_epsilon=config.get("rms_norm_eps", 1e-6),
            rope=rope,
            mscale_all_dim=float(mscale_all_dim) if mscale_all_dim else None,
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (transformers 5 layout) for this config; every layer dense."""
        rope = llama.rope_to_hf(self.rope)
        if self.mscale_all_dim is not None:
            rope["mscale_all_dim"] = self.mscale_all_dim
        return dict(
            model_type=MODEL_TYPE,
            architectures=["DeepseekV3ForCausalLM"],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            first_k_dense_replace=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_heads,
            kv_lora_rank=self.kv_lora_rank,
            q_lora_rank=self.q_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            hidden_act="silu",
            attention_bias=False,
            rms_norm_eps=self.norm_epsilon,
            rope_parameters=rope,
            rope_interleave=self.rope.layout == "interleaved",
            tie_word_embeddings=self.tie_embeddings,
        )


def _check_supported(config: Mapping[str, Any]) -> None:
    """Raise for what this loader does not build: MoE layers, attention biases, quantised weights, ..."""
    model_type = config.get("model_type", MODEL_TYPE)
    if model_type != MODEL_TYPE:
        raise ValueError(f"DeepseekV3Config.from_hf: model_type must be {MODEL_TYPE!r}, got {model_type!r}.")
    layers = config["num_hidden_layers"]
    dense = config.get("first_k_dense_replace")
    if config.get("n_routed_experts") and (dense is None or dense < layers):
        raise ValueError(
            f"mixture-of-experts layers are not supported: every layer must be dense, i.e. first_k_dense_replace "
            f">= num_hidden_layers={layers} (or n_routed_experts=None), got first_k_dense_replace={dense!r} "
            f"with n_routed_experts={config['n_routed_experts']!r}."
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got hidden_act={config['hidden_act']!r}.")
    if config.get("attention_bias"):
        raise ValueError("attention_bias=True is not supported (DeepSeek-V3 checkpoints have no attention biases).")
    kv_heads = config.get("num_key_value_heads")
    if kv_heads not in (None, config["num_attention_heads"]):
        raise ValueError(
            f"num_key_value_heads must equal num_attention_heads={config['num_attention_heads']} (MLA expands "
            f"the latent into every head), got num_key_value_heads={kv_heads!r}."
        )
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method")
        raise ValueError(f"quantised checkpoints (quant_method={method!r}) are not supported; dequantise first.")


# --------------------------------------------------------------------------------------------- model


def build(config: DeepseekV3Config, *, dtype: Any = jnp.float32, rngs: nnx.Rngs) -> ajnn.TransformerLM:
    """A freshly initialised ``TransformerLM`` with the architecture of ``config`` (parameters in ``dtype``)."""
    block = ajnn.BlockConfig(
        num_heads=config.num_heads, mlp="swiglu", mlp_features=config.intermediate_size, norm="rms",
        norm_epsilon=config.norm_epsilon, norm_position="pre", deterministic=True, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    attention = functools.partial(
        ajnn.MultiHeadLatentAttention, num_heads=config.num_heads, kv_lora_rank=config.kv_lora_rank,
        q_lora_rank=config.q_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
        qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim, rope=config.rope, scale=config.scale,
        norm_epsilon=LATENT_NORM_EPSILON, dtype=dtype, param_dtype=dtype,
    )  # fmt: skip
    return ajnn.TransformerLM(
        config.vocab_size, config.hidden_size, config.num_layers, attention=attention,
        tie_embeddings=config.tie_embeddings, config=block, rngs=rngs,
    )  # fmt: skip


# A tensor: Hugging Face name, the model's variables it fills (kv_b_proj fills two), HF array -> ours
# (one array per variable), ours -> HF array.
Entry = tuple[str, tuple[nnx.Variable, ...], Callable[[np.ndarray], tuple], Callable[..., np.ndarray]]


def _one(entry: llama.Entry) -> Entry:
    """A one-variable entry of :mod:`attention_jax.models.llama` in this module's form."""
    name, variable, to_ours, to_hf = entry
    return name, (variable,), lambda w: (to_ours(w),), to_hf


def attention_entries(prefix: str, attention: ajnn.MultiHeadLatentAttention) -> Iterator[Entry]:
    """The MLA projections of one layer, ``prefix`` e.g. ``model.layers.0.self_attn``."""
    n, hn, hv = attention.num_heads, attention.qk_nope_head_dim, attention.v_head_dim
    q_in, heads = attention.q_up.kernel.shape[0], attention.q_up.kernel.shape[1:]  # D or Q, (N, Hq)

    def q_up(name: str) -> Entry:
        return _one((
            f"{prefix}.{name}.weight", attention.q_up.kernel,
            lambda w: w.T.reshape(q_in, *heads), lambda k: k.reshape(q_in, -1).T,
        ))  # fmt: skip

    if attention.q_down is None:
        yield q_up("q_proj")
    else:
        yield _one((f"{prefix}.q_a_proj.weight", attention.q_down.kernel, llama.transpose, llama.transpose))
        yield _one((f"{prefix}.q_a_layernorm.weight", attention.q_norm.scale, llama.same, llama.same))
        yield q_up("q_b_proj")
    yield _one((f"{prefix}.kv_a_proj_with_mqa.weight", attention.kv_down.kernel, llama.transpose, llama.transpose))
    yield _one((f"{prefix}.kv_a_layernorm.weight", attention.kv_norm.scale, llama.same, llama.same))

    def split_kv(w):  # [N*(Hn + Hv), L] -> w_uk [L, N, Hn], w_uv [L, N, Hv]
        w = w.reshape(n, hn + hv, -1)  # [N, Hn + Hv, L]
        return w[:, :hn].transpose(2, 0, 1), w[:, hn:].transpose(2, 0, 1)

    def join_kv(uk, uv):
        w = np.concatenate([uk.transpose(1, 2, 0), uv.transpose(1, 2, 0)], axis=1)  # [N, Hn + Hv, L]
        return w.reshape(n * (hn + hv), -1)

    yield f"{prefix}.kv_b_proj.weight", (attention.w_uk, attention.w_uv), split_kv, join_kv
    yield _one((
        f"{prefix}.o_proj.weight", attention.out.kernel,
        lambda w: w.T.reshape(n, hv, -1), lambda k: k.reshape(n * hv, -1).T,
    ))  # fmt: skip


def entries(model: ajnn.TransformerLM, config: DeepseekV3Config) -> Iterator[Entry]:
    """Every tensor of a dense DeepSeek-V3 checkpoint against the model's variables."""
    del config  # the layout follows the model (q_lora_rank is visible on each layer)
    yield from map(_one, llama.head_entries(model))
    for i, block in enumerate(model.stack.blocks):
        prefix = f"model.layers.{i}"
        yield _one((f"{prefix}.input_layernorm.weight", block.attention_norm.scale, llama.same, llama.same))
        yield from attention_entries(f"{prefix}.self_attn", block.attention)
        yield _one((f"{prefix}.post_attention_layernorm.weight", block.mlp_norm.scale, llama.same, llama.same))
        yield from map(_one, llama.mlp_entries(f"{prefix}.mlp", block.mlp))


def load(entries_: Iterator[Entry], weights: Mapping[str, np.ndarray]) -> None:
    """Copy ``weights`` (by Hugging Face name) into the entries' variables, checking every shape."""
    for name, variables, to_ours, _ in entries_:
        for variable, value in zip(variables, to_ours(np.asarray(take(weights, name))), strict=True):
            fill(variable, value, name)


def export(entries_: Iterator[Entry]) -> dict[str, np.ndarray]:
    """The entries' variables as Hugging Face tensors."""
    return {
        name: np.ascontiguousarray(to_hf(*(np.asarray(v[...]) for v in variables)))
        for name, variables, _, to_hf in entries_
    }


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ajnn.TransformerLM:
    """A ``TransformerLM`` holding the weights of the dense DeepSeek-V3 checkpoint directory ``path``.

    ``path`` holds ``config.json`` and safetensors weights (sharded or not, any float dtype); the
    parameters are cast to ``dtype``. ``DeepseekV3Config.from_hf(read_config(path))`` is its config.
    """
    config = DeepseekV3Config.from_hf(read_config(path))
    model = unfilled(lambda: build(config, dtype=dtype, rngs=nnx.Rngs(0)))
    load(entries(model, config), read_weights(path))
    return check_filled(model)


def to_pretrained(model: ajnn.TransformerLM, config: DeepseekV3Config, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, export(entries(model, config)), config.to_hf())
