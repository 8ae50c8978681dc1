"""CPU benchmark of the blockwise (flash) path against PyTorch SDPA and jax.nn, measured in the same run.

Peers: PyTorch's ``scaled_dot_product_attention`` (its CPU flash kernel, the same number of
threads as XLA: the machine's cores) and ``jax.nn.dot_product_attention`` (XLA, dense; only at
small T, where its ``T x T`` scores fit). B=1, N=8, H=64, K=8 (MHA) and K=2 (GQA), causal and
full, forward and forward + backward. Each shape runs in a fresh process; its implementations are
timed in interleaved rounds (a change of machine load hits them alike) and reported as medians
after a warm-up (compilation) call. Each process also times a large float32 ``jnp`` matmul in the
same rounds: the fraction of that rate our attention reaches counts ``4 B N T S H`` flops for the
forward (half under a causal mask) and 3.5 times that for forward + backward (the backward
recomputes the scores: five matmuls per tile against two).

Also: bfloat16 inputs; dropout (the hashed bits, regenerated in the backward) and an ALiBi score
function at T=8192 with the compiled temporaries (``compiled.memory_analysis()``) as T doubles.

    python benchmarks/bench_flash_cpu.py           # the suite; updates its section of RESULTS.md
    python benchmarks/bench_flash_cpu.py --quick   # small sizes, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import (  # noqa: E402
    fmt_ms,
    fmt_ratio,
    load_average,
    machine,
    markdown_table,
    run_child,
    torch_version,
    write_section,
)

SECTION = "Flash attention (CPU)"
SCRIPT = Path(__file__).resolve()
B, N, H = 1, 8, 64
MATMUL = 2048  # the reference matmul: [2048, 2048] x [2048, 2048] float32


# ---------------------------------------------------------------------------------------------------
# Child process: one shape, several implementations, interleaved rounds
# ---------------------------------------------------------------------------------------------------


def _spec(t: int, mask: str, extra: str = "plain", blocks=None):
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    import attention_jax as aj
    from attention_jax.functional import blockwise

    bq, bk = blocks or blockwise.default_block_sizes(t, t)
    m = aj.masks.causal() if mask == "causal" else aj.masks.full()
    spec = m.spec(t, t, bq, bk)
    spec = dataclasses.replace(spec, block_map=np.asarray(spec.block_map))  # known at trace time: static schedule
    if extra == "alibi":
        slopes = jnp.asarray(aj.positional.alibi_slopes(N), jnp.float32)
        spec = dataclasses.replace(spec, score_fn=_alibi, score_params=(slopes,))
    return spec


def _alibi(score, batch, head, q_pos, kv_pos, params):
    return score + params[0] * (kv_pos - q_pos).astype(score.dtype)


def _jax_callable(impl: str, mode: str, t: int, mask: str, blocks=None):
    import jax
    import jax.numpy as jnp

    from attention_jax.functional import blockwise

    if impl == "jax_nn":
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=mask == "causal")
    else:
        extra = {"blockwise": "plain", "blockwise_dropout": "plain", "blockwise_alibi": "alibi"}[impl]
        rate = 0.1 if impl == "blockwise_dropout" else 0.0
        spec = _spec(t, mask, extra, blocks)

        def f(q, k, v):
            seed = jnp.int32(17) if rate else None
            return blockwise.attention(q, k, v, spec, scale=H**-0.5, dropout_rate=rate, dropout_seed=seed)[0]

    if mode == "fwd":
        return jax.jit(f)
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def _torch_callable(mode: str, mask: str, arrays, dtype: str):
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(os.cpu_count() or 1)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    q, k, v, do = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2))).to(tdtype) for a in arrays)
    kw = {"enable_gqa": k.shape[1] != q.shape[1], "is_causal": mask == "causal"}
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                return F.scaled_dot_product_attention(q, k, v, **kw)

        return fwd
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        for x in leaves:
            x.grad = None
        F.scaled_dot_product_attention(*leaves, **kw).backward(do)
        return [x.grad for x in leaves]

    return fwd_bwd


def _matmul_callable():
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (MATMUL, MATMUL), jnp.float32)
    f = jax.jit(lambda a: jnp.dot(a, a, precision=jax.lax.Precision.HIGHEST))
    return lambda: f(a)


def _timed(call) -> float:
    import jax

    start = time.perf_counter()
    out = call()
    if not _is_torch(out):
        jax.block_until_ready(out)
    return time.perf_counter() - start


def _is_torch(x) -> bool:
    mod = type(x[0] if isinstance(x, list) else x).__module__
    return mod.startswith("torch")


def child(spec: dict) -> dict:
    """Measure ``spec["items"]`` (impl, mode) on one shape; print JSON."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    t, kv_heads, dtype = spec["t"], spec["k"], spec.get("dtype", "float32")
    rng = np.random.default_rng(0)
    shapes = [(B, t, N, H), (B, t, kv_heads, H), (B, t, kv_heads, H), (B, t, N, H)]  # q, k, v, output cotangent
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    jax_arrays = [jax.block_until_ready(jnp.asarray(a, dtype)) for a in arrays]
    calls = []
    for item in spec["items"]:
        impl, mode = item["impl"], item["mode"]
        if impl == "torch":
            calls.append(_torch_callable(mode, spec["mask"], arrays, dtype))
        elif impl == "matmul":
            calls.append(_matmul_callable())
        else:
            f = _jax_callable(impl, mode, t, spec["mask"], item.get("blocks"))
            args = jax_arrays[:3] if mode == "fwd" else jax_arrays
            calls.append(lambda f=f, args=args: f(*args))
    load_start = load_average()
    firsts = [_timed(call) for call in calls]  # compile / warm up each
    samples = [[] for _ in calls]
    for _ in range(spec["repeats"]):
        for n, call in enumerate(calls):
            samples[n].append(_timed(call))
    items = []
    for item, first, s in zip(spec["items"], firsts, samples):
        s = s or [first]
        items.append({**item, "median": float(np.median(s)), "samples": s, "first": first})
    return {"items": items, "load": [load_start, load_average()]}


