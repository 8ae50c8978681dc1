"""How fast could any XLA attention be on this CPU? The matmul bound, against PyTorch SDPA, in one run.

A blockwise (flash) attention forward is two batched matmuls per tile, ``S = Q K^T`` over the
head dim (``[N, bq, H] x [N, bk, H]``) and ``O += P V`` over the key tile (``[N, bq, bk] x
[N, bk, H]``), plus the softmax between them. This script times those two matmuls alone, as XLA
compiles them (``jnp.einsum`` under ``jit``) and as PyTorch runs them (``torch.bmm``), for several
tile sizes, interleaved in one process. From XLA's best rate it derives a lower bound on the
forward time of *any* XLA blockwise attention (softmax free, no waste on diagonal tiles) and
compares it with PyTorch SDPA's measured forward at the same shape: when the bound is slower than
torch, no tiling or schedule written in JAX reaches the 1.2x-over-torch goal on this machine.

A second part looks at one decode step (one query token per sequence over a long cache) at the
attention shapes of ``bench_decode.py``'s model, on every core and pinned to one core, each in a
fresh child process: ours (the XLA decode body that a layer's ``cached_attention`` runs on CPU)
against torch SDPA as transformers calls it for one token (the query group packed as rows of the
key/value head). It shows where the time goes: how much each side gains from the second core.

    python benchmarks/bench_cpu_bound.py           # updates its section of RESULTS.md
    python benchmarks/bench_cpu_bound.py --quick   # small sizes, prints only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import fmt_ms, load_average, machine, markdown_table, run_child, torch_version, write_section  # noqa: E402

SECTION = "CPU matmul bound of XLA attention"
B, N, H = 1, 8, 64
DECODE = dict(batch=8, num_heads=8, num_kv_heads=2, head_dim=64)  # bench_decode.py's model
TILES = ((128, 128), (256, 256), (512, 256), (512, 512), (1024, 1024), (2048, 2048))


def _timer(call, repeats: int):
    """Median seconds of ``call()`` (which blocks until its result is ready) over ``repeats`` calls.

    One untimed call first: the other library's worker threads may still be spinning from its last
    call (torch's OpenMP pool and XLA's pool each wait busy for a while), which slows a lone call.
    """

    def run() -> float:
        call()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return float(np.median(samples))

    return run


def _tile_calls(bq: int, bk: int, repeats: int) -> dict:
    """The two tile matmuls in XLA and in torch: name -> (timer, flops per call)."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((N, n, H), dtype=np.float32) for n in (bq, bk, bk))
    p = rng.random((N, bq, bk), dtype=np.float32)
    scores = jax.jit(lambda q, k: jnp.einsum("NQH,NKH->NQK", q, k))  # contraction over H
    values = jax.jit(lambda p, v: jnp.einsum("NQK,NKH->NQH", p, v))  # contraction over the key tile
    jq, jk, jv, jp = (jnp.asarray(x) for x in (q, k, v, p))
    tq, tk, tv, tp = (torch.from_numpy(x) for x in (q, k, v, p))
    tkt = tk.transpose(1, 2)
    flops = 2 * N * bq * bk * H
    return {
        "xla QK": (_timer(lambda: scores(jq, jk).block_until_ready(), repeats), flops),
        "xla PV": (_timer(lambda: values(jp, jv).block_until_ready(), repeats), flops),
        "torch QK": (_timer(lambda: torch.bmm(tq, tkt), repeats), flops),
        "torch PV": (_timer(lambda: torch.bmm(tp, tv), repeats), flops),
    }


