"""models.auto.from_pretrained: one loader for every supported checkpoint, dispatched on model_type."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import auto


def test_loads_a_saved_llama_and_dispatches_by_model_type(tmp_path):
    config = aj.models.llama.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=4, num_kv_heads=2, head_dim=4, model_type="qwen2",
                                         qkv_bias=True)  # fmt: skip
    model = aj.models.llama.build(config, rngs=nnx.Rngs(3))
    aj.models.llama.to_pretrained(model, config, tmp_path)
    loaded = auto.from_pretrained(tmp_path)
    assert isinstance(loaded, aj.nn.TransformerLM)
    tokens = jax.random.randint(jax.random.key(0), (2, 7), 0, config.vocab_size)
    forward = nnx.jit(lambda m, t: m(t))  # one compilation serves both (same structure)
    np.testing.assert_array_equal(np.asarray(forward(loaded, tokens)), np.asarray(forward(model, tokens)))

    assert auto.loader("mistral") is aj.models.llama and auto.loader("gemma3_text") is aj.models.gemma
    assert auto.loader("gpt2") is aj.models.gpt2 and auto.loader("t5") is aj.models.t5
    assert {"llama", "qwen3", "gemma2", "gpt2", "bert", "t5"} <= set(auto.MODEL_TYPES)


def test_dtype_reaches_the_loader(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(aj.models.gpt2, "from_pretrained", lambda path, **kw: calls.append((path, kw)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    auto.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    auto.from_pretrained(tmp_path)  # None: the loader's own default
    assert calls == [(tmp_path, {"dtype": jnp.bfloat16}), (tmp_path, {})]


def test_unknown_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"model_type 'mamba' is not supported; supported model types: .*llama"):
        auto.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ValueError, match="has no model_type"):
        auto.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config.json"):
        auto.from_pretrained(tmp_path / "nowhere")
