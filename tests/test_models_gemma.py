"""Gemma 2 and Gemma 3 (text) from local checkpoints against transformers (torch, float32).

Same checks as ``test_models_llama.py`` (whose helpers these tests reuse): logits, the gradient of
every weight, greedy generation with each cache kind on a ragged batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import gemma

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_models_llama import assert_close, check_generate, check_logits_and_grads, forward, save_tiny  # noqa: E402

# head_dim 16 with query_pre_attn_scalar 12 (not H) checks the score scale; 3 layers: local, global, local.
SMALL_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=16)  # fmt: skip
GEMMA = dict(num_hidden_layers=3, head_dim=16, query_pre_attn_scalar=12, sliding_window=4)


def load(tmp_path):
    model = gemma.from_pretrained(tmp_path)
    config = gemma.GemmaConfig.from_hf(gemma.read_config(tmp_path))
    return model, config, lambda m: gemma.entries(m, config)


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """(transformers model, our model, config, entries): one Gemma 2 checkpoint, saved and loaded once."""
    path = tmp_path_factory.mktemp("gemma2")
    # Small softcaps so that both caps bend the values (random scores reach a few units).
    hf = save_tiny(path, "Gemma2Config", "Gemma2ForCausalLM", attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                   **GEMMA)  # fmt: skip
    return hf, *load(path)


def test_gemma2(gemma2):
    hf, model, config, entries_of = gemma2
    assert config.sliding_window == 3 and config.layer_types[:2] == ("sliding_attention", "full_attention")
    assert [block.attention.sliding_window for block in model.stack.blocks] == [3, None, 3]
    check_logits_and_grads(model, hf, entries_of)
    check_generate(model, hf, ["rolling"])


@pytest.mark.slow
def test_gemma2_paged_cache(gemma2):
    # The alternating windows over a full-length cache (the dense cache: every other model test, Mistral's window).
    hf, model, _, _ = gemma2
    check_generate(model, hf, ["paged"])


def test_gemma3(tmp_path):
    rope = dict(full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1e6),
                sliding_attention=dict(rope_type="default", rope_theta=1e4))  # fmt: skip
    layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    hf = save_tiny(tmp_path, "Gemma3TextConfig", "Gemma3ForCausalLM", rope_parameters=rope, layer_types=layer_types,
                   final_logit_softcapping=None, **GEMMA)  # fmt: skip
    model, config, entries_of = load(tmp_path)
    assert config.qk_norm and config.local_rope.theta == 1e4 and config.rope.scaling.factor == 4.0
    check_logits_and_grads(model, hf, entries_of)
    check_generate(model, hf, ["rolling"])


def test_round_trip(tmp_path):
    """to_pretrained writes what transformers loads to the same logits, and from_pretrained reads it back."""
    config = gemma.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
        sliding_window=3, qk_norm=True, attn_softcap=None, model_type="gemma3_text",
        local_rope=aj.positional.RoPE(theta=1e4), rope=aj.positional.RoPE(theta=1e6),
    )  # fmt: skip
    model = gemma.build(config, rngs=nnx.Rngs(3))
    for block in model.stack.blocks:  # non-trivial norms (a fresh (1 + w) norm stores zeros)
        block.post_mlp_norm.scale[...] = jnp.linspace(-0.5, 0.5, 32)
        block.attention.key_norm.scale[...] = jnp.linspace(0.5, 1.5, 16)
    gemma.to_pretrained(model, config, tmp_path)
    assert gemma.GemmaConfig.from_hf(gemma.read_config(tmp_path)) == config
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    tokens = np.random.default_rng(0).integers(0, 64, (1, 10))
    assert_close(forward(model, tokens), hf(torch.tensor(tokens)).logits.detach().numpy(), "logits")
    again = gemma.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-7)


def test_gemma3_multimodal_checkpoint(tmp_path):
    """The language model of a Gemma3ForConditionalGeneration checkpoint: text-only logits equal transformers'."""
    torch.manual_seed(0)
    text = dict(SMALL_TEXT, layer_types=["sliding_attention", "full_attention"], sliding_window=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=63, boi_token_index=61, eoi_token_index=62)  # fmt: skip
    config._attn_implementation = "eager"
    hf = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    model = gemma.from_pretrained(tmp_path)
    tokens = np.random.default_rng(0).integers(0, 60, (2, 10))
    expected = hf(input_ids=torch.tensor(tokens)).logits.detach().numpy()
    assert_close(forward(model, tokens), expected, "logits")


def test_bad_config():
    base = dict(model_type="gemma2", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                num_attention_heads=1)  # fmt: skip
    with pytest.raises(ValueError, match="model_type"):
        gemma.GemmaConfig.from_hf(dict(base, model_type="gemma"))
    with pytest.raises(ValueError, match="sliding_window"):
        gemma.GemmaConfig.from_hf(dict(base, sliding_window=1))
    with pytest.raises(ValueError, match="layer_types"):
        gemma.GemmaConfig(8, 8, 8, 2, 1, layer_types=("full_attention",))


def test_transformers4_gemma3_config():
    """Gemma 3's transformers 4 fields (rope_local_base_freq, sliding_window_pattern) read as the 5 layout does."""
    v5 = gemma.GemmaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=7, num_heads=2, head_dim=16, qk_norm=True,
        attn_softcap=None, final_softcap=None, model_type="gemma3_text", sliding_window=511,
        layer_types=("sliding_attention",) * 5 + ("full_attention", "sliding_attention"),
        rope=aj.positional.RoPE(theta=1e6, scaling=aj.positional.LinearScaling(8.0)),
        local_rope=aj.positional.RoPE(theta=1e4),
    )  # fmt: skip
    v4 = {k: v for k, v in v5.to_hf().items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_scaling=dict(rope_type="linear", factor=8.0), rope_local_base_freq=1e4,
              sliding_window_pattern=6)  # fmt: skip
    assert gemma.GemmaConfig.from_hf(v4) == v5
