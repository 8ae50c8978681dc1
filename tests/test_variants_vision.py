"""Channel and spatial attention (SE, ECA, CBAM) against their formulas, and a Vision Transformer that trains."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close

from attention_jax.functional.vision import (
    cbam,
    eca_kernel_size,
    efficient_channel_attention,
    patchify,
    spatial_attention,
    squeeze_excitation,
)
from attention_jax.nn.linear import LinearAttention
from attention_jax.nn.vision import CBAM, EfficientChannelAttention, SqueezeExcitation, VisionTransformer


def randn(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def f64(*xs):
    return [np.asarray(x, np.float64) for x in xs]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_mlp(p, w1, b1, w2, b2):
    return np.maximum(p @ w1 + b1, 0) @ w2 + b2


def np_spatial(x, kernel, bias):
    """``sigmoid(conv_kxk([mean_C; max_C]) + b)`` with zero 'same' padding, written as loops."""
    desc = np.stack([x.mean(-1), x.max(-1)], axis=-1)  # [B, H, W, 2]
    k = kernel.shape[0]
    padded = np.pad(desc, [(0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)])
    logits = np.zeros(x.shape[:3])
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            logits[:, i, j] = np.einsum("Bhwc,hwc->B", padded[:, i : i + k, j : j + k], kernel[..., 0]) + bias[0]
    return x * sigmoid(logits)[..., None]


MLP = dict(w_reduce=randn(1, 8, 2), b_reduce=randn(2, 2), w_expand=randn(3, 2, 8), b_expand=randn(4, 8))


def test_channel_attention_matches_formulas():
    x = randn(0, 2, 5, 5, 8)  # [B, H, W, C]
    xn, w1, b1, w2, b2 = f64(x, *MLP.values())
    se = xn * sigmoid(np_mlp(xn.mean((1, 2)), w1, b1, w2, b2))[:, None, None, :]  # Hu et al. (2018)
    assert_close(jax.jit(lambda x: squeeze_excitation(x, **MLP))(x), jnp.asarray(se, jnp.float32))
    kernel = randn(5, 3)
    pooled = np.pad(xn.mean((1, 2)), [(0, 0), (1, 1)])
    conv = sum(np.asarray(kernel[i], np.float64) * pooled[:, i : i + 8] for i in range(3))  # Wang et al. (2020)
    eca = jax.jit(lambda x, k: efficient_channel_attention(x, kernel=k))(x, kernel)
    assert_close(eca, jnp.asarray(xn * sigmoid(conv)[:, None, None, :], jnp.float32))
    assert [eca_kernel_size(c) for c in (16, 64, 256, 512)] == [3, 3, 5, 5]


def test_spatial_attention_and_cbam_match_formulas():
    x = randn(6, 2, 5, 6, 8)
    kernel, bias = randn(7, 3, 3, 2, 1), randn(8, 1)
    xn, kn, bn, w1, b1, w2, b2 = f64(x, kernel, bias, *MLP.values())
    spatial = jax.jit(lambda x: spatial_attention(x, kernel=kernel, bias=bias))(x)
    assert_close(spatial, jnp.asarray(np_spatial(xn, kn, bn), jnp.float32))
    channel = (
        xn * sigmoid(np_mlp(xn.mean((1, 2)), w1, b1, w2, b2) + np_mlp(xn.max((1, 2)), w1, b1, w2, b2))[:, None, None, :]
    )  # Woo et al. (2018): shared MLP on average- and max-pooled channels, then the spatial map
    out = jax.jit(lambda x: cbam(x, **MLP, spatial_kernel=kernel, spatial_bias=bias))(x)
    assert_close(out, jnp.asarray(np_spatial(channel, kn, bn), jnp.float32))


def test_modules_apply_their_parameters():
    x = randn(9, 2, 4, 4, 16)
    forward = nnx.jit(lambda layer, x: layer(x))
    se = SqueezeExcitation(16, reduction=4, rngs=nnx.Rngs(0))
    assert_close(forward(se, x), squeeze_excitation(x, **se.mlp.params()))
    eca = EfficientChannelAttention(16, rngs=nnx.Rngs(0))
    assert_close(forward(eca, x), efficient_channel_attention(x, kernel=eca.kernel[...]))
    block = CBAM(16, reduction=4, kernel_size=3, rngs=nnx.Rngs(0))
    grads = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x) ** 2)))(block, x)
    chex.assert_tree_all_finite(grads)


def test_patchify_reads_patches_in_row_major_order():
    images = jnp.arange(2 * 4 * 6 * 3, dtype=jnp.float32).reshape(2, 4, 6, 3)
    patches = patchify(images, 2)  # [B, (4/2)(6/2), 2*2*3]
    chex.assert_shape(patches, (2, 6, 12))
    np.testing.assert_array_equal(patches[1, 4], images[1, 2:4, 2:4].reshape(-1))  # patch row 1, column 1


def stripes(rng, n):
    """Toy images ``[n, 8, 8, 1]``: class 0 has a horizontal bar, class 1 a vertical one, plus noise."""
    labels = rng.integers(0, 2, n)
    pos = rng.integers(0, 8, n)
    images = 0.3 * rng.standard_normal((n, 8, 8, 1))
    for i in range(n):
        if labels[i]:
            images[i, :, pos[i]] += 1.0
        else:
            images[i, pos[i], :] += 1.0
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)


def test_vision_transformer_trains_on_cpu_and_takes_any_attention():
    rng = np.random.default_rng(0)
    model = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=2, features=16, depth=1,
                              num_heads=2, rngs=nnx.Rngs(0))  # fmt: skip
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, images, labels):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, *stripes(rng, 32))) for _ in range(60)]
    images, labels = stripes(rng, 128)
    accuracy = float(jnp.mean(jnp.argmax(nnx.jit(lambda m, x: m(x))(model, images), -1) == labels))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]) and accuracy > 0.85, (losses[::10], accuracy)
    plugged = functools.partial(LinearAttention, num_heads=2)  # any attention factory(features, rngs=rngs)
    linear_vit = VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=2, features=16, depth=1,
                                   attention=plugged, rngs=nnx.Rngs(0))  # fmt: skip
    assert isinstance(linear_vit.encoder.blocks[0].attention, LinearAttention)
    chex.assert_shape(nnx.jit(lambda m, x: m(x))(linear_vit, images[:2]), (2, 2))


def test_vision_transformer_takes_block_options():
    """The block options reach every layer (Hugging Face's ViT layout); the defaults stay the original ViT's."""
    hf_layout = dict(mlp="gelu_exact", mlp_bias=True, norm_epsilon=1e-12, qkv_bias=True, out_bias=True)
    vit = functools.partial(VisionTransformer, image_size=8, patch_size=4, in_channels=1, features=8)
    abstract = lambda **kw: nnx.eval_shape(lambda: vit(**kw, rngs=nnx.Rngs(0)))  # structure only: no init
    backbone = abstract(num_classes=None, depth=2, num_heads=2, mlp_features=12, **hf_layout)
    assert backbone.head is None
    for block in backbone.encoder.blocks:
        attn, mlp = block.attention, block.mlp
        assert attn.num_heads == 2 and attn.query.bias is not None and attn.out.bias is not None
        assert mlp.kind == "gelu_exact" and mlp.up.bias is not None and mlp.up.kernel.shape == (8, 12)
        assert block.attention_norm.epsilon == block.mlp_norm.epsilon == 1e-12
    assert backbone.encoder.final_norm.epsilon == 1e-12
    block = abstract(num_classes=2, depth=1).encoder.blocks[0]
    assert block.attention.num_heads == 4 and block.attention.query.bias is None and block.attention.out.bias is None
    assert block.mlp.kind == "gelu" and block.mlp.up.bias is None and block.mlp.up.kernel.shape == (8, 32)
    assert isinstance(block.mlp_norm, nnx.LayerNorm) and block.mlp_norm.epsilon == 1e-6
    with pytest.raises(ValueError, match="qkv_bias"):
        vit(num_classes=2, attention=functools.partial(LinearAttention, num_heads=2), qkv_bias=True, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unexpected keyword"):
        vit(num_classes=2, mlp_size=8, rngs=nnx.Rngs(0))


def test_bad_configurations_raise():
    x = randn(0, 1, 4, 4, 8)
    with pytest.raises(ValueError, match="odd"):
        efficient_channel_attention(x, kernel=jnp.ones(4))
    with pytest.raises(ValueError, match="C=8"):
        squeeze_excitation(x, **{**MLP, "w_reduce": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match="patch_size"):
        patchify(x, 3)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(image_size=8, patch_size=3, num_classes=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="NHWC"):
        spatial_attention(x[0], kernel=jnp.ones((3, 3, 2, 1)))
