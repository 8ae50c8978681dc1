"""The examples run in their small modes and write what they promise (the full runs are marked slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"  # what conftest.py adds to XLA_FLAGS


def environment(*, optimize: bool = False) -> dict:
    """The examples' environment. The small runs are mostly compiling: they inherit conftest.py's fast-compile
    settings. Runs that train to an accuracy are mostly running: ``optimize`` compiles them as users do."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if optimize:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0"
        env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_COMPILE_XLA_FLAG, "").strip()
    return env


def run(script: str, *args: str, timeout: int = 300, optimize: bool = False) -> str:
    env = environment(optimize=optimize)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def load_example(script: str):
    """An example as a module, to run in this process: no fresh interpreter importing JAX for each run."""
    import importlib.util

    name = f"{Path(script).stem}_example"
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_train_lm_tiny_then_resume(tmp_path, capsys):
    train_lm = load_example("train_lm.py")  # in this process: three runs, one JAX start
    train_lm.main(["--tiny", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    run_dir = tmp_path / "train_lm" / "mha"
    for name in ("loss.png", "attention.png", "metrics.json"):
        assert (run_dir / name).stat().st_size > 0, name
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["15", "30"]  # aj.checkpoint's steps
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["step"] == 30 and 0.0 <= metrics["accuracy"] <= 1.0 and metrics["final_loss"] < 10
    assert "held-out recall accuracy" in out

    train_lm.main(["--tiny", "--steps", "40", "--resume", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 30" in out
    assert json.loads((run_dir / "metrics.json").read_text())["step"] == 40
    assert sorted(p.name for p in (run_dir / "checkpoint").iterdir()) == ["30", "40"]  # the last two kept

    with pytest.raises(SystemExit, match=r"written by a different run \(differs in \['num_heads'\]\)"):
        train_lm.main(["--tiny", "--num-heads", "2", "--resume", "--out-dir", str(tmp_path)])


@pytest.mark.slow
def test_train_lm_compare_tiny_runs_every_variant(tmp_path):
    """Every attention variant of the example drops into the LM as it is (no adapter in the example): each trains
    and evaluates (one layer, two steps: the time is compiling, one training and one evaluation program each)."""
    out = run("train_lm.py", "--tiny", "--compare", "--steps", "2", "--num-layers", "1", "--out-dir", str(tmp_path),
              timeout=900)  # fmt: skip
    rows = json.loads((tmp_path / "train_lm_compare.json").read_text())
    sys.path.insert(0, str(ROOT / "examples"))
    from train_lm import VARIANTS

    assert [r["variant"] for r in rows] == list(VARIANTS) and len(VARIANTS) >= 14
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["ms_per_step"] > 0 for r in rows)
    assert "| variant" in out


def test_seq2seq_alignment_small(tmp_path):
    run("seq2seq_alignment.py", "--steps", "30", "--max-length", "6", "--out-dir", str(tmp_path))
    out_dir = tmp_path / "seq2seq_alignment"
    assert (out_dir / "alignment_additive.png").stat().st_size > 0
    assert 0.0 <= json.loads((out_dir / "metrics_additive.json").read_text())["accuracy"] <= 1.0




def test_generate_every_cache_kind(tmp_path):
    run("generate.py", "--batch-size", "2", "--prompt-length", "12", "--new-tokens", "5", "--features", "32",
        "--num-layers", "2", "--num-heads", "4", "--window", "4", "--repeats", "1", "--kinds",
        "dense,rolling,paged,dense-int8", "--out-dir", str(tmp_path))
    rows = {r["cache"]: r for r in json.loads((tmp_path / "generate" / "metrics.json").read_text())}
    assert set(rows) == {"dense", "rolling", "paged", "dense-int8"}
    for name in ("dense", "rolling", "paged"):  # exact caches reproduce the library's greedy tokens
        assert rows[name]["same_as_generate"] == 1.0, name
    assert rows["dense-int8"]["cache_mib"] < rows["dense"]["cache_mib"]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in rows.values())


def test_generate_from_a_checkpoint(tmp_path):
    """--checkpoint DIR: a saved Hugging Face checkpoint generates what aj.generate gives for the same weights."""
    import importlib.util

    import jax.numpy as jnp
    from flax import nnx

    import attention_jax as aj

    config = aj.models.llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                                         num_heads=2, num_kv_heads=1, head_dim=8)  # fmt: skip
    model = aj.models.llama.build(config, rngs=nnx.Rngs(4))
    aj.models.llama.to_pretrained(model, config, tmp_path / "llama")
    out = run("generate.py", "--checkpoint", str(tmp_path / "llama"), "--prompt-ids", "3,1,4,1,5", "--new-tokens",
              "4", "--out-dir", str(tmp_path))  # fmt: skip
    written = json.loads((tmp_path / "generate" / "checkpoint.json").read_text())
    expected = aj.generate(model, jnp.asarray([[3, 1, 4, 1, 5]]), max_new_tokens=4)
    assert written["prompt_ids"] == [3, 1, 4, 1, 5] and written["new_ids"] == expected[0].tolist()
    assert f"new ids:    {written['new_ids']}" in out

    spec = importlib.util.spec_from_file_location("generate_example", ROOT / "examples" / "generate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.argparse.Namespace(checkpoint=tmp_path / "llama", prompt="Hello", prompt_ids=None)
    with pytest.raises(SystemExit, match="--prompt needs a tokenizer: .* Pass token ids instead"):
        example.prompt_ids(args, example.load_tokenizer(tmp_path / "llama"), config.to_hf())
    with pytest.raises(SystemExit, match="give a prompt: --prompt-ids"):
        example.prompt_ids(example.argparse.Namespace(prompt=None, prompt_ids=None), None, config.to_hf())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_lm_default_learns_recall(tmp_path):
    """The default run learns recall (it stops at the first evaluation that shows it)."""
    run("train_lm.py", "--target-accuracy", "0.9", "--out-dir", str(tmp_path), timeout=800, optimize=True)
    assert json.loads((tmp_path / "train_lm" / "mha" / "metrics.json").read_text())["accuracy"] >= 0.9


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vit_digits_reaches_95_percent_and_explains_it(tmp_path):
    """The default ViT reaches 95% (stopping at the first epoch that does), then writes every explanation."""
    run("vit_digits.py", "--target-accuracy", "0.95", "--num-images", "2", "--out-dir", str(tmp_path), timeout=800,
        optimize=True)  # fmt: skip
    out_dir = tmp_path / "vit_digits"
    assert json.loads((out_dir / "metrics.json").read_text())["test_accuracy"] >= 0.95
    for name in ("rollout.png", "flow.png", "relevance.png", "grad_cam.png", "heads.png", "cdam.png"):
        assert (out_dir / name).stat().st_size > 0, name
