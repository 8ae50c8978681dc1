"""Llama 3, Mistral, Qwen2, Qwen3 from local checkpoints against transformers (the oracle, torch, float32).

Each test builds a tiny random transformers model, saves it, loads it with ``from_pretrained`` and
compares logits, the gradient of a random linear loss w.r.t. every weight, and greedy generation
(``aj.generate`` with each cache kind on a ragged batch; transformers runs each prompt alone).
The helpers here are shared with ``test_models_gemma.py``.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import llama

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SMALL = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)  # fmt: skip


def save_tiny(tmp_path, config_cls: str, model_cls: str, seed: int = 0, **options):
    """A random transformers model (every weight ~ N(0, 0.2^2) plus one for norm-like vectors), saved to tmp_path."""
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**dict(SMALL, **options))
    config._attn_implementation = "eager"
    model = getattr(transformers, model_cls)(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Norm scales near their usual values, everything else large enough for clear greedy argmaxes.
            offset = 1.0 if p.ndim == 1 and "norm" in name and "gemma" not in config.model_type else 0.0
            p.copy_(offset + 0.2 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


def assert_close(ours, theirs, what: str, rtol: float = 1e-4):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
    scale = max(np.abs(theirs).max(), 1e-6)
    np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=1e-5 * scale, err_msg=what)


def check_logits_and_grads(model, hf, entries_of, seed: int = 0, t: int = 12):
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
    assert_close(logits, theirs.detach().numpy(), "logits")

    grad_model = nnx.merge(graphdef, grads, rest)
    hf_params = dict(hf.named_parameters())
    checked = 0
    for name, variable, to_ours, _ in entries_of(grad_model):
        grad = hf_params[name].grad
        assert grad is not None, name
        # The loaders' maps are affine (reshapes, transposes, Gemma 3's 1 + w): gradients take the linear part.
        expected = to_ours(grad.numpy()) - to_ours(np.zeros_like(grad.numpy()))
        assert_close(variable[...], expected, f"gradient of {name}", rtol=1e-3)
        checked += 1
    assert checked == len(hf_params)  # every weight (a tied head is one parameter in both)


def check_generate(model, hf, kinds, seed: int = 1, new: int = 8, lengths=(9, 5)):
    """Greedy aj.generate of a right-padded ragged batch equals transformers' greedy generate per prompt."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, model.vocab_size, (len(lengths), max(lengths)))
    expected = []
    for row, n in zip(prompt, lengths):
        out = hf.generate(torch.tensor(row[None, :n]), max_new_tokens=new, do_sample=False, pad_token_id=0)
        expected.append(out[0, n:].numpy())
    for kind in kinds:
        got = aj.generate(
            model, jnp.asarray(prompt, jnp.int32), max_new_tokens=new, prompt_lengths=jnp.asarray(lengths),
            cache_kind=kind, cache_options=dict(page_size=4) if kind == "paged" else None,
        )  # fmt: skip
        np.testing.assert_array_equal(np.asarray(got), np.stack(expected), err_msg=f"cache_kind={kind}")


# A jitted forward: a model run eagerly compiles each of its hundreds of ops alone, many times the cost of one program.
forward = nnx.jit(lambda model, tokens: model(jnp.asarray(tokens, jnp.int32)))


