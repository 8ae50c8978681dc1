"""T5: a shared embedding, a :class:`~attention_jax.nn.TransformerEncoder` and a
:class:`~attention_jax.nn.TransformerDecoder`, and its Hugging Face checkpoints.

T5 runs pre-norm blocks with RMSNorm (no bias), unscaled scores (``scale=1``), no biases, and a
learned relative position bias (bidirectional in the encoder, causal buckets in the decoder): one
table per stack, stored in its first layer and read by every layer (the stacks'
``shared_attention=("relative_bias",)``, so its gradient sums every layer's use, as in Hugging Face).
The MLP is ``relu`` (T5) or gated GELU (``gated-gelu``, T5 v1.1: ``wi_0`` the gate,
``wi_1`` the up projection). Logits read the shared embedding after scaling the decoder output by
``D ** -0.5`` (T5; not T5 v1.1, which has a separate ``lm_head``).

Generation runs through :func:`attention_jax.generate` with the encoder output as ``model_inputs``:

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> config = T5Config(vocab_size=64, features=16, num_layers=1, num_heads=2, head_dim=8, mlp_features=32)
>>> model = T5Model(config, rngs=nnx.Rngs(0))
>>> inputs = jnp.ones((2, 5), jnp.int32)
>>> context = model.encode(inputs, lengths=jnp.array([5, 3]))
>>> start = jnp.zeros((2, 1), jnp.int32)  # decoder_start_token_id
>>> aj.generate(model, start, max_new_tokens=3,
...             model_inputs={"context": context, "context_lengths": jnp.array([5, 3])}).shape
(2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
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

__all__ = ["T5Config", "T5Model", "build", "from_pretrained", "to_hf_weights", "to_pretrained"]

Array = jax.Array

# Hugging Face's ``feed_forward_proj`` as our MLP kinds: "gelu" is the exact GELU, but T5 v1.1's "gated-gelu"
# means the tanh one (``gelu_new``).
ACTIVATIONS = {
    "relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu", "gated-gelu": "geglu", "gated-gelu_new": "geglu",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The shape of a T5 encoder-decoder.

    Attributes:
      vocab_size: V.
      features: D (``d_model``).
      num_layers, num_decoder_layers: encoder and decoder blocks (the decoder defaults to the encoder's).
      num_heads: N.
      head_dim: H (``d_kv``; N * H need not equal D).
      mlp_features: hidden width of the MLP (``d_ff``).
      mlp: our MLP kind (``"relu"``, or ``"geglu"`` for ``gated-gelu``).
      relative_buckets, relative_max_distance: the relative position bias.
      norm_epsilon: RMSNorm epsilon (``layer_norm_epsilon``).
      scale_outputs: scale the decoder output by ``D ** -0.5`` before the logits (T5, not v1.1).
      tie_embeddings: logits read the shared embedding; else a separate ``lm_head``.
    """

    vocab_size: int = 32128
    features: int = 512
    num_layers: int = 6
    num_decoder_layers: int | None = None
    num_heads: int = 8
    head_dim: int = 64
    mlp_features: int = 2048
    mlp: str = "relu"
    relative_buckets: int = 32
    relative_max_distance: int = 128
    norm_epsilon: float = 1e-6
    scale_outputs: bool = True
    tie_embeddings: bool = True

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], *, tie_embeddings: bool = True) -> T5Config:
        """Our config from a Hugging Face ``T5Config`` dict (``config.json``)."""
        proj = config.get("feed_forward_proj", "relu")
        if proj not in ACTIVATIONS:
            raise ValueError(f"T5Config: feed_forward_proj must be one of {tuple(ACTIVATIONS)}, got {proj!r}.")
        return cls(
            vocab_size=config["vocab_size"],
            features=config["d_model"],
            num_layers=config["num_layers"],
            num_decoder_layers=config.get("num_decoder_layers") or config["num_layers"],
            num_heads=config["num_heads"],
            head_dim=config["d_kv"],
            mlp_features=config["d_ff"],
            mlp=ACTIVATIONS[proj],
            relative_buckets=config.get("relative_attention_num_buckets", 32),
            relative_max_distance=config.get("relative_attention_max_distance", 128),
            norm_epsilon=config.get("layer_norm_epsilon", 1e-6),
            scale_outputs=config.get("scale_decoder_outputs", config.get("tie_word_embeddings", True) is not False),
            tie_embeddings=tie_embeddings,
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (the reverse of :meth:`from_hf`)."""
        proj = {"relu": "relu", "gelu_exact": "gelu", "gelu": "gelu_new", "geglu": "gated-gelu"}[self.mlp]
        return dict(
            architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=self.vocab_size,
            d_model=self.features, num_layers=self.num_layers,
            num_decoder_layers=self.num_decoder_layers or self.num_layers, num_heads=self.num_heads,
            d_kv=self.head_dim, d_ff=self.mlp_features, feed_forward_proj=proj,
            relative_attention_num_buckets=self.relative_buckets,
            relative_attention_max_distance=self.relative_max_distance, layer_norm_epsilon=self.norm_epsilon,
            scale_decoder_outputs=self.scale_outputs, tie_word_embeddings=self.tie_embeddings,
            is_encoder_decoder=True, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )  # fmt: skip


class T5Model(nnx.Module):
    """T5 (Hugging Face's ``T5ForConditionalGeneration``) from :mod:`attention_jax.nn` stacks.

    :meth:`encode` maps input tokens to ``context [B, S, D]``; a call maps decoder tokens and that
    context to logits, decoding with ``cache=`` from :meth:`init_cache` as ``aj.generate`` expects.
    """

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        self.config = config
        d, dtypes = config.features, dict(dtype=dtype, param_dtype=param_dtype)
        attention = functools.partial(
            ajnn.MultiHeadAttention, num_heads=config.num_heads, head_dim=config.head_dim, scale=1.0, **dtypes
        )
        relative = functools.partial(
            attention, relative_buckets=config.relative_buckets, relative_max_distance=config.relative_max_distance
        )
        block = ajnn.BlockConfig(
            num_heads=config.num_heads, mlp=config.mlp, mlp_features=config.mlp_features, norm="rms",
            norm_epsilon=config.norm_epsilon, **dtypes,
        )  # fmt: skip
        self.embed = nnx.Embed(config.vocab_size, d, **dtypes, rngs=rngs)
        self.encoder = ajnn.TransformerEncoder(
            config.num_layers, d, attention=functools.partial(relative, relative_bidirectional=True), config=block,
            shared_attention=("relative_bias",), rngs=rngs,
        )  # fmt: skip
        self.decoder = ajnn.TransformerDecoder(
            config.num_decoder_layers or config.num_layers, d,
            attention=functools.partial(relative, relative_bidirectional=False), cross_attention=attention,
            config=block, shared_attention=("relative_bias",), rngs=rngs,
        )  # fmt: skip
        tied = config.tie_embeddings
        self.head = nnx.data(None) if tied else nnx.Linear(d, config.vocab_size, use_bias=False, **dtypes, rngs=rngs)

    def encode(self, tokens: Array, *, lengths: Array | None = None, deterministic: bool | None = None) -> Array:
        """Encoder output ``[B, S, D]`` of ``tokens [B, S]`` (int), right-padded to ``lengths [B]``."""
        _check_tokens("tokens", tokens)
        return self.encoder(self.embed(tokens), lengths=lengths, deterministic=deterministic)

    def __call__(
        self,
        tokens: Array,
        *,
        context: Array,
        context_lengths: Array | None = None,
        mask: masks_lib.Mask | Array | None = None,
        lengths: Array | None = None,
        cache: Sequence | None = None,
        deterministic: bool | None = None,
    ):
        """Logits ``[B, T, V]`` of decoder ``tokens [B, T]`` attending to ``context [B, S, D]``.

        ``context_lengths [B]`` masks the context's right padding; with ``cache`` returns ``(logits, caches)``.
        """
        _check_tokens("tokens", tokens)
        out = self.decoder(
            self.embed(tokens), context, mask=mask, context_lengths=context_lengths, lengths=lengths, cache=cache,
            deterministic=deterministic,
        )  # fmt: skip
        x, cache = out if cache is not None else (out, None)
        if self.config.scale_outputs:
            x = x * jnp.asarray(self.config.features**-0.5, x.dtype)
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # [B, T, V]
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch_size: int, max_length: int, **options) -> tuple:
        """The decoder's self-attention caches (cross-attention reads ``context`` at every step)."""
        return self.decoder.init_cache(batch_size, max_length, **options)


def _check_tokens(name: str, tokens) -> None:
    if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(
            f"T5Model: {name} must be integers of shape [B, T], got {jnp.result_type(tokens)} {jnp.shape(tokens)}."
        )


def build(config: T5Config, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32) -> T5Model:
    """A randomly initialised :class:`T5Model` of ``config``."""
    return T5Model(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def load_weights(model: T5Model, weights: Mapping[str, np.ndarray]) -> None:
    """Copy Hugging Face T5 ``weights`` (name -> array) into ``model``, in place."""
    c = model.config
    n, h, d = c.num_heads, c.head_dim, c.features

    def put(param, name, fn=lambda w: w):
        assign(param, fn(take(weights, name)), name)

    def attention(attn, name, table=None):
        for proj, key in ((attn.query, "q"), (attn.key, "k"), (attn.value, "v")):
            put(proj.kernel, f"{name}.{key}.weight", lambda w: w.T.reshape(d, n, h))  # [N*H, D] -> [D, N, H]
        put(attn.out.kernel, f"{name}.o.weight", lambda w: w.T.reshape(n, h, d))  # [D, N*H] -> [N, H, D]
        if table is not None:  # one table per stack: the first layer's, shared by the others
            put(attn.relative_bias, table)

    def mlp(ffn, name):
        if ffn.gate is None:
            put(ffn.up.kernel, f"{name}.wi.weight", np.transpose)
        else:
            put(ffn.gate.kernel, f"{name}.wi_0.weight", np.transpose)
            put(ffn.up.kernel, f"{name}.wi_1.weight", np.transpose)
        put(ffn.down.kernel, f"{name}.wo.weight", np.transpose)

    put(model.embed.embedding, "shared.weight")
    for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        table = f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"  # [buckets, N]
        for i, block in enumerate(stack.blocks):
            g = f"{stack_name}.block.{i}.layer."
            attention(block.attention, g + "0.SelfAttention", table if i == 0 else None)
            put(block.attention_norm.scale, g + "0.layer_norm.weight")
            last = 1
            if block.cross_attention is not None:
                attention(block.cross_attention, g + "1.EncDecAttention")
                put(block.cross_norm.scale, g + "1.layer_norm.weight")
                last = 2
            mlp(block.mlp, f"{g}{last}.DenseReluDense")
            put(block.mlp_norm.scale, f"{g}{last}.layer_norm.weight")
        put(stack.final_norm.scale, f"{stack_name}.final_layer_norm.weight")
    if model.head is not None:
        put(model.head.kernel, "lm_head.weight", np.transpose)


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> T5Model:
    """T5 from a local Hugging Face checkpoint directory (``config.json`` + safetensors), no torch.

    A checkpoint with its own ``lm_head.weight`` (T5 v1.1) gets a separate head.
    """
    weights = read_weights(path)
    config = T5Config.from_hf(read_config(path), tie_embeddings="lm_head.weight" not in weights)
    model = unfilled(lambda: build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    load_weights(model, weights)
    return check_filled(model)


def to_hf_weights(model: T5Model) -> dict[str, np.ndarray]:
    """The Hugging Face ``T5ForConditionalGeneration`` tensors of ``model`` (the reverse of :func:`load_weights`).

    Each stack's relative bias table is written from its first layer (Hugging Face keeps one).
    """
    d, out = model.config.features, {}

    def get(param) -> np.ndarray:
        return np.asarray(jax.device_get(param[...]))

    def attention(attn, name):
        for proj, key in ((attn.query, "q"), (attn.key, "k"), (attn.value, "v")):
            out[f"{name}.{key}.weight"] = get(proj.kernel).reshape(d, -1).T  # [N*H, D]
        out[f"{name}.o.weight"] = get(attn.out.kernel).reshape(-1, d).T  # [D, N*H]

    def mlp(ffn, name):
        if ffn.gate is None:
            out[f"{name}.wi.weight"] = get(ffn.up.kernel).T
        else:
            out[f"{name}.wi_0.weight"], out[f"{name}.wi_1.weight"] = get(ffn.gate.kernel).T, get(ffn.up.kernel).T
        out[f"{name}.wo.weight"] = get(ffn.down.kernel).T

    out["shared.weight"] = get(model.embed.embedding)
    for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        table = f"{stack_name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        out[table] = get(stack.blocks[0].attention.relative_bias)
        for i, block in enumerate(stack.blocks):
            g = f"{stack_name}.block.{i}.layer."
            attention(block.attention, g + "0.SelfAttention")
            out[g + "0.layer_norm.weight"] = get(block.attention_norm.scale)
            last = 1
            if block.cross_attention is not None:
                attention(block.cross_attention, g + "1.EncDecAttention")
                out[g + "1.layer_norm.weight"] = get(block.cross_norm.scale)
                last = 2
            mlp(block.mlp, f"{g}{last}.DenseReluDense")
            out[f"{g}{last}.layer_norm.weight"] = get(block.mlp_norm.scale)
        out[f"{stack_name}.final_layer_norm.weight"] = get(stack.final_norm.scale)
    if model.head is not None:
        out["lm_head.weight"] = get(model.head.kernel).T
    return out


def to_pretrained(model: T5Model, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face T5 checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, to_hf_weights(model), model.config.to_hf())
