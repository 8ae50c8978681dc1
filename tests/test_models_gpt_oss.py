"""gpt-oss from a local checkpoint against transformers (torch, float32).

One tiny random ``GptOssForCausalLM`` (2 layers: sliding then full; GQA 4/2 heads with biases and
non-zero sinks; 4 experts, top-2, a clamp that binds; YaRN with ``truncate=False``), saved once per
module. Checked as in ``test_models_llama.py`` (whose helpers these tests reuse): logits on a sequence
longer than the window, the gradient of every weight, greedy generation on a ragged batch (dense and
rolling caches), plus the window conversion, the export and MXFP4 expert weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import gpt_oss

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_models_llama import assert_close, check_generate, check_logits_and_grads  # noqa: E402

WINDOW = 4  # Hugging Face's count: the query and 3 tokens before it
YARN = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
            original_max_position_embeddings=16)  # fmt: skip
TINY = dict(
    vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW,
    layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.5, max_position_embeddings=64,
    rope_parameters=YARN, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model): random weights, norm scales near one, sinks ~ N(0, 1)."""
    torch.manual_seed(0)
    config = transformers.GptOssConfig(**TINY)
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"  # the reference loop over experts
    hf = transformers.GptOssForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("sinks"):
                p.copy_(torch.randn_like(p))  # large enough to move the outputs visibly
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("gpt_oss")
    hf.save_pretrained(path)
    return path, hf


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(model, config) read back with from_pretrained, shared by the tests that only run it."""
    path, _ = checkpoint
    return gpt_oss.from_pretrained(path), gpt_oss.GptOssConfig.from_hf(gpt_oss.read_config(path))


def test_logits_gradients_generation(checkpoint, loaded):
    _, hf = checkpoint
    model, config = loaded
    assert config.sliding_window == WINDOW - 1 and config.rope.scaling.truncate is False
    assert [block.attention.sliding_window for block in model.stack.blocks] == [WINDOW - 1, None]
    assert float(jnp.min(jnp.abs(model.stack.blocks[0].attention.sinks[...]))) > 0
    check_logits_and_grads(model, hf, lambda m: gpt_oss.entries(m, config), t=12)  # 12 tokens > the window
    check_generate(model, hf, ["dense", "rolling"])


def test_window_count(checkpoint, loaded):
    """transformers' window W counts the query: mapping it literally (W, not W - 1) misses the logits."""
    _, hf = checkpoint
    literal = nnx.clone(loaded[0])
    literal.stack.blocks[0].attention.sliding_window = WINDOW
    tokens = np.random.default_rng(2).integers(0, 64, (1, 10))
    expected = hf(torch.tensor(tokens)).logits.detach().numpy()
    logits = nnx.jit(lambda m, t: m(t))(literal, jnp.asarray(tokens, jnp.int32))
    assert np.abs(np.asarray(logits) - expected).max() > 1e-2


def test_round_trip(checkpoint, loaded, tmp_path):
    """to_pretrained writes what transformers loads to the same weights and logits, and reads back to the config."""
    _, hf = checkpoint
    model, config = loaded
    gpt_oss.to_pretrained(model, config, tmp_path)
    assert gpt_oss.GptOssConfig.from_hf(gpt_oss.read_config(tmp_path)) == config
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    for name, p in hf.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), p.numpy(), err_msg=name)
    tokens = np.random.default_rng(3).integers(0, 64, (1, 6))
    expected = hf(torch.tensor(tokens)).logits.detach().numpy()
    assert_close(again(torch.tensor(tokens)).logits.detach().numpy(), expected, "exported logits")