def load(tmp_path):
    model = llama.from_pretrained(tmp_path)
    config = llama.LlamaConfig.from_hf(llama.read_config(tmp_path))
    return model, config, lambda m: llama.entries(m, config)


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500_000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16)  # fmt: skip


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    """(directory, transformers model) of a Llama 3 checkpoint, saved once for the tests that read it."""
    path = tmp_path_factory.mktemp("llama3")
    return path, save_tiny(path, "LlamaConfig", "LlamaForCausalLM", rope_scaling=LLAMA3_ROPE)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """(directory, transformers model) of a Qwen2 checkpoint with a tied head, saved once."""
    path = tmp_path_factory.mktemp("qwen2")
    return path, save_tiny(path, "Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True)


def test_llama3(llama3):
    path, hf = llama3
    model, config, entries_of = load(path)
    assert isinstance(config.rope.scaling, aj.positional.Llama3Scaling) and not config.tie_embeddings
    check_logits_and_grads(model, hf, entries_of)
    # The paged cache is checked with a window below (and without one in test_generate.py): dense suffices here.
    check_generate(model, hf, ["dense"])


def test_mistral_sliding_window(tmp_path):
    # A window of 4 keys (Hugging Face's count) is aj's sliding_window=3; prompts + generation reach 17 tokens.
    hf = save_tiny(tmp_path, "MistralConfig", "MistralForCausalLM", sliding_window=4, head_dim=8)
    model, config, entries_of = load(tmp_path)
    assert config.sliding_window == 3
    assert all(block.attention.sliding_window == 3 for block in model.stack.blocks)
    check_logits_and_grads(model, hf, entries_of, t=12)
    check_generate(model, hf, ["dense", "rolling", "paged"])


def test_qwen2_qkv_bias_tied(qwen2):
    path, hf = qwen2
    model, config, entries_of = load(path)
    attention = model.stack.blocks[0].attention
    assert attention.query.bias is not None and attention.out.bias is None and model.head is None
    check_logits_and_grads(model, hf, entries_of)
    check_generate(model, hf, ["dense"])


def test_qwen3_qk_norm_yarn(tmp_path):
    # YaRN with a small original context, so that the ramp between interpolated and kept frequencies is inside H;
    # unrounded ramp ends (truncate=False, as gpt-oss): our default rounding would miss the logits.
    yarn = dict(rope_type="yarn", rope_theta=1e4, factor=4.0, original_max_position_embeddings=64, truncate=False)
    hf = save_tiny(tmp_path, "Qwen3Config", "Qwen3ForCausalLM", head_dim=16, rope_parameters=yarn)
    model, config, entries_of = load(tmp_path)
    assert config.qk_norm and config.head_dim == 16 and isinstance(config.rope.scaling, aj.positional.YaRNScaling)
    assert config.rope.scaling.truncate is False
    check_logits_and_grads(model, hf, entries_of)
    check_generate(model, hf, ["dense"])


def test_round_trip(tmp_path):
    """to_pretrained writes what transformers loads back to the same logits, and from_pretrained to the same weights."""
    config = llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
        rope=aj.positional.RoPE(theta=1e4, scaling=aj.positional.Llama3Scaling(original_max_position=16)),
        sliding_window=5, model_type="mistral",
    )  # fmt: skip
    model = llama.build(config, rngs=nnx.Rngs(3))
    llama.to_pretrained(model, config, tmp_path)
    assert llama.LlamaConfig.from_hf(llama.read_config(tmp_path)) == config
    again = llama.from_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").float().eval()
    tokens = np.random.default_rng(0).integers(0, 64, (1, 10))
    assert_close(forward(model, tokens), hf(torch.tensor(tokens)).logits.detach().numpy(), "logits")
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_checkpoint(llama3):
    tmp_path, _ = llama3
    with pytest.raises(ValueError, match="rope_type"):
        llama.LlamaConfig.from_hf(dict(llama.read_config(tmp_path), rope_parameters=dict(rope_type="dynamic")))
    with pytest.raises(ValueError, match="model_type"):
        llama.LlamaConfig.from_hf(dict(llama.read_config(tmp_path), model_type="gpt2"))
    weights = llama.read_weights(tmp_path)
    config = llama.LlamaConfig.from_hf(llama.read_config(tmp_path))
    model = llama.build(config, rngs=nnx.Rngs(0))
    del weights["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj"):
        llama.load(llama.entries(model, config), weights)


def test_sharded_bfloat16_checkpoint(qwen2, tmp_path):
    """A bfloat16 checkpoint in several shards loads exactly (upcast) and runs in bfloat16 too."""
    hf = copy.deepcopy(qwen2[1])  # the shared model stays float32
    with torch.no_grad():  # the reference: float32 with bfloat16-rounded weights (RoPE buffers stay float32)
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert len(list((tmp_path / "bf16").glob("*.safetensors"))) > 1
    tokens = np.random.default_rng(0).integers(0, 64, (2, 10))
    expected = hf(torch.tensor(tokens)).logits.detach().numpy()
    model = llama.from_pretrained(tmp_path / "bf16")
    assert_close(forward(model, tokens), expected, "logits")
    half = llama.from_pretrained(tmp_path / "bf16", dtype=jnp.bfloat16)
    logits = forward(half, tokens)
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), expected, atol=0.1 * np.abs(expected).max())


def test_transformers4_config_fields():
    """transformers 4 configs (rope_theta + rope_scaling; Qwen2's use_sliding_window) read as the 5 layout does."""
    v5 = llama.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=4, num_heads=4, num_kv_heads=2,
        rope=aj.positional.RoPE(theta=5e5, scaling=aj.positional.Llama3Scaling(original_max_position=16)),
    )  # fmt: skip
    v4 = {k: v for k, v in v5.to_hf().items() if k != "rope_parameters"}
    v4.update(rope_theta=5e5, rope_scaling=dict(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                  original_max_position_embeddings=16))  # fmt: skip
    assert llama.LlamaConfig.from_hf(v4) == v5
    qwen2 = dict(v4, model_type="qwen2", rope_scaling=None, use_sliding_window=True, sliding_window=8,
                 max_window_layers=2)  # fmt: skip
    config = llama.LlamaConfig.from_hf(qwen2)
    assert [config.window(i) for i in range(4)] == [None, None, 7, 7] and config.qkv_bias and not config.out_bias
    assert llama.LlamaConfig.from_hf(dict(qwen2, use_sliding_window=False)).sliding_window is None
    with_length = dict(v4, max_position_embeddings=4096)  # kept through the reverse export
    assert llama.LlamaConfig.from_hf(llama.LlamaConfig.from_hf(with_length).to_hf()).max_position_embeddings == 4096
    assert "max_position_embeddings" not in v5.to_hf()  # unset stays unset (transformers' own default)
