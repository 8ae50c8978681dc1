"""ViT as a configuration of :class:`attention_jax.nn.VisionTransformer`, and its Hugging Face checkpoints.

Hugging Face's ViT (``ViTModel``, ``ViTForImageClassification``) embeds ``P x P`` patches with a
stride-P convolution, prepends a class token, adds learned positions and runs pre-LayerNorm blocks with
biases in every projection (query/key/value as ``qkv_bias`` says), the exact (erf) GELU and
``layer_norm_eps`` (1e-12 by default), then a final LayerNorm. ``ViTModel`` may add a pooler
(``tanh(Linear(h[:, 0]))``); ``ViTForImageClassification`` a linear classifier on the class token.

Images are NHWC, ``[B, H, W, C]``, cut into L = (H/P)(W/P) patches; Hugging Face's ``pixel_values``
are ``[B, C, H, W]`` (``pixel_values.transpose(0, 2, 3, 1)`` is our input). Tensor layouts (``nn.Linear`` weights are
``[out, in]``): the convolution ``[D, C, P, P]`` becomes the patch kernel ``[P*P*C, D]`` (rows in
``(row, column, channel)`` order), ``query``/``key``/``value`` ``[N*H, D]`` become ``[D, N, H]``, the
attention output ``[D, N*H]`` becomes ``[N, H, D]``. Position embeddings are not interpolated: the
model takes the checkpoint's image size only.

Loading a directory written by ``save_pretrained`` (``pixel_values`` from an image processor)::

    model = from_pretrained(path)                            # a ViTModel, with the checkpoint's head if any
    images = pixel_values.transpose(0, 2, 3, 1)              # [B, C, H, W] -> NHWC [B, H, W, C]
    logits = model(images)                                   # [B, num_classes] (no head: the hidden states)
    hidden = model.encode(images)                            # [B, 1 + L, D], class token first

The config of a ``config.json``:

>>> config = from_config({"architectures": ["ViTForImageClassification"], "image_size": 224, "patch_size": 16,
...                       "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
...                       "intermediate_size": 3072, "id2label": {"0": "cat", "1": "dog"}})
>>> config.num_classes, config.mlp, config.norm_epsilon, config.qkv_bias
(2, 'gelu_exact', 1e-12, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from attention_jax import nn as ajnn
from attention_jax.models._loading import check_filled, fill, read_config, read_weights, take, unfilled, write_weights
from attention_jax.models.bert import ACTIVATIONS
from attention_jax.models.llama import Entry, export, same, transpose

__all__ = ["ViTConfig", "ViTModel", "build", "from_config", "from_pretrained", "to_pretrained", "to_hf_weights"]

Array = jax.Array

# Hugging Face's ``pooler_act`` names.
POOLER_ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": jax.nn.gelu,
    "linear": lambda x: x,
}


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """The shape of a ViT.

    Attributes:
      image_size: H = W, or ``(H, W)`` (``image_size``).
      patch_size: P (``patch_size``).
      num_channels: C (``num_channels``).
      features: D (``hidden_size``).
      num_layers: blocks (``num_hidden_layers``).
      num_heads: N (``num_attention_heads``); H = D / N.
      mlp_features: hidden width of the MLP (``intermediate_size``).
      norm_epsilon: LayerNorm epsilon (``layer_norm_eps``).
      mlp: our MLP kind (``"gelu_exact"``: Hugging Face's ``gelu``).
      qkv_bias: biases on queries, keys and values (``qkv_bias``); the output projection always has one.
      num_classes: classifier width (``num_labels`` of ``ViTForImageClassification``), None for no head.
      pooler: whether the model has ``ViTModel``'s pooler.
      pooler_features: the pooler's width (``pooler_output_size``), default D.
      pooler_act: the pooler's activation (``pooler_act``).
    """

    image_size: int | tuple[int, int] = 224
    patch_size: int = 16
    num_channels: int = 3
    features: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_features: int = 3072
    norm_epsilon: float = 1e-12
    mlp: str = "gelu_exact"
    qkv_bias: bool = True
    num_classes: int | None = None
    pooler: bool = False
    pooler_features: int | None = None
    pooler_act: str = "tanh"

    def __post_init__(self):
        if self.features % self.num_heads:
            raise ValueError(f"ViTConfig: num_heads must divide features, got {self.num_heads=} {self.features=}.")
        if self.pooler_act not in POOLER_ACTIVATIONS:
            raise ValueError(
                f"ViTConfig: pooler_act must be one of {tuple(POOLER_ACTIVATIONS)}, got {self.pooler_act!r}."
            )

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> ViTConfig:
        """Our config from a Hugging Face ``ViTConfig`` dict (``config.json``).

        The head and pooler follow ``architectures`` (``ViTForImageClassification``: a head of
        ``num_labels`` classes; ``ViTModel``: a pooler); :func:`from_pretrained` corrects both from the
        tensors the checkpoint actually holds.
        """
        model_type = config.get("model_type", "vit")
        if model_type != "vit":
            raise ValueError(f"ViTConfig: model_type must be 'vit', got {model_type!r}.")
        act = config.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig: hidden_act must be one of {tuple(ACTIVATIONS)}, got {act!r}.")
        features, num_heads = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim")
        if head_dim is not None and head_dim * num_heads != features:
            raise ValueError(
                f"ViTConfig: head_dim must be hidden_size / num_attention_heads = {features // num_heads}, "
                f"got head_dim={head_dim}."
            )
        patch = config.get("patch_size", 16)
        if not isinstance(patch, int):
            if len(set(patch)) != 1:
                raise ValueError(f"ViTConfig: only square patches load, got patch_size={patch!r}.")
            patch = patch[0]
        size = config.get("image_size", 224)
        architectures = config.get("architectures") or []
        classifier = "ViTForImageClassification" in architectures
        num_labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
        return cls(
            image_size=size if isinstance(size, int) else tuple(size),
            patch_size=patch,
            num_channels=config.get("num_channels", 3),
            features=features,
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            mlp_features=config["intermediate_size"],
            norm_epsilon=config.get("layer_norm_eps", 1e-12),
            mlp=ACTIVATIONS[act],
            qkv_bias=config.get("qkv_bias", True),
            num_classes=num_labels if classifier and num_labels > 0 else None,
            pooler="ViTModel" in architectures,
            pooler_features=config.get("pooler_output_size"),
            pooler_act=config.get("pooler_act", "tanh"),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face ``config.json`` dict of this config (the reverse of :meth:`from_hf`)."""
        act = {"gelu_exact": "gelu", "gelu": "gelu_new", "relu": "relu"}[self.mlp]
        out = dict(
            architectures=["ViTModel" if self.num_classes is None else "ViTForImageClassification"],
            model_type="vit", image_size=self.image_size if isinstance(self.image_size, int) else list(self.image_size),
            patch_size=self.patch_size, num_channels=self.num_channels, hidden_size=self.features,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            intermediate_size=self.mlp_features, hidden_act=act, layer_norm_eps=self.norm_epsilon,
            qkv_bias=self.qkv_bias, pooler_output_size=self.pooler_features or self.features,
            pooler_act=self.pooler_act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            encoder_stride=self.patch_size,
        )  # fmt: skip
        if self.num_classes is not None:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_classes)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_classes)}
        return out

    @property
    def head_dim(self) -> int:
        return self.features // self.num_heads


