"""DeepSeek-V3 (dense layers) from local checkpoints against transformers (the oracle, torch, float32).

Two tiny random checkpoints, each saved once per module: one with the low-rank query path
(``q_lora_rank``), YaRN with distinct ``mscale``/``mscale_all_dim`` (RoPE magnitude and softmax scale)
and interleaved RoPE; one with a full query projection, plain RoPE in the half layout and a tied head.
Checks: logits, the gradient of a random linear loss w.r.t. every weight, greedy generation of a
ragged batch (dense cache), the export round trip, and the loader's refusals.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import deepseek

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from test_models_llama import assert_close, check_generate, save_tiny  # noqa: E402

# rms_norm_eps 1e-2 for the block norms checks that the latent norms keep transformers' fixed 1e-6.
MLA = dict(num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
           n_routed_experts=4, rms_norm_eps=1e-2)  # fmt: skip
# theta 100 and an original context of 64 put YaRN's ramp inside the R / 2 = 4 frequencies.
YARN = dict(rope_type="yarn", rope_theta=100.0, factor=4.0, original_max_position_embeddings=64, mscale=0.8,
            mscale_all_dim=0.6)  # fmt: skip


@pytest.fixture(scope="module")
def yarn(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_yarn")
    hf = save_tiny(path, "DeepseekV3Config", "DeepseekV3ForCausalLM", q_lora_rank=12, rope_parameters=YARN,
                   rope_interleave=True, max_position_embeddings=256, num_hidden_layers=1,
                   first_k_dense_replace=1, **MLA)  # fmt: skip
    return path, hf


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    path = tmp_path_factory.mktemp("deepseek_plain")
    hf = save_tiny(path, "DeepseekV3Config", "DeepseekV3ForCausalLM", q_lora_rank=None, rope_interleave=False,
                   tie_word_embeddings=True, num_hidden_layers=2, first_k_dense_replace=2, **MLA)  # fmt: skip
    return path, hf


def load(path):
    config = deepseek.DeepseekV3Config.from_hf(deepseek.read_config(path))
    return deepseek.from_pretrained(path), config


def check_logits_and_grads(model, config, hf, seed: int = 0, t: int = 12):
    """Logits and d(sum(logits * R))/d(every weight) equal transformers' (mapped through the loader's entries)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, model.vocab_size, (2, t))
    weights = rng.standard_normal((2, t, model.vocab_size)).astype(np.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(jnp.asarray(tokens, jnp.int32))
        return jnp.sum(logits * weights), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    hf.zero_grad()
    theirs = hf(torch.tensor(tokens)).logits
    (theirs * torch.tensor(weights)).sum().backward()
    assert_close(logits, theirs.detach().numpy(), "logits", rtol=1e-5)

    hf_params = dict(hf.named_parameters())
    names = []
    for name, variables, to_ours, _ in deepseek.entries(nnx.merge(graphdef, grads, rest), config):
        for variable, expected in zip(variables, to_ours(hf_params[name].grad.numpy()), strict=True):
            assert_close(variable[...], expected, f"gradient of {name}", rtol=1e-3)  # the maps are linear
        names.append(name)
    assert sorted(names) == sorted(hf_params)  # every weight, once (kv_b_proj fills w_uk and w_uv)


def test_low_rank_query_yarn_interleaved(yarn):
    path, hf = yarn
    model, config = load(path)
    attention = model.stack.blocks[0].attention
    assert config.q_lora_rank == 12 and attention.q_down is not None and config.rope.layout == "interleaved"
    assert isinstance(config.rope.scaling, aj.positional.YaRNScaling) and config.mscale_all_dim == 0.6
    # transformers' softmax scale, with the mscale_all_dim factor (a wrong scale would also miss the logits)
    assert attention.scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12) != 16**-0.5
    check_logits_and_grads(model, config, hf)
    check_generate(model, hf, ["dense"])  # the latent cache paged: test_nn_decode.py


def test_full_query_half_rope_tied(plain):
    path, hf = plain
    model, config = load(path)
    assert config.q_lora_rank is None and model.stack.blocks[0].attention.q_down is None and model.head is None
    assert config.rope.layout == "rotate_half" and config.rope.scaling is None and config.mscale_all_dim is None
    check_logits_and_grads(model, config, hf, seed=1)


def test_round_trip(yarn, tmp_path):
    """to_pretrained writes what transformers loads back to the same logits, and from_pretrained to the same weights."""
    path, hf = yarn
    model, config = load(path)
    deepseek.to_pretrained(model, config, tmp_path)
    assert deepseek.DeepseekV3Config.from_hf(deepseek.read_config(tmp_path)) == config
    again = deepseek.from_pretrained(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    tokens = torch.tensor(np.random.default_rng(2).integers(0, 64, (1, 10)))
    expected = hf(tokens).logits.detach().numpy()
    assert_close(exported(tokens).logits.detach().numpy(), expected, "logits of the exported checkpoint", rtol=1e-5)


def test_refusals(plain):
    path, _ = plain
    hf_config = deepseek.read_config(path)
    with pytest.raises(ValueError, match="first_k_dense_replace"):  # a mixture-of-experts layer
        deepseek.DeepseekV3Config.from_hf(dict(hf_config, first_k_dense_replace=0))
    assert deepseek.DeepseekV3Config.from_hf(dict(hf_config, first_k_dense_replace=0, n_routed_experts=None))
    with pytest.raises(ValueError, match="attention_bias"):
        deepseek.DeepseekV3Config.from_hf(dict(hf_config, attention_bias=True))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        deepseek.DeepseekV3Config.from_hf(dict(hf_config, num_key_value_heads=2))
    with pytest.raises(ValueError, match="quant_method"):
        deepseek.DeepseekV3Config.from_hf(dict(hf_config, quantization_config=dict(quant_method="fp8")))
    with pytest.raises(ValueError, match="model_type"):
        deepseek.DeepseekV3Config.from_hf(dict(hf_config, model_type="deepseek_v2"))
    model, config = load(path)
    weights = deepseek.read_weights(path)
    del weights["model.layers.0.self_attn.kv_b_proj.weight"]
    with pytest.raises(ValueError, match="kv_b_proj"):
        deepseek.load(deepseek.entries(model, config), weights)