def memory_child(spec: dict) -> dict:
    """Compiled temporaries (bytes) of ours, forward + backward, for each T in ``spec["ts"]``; print JSON."""
    import jax

    out = {}
    for t in spec["ts"]:
        f = _jax_callable(spec["impl"], "fwd_bwd", t, "causal")
        x = jax.ShapeDtypeStruct((B, t, N, H), "float32")
        kv = jax.ShapeDtypeStruct((B, t, spec["k"], H), "float32")
        compiled = f.trace(x, kv, kv, x).lower().compile()
        out[str(t)] = compiled.memory_analysis().temp_size_in_bytes
    return {"temp_bytes": out}


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


def measure(t, k, items, *, mask="causal", repeats=3, dtype="float32") -> dict:
    spec = {"t": t, "k": k, "items": items, "mask": mask, "repeats": repeats, "dtype": dtype}
    started = time.perf_counter()
    result = run_child(SCRIPT, ["--child", json.dumps(spec)])
    what = ", ".join(f"{i['impl']}/{i['mode']}" for i in items)
    print(f"  T={t} K={k} {mask} {dtype}: {what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if "error" in result:
        print(f"    -> {result['error']}", file=sys.stderr, flush=True)
    return result


def _median(result, impl, mode):
    for item in result.get("items", []):
        if item["impl"] == impl and item["mode"] == mode:
            return item["median"]
    return None


def _flops(t: int, mask: str, mode: str) -> float:
    fwd = 4 * B * N * t * t * H * (0.5 if mask == "causal" else 1.0)
    return fwd * (3.5 if mode == "fwd_bwd" else 1.0)


def _fraction(seconds, t, mask, mode, matmul_s):
    if not seconds or not matmul_s:
        return None
    return (_flops(t, mask, mode) / seconds) / (2 * MATMUL**3 / matmul_s)


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.0f}%"


def main_table(points, have_torch, repeats, nn_max_t, dtype="float32") -> tuple[list[str], list[dict]]:
    """One row per (T, mask, K): ours, torch and jax.nn, forward and forward + backward, and ours' matmul fraction."""
    rows, records = [], []
    for t, mask, k, modes in points:
        impls = ["blockwise"] + (["torch"] if have_torch else []) + (["jax_nn"] if t <= nn_max_t else [])
        items = [{"impl": i, "mode": m} for m in modes for i in impls] + [{"impl": "matmul", "mode": "fwd"}]
        # Long sequences: one timed round after the warm-up (minutes per round on 2 cores).
        res = measure(t, k, items, mask=mask, repeats=1 if t >= 8192 else repeats, dtype=dtype)
        matmul_s = _median(res, "matmul", "fwd")
        row = [str(t), mask, "MHA" if k == N else f"GQA K={k}"]
        rec = {"t": t, "mask": mask, "k": k, "load": res.get("load"), "error": res.get("error")}
        for mode in ("fwd", "fwd_bwd"):
            ours, torch_s, nn = (_median(res, i, mode) for i in ("blockwise", "torch", "jax_nn"))
            ratio = torch_s / ours if ours and torch_s else None
            frac = _fraction(ours, t, mask, mode, matmul_s)
            row += [fmt_ms(ours), fmt_ms(torch_s), fmt_ratio(ratio), fmt_ms(nn), _pct(frac)]
            rec[mode] = {"ours": ours, "torch": torch_s, "jax_nn": nn, "ratio": ratio, "fraction": frac}
        gflops = 2 * MATMUL**3 / matmul_s / 1e9 if matmul_s else None
        row.append("n/a" if gflops is None else f"{gflops:.0f}")
        load = res.get("load") or [float("nan")] * 2
        row.append(f"{load[0]:.1f}-{load[1]:.1f}")
        rows.append(row)
        records.append(rec)
    header = ["T", "mask", "heads"]
    for what in ("fwd", "fwd+bwd"):
        header += [f"{what}: ours (ms)", "torch (ms)", "torch / ours", "jax.nn (ms)", "ours / matmul rate"]
    header += ["matmul GFLOP/s", "load"]
    return markdown_table(header, rows), records


