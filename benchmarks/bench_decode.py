"""Prefill and decode tokens/s of a Llama-style model: ours against transformers on torch, the same weights.

The model: ``attention_jax.models.llama`` (``LlamaConfig`` + ``build``, random weights), 4 layers, D=512,
8 query / 2 key-value heads of 64 (GQA), SwiGLU of 1536, RoPE (theta 500k), RMSNorm, an untied head of
V=32000, float32. It is exported with ``llama.to_pretrained`` into a temporary directory, and both sides load
that directory (ours ``llama.from_pretrained``, theirs ``transformers.LlamaForCausalLM.from_pretrained``), so
both run the same weights. Before timing, a short check (B=2, a prompt of 12, 6 steps) asserts that the two
agree: the prefill's last logits to float32 precision and the same greedy tokens, against either cache.

A point is a cache length L and a batch B: a random prompt of ``P = L - n`` tokens, then ``n`` greedy decode
steps, so the cache holds exactly L tokens at the end (ours is allocated with capacity L). Tokens/s:
``B * P / prefill time`` and ``B * n / decode time`` (the decode steps feed one token per row each). Both
sides compute the logits of the prompt's last token only, as generation does (ours ``logits_at``, theirs
``logits_to_keep=1``, what ``generate`` passes): the ``[B, P, V]`` logits would cost more than the attention.

* ours: one jitted call for the prefill, then one jitted call per token with the cache donated (updated in
  place), as in ``examples/generate.py``; both compiled ahead of timing (compile time reported apart).
* transformers: ``model(input_ids, use_cache=True)`` then one forward per token with the returned cache
  (``DynamicCache``, the default; it grows by concatenation), and the same with a preallocated
  ``StaticCache(max_cache_len=L)``, the fair peer of ours; default attention implementation (SDPA),
  ``torch.inference_mode``, ``torch.set_num_threads`` = the cores.

Each point runs in a fresh process; its implementations are timed in interleaved rounds (a change of machine
load hits them alike) and reported as medians. Run it on a quiet machine: torch's threads wait for each other
at every op, and a busy machine slows transformers far more than ours (a warning says so).

    python benchmarks/bench_decode.py                # the suite (~16 min, < 5 GB on 2 cores); updates RESULTS.md
    python benchmarks/bench_decode.py --quick        # a tiny model, L=64, B=1 and 2, 4 steps; prints only
    python benchmarks/bench_decode.py --lengths 2048 --batches 1 --no-write   # one point
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    RESULTS,
    fmt_ratio,
    load_average,
    machine,
    markdown_table,
    peak_rss_mb,
    run_child,
    write_section,
)

SECTION = "Prefill and decode vs transformers"
SCRIPT = Path(__file__).resolve()
FULL = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=4, num_heads=8, num_kv_heads=2,
            head_dim=64)  # fmt: skip
QUICK = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=16)  # fmt: skip
IMPLS = ("ours", "dynamic", "static")
NAMES = {"ours": "ours", "dynamic": "transformers, DynamicCache", "static": "transformers, StaticCache"}


# ---------------------------------------------------------------------------------------------------
# The model, both sides
# ---------------------------------------------------------------------------------------------------


def export_model(sizes: dict, path: Path, seed: int = 0) -> None:
    """Build a random Llama-style model with ``aj`` and write it as a Hugging Face checkpoint into ``path``."""
    from flax import nnx

    from attention_jax import positional
    from attention_jax.models import llama

    config = llama.LlamaConfig(**sizes, norm_epsilon=1e-5, rope=positional.RoPE(theta=500_000.0))
    llama.to_pretrained(llama.build(config, rngs=nnx.Rngs(seed)), config, path)


def load_ours(path):
    from attention_jax.models import llama

    return llama.from_pretrained(path)


def load_theirs(path, max_length: int):
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(os.cpu_count() or 1)
    # max_position_embeddings is not in the exported config (transformers' default is 2048); plain RoPE ignores it.
    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, max_position_embeddings=max_length)
    return hf.eval()


class Run(NamedTuple):
    """One greedy generation: tokens ``[B, 1 + n]``, the prefill's last logits ``[B, V]``, seconds of each phase."""

    tokens: Any
    logits: Any
    prefill_s: float
    decode_s: float


def _greedy_step(graphdef, state, tokens, cache):
    """``tokens [B, T]`` through the model with its cache: the next greedy token ``[B]``, its logits ``[B, V]``
    and the new cache."""
    import jax.numpy as jnp
    from flax import nnx

    last = jnp.full((tokens.shape[0], 1), tokens.shape[1] - 1, jnp.int32)  # [B, 1]
    logits, cache = nnx.merge(graphdef, state)(tokens, cache=cache, logits_at=last)  # [B, 1, V]
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), logits[:, -1], cache


