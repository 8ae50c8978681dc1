"""CPU benchmark of the blockwise (flash) path against its peers, measured in the same run.

Peers: ``jax.nn.dot_product_attention`` (XLA), our dense reference, and PyTorch's
``scaled_dot_product_attention`` (its CPU flash kernel) when torch is importable. float32, B=1, N=8,
H=64, K=8 (MHA) and K=2 (GQA). Every measurement runs in a fresh process (clean peak memory; a peer
that runs out of memory cannot take the suite down); peers of one shape share that process and are
timed in interleaved rounds, so a change of machine load hits them alike. Medians after a warm-up
(compilation) call.

1. causal forward and forward + backward at T=8192 (targets: >= 5x and >= 3x faster than jax.nn);
2. sliding window 512 at T=16384 and 32768 (time ratio <= 2.3; >= 15x faster than jax.nn's
   ``local_window_size=(512, 0)`` at 16384);
3. peak process memory of causal forward + backward as T grows to 65536 (target < 2 GB, linear);
4. block sizes (what ``default_block_sizes`` picks on CPU);
5. the crossover against the dense reference at small T (what ``implementation=None`` should pick).

    python benchmarks/bench_flash_cpu.py           # the suite; updates its section of RESULTS.md
    python benchmarks/bench_flash_cpu.py --quick   # small sizes, prints only
"""

from __future__ import annotations

import argparse
import json
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
    peak_rss_mb,
    run_child,
    time_fn,
    torch_version,
    write_section,
)

SECTION = "Flash attention (CPU)"
SCRIPT = Path(__file__).resolve()
B, N, H = 1, 8, 64
NAMES = {
    "blockwise": "ours (blockwise)",
    "reference": "ours (dense reference)",
    "jax_nn": "jax.nn.dot_product_attention",
    "torch": "torch SDPA",
}


# ---------------------------------------------------------------------------------------------------
# Child process: one shape, several implementations, interleaved rounds
# ---------------------------------------------------------------------------------------------------


def _jax_callable(impl: str, mode: str, mask: str, window: int, blocks):
    import jax

    import attention_jax as aj
    from attention_jax.functional import _checks, blockwise

    if impl == "jax_nn":
        kw = {"local_window_size": (window, 0)} if mask == "window" else {"is_causal": True}
        f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kw)
    else:
        m = aj.masks.sliding_window(window) if mask == "window" else aj.masks.causal()
        if impl == "blockwise" and blocks:

            def f(q, k, v):
                shape = _checks.check_qkv(q, k, v)
                out, _ = blockwise.attention(
                    q, k, v, shape=shape, scale=H**-0.5, mask=m, block_q=blocks[0], block_k=blocks[1]
                )
                return out

        else:
            f = lambda q, k, v: aj.dot_product_attention(q, k, v, mask=m, implementation=impl)
    if mode == "fwd":
        return jax.jit(f)
    return jax.jit(lambda q, k, v, do: jax.vjp(f, q, k, v)[1](do))


def _torch_callable(mode: str, mask: str, window: int, arrays):
    import numpy as np
    import torch
    import torch.nn.functional as F

    q, k, v, do = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 1, 2))) for a in arrays)  # [B, N, T, H]
    t = q.shape[2]
    kw = {"enable_gqa": k.shape[1] != q.shape[1]}
    if mask == "window":
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        kw["attn_mask"] = (j <= i) & (j >= i - window)
    else:
        kw["is_causal"] = True

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


