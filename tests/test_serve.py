"""examples/serve.py: the continuous-batching engine gives every request the tokens aj.generate gives it alone."""

import functools
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import attention_jax as aj

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def serve():
    """The example as a module, run in this process."""
    spec = importlib.util.spec_from_file_location("serve_example", ROOT / "examples" / "serve.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_example"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def tiny_lm(seed=0):
    """Two GQA layers (2 query heads, 1 key/value head) with RoPE: positions matter in every slot."""
    attention = functools.partial(aj.nn.MultiHeadAttention, num_heads=2, num_kv_heads=1, rope=aj.positional.RoPE())
    return aj.nn.TransformerLM(32, 16, 2, attention=attention, rngs=nnx.Rngs(seed))


def test_engine_tokens_equal_generate_alone(serve):
    """5 requests through 2 slots, prompts longer than a chunk, a pool too small for two long requests at once,
    and an eos that ends one request early: every request gets aj.generate's greedy tokens for it alone."""
    model = tiny_lm()
    requests = serve.make_requests(5, 32, (1, 10), (2, 6), seed=3)
    assert max(len(r.prompt) for r in requests) > 4  # several prompt chunks of 4
    alone = serve.generate_each(model, requests, eos_id=None)  # [new tokens] per request, each alone
    longest = max(requests, key=lambda r: r.max_new_tokens)
    eos = alone[longest.id][1] if alone[longest.id][1] != alone[longest.id][0] else alone[longest.id][2]
    expected = {i: t[: t.index(eos) + 1] if eos in t else t for i, t in alone.items()}  # what eos_id=eos returns
    assert any(len(expected[r.id]) < r.max_new_tokens for r in requests)  # some request ends at eos

    engine = serve.Engine(model, slots=2, max_length=16, page_size=4, num_pages=5, chunk=4, prefill_rows=2, eos_id=eos)
    out, report = engine.run(requests)
    assert out == expected
    assert report.requests == 5 and report.tokens == sum(map(len, expected.values()))
    assert report.pages_at_end == 0 and 0 < report.peak_pages <= 5  # every page went back to the pool
    assert report.prefill_steps > 0 and 0 < report.mean_occupancy <= 1
    assert all(int(c.num_free_pages) == 5 and not c.lengths.any() for c in engine.caches)


def test_engine_refuses_what_cannot_fit(serve):
    engine = serve.Engine(tiny_lm(), slots=2, max_length=8, page_size=4, num_pages=2)
    with pytest.raises(ValueError, match="request 0 needs 6 \\+ 3 tokens"):
        engine.run([serve.Request(0, tuple(range(6)), 3)])
    with pytest.raises(ValueError, match="slots must be a positive integer"):
        serve.Engine(tiny_lm(), slots=0, max_length=8)


def test_main_compare_reports(serve, tmp_path, capsys):
    """The command line: engine and aj.generate loop agree; the report and metrics.json have the numbers."""
    metrics = serve.main(["--requests", "3", "--slots", "2", "--prompt-lengths", "5", "--new-tokens", "3",
                          "--chunk", "4", "--page-size", "4", "--vocab-size", "32", "--features", "16",
                          "--num-layers", "1", "--num-heads", "2", "--num-kv-heads", "1", "--compare",
                          "--out-dir", str(tmp_path)])  # fmt: skip
    out, err = capsys.readouterr()
    assert "same tokens as aj.generate for 3/3 requests" in out and "3/3 requests" in err
    written = json.loads((tmp_path / "serve" / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert written["tokens"] == 9 and written["pages_at_end"] == 0 and written["same_as_generate"] == 1.0
    assert np.isfinite(written["ratio"]) and written["tokens_per_s"] > 0


def test_sampling_near_zero_temperature_is_greedy(serve):
    """temperature > 0 samples inside the step; as it goes to 0 the samples become the greedy tokens (and at 1 they
    are not: a random model's logits are nearly flat over 32 tokens)."""
    model = tiny_lm(1)
    requests = serve.make_requests(3, 32, (2, 6), (3, 4), seed=5)
    run = lambda t: serve.Engine(model, slots=2, max_length=10, page_size=4, chunk=4, temperature=t).run(requests)[0]
    greedy = run(0.0)
    assert run(1e-6) == greedy
    hot = run(1.0)
    assert hot != greedy and [len(hot[r.id]) for r in requests] == [r.max_new_tokens for r in requests]


def test_main_serves_a_checkpoint(serve, tmp_path, capsys):
    """--checkpoint DIR: a saved Llama checkpoint is served, each request equal to aj.generate on its weights."""
    config = aj.models.llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=8)  # fmt: skip
    aj.models.llama.to_pretrained(aj.models.llama.build(config, rngs=nnx.Rngs(4)), config, tmp_path / "llama")
    metrics = serve.main(["--checkpoint", str(tmp_path / "llama"), "--requests", "2", "--slots", "2",
                          "--prompt-lengths", "3", "--new-tokens", "2", "--page-size", "4", "--chunk", "4",
                          "--repeats", "1", "--compare", "--quiet", "--out-dir", str(tmp_path)])  # fmt: skip
    assert metrics["same_as_generate"] == 1.0 and metrics["tokens"] == 4
    assert "same tokens as aj.generate for 2/2 requests" in capsys.readouterr().out