def _jitted_step():
    import jax

    return jax.jit(_greedy_step, static_argnums=0, donate_argnums=3)


class Ours:
    """Our greedy loop at one shape: ``prefill`` and ``step`` compiled ahead of time for ``[B, P]`` and ``[B, 1]``."""

    def __init__(self, model, b: int, p: int, length: int):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        self.model, self.b, self.length = model, b, length
        self.graphdef, self.state = nnx.split(model)
        step = _jitted_step()
        start = time.perf_counter()
        self.prefill = step.lower(self.graphdef, self.state, jnp.zeros((b, p), jnp.int32), self.cache()).compile()
        self.step = step.lower(self.graphdef, self.state, jnp.zeros((b, 1), jnp.int32), self.cache()).compile()
        self.compile_s = time.perf_counter() - start
        self._block = jax.block_until_ready

    def cache(self):
        import jax
        import jax.numpy as jnp

        # Own buffers: a fresh cache may share its zeros, and the steps donate them.
        return jax.tree.map(jnp.copy, self.model.init_cache(self.b, self.length))

    def run(self, prompt, steps: int) -> Run:
        """Greedy generation of ``1 + steps`` tokens after ``prompt [B, P]``."""
        import jax.numpy as jnp
        import numpy as np

        prompt, cache = self._block((jnp.asarray(prompt, jnp.int32), self.cache()))
        start = time.perf_counter()
        token, logits, cache = self.prefill(self.state, prompt, cache)
        self._block(token)
        prefill = time.perf_counter() - start
        out = [token]
        start = time.perf_counter()
        for _ in range(steps):
            token, _, cache = self.step(self.state, token[:, None], cache)
            out.append(token)
        self._block(token)
        decode = time.perf_counter() - start
        return Run(np.stack([np.asarray(t) for t in out], axis=1), np.asarray(logits), prefill, decode)


def _cache_arg(hf) -> str:
    # transformers 5.x renamed the forward's ``past_key_values`` to ``cache`` (and the output's field alike).
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def run_theirs(hf, prompt, steps: int, kind: str, length: int) -> Run:
    """transformers' greedy generation of ``1 + steps`` tokens, cache ``kind`` ``"dynamic"`` or ``"static"``."""
    import numpy as np
    import torch
    import transformers

    name = _cache_arg(hf)
    ids = torch.from_numpy(np.asarray(prompt, np.int64))
    with torch.inference_mode():
        kw = {name: transformers.StaticCache(config=hf.config, max_cache_len=length)} if kind == "static" else {}
        start = time.perf_counter()
        out = hf(ids, use_cache=True, logits_to_keep=1, **kw)
        logits = out.logits[:, -1]  # [B, V]
        token = logits.argmax(-1)
        prefill = time.perf_counter() - start
        cache = getattr(out, name)
        del out
        tokens = [token]
        start = time.perf_counter()
        for _ in range(steps):
            out = hf(token[:, None], use_cache=True, logits_to_keep=1, **{name: cache})
            token, cache = out.logits[:, -1].argmax(-1), getattr(out, name)
            tokens.append(token)
        decode = time.perf_counter() - start
    return Run(torch.stack(tokens, dim=1).numpy(), logits.numpy(), prefill, decode)


def logit_error(ours: Run, theirs: Run) -> float:
    """Largest difference of the prefill's last logits, relative to the largest of theirs."""
    import numpy as np

    return float(np.abs(ours.logits - theirs.logits).max() / np.abs(theirs.logits).max())


def check_parity(path, vocab_size: int, b: int = 2, p: int = 12, steps: int = 6) -> float:
    """Assert that ours and transformers (both caches) agree on ``path``'s model: prefill logits to float32
    precision and the same greedy tokens. Returns the largest logit error."""
    import numpy as np

    ours, hf = load_ours(path), load_theirs(path, p + steps)
    prompt = np.random.default_rng(1).integers(0, vocab_size, (b, p))
    expected = Ours(ours, b, p, p + steps).run(prompt, steps)
    errors = []
    for kind in ("dynamic", "static"):
        theirs = run_theirs(hf, prompt, steps, kind, p + steps)
        errors.append(logit_error(expected, theirs))
        if not errors[-1] < 1e-4:
            raise AssertionError(f"prefill logits differ from transformers' ({kind}): {errors[-1]:.2e} of the largest.")
        if not np.array_equal(theirs.tokens, expected.tokens):
            raise AssertionError(
                f"greedy tokens of transformers ({kind}) differ from ours: {theirs.tokens} != {expected.tokens}."
            )
    return max(errors)