def child(spec: dict) -> dict:
    """Measure ``spec["items"]`` (impl, mode) on one shape; print JSON."""
    import jax
    import numpy as np

    kv_heads = spec["k"]
    keep_numpy = any(item["impl"] == "torch" for item in spec["items"])
    inputs = {}  # length -> (numpy arrays (for torch), jax arrays); an item may name its own length "t"
    for t in sorted({item.get("t", spec["t"]) for item in spec["items"]}):
        rng = np.random.default_rng(0)
        shapes = [(B, t, N, H), (B, t, kv_heads, H), (B, t, kv_heads, H), (B, t, N, H)]  # q, k, v, output cotangent
        arrays, jax_arrays = [], []
        for shape in shapes:  # one at a time, so that a numpy copy never doubles the inputs' memory
            a = rng.standard_normal(shape, dtype=np.float32)
            jax_arrays.append(jax.block_until_ready(jax.device_put(a)))
            if keep_numpy:
                arrays.append(a)
            del a
        inputs[t] = (arrays, jax_arrays)
    base = peak_rss_mb()
    calls = []
    for item in spec["items"]:
        impl, mode = item["impl"], item["mode"]
        arrays, jax_arrays = inputs[item.get("t", spec["t"])]
        if impl == "torch":
            calls.append(_torch_callable(mode, spec["mask"], spec["window"], arrays))
        else:
            f = _jax_callable(impl, mode, spec["mask"], spec["window"], item.get("blocks"))
            args = jax_arrays[:3] if mode == "fwd" else jax_arrays
            calls.append(lambda f=f, args=args: f(*args))
    load_start = load_average()
    firsts = [time_fn(call, repeats=0)["first"] for call in calls]  # compile / warm up each
    samples = [[] for _ in calls]
    for _ in range(spec["repeats"]):
        for n, call in enumerate(calls):
            samples[n].append(time_fn(call, repeats=1, warmup=0)["samples"][0])
    items = []
    for item, first, s in zip(spec["items"], firsts, samples):
        s = s or [first]
        items.append({**item, "median": float(np.median(s)), "min": min(s), "samples": s, "first": first})
    return {"items": items, "base_mb": base, "peak_mb": peak_rss_mb(), "load": [load_start, load_average()]}


# ---------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------