def from_config(config: Mapping[str, Any]) -> ViTConfig:
    """Our :class:`ViTConfig` of a Hugging Face ``config.json`` dict (:meth:`ViTConfig.from_hf`)."""
    return ViTConfig.from_hf(config)


class ViTModel(ajnn.VisionTransformer):
    """Hugging Face's ViT as an :class:`~attention_jax.nn.VisionTransformer`, plus ``ViTModel``'s pooler.

    The call returns the classifier's logits ``[B, num_classes]``, or without a head the hidden
    states ``[B, 1 + L, D]`` (``last_hidden_state``); :meth:`encode` always the hidden states and
    :meth:`pool` the pooled output ``[B, pooler_features]``.

    Args:
      config: a :class:`ViTConfig`.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: as usual. No dropout: a loaded model runs inference or fine-tunes without it.
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32):
        block = ajnn.BlockConfig(
            num_heads=config.num_heads, mlp=config.mlp, mlp_features=config.mlp_features, mlp_bias=True,
            norm="layer", norm_epsilon=config.norm_epsilon, norm_position="pre", deterministic=True, dtype=dtype,
            param_dtype=param_dtype,
        )  # fmt: skip
        super().__init__(
            image_size=config.image_size, patch_size=config.patch_size, in_channels=config.num_channels,
            num_classes=config.num_classes, features=config.features, depth=config.num_layers,
            qkv_bias=config.qkv_bias, out_bias=True, config=block, rngs=rngs,
        )  # fmt: skip
        self.config = config
        width = config.pooler_features or config.features
        self.pooler = (
            nnx.Linear(config.features, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if config.pooler
            else nnx.data(None)
        )

    def pool(self, hidden: Array) -> Array:
        """The pooled output ``act(W h[:, 0] + b)`` ``[B, pooler_features]`` of hidden
        states ``[B, 1 + L, D]``."""
        if self.pooler is None:
            raise ValueError("ViTModel: this model has no pooler (config.pooler=False).")
        return POOLER_ACTIVATIONS[self.config.pooler_act](self.pooler(hidden[:, 0]))


def build(config: ViTConfig, *, rngs: nnx.Rngs, dtype: Any = None, param_dtype: Any = jnp.float32) -> ViTModel:
    """A randomly initialised :class:`ViTModel` of ``config``."""
    return ViTModel(config, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _prefix(weights: Mapping[str, np.ndarray]) -> str:
    """``"vit."`` for task checkpoints (``ViTForImageClassification``, ...), ``""`` for a bare ``ViTModel``."""
    return "vit." if "vit.embeddings.cls_token" in weights else ""


def entries(model: ViTModel, prefix: str) -> Iterator[Entry]:
    """Every tensor of a ViT checkpoint (encoder names under ``prefix``) against the model's variables."""
    config = model.config
    p, c, d, n, h = config.patch_size, config.num_channels, config.features, config.num_heads, config.head_dim

    def linear(name: str, layer) -> Iterator[Entry]:
        yield f"{name}.weight", layer.kernel, transpose, transpose
        yield f"{name}.bias", layer.bias, same, same

    def layer_norm(name: str, norm) -> Iterator[Entry]:
        yield f"{name}.weight", norm.scale, same, same
        yield f"{name}.bias", norm.bias, same, same

    e = prefix + "embeddings."
    yield e + "cls_token", model.class_token, same, same  # [1, 1, D]
    yield e + "position_embeddings", model.positions, same, same  # [1, 1 + L, D]
    yield (
        e + "patch_embeddings.projection.weight", model.embed.proj.kernel,  # [D, C, P, P] <-> [P*P*C, D]
        lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, d),
        lambda k: k.reshape(p, p, c, d).transpose(3, 2, 0, 1),
    )  # fmt: skip
    yield e + "patch_embeddings.projection.bias", model.embed.proj.bias, same, same
    for i, block in enumerate(model.encoder.blocks):
        g, attn = f"{prefix}encoder.layer.{i}.", block.attention
        yield from layer_norm(g + "layernorm_before", block.attention_norm)
        for name, proj in (("query", attn.query), ("key", attn.key), ("value", attn.value)):
            yield (
                f"{g}attention.attention.{name}.weight", proj.kernel,  # [N*H, D] <-> [D, N, H]
                lambda w: w.T.reshape(d, n, h), lambda k: k.reshape(d, n * h).T,
            )  # fmt: skip
            if proj.bias is not None:
                yield f"{g}attention.attention.{name}.bias", proj.bias, lambda b: b.reshape(n, h), np.ravel
        yield (
            g + "attention.output.dense.weight", attn.out.kernel,  # [D, N*H] <-> [N, H, D]
            lambda w: w.T.reshape(n, h, d), lambda k: k.reshape(n * h, d).T,
        )  # fmt: skip
        yield g + "attention.output.dense.bias", attn.out.bias, same, same
        yield from layer_norm(g + "layernorm_after", block.mlp_norm)
        yield from linear(g + "intermediate.dense", block.mlp.up)
        yield from linear(g + "output.dense", block.mlp.down)
    yield from layer_norm(prefix + "layernorm", model.encoder.final_norm)
    if model.pooler is not None:
        yield from linear(prefix + "pooler.dense", model.pooler)
    if model.head is not None:
        yield from linear("classifier", model.head)