# ---------------------------------------------------------------------------------------------------
# Child process: one point (L, B), every implementation, interleaved rounds
# ---------------------------------------------------------------------------------------------------


def child(spec: dict) -> dict:
    """Time ``spec``'s point; return medians of prefill and decode seconds per implementation, JSON-ready."""
    import numpy as np

    length, b, steps, impls = spec["length"], spec["batch"], spec["steps"], spec["impls"]
    p = length - steps
    ours, hf = load_ours(spec["path"]), load_theirs(spec["path"], length)
    prompt = np.random.default_rng(spec["seed"]).integers(0, ours.vocab_size, (b, p))
    runner = Ours(ours, b, p, length)
    run_theirs(hf, prompt[:, :16], 2, "dynamic", 18)  # warm torch's threads and allocator
    calls = {
        "ours": lambda: runner.run(prompt, steps),
        "dynamic": lambda: run_theirs(hf, prompt, steps, "dynamic", length),
        "static": lambda: run_theirs(hf, prompt, steps, "static", length),
    }
    load_start = load_average()
    samples = {impl: [] for impl in impls}
    first = {}  # each implementation's first run: its tokens and logits
    for _ in range(spec["repeats"]):
        for impl in impls:
            try:
                run = calls[impl]()
            except Exception as e:  # noqa: BLE001 - a peer that fails is reported, not fatal
                samples[impl] = {"error": f"{type(e).__name__}: {e}"[:200]}
                impls = [i for i in impls if i != impl]
                continue
            samples[impl].append((run.prefill_s, run.decode_s))
            first.setdefault(impl, run)
    result = {"length": length, "batch": b, "prompt": p, "steps": steps, "compile_s": runner.compile_s}
    for impl, s in samples.items():
        if isinstance(s, dict):
            result[impl] = s
            continue
        prefill, decode = statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)
        result[impl] = {"prefill_s": prefill, "decode_s": decode, "prefill_tok_s": b * p / prefill,
                        "decode_tok_s": b * steps / decode, "samples": s}  # fmt: skip
        if impl != "ours" and "ours" in first:
            result[impl]["same_tokens"] = float(np.mean(first[impl].tokens == first["ours"].tokens))
            result[impl]["logit_error"] = logit_error(first["ours"], first[impl])
    result["load"], result["peak_rss_mb"] = [load_start, load_average()], peak_rss_mb()
    return result


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


def _rate(result: dict, impl: str, what: str) -> float | None:
    return result.get(impl, {}).get(f"{what}_tok_s")


