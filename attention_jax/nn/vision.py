"""Attention for vision: channel and spatial attention for CNNs (NHWC), and a small Vision Transformer.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> x = jnp.ones((2, 8, 8, 16))                              # [B, H, W, C]
>>> CBAM(16, reduction=4, rngs=nnx.Rngs(0))(x).shape
(2, 8, 8, 16)
>>> vit = VisionTransformer(image_size=8, patch_size=4, in_channels=16, num_classes=10, features=32, depth=1,
...                         num_heads=4, rngs=nnx.Rngs(0))
>>> vit(x).shape
(2, 10)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax.functional.vision import (
    cbam,
    eca_kernel_size,
    efficient_channel_attention,
    patchify,
    spatial_attention,
    squeeze_excitation,
)
from attention_jax.nn._heads import positive_int
from attention_jax.nn.blocks import AttentionFactory, BlockConfig, block_config
from attention_jax.nn.transformer import TransformerEncoder

Array = jax.Array

__all__ = [
    "SqueezeExcitation",
    "EfficientChannelAttention",
    "SpatialAttention",
    "CBAM",
    "PatchEmbedding",
    "VisionTransformer",
]

_kernel_init = nnx.initializers.lecun_normal()


class _ChannelMLP(nnx.Module):
    """The bottleneck ``C -> C / reduction -> C`` of SE and CBAM, as raw parameters for the functional ops."""

    def __init__(self, channels: int, reduction: int, rngs: nnx.Rngs):
        positive_int("channels", channels)
        positive_int("reduction", reduction)
        hidden = max(1, channels // reduction)
        self.w_reduce = nnx.Param(_kernel_init(rngs.params(), (channels, hidden)))
        self.b_reduce = nnx.Param(jnp.zeros((hidden,)))
        self.w_expand = nnx.Param(_kernel_init(rngs.params(), (hidden, channels)))
        self.b_expand = nnx.Param(jnp.zeros((channels,)))

    def params(self) -> dict[str, Array]:
        names = ("w_reduce", "b_reduce", "w_expand", "b_expand")
        return {name: getattr(self, name)[...] for name in names}


class SqueezeExcitation(nnx.Module):
    """Squeeze-and-Excitation (Hu et al., 2018) on NHWC feature maps.

    Args:
      channels: C.
      reduction: the bottleneck is ``max(1, C // reduction)`` wide.
    """

    def __init__(self, channels: int, *, reduction: int = 16, rngs: nnx.Rngs):
        self.mlp = _ChannelMLP(channels, reduction, rngs)

    def __call__(self, x: Array) -> Array:
        return squeeze_excitation(x, **self.mlp.params())


class EfficientChannelAttention(nnx.Module):
    """ECA (Wang et al., 2020): a 1-D convolution of size k across the pooled channels, no bottleneck.

    Args:
      channels: C.
      kernel_size: k (odd); default adaptive, :func:`attention_jax.functional.vision.eca_kernel_size`.
      gamma, b: the adaptive rule's constants.

    >>> from flax import nnx
    >>> EfficientChannelAttention(64, rngs=nnx.Rngs(0)).kernel.shape   # k = 3 for C = 64
    (3,)
    """

    def __init__(self, channels: int, *, kernel_size: int | None = None, gamma: int = 2, b: int = 1, rngs):
        k = (
            eca_kernel_size(channels, gamma=gamma, b=b)
            if kernel_size is None
            else positive_int("kernel_size", kernel_size)
        )
        if k % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size=}.")
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (k,), minval=-1.0, maxval=1.0) / k**0.5)

    def __call__(self, x: Array) -> Array:
        return efficient_channel_attention(x, kernel=self.kernel[...])


class SpatialAttention(nnx.Module):
    """CBAM's spatial attention: a ``k x k`` convolution of the channel mean and max, then a sigmoid gate.

    Args:
      kernel_size: k (7 in the paper).
    """

    def __init__(self, *, kernel_size: int = 7, rngs: nnx.Rngs):
        positive_int("kernel_size", kernel_size)
        self.kernel = nnx.Param(_kernel_init(rngs.params(), (kernel_size, kernel_size, 2, 1)))
        self.bias = nnx.Param(jnp.zeros((1,)))

    def __call__(self, x: Array) -> Array:
        return spatial_attention(x, kernel=self.kernel[...], bias=self.bias[...])


class CBAM(nnx.Module):
    """Convolutional Block Attention Module (Woo et al., 2018): channel attention, then spatial attention.

    Args:
      channels: C.
      reduction: the channel MLP's bottleneck is ``max(1, C // reduction)`` wide.
      kernel_size: the spatial convolution's size.
    """

    def __init__(self, channels: int, *, reduction: int = 16, kernel_size: int = 7, rngs: nnx.Rngs):
        self.mlp = _ChannelMLP(channels, reduction, rngs)
        self.spatial = SpatialAttention(kernel_size=kernel_size, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return cbam(
            x, **self.mlp.params(), spatial_kernel=self.spatial.kernel[...], spatial_bias=self.spatial.bias[...]
        )


class PatchEmbedding(nnx.Module):
    """Non-overlapping ``P x P`` patches, each linearly embedded: ``[B, H, W, C] -> [B, (H/P)(W/P), D]``.

    ``proj.kernel [P*P*C, D]`` reads each patch flattened as ``(row, column, channel)``: a ``P x P``
    convolution of stride P, as ViT checkpoints store it (``[D, C, P, P]``), is this kernel transposed.
    """

    def __init__(
        self, patch_size: int, in_channels: int, features: int, *, dtype: Any = None, param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):  # fmt: skip
        self.patch_size = positive_int("patch_size", patch_size)
        self.proj = nnx.Linear(
            patch_size * patch_size * in_channels, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, images: Array) -> Array:
        return self.proj(patchify(images, self.patch_size))


# The blocks of the original ViT: pre-LayerNorm, a GELU MLP 4D wide, no biases (``config=`` replaces these).
VIT_BLOCK = BlockConfig(num_heads=4, mlp="gelu", norm="layer")


class VisionTransformer(nnx.Module):
    """Vision Transformer (Dosovitskiy et al., 2021): patches + class token + learned positions + encoder.

    Args:
      image_size: H = W, or ``(H, W)``; patch_size must divide both.
      patch_size: P.
      in_channels: C.
      num_classes: width of the classification head (applied to the class token), or None for no
        head: the model is then a backbone whose call returns the hidden states.
      features: D, the model width.
      depth: number of encoder blocks.
      attention: an attention factory, ``factory(features, rngs=rngs)`` (see
        :data:`attention_jax.nn.blocks.AttentionFactory`); default ``MultiHeadAttention`` with
        ``config.num_heads`` heads and no mask.
        Any module of the attention-layer protocol (:class:`attention_jax.nn.AttentionLayer`) fits, e.g.
        ``functools.partial(Performer, num_heads=4)`` or ``functools.partial(MultiHeadAttention, num_heads=4,
        pattern=aj.sparse_patterns.longformer(2, global_tokens=(0,)))``; :mod:`attention_jax.explain` reads
        the attention maps of any of them that records.
      qkv_bias, out_bias: biases on the default attention's query/key/value and output projections
        (Hugging Face's ViT has both); a custom ``attention`` factory sets its own.
      config: the block options, a :class:`~attention_jax.nn.BlockConfig`; default :data:`VIT_BLOCK`
        (4 heads, pre-LayerNorm with epsilon 1e-6, tanh-GELU MLP ``4 * D`` wide without biases).
        Keyword ``options`` (its field names: ``num_heads``, ``mlp``, ``mlp_features``, ``mlp_bias``,
        ``norm_epsilon``, ``dtype``, ...) override it; Hugging Face's ViT is ``mlp="gelu_exact",
        mlp_bias=True, norm_epsilon=1e-12``.
      rngs: as usual.

    The encoder is :class:`attention_jax.nn.TransformerEncoder` with ``config``'s blocks and (pre-norm)
    a final norm. Images are NHWC, ``[B, H, W, C]`` (a PyTorch ``[B, C, H, W]`` batch is
    ``x.transpose(0, 2, 3, 1)``). :meth:`encode` returns the final hidden states ``[B, 1 + L, D]``
    (class token first, then the L = (H/P)(W/P) patches in row-major order); the call returns
    the logits ``[B, num_classes]`` of the class token, or those hidden states when there is no head.

    A backbone in Hugging Face's ViT layout (no head: the call returns the hidden states):

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> backbone = VisionTransformer(image_size=8, patch_size=4, in_channels=16, num_classes=None, features=32,
    ...                              depth=1, num_heads=4, mlp="gelu_exact", mlp_bias=True, norm_epsilon=1e-12,
    ...                              qkv_bias=True, out_bias=True, rngs=nnx.Rngs(0))
    >>> backbone(jnp.ones((2, 8, 8, 16))).shape                  # [B, 1 + (8/4)(8/4), D]
    (2, 5, 32)
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int],
        patch_size: int,
        in_channels: int = 3,
        num_classes: int | None,
        features: int = 64,
        depth: int = 4,
        attention: AttentionFactory | None = None,
        qkv_bias: bool = False,
        out_bias: bool = False,
        config: BlockConfig | None = None,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = block_config(VIT_BLOCK if config is None else config, options)
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        positive_int("patch_size", patch_size)
        if height % patch_size or width % patch_size:
            raise ValueError(f"patch_size must divide the image size, got {patch_size=} and {image_size=}.")
        for name, value in (("features", features), ("depth", depth), ("in_channels", in_channels)):
            positive_int(name, value)
        if num_classes is not None:
            positive_int("num_classes", num_classes)
        if attention is not None and (qkv_bias or out_bias):
            raise ValueError(
                f"qkv_bias and out_bias configure the default attention; give them to the attention factory "
                f"instead, got {qkv_bias=}, {out_bias=} and attention={attention!r}."
            )
        if attention is None:
            attention = config.default_attention(qkv_bias=qkv_bias, out_bias=out_bias)
        num_patches = (height // patch_size) * (width // patch_size)
        dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.image_shape = (height, width, in_channels)
        self.embed = PatchEmbedding(patch_size, in_channels, features, **dtypes, rngs=rngs)
        self.class_token = nnx.Param(jnp.zeros((1, 1, features), config.param_dtype))
        self.positions = nnx.Param(
            nnx.initializers.normal(0.02)(rngs.params(), (1, num_patches + 1, features), config.param_dtype)
        )
        self.encoder = TransformerEncoder(depth, features, attention=attention, config=config, rngs=rngs)
        self.head = (
            nnx.Linear(features, num_classes, **dtypes, rngs=rngs) if num_classes is not None else nnx.data(None)
        )

    def encode(self, images: Array, *, deterministic: bool | None = None) -> Array:
        """The final hidden states ``[B, 1 + L, D]`` (class token first) of NHWC ``images [B, H, W, C]``."""
        if images.ndim != 4 or images.shape[1:] != self.image_shape:
            raise ValueError(
                f"images must be NHWC [B, H, W, C] with (H, W, C)={self.image_shape}, got shape {images.shape}."
            )
        tokens = self.embed(images)  # [B, L, D]
        cls = jnp.broadcast_to(self.class_token[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[2]))
        x = jnp.concatenate([cls, tokens], axis=1) + self.positions[...].astype(tokens.dtype)  # [B, 1 + L, D]
        return self.encoder(x, deterministic=deterministic)  # after the final norm (pre-norm blocks)

    def __call__(self, images: Array, *, deterministic: bool | None = None) -> Array:
        """Logits ``[B, num_classes]`` of NHWC ``images [B, H, W, C]``; without a head, :meth:`encode`."""
        hidden = self.encode(images, deterministic=deterministic)  # [B, 1 + L, D]
        return hidden if self.head is None else self.head(hidden[:, 0])  # the class token's state