def test_mxfp4_experts(checkpoint, tmp_path):
    """MXFP4 expert weights (the released checkpoints' format) dequantize as transformers does."""
    from safetensors.numpy import save_file
    from transformers.integrations.mxfp4 import _convert_moe_packed_tensors

    path, _ = checkpoint
    weights = gpt_oss.read_weights(path)
    rng = np.random.default_rng(4)
    expected = {}
    for i in range(2):
        for proj, (rows, cols) in (("gate_up_proj", (64, 32)), ("down_proj", (32, 32))):  # [E, R, G, 16] packs
            name = f"model.layers.{i}.mlp.experts.{proj}"
            blocks = rng.integers(0, 256, (4, rows, cols // 32, 16), dtype=np.uint8)
            scales = rng.integers(120, 131, (4, rows, cols // 32), dtype=np.uint8)
            expected[name] = _convert_moe_packed_tensors(
                torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
            ).numpy()
            np.testing.assert_array_equal(gpt_oss.dequantize_mxfp4(blocks, scales), expected[name], err_msg=name)
            del weights[name]
            weights[name + "_blocks"], weights[name + "_scales"] = blocks, scales
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(weights, str(tmp_path / "model.safetensors"))
    model = gpt_oss.from_pretrained(tmp_path)
    for i, block in enumerate(model.stack.blocks):
        np.testing.assert_array_equal(block.mlp.gate_up[...], expected[f"model.layers.{i}.mlp.experts.gate_up_proj"])
        np.testing.assert_array_equal(block.mlp.down[...], expected[f"model.layers.{i}.mlp.experts.down_proj"])
    with pytest.raises(ValueError, match="_scales"):
        gpt_oss.dequantized({"x_blocks": weights[name + "_blocks"]})


def test_mixture_of_experts_routes_top_k(loaded):
    """A loaded layer equals a numpy loop over each token's top-k experts (softmax over the selected logits)."""
    moe = loaded[0].stack.blocks[0].mlp
    x = np.random.default_rng(5).standard_normal((2, 3, 32))
    p = {k: np.asarray(getattr(moe, k)[...], np.float64) for k in ("gate_up", "gate_up_bias", "down", "down_bias")}
    logits = x @ np.asarray(moe.router.kernel[...]) + np.asarray(moe.router.bias[...])  # [B, T, E]
    expected, clamped = np.zeros_like(x), 0
    for b, t in np.ndindex(2, 3):
        top = np.argsort(-logits[b, t])[:2]
        probs = np.exp(logits[b, t, top] - logits[b, t, top].max())
        for e, w in zip(top, probs / probs.sum()):
            h = x[b, t] @ p["gate_up"][e] + p["gate_up_bias"][e]
            gate, up = np.minimum(h[0::2], 1.5), np.clip(h[1::2], -1.5, 1.5)  # swiglu_limit
            clamped += np.sum(h[0::2] > 1.5) + np.sum(np.abs(h[1::2]) > 1.5)
            swiglu = (up + 1) * gate / (1 + np.exp(-1.702 * gate))
            expected[b, t] += w * (swiglu @ p["down"][e] + p["down_bias"][e])
    np.testing.assert_allclose(nnx.jit(lambda m, v: m(v))(moe, jnp.asarray(x, jnp.float32)), expected,
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert clamped > 0  # the limit binds, so the clamps are tested


def test_bad_config(checkpoint):
    path, _ = checkpoint
    hf = gpt_oss.read_config(path)
    with pytest.raises(ValueError, match="model_type"):
        gpt_oss.GptOssConfig.from_hf(dict(hf, model_type="llama"))
    with pytest.raises(ValueError, match="experts_per_token"):
        gpt_oss.GptOssConfig.from_hf(dict(hf, num_experts_per_tok=5))
    with pytest.raises(ValueError, match="sliding_window"):
        gpt_oss.GptOssConfig.from_hf(dict(hf, sliding_window=1))
    with pytest.raises(ValueError, match="layer_types"):
        gpt_oss.GptOssConfig(8, 8, 8, 2, 1, layer_types=("full_attention",))
    with pytest.raises(TypeError, match="feed_forward"):
        aj.nn.BlockConfig(feed_forward=3)
    with pytest.raises(ValueError, match="top_k"):
        gpt_oss.MixtureOfExperts(8, 4, num_experts=2, top_k=3, rngs=nnx.Rngs(0))
    # transformers 4's layout (rope_theta + rope_scaling) reads as the 5 one; no RoPE fields: gpt-oss's defaults.
    v4 = {k: v for k, v in hf.items() if k != "rope_parameters"}
    v4.update(rope_theta=1e4, rope_scaling={k: v for k, v in YARN.items() if k != "rope_theta"})
    assert gpt_oss.GptOssConfig.from_hf(v4) == gpt_oss.GptOssConfig.from_hf(hf)
    bare = gpt_oss.GptOssConfig.from_hf({k: v for k, v in v4.items() if not k.startswith("rope")})
    assert bare.rope == aj.positional.RoPE(theta=150_000.0, scaling=aj.positional.YaRNScaling(
        factor=32.0, original_max_position=4096, truncate=False))  # fmt: skip