def _fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def tables(results: list[dict], impls) -> list[str]:
    peers = [i for i in impls if i != "ours"]
    lines = []
    for what, count, unit in (("prefill", "prompt", "prompt tokens/s"), ("decode", "steps", "generated tokens/s")):
        header = ["L", "B", "P" if what == "prefill" else "n", f"ours ({unit})"]
        for peer in peers:
            header += [NAMES[peer], f"ours / {peer}"]
        if what == "decode":
            header += [f"same tokens ({peer})" for peer in peers] + ["ours compile (s)", "peak RSS (GB)", "load"]
        rows = []
        for r in results:
            if "error" in r:
                rows.append([str(r["length"]), str(r["batch"]), r["error"]] + [""] * (len(header) - 3))
                continue
            ours = _rate(r, "ours", what)
            row = [str(r["length"]), str(r["batch"]), str(r[count]), _fmt_rate(ours)]
            for peer in peers:
                theirs = _rate(r, peer, what)
                ratio = ours / theirs if ours and theirs else None
                row += [_fmt_rate(theirs) if theirs else r.get(peer, {}).get("error", "n/a"), fmt_ratio(ratio)]
            if what == "decode":
                row += [f"{100 * r[p]['same_tokens']:.0f}%" if "same_tokens" in r.get(p, {}) else "n/a" for p in peers]
                row += [f"{r['compile_s']:.1f}", f"{r['peak_rss_mb'] / 1024:.1f}", "{:.1f}-{:.1f}".format(*r["load"])]
            rows.append(row)
        title = "**Prefill**" if what == "prefill" else "**Decode**"
        lines += [f"{title} ({unit}; ours / peer > 1 means ours is faster)", ""] + markdown_table(header, rows) + [""]
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes, few steps, in one process")
    parser.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], help="cache lengths L")
    parser.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], help="batch sizes B")
    parser.add_argument("--steps", type=int, help="decode steps n (default 64; 4 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed rounds per point (default 3; 1 with --quick)")
    parser.add_argument("--no-static", action="store_true", help="skip transformers' StaticCache")
    parser.add_argument("--results", type=Path, help=f"write the section here (default {RESULTS.name}; not --quick)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    quick = args.quick
    lengths = args.lengths or ([64] if quick else [2048, 4096, 8192])
    batches = args.batches or ([1, 2] if quick else [1, 8])
    steps = args.steps or (4 if quick else 64)
    repeats = args.repeats or (1 if quick else 3)
    impls = [i for i in IMPLS if not (args.no_static and i == "static")]
    if steps < 1 or repeats < 1 or min(batches) < 1 or min(lengths) <= steps:
        raise ValueError(f"--lengths must exceed --steps, and --steps, --repeats and --batches be >= 1; got "
                         f"{lengths=}, {batches=}, {steps=}, {repeats=}.")  # fmt: skip
    import transformers

    started, load_start = time.perf_counter(), load_average()
    if load_start > (os.cpu_count() or 1) / 2:
        # torch's OpenMP threads wait for each other at every op: on a busy machine its numbers collapse (10-100x).
        print(f"  warning: load average {load_start:.1f} on {os.cpu_count()} cores; the numbers will not be "
              "representative, transformers' least of all.", file=sys.stderr, flush=True)  # fmt: skip
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as tmp:
        export_model(sizes, Path(tmp))
        parity = check_parity(tmp, sizes["vocab_size"])
        print(f"  parity: logits max error {parity:.1e}, same greedy tokens "
              f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
        results = []
        for length in lengths:
            for b in batches:
                spec = dict(path=tmp, length=length, batch=b, steps=steps, repeats=repeats, impls=impls, seed=b)
                point = time.perf_counter()
                # --quick: in this process (tiny, and no process start-up); else a fresh process per point.
                result = child(spec) if quick else run_child(SCRIPT, ["--child", json.dumps(spec)])
                results.append({"length": length, "batch": b, **result})
                print(f"  L={length} B={b}: {time.perf_counter() - point:.0f} s {result.get('error', '')}",
                      file=sys.stderr, flush=True)  # fmt: skip

    command = " ".join(["python benchmarks/bench_decode.py", *(sys.argv[1:] if argv is None else argv)])
    errors = [r[i]["logit_error"] for r in results for i in impls if "logit_error" in r.get(i, {})]
    model = (f"{sizes['num_layers']} layers, D={sizes['hidden_size']}, {sizes['num_heads']} query / "
             f"{sizes['num_kv_heads']} KV heads of {sizes['head_dim']}, SwiGLU {sizes['intermediate_size']}, "
             f"V={sizes['vocab_size']}, untied head, float32")  # fmt: skip
    body = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC with `{command}` on {machine()}, "
        f"transformers {transformers.__version__}, {os.cpu_count()} torch threads.",
        f"Load average {load_start:.1f} at the start and {load_average():.1f} at the end "
        f"({time.perf_counter() - started:.0f} s in all).",
        "",
        f"Llama-style model built with `attention_jax.models.llama` ({model}; random weights), exported with "
        "`to_pretrained` and loaded by both sides. Checked first (B=2, a prompt of 12, 6 steps): the prefill's last "
        f"logits agree to {parity:.0e} of the largest, and greedy tokens agree, with either cache"
        + (f"; at the points below they differ by at most {max(errors):.0e}. " if errors else ". ")
        + "Each point: a random prompt of "
        f"P = L - n tokens, then n = {steps} greedy decode steps (the cache ends holding L tokens); median of "
        f"{repeats} interleaved rounds. Prefill: B * P / time (logits of the last prompt token only on both sides: "
        "ours `logits_at`, theirs `logits_to_keep=1`, as generation does); "
        "decode: B * n / time. Ours: one jitted prefill, one jitted step per token with the cache donated, "
        "compiled ahead; the loop does not wait for each token (the next step is dispatched while one runs). "
        "Theirs: `model(input_ids, use_cache=True)`, then one forward per token with the returned cache, under "
        "`torch.inference_mode`, default attention (SDPA); DynamicCache is the default, StaticCache "
        "(preallocated, as ours) the like-for-like peer. 'same tokens': greedy tokens equal to ours; "
        "peak RSS: of the point's process (every implementation together).",
        "",
    ] + tables(results, impls)
    text = "\n".join(body)
    print(text)
    if not args.no_write and (args.results or not quick):
        write_section(SECTION, text, args.results or RESULTS)


if __name__ == "__main__":
    main()