def _attention_calls(t: int, repeats: int) -> dict:
    """Causal forward at length ``t``: ours (the library's default path) and torch SDPA."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    import attention_jax as aj

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((B, t, N, H), dtype=np.float32) for _ in range(3))
    ours = jax.jit(lambda q, k, v: aj.dot_product_attention(q, k, v, mask=aj.masks.causal()))
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2))) for x in (q, k, v))

    def sdpa():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    return {"ours": _timer(lambda: ours(jq, jk, jv).block_until_ready(), repeats), "torch": _timer(sdpa, repeats)}


def _decode_calls(length: int, repeats: int) -> dict:
    """One decode step at cache length ``length``: ours (``decode_attention``, XLA body) and torch SDPA."""
    import jax
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from pallas_kernels.decode_attention import decode_attention

    b, n, kh, h = DECODE["batch"], DECODE["num_heads"], DECODE["num_kv_heads"], DECODE["head_dim"]
    rng = np.random.default_rng(2)
    q = rng.standard_normal((b, 1, n, h), dtype=np.float32)
    k, v = (rng.standard_normal((b, length, kh, h), dtype=np.float32) for _ in range(2))
    # A dense cache is one page per sequence; every slot is written, the query is the last token.
    table, lengths = jnp.arange(b, dtype=jnp.int32)[:, None], jnp.full((b,), length, jnp.int32)
    positions = (lengths - 1)[:, None]

    def causal(q_pos, kv_pos, q_vals, kv_vals):
        return kv_pos <= q_pos

    ours = jax.jit(lambda q, k, v: decode_attention(q, k, v, table, lengths, q_positions=positions, mask_fn=causal))
    jq, jk, jv = (jnp.asarray(x) for x in (q, k, v))
    # transformers' SDPA path for one token packs each KV head's query group as rows: [B, K, G, H].
    tq = torch.from_numpy(np.ascontiguousarray(q.reshape(b, kh, n // kh, h)))
    tk, tv = (torch.from_numpy(np.ascontiguousarray(np.swapaxes(x, 1, 2))) for x in (k, v))

    def sdpa():
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv)

    return {"ours": _timer(lambda: ours(jq, jk, jv).block_until_ready(), repeats), "torch": _timer(sdpa, repeats)}


def decode_child(lengths, rounds: int, repeats: int) -> dict:
    """Decode timings in this process, interleaved rounds: ``{length: {"ours": s, "torch": s}}``."""
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    calls = {t: _decode_calls(t, repeats) for t in lengths}
    timers = [((t, name), timer) for t, named in calls.items() for name, timer in named.items()]
    medians = _interleaved_medians(timers, rounds, warmup=20)
    return {str(t): {name: medians[(t, name)] for name in calls[t]} for t in lengths}


def _interleaved_medians(timers, rounds: int, warmup: int) -> dict:
    """``warmup`` untimed calls of each timer (compiling; torch's first few dozen calls run slowly), then
    ``rounds`` rounds calling every timer once in turn: ``{key: median seconds}``."""
    for _, timer in timers:
        for _ in range(warmup):
            timer()
    samples: dict = {key: [] for key, _ in timers}
    for _ in range(rounds):
        for key, timer in timers:
            samples[key].append(timer())
    return {key: float(np.median(s)) for key, s in samples.items()}


def measure(ts, tiles, rounds: int, repeats: int) -> tuple[dict, dict]:
    """Interleaved rounds over every tile matmul and attention call; medians over rounds."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tile_calls = {(bq, bk): _tile_calls(bq, bk, repeats) for bq, bk in tiles}
    attn_calls = {t: _attention_calls(t, 1) for t in ts}
    timers = [(("tile", key, name), timer) for key, calls in tile_calls.items() for name, (timer, _) in calls.items()]
    timers += [(("attn", t, name), timer) for t, calls in attn_calls.items() for name, timer in calls.items()]
    medians = _interleaved_medians(timers, rounds, warmup=5)
    rates = {
        (bq, bk): {name: flops / medians[("tile", (bq, bk), name)] for name, (_, flops) in calls.items()}
        for (bq, bk), calls in tile_calls.items()
    }
    attn = {t: {name: medians[("attn", t, name)] for name in calls} for t, calls in attn_calls.items()}
    return rates, attn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only (no RESULTS.md update)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-child", type=int, help=argparse.SUPPRESS)  # cores to pin this child to
    parser.add_argument("--decode-lengths", type=lambda s: [int(x) for x in s.split(",")], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if torch_version() is None:
        sys.exit("bench_cpu_bound.py needs torch (the `bench` extra): it compares against torch's matmuls.")
    if args.decode_child:
        # Pinned before JAX or torch start their thread pools, so both size them to these cores.
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.decode_child])
        print(json.dumps(decode_child(args.decode_lengths, args.rounds, 20)))
        return
    ts, tiles, repeats = ((1024,), TILES[:3], 20) if args.quick else ((4096, 8192), TILES, 20)
    decode_lengths = (1024,) if args.quick else (4096, 8192)
    started, load_start = time.perf_counter(), load_average()
    rates, attn = measure(ts, tiles, args.rounds, repeats)
    all_cores = len(os.sched_getaffinity(0))
    child_args = ["--rounds", str(args.rounds), "--decode-lengths", ",".join(map(str, decode_lengths))]
    decode = {cores: run_child(Path(__file__), [*child_args, "--decode-child", str(cores)])
              for cores in sorted({all_cores, 1}, reverse=True)}  # fmt: skip

    tile_rows = []
    for (bq, bk), r in rates.items():
        g = {name: rate / 1e9 for name, rate in r.items()}
        tile_rows.append(
            [f"{bq} x {bk}"] + [f"{g[n]:.0f}" for n in ("xla QK", "torch QK", "xla PV", "torch PV")]
            + [f"{g['torch QK'] / g['xla QK']:.2f}x", f"{g['torch PV'] / g['xla PV']:.2f}x"]
        )  # fmt: skip
    best_qk = max(r["xla QK"] for r in rates.values())
    best_pv = max(r["xla PV"] for r in rates.values())
    bound_rows = []
    for t, times in attn.items():
        half_flops = 2 * B * N * t * t * H / 2  # each of the two matmuls, causal: half the tiles
        bound = half_flops / best_qk + half_flops / best_pv
        bound_rows.append(
            [str(t), fmt_ms(times["torch"]), fmt_ms(times["ours"]), fmt_ms(bound), fmt_ms(times["torch"] / 1.2),
             f"{times['torch'] / times['ours']:.2f}x", f"{times['torch'] / bound:.2f}x"]
        )  # fmt: skip
    decode_rows = []
    for cores, result in decode.items():
        for t in decode_lengths:
            if "error" in result:
                decode_rows.append([str(t), str(cores)] + [result["error"]] + [""] * 2)
                continue
            times = result[str(t)]
            decode_rows.append([str(t), str(cores), fmt_ms(times["ours"]), fmt_ms(times["torch"]),
                                f"{times['torch'] / times['ours']:.2f}x"])  # fmt: skip
    d = DECODE
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC with `python benchmarks/bench_cpu_bound.py"
        f"{' --quick' if args.quick else ''}` on {machine()}; load average {load_start:.1f} at the start and "
        f"{load_average():.1f} at the end ({time.perf_counter() - started:.0f} s). Every number below comes from "
        f"one process, implementations interleaved; median of {args.rounds} rounds of {repeats} calls (attention: "
        "1 call per round).",
        "",
        f"**The two matmuls of one attention tile** (N={N} heads, H={H}, float32), GFLOP/s: XLA (`jnp.einsum` under "
        "`jit`) against torch (`torch.bmm`).",
        "",
        *markdown_table(
            ["tile (bq x bk)", "XLA QK^T", "torch QK^T", "XLA PV", "torch PV", "torch/XLA QK^T", "torch/XLA PV"],
            tile_rows,
        ),
        "",
        f"**Causal forward, B={B}, N={N}, H={H}, float32.** 'XLA matmul bound': the attention's matmul flops "
        "(half the T x T tiles, no diagonal waste) at XLA's best tile rates above, softmax free: no XLA "
        "blockwise attention can be faster on this machine. 'goal': torch / 1.2.",
        "",
        *markdown_table(
            ["T", "torch SDPA (ms)", "ours (ms)", "XLA matmul bound (ms)", "goal (ms)", "torch / ours",
             "torch / bound"],
            bound_rows,
        ),  # fmt: skip
        "",
        f"**One decode step, B={d['batch']}, {d['num_heads']} query / {d['num_kv_heads']} key-value heads, "
        f"H={d['head_dim']}, float32** (the attention of one layer of `bench_decode.py`'s model): ours, "
        "`decode_attention`'s XLA body over a dense cache (what `cached_attention` runs on CPU), against torch "
        "SDPA with each key-value head's query group packed as rows (what transformers runs for one token). "
        "Each core count in its own process, pinned to that many cores before JAX and torch start their thread "
        "pools (torch threads = cores).",
        "",
        *markdown_table(["L", "cores", "ours (ms)", "torch SDPA (ms)", "torch / ours"], decode_rows),
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
