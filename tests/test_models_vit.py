"""ViT loaded from tiny random ``transformers`` checkpoints equals them: logits, hidden states, pooler, gradients.

Hugging Face's ``pixel_values`` are ``[B, C, H, W]``; ours are NHWC ``[B, H, W, C]``: the tests convert.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from attention_jax.models import vit

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOL = dict(rtol=2e-5, atol=2e-5)


def _perturb(hf):
    """Every parameter moved off its init (zero biases and identity LayerNorms would hide mapping errors)."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    hf = _perturb(transformers.ViTForImageClassification(config).float().eval())
    path = tmp_path_factory.mktemp("vit_classifier")
    hf.save_pretrained(path)
    return hf, vit.from_pretrained(path)


def _images(seed: int, shape) -> np.ndarray:
    """Random NCHW pixel values, float32."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _nhwc(pixels: np.ndarray) -> jax.Array:
    return jnp.asarray(pixels.transpose(0, 2, 3, 1))


# Parameter names of transformers 5 modules -> the checkpoint names (what save_pretrained writes).
_CHECKPOINT_NAMES = [
    (r"(^|\.)layers\.", r"\1encoder.layer."),
    (r"attention\.([qkv])_proj", lambda m: "attention.attention." + dict(q="query", k="key", v="value")[m[1]]),
    (r"attention\.o_proj", "attention.output.dense"),
    (r"mlp\.fc1", "intermediate.dense"),
    (r"mlp\.fc2", "output.dense"),
]


def _checkpoint_name(name: str) -> str:
    for pattern, replacement in _CHECKPOINT_NAMES:
        name = re.sub(pattern, replacement, name)
    return name


def test_classifier_matches_logits_hidden_states_and_gradients(classifier):
    hf, model = classifier
    assert model.config.num_classes == 3 and model.pooler is None
    assert model.config.norm_epsilon == 1e-12 and model.config.mlp == "gelu_exact"
    pixels = _images(1, (2, 3, 16, 16))
    rng = np.random.default_rng(2)
    w_logits, w_hidden = rng.normal(size=(2, 3)), rng.normal(size=(2, 17, 32))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, images):
        m = nnx.merge(graphdef, params, rest)
        hidden = m.encode(images)  # [B, 1 + P, D]
        logits = m.head(hidden[:, 0])  # what the call returns, without compiling the encoder twice
        return jnp.sum(logits * w_logits) + jnp.sum(hidden * w_hidden), (logits, hidden)

    images = _nhwc(pixels)
    (ours_loss, (logits, hidden)), (param_grads, pixel_grads) = jax.jit(
        jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    )(params, images)
    assert logits.shape == (2, 3) and hidden.shape == (2, 17, 32) and logits.dtype == jnp.float32

    x = torch.from_numpy(pixels).requires_grad_(True)
    hf.zero_grad()
    ref_hidden = hf.vit(x).last_hidden_state
    ref_logits = hf.classifier(ref_hidden[:, 0])
    np.testing.assert_allclose(np.asarray(logits), hf(torch.from_numpy(pixels)).logits.detach().numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden.detach().numpy(), **TOL)
    ref_loss = (ref_logits * torch.from_numpy(w_logits).float()).sum() + (
        ref_hidden * torch.from_numpy(w_hidden).float()
    ).sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(ours_loss), ref_loss.item(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(pixel_grads), x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    ours = vit.to_hf_weights(nnx.merge(graphdef, param_grads, rest))  # gradients under the checkpoint's names
    ref = {_checkpoint_name(name): p.grad.numpy() for name, p in hf.named_parameters()}
    assert set(ref) == set(ours)
    for name, g in ref.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_backbone_with_pooler_on_non_square_images(tmp_path):
    """``ViTModel`` with its pooler, on 8x12 images (a 2x3 patch grid: row-major order), no q/k/v biases."""
    torch.manual_seed(1)
    config = transformers.ViTConfig(
        image_size=(8, 12), patch_size=4, num_channels=2, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, qkv_bias=False, pooler_output_size=12, layer_norm_eps=1e-6,
    )  # fmt: skip
    hf = _perturb(transformers.ViTModel(config).float().eval())
    hf.save_pretrained(tmp_path)
    model = vit.from_pretrained(tmp_path)
    assert model.head is None and model.pooler is not None and model.encoder.blocks[0].attention.query.bias is None
    pixels = _images(3, (2, 2, 8, 12))
    with torch.no_grad():
        ref = hf(torch.from_numpy(pixels))
    hidden = nnx.jit(lambda m, x: m(x))(model, _nhwc(pixels))  # no head: the call is the hidden states
    np.testing.assert_allclose(np.asarray(hidden), ref.last_hidden_state.numpy(), **TOL)
    np.testing.assert_allclose(np.asarray(model.pool(hidden)), ref.pooler_output.numpy(), **TOL)

    vit.to_pretrained(model, tmp_path / "export")  # the reverse export, read back by transformers
    back = transformers.ViTModel.from_pretrained(tmp_path / "export").float().eval()
    with torch.no_grad():
        again = back(torch.from_numpy(pixels))
    np.testing.assert_allclose(again.last_hidden_state.numpy(), ref.last_hidden_state.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(again.pooler_output.numpy(), ref.pooler_output.numpy(), rtol=1e-6, atol=1e-6)


def test_classifier_export_round_trip(classifier, tmp_path):
    hf, model = classifier
    vit.to_pretrained(model, tmp_path)
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path).float().eval()
    pixels = torch.from_numpy(_images(4, (1, 3, 16, 16)))
    with torch.no_grad():
        np.testing.assert_allclose(back(pixels).logits.numpy(), hf(pixels).logits.numpy(), rtol=1e-6, atol=1e-6)
    assert vit.from_pretrained(tmp_path).config == model.config


def test_errors(classifier):
    _, model = classifier
    with pytest.raises(ValueError, match="NHWC"):
        model(jnp.zeros((1, 3, 16, 16)))  # a PyTorch-layout batch
    with pytest.raises(ValueError, match="model_type"):
        vit.ViTConfig.from_hf(dict(model_type="deit", hidden_size=8, num_attention_heads=2))
    config = transformers.ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(ValueError, match="hidden_act"):
        vit.from_config({**config.to_dict(), "hidden_act": "swish"})
    with pytest.raises(ValueError, match="no pooler"):
        model.pool(jnp.zeros((1, 17, 32)))
