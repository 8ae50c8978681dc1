"""Sparse attention on the block-skipping (blockwise) path: does the cost grow as O(T * w)?

Longformer (sliding window of 256 keys per side + 2 global tokens) and BigBird (blocks of 128: one neighbour
block per side, one global block, two random blocks) masks from ``attention_jax.sparse_patterns``, next to full
and causal attention measured in the same run. For each pattern: the median forward time at T and at 2T, their
ratio (2 for O(T * w), 4 for O(T^2)), and the share of tiles the block map leaves to visit. Two tilings: the
default of ``dot_product_attention(..., implementation="blockwise")`` (512 x 512 on CPU) and 128 x 128 tiles
(``aj.functional.backends.Blockwise(block_q=128, block_k=128)``), which BigBird's 128-position blocks
need to be skipped.

float32, B=1, N=8, K=2 (GQA), H=64; medians of 5 calls after a warm-up (compilation) call, every (pattern, T)
interleaved round by round so that a change of machine load hits them alike.

    python benchmarks/bench_sparse.py            # T = 4096 and 8192; updates its section of RESULTS.md
    python benchmarks/bench_sparse.py --quick    # T = 1024 and 2048, prints only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import block, fmt_ms, fmt_ratio, load_average, machine, markdown_table, write_section  # noqa: E402

import attention_jax as aj  # noqa: E402
from attention_jax import sparse_patterns  # noqa: E402
from attention_jax.functional import blockwise  # noqa: E402
from pallas_kernels.mask_info import EMPTY  # noqa: E402

SECTION = "Sparse attention (CPU)"
B, N, K, H = 1, 8, 2, 64
PATTERNS = {
    "full": None,
    "causal": aj.masks.causal(),
    "Longformer (w=256, 2 global)": sparse_patterns.longformer(256, global_tokens=2),
    "BigBird (block 128, 1+1+2)": sparse_patterns.bigbird(128, window_blocks=1, global_blocks=1, random_blocks=2),
}
TILINGS = {"default tiles": None, "128 x 128 tiles": 128}
BUSY = (
    " Other jobs shared the cores during this run: ratios far above 4 for full attention are their noise; read the"
    " sparse rows against the dense rows of the same run."
)


def attend_fn(mask, tile, t):
    """A jitted forward at length t: the public blockwise path, or blockwise with ``tile x tile`` tiles."""
    backend = "blockwise" if tile is None else aj.functional.backends.Blockwise(block_q=tile, block_k=tile)
    return jax.jit(lambda q, k, v: aj.dot_product_attention(q, k, v, mask=mask, implementation=backend))


def visited_share(mask, tile, t) -> float:
    """Share of the score matrix's tiles that the block map leaves to visit."""
    if tile is None:
        tile = blockwise.default_block_sizes(t, t)[0]
    if mask is None:
        return 1.0
    return float(np.mean(mask.block_map(t, t, tile, tile) != EMPTY))


def measure(lengths, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    inputs = {
        t: tuple(jnp.asarray(rng.standard_normal((B, t, heads, H)), jnp.float32) for heads in (N, K, K))
        for t in lengths
    }
    rows = []
    for tiling, tile in TILINGS.items():
        fns = {(name, t): attend_fn(mask, tile, t) for name, mask in PATTERNS.items() for t in lengths}
        for (_, t), fn in fns.items():  # warm-up: compile
            block(fn(*inputs[t]))
        samples = {key: [] for key in fns}
        for _ in range(repeats):  # interleaved rounds: every pattern at both lengths in each round
            for (name, t), fn in fns.items():
                start = time.perf_counter()
                block(fn(*inputs[t]))
                samples[name, t].append(time.perf_counter() - start)
        t0, t1 = lengths
        for name, mask in PATTERNS.items():
            m0, m1 = statistics.median(samples[name, t0]), statistics.median(samples[name, t1])
            rows.append(
                dict(
                    tiling=tiling,
                    pattern=name,
                    t0=m0,
                    t1=m1,
                    ratio=m1 / m0,
                    visited0=visited_share(mask, tile, t0),
                    visited1=visited_share(mask, tile, t1),
                )
            )
            print(
                f"{tiling:<16}{name:<30}{fmt_ms(m0):>9} ms {fmt_ms(m1):>9} ms  x{m1 / m0:.2f}"
                f"  tiles {rows[-1]['visited0']:.0%} -> {rows[-1]['visited1']:.0%}",
                flush=True,
            )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 1024 and 2048; print only")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    lengths = (1024, 2048) if args.quick else (4096, 8192)
    load = load_average()
    print(machine(), f"load average {load:.1f}")
    rows = measure(lengths, args.repeats)
    if args.quick:
        return
    t0, t1 = lengths
    header = ["tiling", "pattern", f"T={t0} (ms)", f"T={t1} (ms)", "time(2T) / time(T)", "tiles visited"]
    table = [
        [r["tiling"], r["pattern"], fmt_ms(r["t0"]), fmt_ms(r["t1"]), fmt_ratio(r["ratio"]),
         f"{r['visited0']:.0%} -> {r['visited1']:.0%}"]
        for r in rows
    ]  # fmt: skip
    body = "\n".join(
        [
            f"Measured {time.strftime('%Y-%m-%d')} on {machine()} (load average {load:.1f} at the start), "
            "`python benchmarks/bench_sparse.py`.",
            "",
            f"Forward, float32, B={B}, N={N}, K={K}, H={H}, blockwise path; median of {args.repeats} after a warm-up. "
            "O(T * w) doubles the time when T doubles, O(T^2) quadruples it."
            + (BUSY if load > (os.cpu_count() or 1) else ""),
            "",
            *markdown_table(header, table, align="llrrrr"),
        ]
    )
    write_section(SECTION, body)
    print(f"wrote the '{SECTION}' section of benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
