"""Ring attention on 8 CPU devices: per-device memory as P grows, and time against one device.

1. Memory: causal forward + backward at a fixed T / P as P grows. Per-device bytes from the
   compiled program (``compiled.memory_analysis()``: arguments + outputs + temporaries), beside
   single-device blockwise and the dense reference on the whole sequence. The ring's figure
   should stay flat.
2. Time: the ring on 8 devices (each layout) against single-device blockwise attention on the same
   sequence, causal, forward and forward + backward; medians. The 8 "devices" share this
   machine's cores, so this measures the ring's overhead (layout permutations, merges,
   ``ppermute``), not a speed-up.

    python benchmarks/bench_ring.py            # prints the tables and updates benchmarks/RESULTS.md
    python benchmarks/bench_ring.py --quick    # smaller sizes, no RESULTS.md update
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

NUM_DEVICES = 8
if "jax" not in sys.modules:  # XLA reads its flags when JAX initialises
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attention_jax as aj  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from common import fmt_ms, load_average, machine, markdown_table, time_fn, write_section  # noqa: E402

SECTION = "Ring attention (CPU, 8 devices)"
MASK = aj.masks.causal()


def _ring(p: int, layout: str):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:p]), ("sp",))
    return functools.partial(aj.sequence_parallel_attention, mesh=mesh, axis="sp", mask=MASK, layout=layout)


def _single(implementation: str):
    return functools.partial(aj.dot_product_attention, mask=MASK, implementation=implementation)


def _fwd_bwd(attention):
    return jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v)), argnums=(0, 1, 2))


def _shapes(b, t, n, k, h):
    q = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    kv = jax.ShapeDtypeStruct((b, t, k, h), jnp.float32)
    return q, kv, kv


def _device_bytes(fn, *args) -> int:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes


def memory_table(per_device: int, b: int, n: int, k: int, h: int) -> list[str]:
    rows = []
    for p in (1, 2, 4, 8):
        t = per_device * p
        args = _shapes(b, t, n, k, h)
        ring = _device_bytes(_fwd_bwd(_ring(p, "zigzag")), *args)
        blockwise = _device_bytes(_fwd_bwd(_single("blockwise")), *args)
        reference = _device_bytes(_fwd_bwd(_single("reference")), *args)
        rows.append([p, t, f"{ring / 1e6:.1f}", f"{blockwise / 1e6:.1f}", f"{reference / 1e6:,.0f}"])
        print(rows[-1], flush=True)
    header = ["P", "T", "ring (zigzag), per device", "single-device blockwise at T", "single-device reference at T"]
    return [
        f"Causal forward + backward, B={b}, N={n}, K={k}, H={h}, float32, T / P = {per_device} tokens per device; "
        "MB per device from `compiled.memory_analysis()` (arguments + outputs + temporaries).",
        "",
        *markdown_table(header, rows, align="rrrrr"),
    ]


def time_table(t: int, b: int, n: int, k: int, h: int, repeats: int) -> list[str]:
    keys = jax.random.split(jax.random.key(0), 3)
    args = (
        jax.random.normal(keys[0], (b, t, n, h)),
        jax.random.normal(keys[1], (b, t, k, h)),
        jax.random.normal(keys[2], (b, t, k, h)),
    )
    p = len(jax.devices())
    candidates = {"single-device blockwise": _single("blockwise")}
    candidates.update(
        {f"ring, {p} devices, {layout}": _ring(p, layout) for layout in ("zigzag", "striped", "contiguous")}
    )
    rows, base = [], None
    for name, attention in candidates.items():
        fwd = time_fn(functools.partial(jax.jit(attention), *args), repeats)["median"]
        both = time_fn(functools.partial(jax.jit(_fwd_bwd(attention)), *args), repeats)["median"]
        base = base or (fwd, both)
        rows.append([name, fmt_ms(fwd), f"{fwd / base[0]:.2f}", fmt_ms(both), f"{both / base[1]:.2f}"])
        print(rows[-1], flush=True)
    header = ["path", "forward (ms)", "ratio", "forward + backward (ms)", "ratio"]
    return [
        f"Causal attention, T={t}, B={b}, N={n}, K={k}, H={h}, float32; median of {repeats} runs after a warm-up. "
        f"The {p} devices share {os.cpu_count()} CPU cores: the ratio is the ring's overhead, not a speed-up.",
        "",
        *markdown_table(header, rows),
    ]


def balance_table(t: int, p: int) -> list[str]:
    rows = []
    for layout in ("contiguous", "zigzag", "striped"):
        counts = aj.distributed.blocks_per_device(MASK, t, p, layout)
        rows.append([layout, counts.min(), counts.max(), f"{counts.max() / counts.mean():.2f}"])
    return [
        f"Causal load balance, T={t} over P={p} devices: tiles computed per device over the whole ring, with the "
        "tiles the run above used (`attention_jax.distributed.blocks_per_device`); max over mean, 1.0 is perfect.",
        "",
        *markdown_table(["layout", "min", "max", "max / mean"], rows),
    ]


READING = [
    "Reading: per-device memory stays flat as P grows at a fixed T / P (P = 1 has no receive buffers), while "
    "one device running the whole sequence grows linearly (blockwise) or quadratically (reference). The 8 CPU "
    "devices share the machine's cores, so the ring's time here counts its total work and per-step costs (one "
    "step launch and one merge per non-empty step, layout permutations), not its balance: contiguous skips the "
    "empty half of the steps, zigzag runs every step on every device, and striped tiles of a causal mask are "
    "partial (mask arithmetic) where zigzag's are full or skipped. On devices that run in parallel the slowest "
    "device sets the pace, and that is what zigzag and striped balance (last table).",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, print only")
    args = parser.parse_args(argv)
    b, n, k, h = 1, 8, 2, 64
    per_device, t, repeats = (512, 2048, 2) if args.quick else (2048, 8192, 5)
    header = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; load average {load_average():.1f} at the start. "
        "`python benchmarks/bench_ring.py`.",
        "",
    ]
    lines = header + memory_table(per_device, b, n, k, h) + [""] + time_table(t, b, n, k, h, repeats)
    lines += [""] + balance_table(t, NUM_DEVICES) + ["", *READING]
    print("\n".join(lines))
    if not args.quick:
        write_section(SECTION, "\n".join(lines))


if __name__ == "__main__":
    main()