def from_pretrained(path: str | Path, dtype: Any = jnp.float32) -> ViTModel:
    """ViT from a local Hugging Face checkpoint directory (``config.json`` + safetensors), no torch.

    Reads ``ViTModel`` (with or without its pooler) and ``ViTForImageClassification`` (``vit.`` names
    and a ``classifier``) checkpoints; other task checkpoints load their encoder. ``dtype``: parameters
    and computation.
    """
    weights = read_weights(path)
    prefix = _prefix(weights)
    classifier = weights.get("classifier.weight")
    config = dataclasses.replace(
        ViTConfig.from_hf(read_config(path)),
        num_classes=None if classifier is None else int(classifier.shape[0]),
        pooler=prefix + "pooler.dense.weight" in weights,
    )
    model = unfilled(lambda: build(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype))
    _load(entries(model, prefix), weights)
    return check_filled(model)


def _load(entries_: Iterator[Entry], weights: Mapping[str, np.ndarray]) -> None:
    """Set the entries' (abstract) variables from ``weights``, checking every shape."""
    for name, variable, to_ours, _ in entries_:
        fill(variable, to_ours(np.asarray(take(weights, name))), name)


def to_hf_weights(model: ViTModel) -> dict[str, np.ndarray]:
    """The Hugging Face tensors of ``model``: ``ViTForImageClassification`` names with a head, else ``ViTModel``."""
    return export(entries(model, "" if model.head is None else "vit."))


def to_pretrained(model: ViTModel, path: str | Path) -> None:
    """Write ``model`` as a Hugging Face checkpoint directory (``config.json`` + ``model.safetensors``)."""
    write_weights(path, to_hf_weights(model), model.config.to_hf())