def measure(t, k, items, *, mask="causal", window=512, repeats=3) -> dict:
    spec = {"t": t, "k": k, "items": items, "mask": mask, "window": window, "repeats": repeats}
    started = time.perf_counter()
    result = run_child(SCRIPT, ["--child", json.dumps(spec)])
    what = ", ".join(f"{i['impl']}/{i['mode']}" for i in items)
    print(f"  T={t} K={k} {mask}: {what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    if "error" in result:
        print(f"    -> {result['error']}", file=sys.stderr, flush=True)
    return result


def _median(result, impl, mode):
    for item in result.get("items", []):
        if item["impl"] == impl and item["mode"] == mode:
            return item["median"]
    return None


def _peers(have_torch):
    return ["blockwise", "jax_nn"] + (["torch"] if have_torch else [])


def causal_section(t, have_torch, repeats) -> tuple[list[str], dict]:
    lines, ratios = [], {}
    rows = []
    for k in (8, 2):
        impls = _peers(have_torch)
        items = [{"impl": i, "mode": m} for m in ("fwd", "fwd_bwd") for i in impls]
        res = measure(t, k, items, repeats=repeats)
        for impl in impls:
            fwd, both = _median(res, impl, "fwd"), _median(res, impl, "fwd_bwd")
            ours_fwd, ours_both = _median(res, "blockwise", "fwd"), _median(res, "blockwise", "fwd_bwd")
            speed_fwd = fwd / ours_fwd if fwd and ours_fwd else None
            speed_both = both / ours_both if both and ours_both else None
            rows.append([f"K={k}", NAMES[impl], fmt_ms(fwd), fmt_ratio(speed_fwd), fmt_ms(both), fmt_ratio(speed_both)])
            ratios[(k, impl)] = (speed_fwd, speed_both)
        if "error" in res:
            rows.append([f"K={k}", "(failed)", res["error"], "", "", ""])
    lines.append(
        f"**Causal, T={t}**, B={B}, N={N}, H={H}, float32; median of {repeats} after a warm-up; "
        "'speed-up' is the peer's time over ours (> 1: ours is faster)."
    )
    lines.append("")
    lines += markdown_table(
        ["heads", "implementation", "forward (ms)", "speed-up", "forward + backward (ms)", "speed-up"], rows
    )
    return lines, ratios


def window_section(ts, have_torch, repeats, window=512) -> tuple[list[str], dict]:
    rows, ours = [], {}
    peer_t = ts[0]
    # Ours at every length in one process, interleaved: the growth ratio is not skewed by load changes.
    items = [{"impl": "blockwise", "mode": m, "t": t} for t in ts for m in ("fwd", "fwd_bwd")]
    if have_torch:
        items.append({"impl": "torch", "mode": "fwd", "t": peer_t})
    res = measure(peer_t, 8, items, mask="window", window=window, repeats=repeats)
    got = {(i["impl"], i["mode"], i["t"]): i["median"] for i in res.get("items", [])}
    nn = measure(peer_t, 8, [{"impl": "jax_nn", "mode": "fwd"}], mask="window", window=window, repeats=2)
    if "error" in nn:  # dense [T, T] scores: may run out of memory when other jobs hold some; retry once
        nn = measure(peer_t, 8, [{"impl": "jax_nn", "mode": "fwd"}], mask="window", window=window, repeats=1)
    for t in ts:
        ours[t] = (got.get(("blockwise", "fwd", t)), got.get(("blockwise", "fwd_bwd", t)))
        rows.append([f"T={t}", NAMES["blockwise"], fmt_ms(ours[t][0]), "1.00x", fmt_ms(ours[t][1])])
        if t == peer_t:
            peers = [("torch", got.get(("torch", "fwd", t)))] if have_torch else []
            peers.append(("jax_nn", _median(nn, "jax_nn", "fwd") if "error" not in nn else None))
            for impl, sec in peers:
                speed = sec / ours[t][0] if sec and ours[t][0] else None
                note = "" if sec or impl != "jax_nn" else f" ({nn['error']})"
                rows.append([f"T={t}", NAMES[impl] + note, fmt_ms(sec), fmt_ratio(speed), ""])
    t0, t1 = ts[0], ts[-1]
    growth = [ours[t1][i] / ours[t0][i] if ours[t1][i] and ours[t0][i] else None for i in (0, 1)]
    lines = [
        f"**Sliding window {window}** (query i sees keys i-{window}..i), K=8, float32; median of {repeats}. "
        f"Ours from T={t0} to T={t1}: forward x{growth[0] or float('nan'):.2f}, forward + backward "
        f"x{growth[1] or float('nan'):.2f} (linear is x{t1 / t0:.1f}).",
        "",
    ]
    lines += markdown_table(["length", "implementation", "forward (ms)", "speed-up", "forward + backward (ms)"], rows)
    return lines, {"growth": growth, "rows": rows}


def memory_section(ts, nn_t) -> tuple[list[str], dict]:
    rows, peaks = [], {}
    for t in ts:
        res = measure(t, 8, [{"impl": "blockwise", "mode": "fwd_bwd"}], repeats=0)
        peaks[t] = res.get("peak_mb")
        time_s = _median(res, "blockwise", "fwd_bwd")
        rows.append([f"T={t}", NAMES["blockwise"], _mb(res.get("base_mb")), _mb(peaks[t]), fmt_ms(time_s)])
    res = measure(nn_t, 8, [{"impl": "jax_nn", "mode": "fwd_bwd"}], repeats=0)
    rows.append(
        [
            f"T={nn_t}",
            NAMES["jax_nn"],
            _mb(res.get("base_mb")),
            _mb(res.get("peak_mb")),
            fmt_ms(_median(res, "jax_nn", "fwd_bwd")),
        ]
    )
    lines = [
        "**Peak process memory** (`ru_maxrss` of a fresh process: Python, JAX, inputs, compilation and one "
        "causal forward + backward), K=8, float32. 'inputs' is the process after creating q, k, v and the "
        "output cotangent, before compiling.",
        "",
    ]
    lines += markdown_table(["length", "implementation", "inputs (MB)", "peak (MB)", "first call (ms)"], rows)
    return lines, peaks


def _mb(x):
    return "n/a" if x is None else f"{x:,.0f}"


def block_section(t, sizes, repeats) -> list[str]:
    items = [{"impl": "blockwise", "mode": m, "blocks": list(b)} for b in sizes for m in ("fwd", "fwd_bwd")]
    res = measure(t, 8, items, repeats=repeats)
    rows = []
    for b in sizes:
        got = {i["mode"]: i["median"] for i in res.get("items", []) if i.get("blocks") == list(b)}
        rows.append([f"{b[0]} x {b[1]}", fmt_ms(got.get("fwd")), fmt_ms(got.get("fwd_bwd"))])
    lines = [f"**Block sizes** (block_q x block_k), causal, T={t}, K=8; median of {repeats}.", ""]
    return lines + markdown_table(["blocks", "forward (ms)", "forward + backward (ms)"], rows)


def crossover_section(ts, repeats) -> list[str]:
    rows = []
    for t in ts:
        impls = ["blockwise", "reference", "jax_nn"]
        res = measure(t, 8, [{"impl": i, "mode": m} for m in ("fwd", "fwd_bwd") for i in impls], repeats=repeats)
        row = [f"T={t}"]
        for mode in ("fwd", "fwd_bwd"):
            ours, ref = _median(res, "blockwise", mode), _median(res, "reference", mode)
            row += [
                fmt_ms(ours),
                fmt_ms(ref),
                fmt_ms(_median(res, "jax_nn", mode)),
                fmt_ratio(ref / ours if ours and ref else None),
            ]
        rows.append(row)
    header = [
        "length",
        "fwd: ours",
        "fwd: reference",
        "fwd: jax.nn",
        "ref / ours",
        "fwd+bwd: ours",
        "fwd+bwd: reference",
        "fwd+bwd: jax.nn",
        "ref / ours",
    ]
    lines = [f"**Small sizes** (ms), causal, K=8: where the dense reference is as fast; median of {repeats}.", ""]
    return lines + markdown_table(header, rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only (no RESULTS.md update)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    have_torch = torch_version() is not None
    started, load_start = time.perf_counter(), load_average()
    if args.quick:
        causal_t, window_ts, memory_ts, nn_mem_t, block_t, cross_ts, reps = (
            2048,
            (4096, 8192),
            (4096, 8192),
            2048,
            2048,
            (256, 1024),
            2,
        )
        sizes = [(256, 256), (512, 512)]
    else:
        causal_t, window_ts, memory_ts, nn_mem_t, block_t, cross_ts, reps = (
            8192,
            (16384, 32768),
            (16384, 32768, 65536),
            8192,
            8192,
            (256, 512, 1024, 2048, 4096),
            3,
        )
        sizes = [(256, 256), (256, 512), (512, 256), (512, 512), (1024, 512)]
    sections = []
    causal_lines, causal_ratios = causal_section(causal_t, have_torch, reps)
    sections.append(causal_lines)
    window_lines, window_info = window_section(window_ts, have_torch, reps)
    sections.append(window_lines)
    memory_lines, peaks = memory_section(memory_ts, nn_mem_t)
    sections.append(memory_lines)
    sections.append(block_section(block_t, sizes, reps))
    sections.append(crossover_section(cross_ts, reps))

    header = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/bench_flash_cpu.py"
        f"{' --quick' if args.quick else ''}` on {machine()}.",
        f"Load average {load_start:.1f} at the start and {load_average():.1f} at the end "
        f"({time.perf_counter() - started:.0f} s in all); the machine's 2 cores were shared with other jobs "
        "when the load exceeds ~2, which slows every row alike (peers are interleaved).",
        "",
    ]
    body = header + [line for s in sections for line in (s + [""])]
    text = "\n".join(body)
    print(text)
    if not args.quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
