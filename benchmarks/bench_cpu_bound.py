"""How fast could any XLA attention be on this CPU? The matmul bound, against PyTorch SDPA, in one run.

A blockwise (flash) attention forward is two batched matmuls per tile, ``S = Q K^T`` over the
head dim (``[N, bq, H] x [N, bk, H]``) and ``O += P V`` over the key tile (``[N, bq, bk] x
[N, bk, H]``), plus the softmax between them. This script times those two matmuls alone, as XLA
compiles them (``jnp.einsum`` under ``jit``) and as PyTorch runs them (``torch.bmm``), for several
tile sizes, interleaved in one process. From XLA's best rate it derives a lower bound on the
forward time of *any* XLA blockwise attention (softmax free, no waste on diagonal tiles) and
compares it with PyTorch SDPA's measured forward at the same shape: when the bound is slower than
torch, no tiling or schedule written in JAX reaches the 1.2x-over-torch goal on this machine.

    python benchmarks/bench_cpu_bound.py           # updates its section of RESULTS.md
    python benchmarks/bench_cpu_bound.py --quick   # small sizes, prints only
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from common import fmt_ms, load_average, machine, markdown_table, torch_version, write_section  # noqa: E402

SECTION = "CPU matmul bound of XLA attention"
B, N, H = 1, 8, 64
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


def measure(ts, tiles, rounds: int, repeats: int) -> tuple[dict, dict]:
    """Interleaved rounds over every tile matmul and attention call; medians over rounds."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    tile_calls = {(bq, bk): _tile_calls(bq, bk, repeats) for bq, bk in tiles}
    attn_calls = {t: _attention_calls(t, 1) for t in ts}
    timers = [(("tile", key, name), timer) for key, calls in tile_calls.items() for name, (timer, _) in calls.items()]
    timers += [(("attn", t, name), timer) for t, calls in attn_calls.items() for name, timer in calls.items()]
    for _, timer in timers:  # compile and warm up: torch's bmm runs slowly for its first few dozen calls
        for _ in range(5):
            timer()
    samples: dict = {key: [] for key, _ in timers}
    for _ in range(rounds):
        for key, timer in timers:
            samples[key].append(timer())
    medians = {key: float(np.median(s)) for key, s in samples.items()}
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
    args = parser.parse_args(argv)
    if torch_version() is None:
        sys.exit("bench_cpu_bound.py needs torch (the `bench` extra): it compares against torch's matmuls.")
    ts, tiles, repeats = ((1024,), TILES[:3], 20) if args.quick else ((4096, 8192), TILES, 20)
    started, load_start = time.perf_counter(), load_average()
    rates, attn = measure(ts, tiles, args.rounds, repeats)

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
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