def extras_table(t, have_torch, repeats) -> list[str]:
    """Dropout and ALiBi at T (causal, MHA): times next to the plain path."""
    impls = ["blockwise", "blockwise_dropout", "blockwise_alibi"]
    items = [{"impl": i, "mode": m} for m in ("fwd", "fwd_bwd") for i in impls]
    res = measure(t, N, items, repeats=repeats)
    names = {"blockwise": "plain", "blockwise_dropout": "dropout 0.1", "blockwise_alibi": "ALiBi score_fn"}
    rows = [[names[i], fmt_ms(_median(res, i, "fwd")), fmt_ms(_median(res, i, "fwd_bwd"))] for i in impls]
    return markdown_table([f"ours, causal, T={t}, MHA", "forward (ms)", "forward + backward (ms)"], rows)


def memory_table(ts) -> list[str]:
    rows = []
    for impl in ("blockwise", "blockwise_dropout", "blockwise_alibi"):
        cmd = [sys.executable, str(SCRIPT), "--memory-child", json.dumps({"ts": list(ts), "k": N, "impl": impl})]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        got = json.loads(lines[-1])["temp_bytes"] if lines else {}
        rows.append([impl.replace("blockwise_", "ours, ").replace("blockwise", "ours, plain")])
        rows[-1] += [f"{got[str(t)] / 2**20:,.1f}" if str(t) in got else "n/a" for t in ts]
        print(f"  memory {impl}: {got}", file=sys.stderr, flush=True)
    rows.append(["one T x T float32 buffer (per head)"] + [f"{t * t * 4 / 2**20:,.0f}" for t in ts])
    return markdown_table(["compiled temporaries (MiB), causal fwd+bwd, MHA"] + [f"T={t}" for t in ts], rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only (no RESULTS.md update)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.memory_child:
        print(json.dumps(memory_child(json.loads(args.memory_child))))
        return

    have_torch = torch_version() is not None
    started, load_start = time.perf_counter(), load_average()
    both = ("fwd", "fwd_bwd")
    if args.quick:
        points = [(t, m, k, both) for t in (1024, 2048) for m in ("causal", "full") for k in (8, 2)]
        bf16_points, extras_t, mem_ts, nn_max_t = [(1024, "causal", 8, both)], 1024, (1024, 2048), 2048
    else:
        points = [(t, m, k, both) for t in (2048, 4096, 8192) for m in ("causal", "full") for k in (8, 2)]
        points += [(16384, "causal", 8, both), (32768, "causal", 8, ("fwd",))]
        bf16_points, extras_t, mem_ts, nn_max_t = [(4096, "causal", 8, both)], 8192, (4096, 8192, 16384), 2048
    main_lines, records = main_table(points, have_torch, args.repeats, nn_max_t)
    bf16_lines, _ = main_table(bf16_points, have_torch, args.repeats, 0, dtype="bfloat16")
    extra_lines = extras_table(extras_t, have_torch, args.repeats)
    memory_lines = memory_table(mem_ts)
    ratios = [r[m]["ratio"] for r in records for m in both if r.get(m) and r[m]["ratio"]]
    fracs = [r[m]["fraction"] for r in records for m in both if r.get(m) and r[m]["fraction"]]

    header = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC with `python benchmarks/bench_flash_cpu.py"
        f"{' --quick' if args.quick else ''}` on {machine()}.",
        f"Load average {load_start:.1f} at the start and {load_average():.1f} at the end "
        f"({time.perf_counter() - started:.0f} s in all); the 2 cores were shared with other jobs whenever the load "
        "exceeds ~2, which slows every column of a row alike (each row's implementations run interleaved in one "
        "process) but not every row alike.",
        "",
        f"**float32**, B={B}, N={N}, H={H}; median of {args.repeats} rounds after a warm-up (one round from T=8192); "
        "'torch / ours' > 1 means ours "
        "is faster. 'ours / matmul rate': our attention flops per second (4BNTSH forward, halved when causal; 3.5x "
        f"that forward + backward) over a {MATMUL}x{MATMUL} float32 `jnp.dot` timed in the same rounds. "
        "jax.nn materialises T x T scores and runs only at small T; blank rows were not measured (time).",
        "",
    ]
    summary = []
    if ratios:
        summary.append(
            f"torch / ours over the measured float32 points: min {min(ratios):.2f}x, max {max(ratios):.2f}x; "
            f"ours / matmul rate: min {_pct(min(fracs))}, max {_pct(max(fracs))}."
        )
        summary.append("")
    body = header + main_lines + [""] + summary
    body += [f"**bfloat16** inputs (ours computes in float32 on CPU), median of {args.repeats}.", ""] + bf16_lines
    body += ["", f"**Dropout and a score function** (ALiBi), median of {args.repeats}.", ""] + extra_lines
    body += [
        "",
        "**Compiled memory**: `compiled.memory_analysis().temp_size_in_bytes` of a jitted forward + backward; "
        "linear in T (one T x T float32 buffer for comparison).",
        "",
    ] + memory_lines
    text = "\n".join(body)
    print(text)
    if not args.quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
