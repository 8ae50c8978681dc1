"""Selective state spaces on CPU: the three scan forms against each other, and a Mamba-2 layer against attention.

1. **The scan forms** (``attention_jax.functional.selective_scan``) at T = 1k..64k, one sequence, Mamba-2's
   shapes: N=8 heads of H=32 channels (E=256), a state of F=32 per head, one group of ``b``/``c``, a scalar
   decay per head, chunks of 64. Forward time, forward+backward time (gradients of every input), and the
   peak memory of the process that ran the point. The chunked form is linear in T by construction; the table
   shows whether the others are too, and the chunked form's achieved GFLOP/s against a large matmul's on the
   same machine (a Pallas kernel for the scan is worth writing only if the XLA form is far from it).
2. **One layer**: ``nn.Mamba2`` (D=256, H=64, F=64) against ``nn.MultiHeadAttention`` (D=256, 4 heads of 64,
   causal, the default implementation: the blockwise flash path on CPU) at T = 1k..16k, batch 1, forward
   and forward+backward: what a user choosing a sequence mixer for a long context compares.

Each point runs in a fresh process (clean peak memory; an out-of-memory point is reported, not fatal), timed
as a median of repeats after a compiling call. Run it on a quiet machine.

    python benchmarks/bench_ssm.py                   # the suite (~5 min on 2 cores); updates RESULTS.md
    python benchmarks/bench_ssm.py --quick           # T = 256, 512; prints only
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
    write_section,
)

SECTION = "Selective state spaces (CPU)"
SCRIPT = Path(__file__).resolve()
FORMS = ("sequential", "associative", "chunked")
HEADS, HEAD_DIM, STATE, CHUNK = 8, 32, 32, 64
LAYER_WIDTH = 256


def scan_flops(length: int) -> float:
    """Multiply-adds x 2 of the chunked form: intra-chunk scores and values, the state's read and update."""
    per_token = CHUNK * (STATE + HEAD_DIM) + 2 * HEAD_DIM * STATE
    return 2.0 * HEADS * length * per_token


def measure_scan(form: str, length: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from attention_jax.functional import selective_scan

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (1, length, HEADS, HEAD_DIM))
    dt = jax.nn.softplus(jax.random.normal(keys[1], (1, length, HEADS)) - 3.0)
    b, c = (jax.random.normal(k, (1, length, 1, STATE)) for k in keys[2:])
    a = -jnp.linspace(1.0, 8.0, HEADS)
    run = lambda *args: selective_scan(*args, implementation=form, chunk_size=CHUNK)  # noqa: E731
    forward = jax.jit(run)
    backward = jax.jit(jax.grad(lambda *args: jnp.sum(run(*args) ** 2), argnums=(0, 1, 2, 3, 4)))
    fwd = time_fn(lambda: forward(x, dt, a, b, c), repeats=repeats)
    bwd = time_fn(lambda: backward(x, dt, a, b, c), repeats=repeats)
    return dict(forward=fwd["median"], backward=bwd["median"], peak_mb=peak_rss_mb())


def measure_matmul_rate() -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: jnp.dot(a, a))
    t = time_fn(lambda: mm(a), repeats=5)["median"]
    return dict(gflops=2.0 * n**3 / t / 1e9)


def measure_layer(kind: str, length: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import attention_jax as aj

    rngs = nnx.Rngs(0)
    if kind == "mamba2":
        layer = aj.nn.Mamba2(LAYER_WIDTH, head_dim=64, state_dim=64, rngs=rngs)
    else:
        layer = aj.nn.MultiHeadAttention(LAYER_WIDTH, num_heads=4, mask=aj.masks.causal(), rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (1, length, LAYER_WIDTH))
    forward = nnx.jit(lambda layer, x: layer(x))
    backward = nnx.jit(nnx.grad(lambda layer, x: jnp.sum(layer(x) ** 2), argnums=(0, 1)))
    fwd = time_fn(lambda: forward(layer, x), repeats=repeats)
    bwd = time_fn(lambda: jax.tree.leaves(backward(layer, x)), repeats=repeats)
    return dict(forward=fwd["median"], backward=bwd["median"], peak_mb=peak_rss_mb())


def child(args) -> None:
    start = time.perf_counter()
    if args.what == "matmul":
        result = measure_matmul_rate()
    elif args.what in FORMS:
        result = measure_scan(args.what, args.length, args.repeats)
    else:
        result = measure_layer(args.what, args.length, args.repeats)
    result["seconds"] = time.perf_counter() - start
    print(json.dumps(result))


def point(what: str, length: int, repeats: int) -> dict:
    return run_child(SCRIPT, ["--child", what, "--length", str(length), "--repeats", str(repeats)])


def _cell(result: dict, key: str) -> str:
    return f"error: {result['error']}" if "error" in result else fmt_ms(result[key])


def _ratio(slow: dict, fast: dict, key: str) -> float | None:
    return None if "error" in slow or "error" in fast else slow[key] / fast[key]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 256, 512; print only")
    p.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    p.add_argument("--child", dest="what", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.what:
        return child(args)
    scan_lengths = [256, 512] if args.quick else [1024, 4096, 16384, 65536]
    layer_lengths = [256, 512] if args.quick else [1024, 4096, 16384]
    repeats = 1 if args.quick else 3
    load = load_average()
    if load > 1.0:
        print(f"warning: load average {load:.1f}; timings are noisy on a busy machine", file=sys.stderr)

    rate = point("matmul", 0, repeats)
    scan_rows = []
    for length in scan_lengths:
        results = {form: point(form, length, repeats) for form in FORMS}
        chunked = results["chunked"]
        achieved = None if "error" in chunked else scan_flops(length) / chunked["forward"] / 1e9
        row = [f"{length:,}"]
        for form in FORMS:
            row += [_cell(results[form], "forward"), _cell(results[form], "backward")]
        row += [f"{results[f].get('peak_mb', float('nan')):,.0f}" for f in FORMS]
        row.append("n/a" if achieved is None else f"{achieved:.1f}")
        scan_rows.append(row)
        print(" | ".join(row), flush=True)
    layer_rows = []
    for length in layer_lengths:
        mamba, attention = point("mamba2", length, repeats), point("attention", length, repeats)
        row = [f"{length:,}", _cell(mamba, "forward"), _cell(attention, "forward"),
               fmt_ratio(_ratio(attention, mamba, "forward")), _cell(mamba, "backward"), _cell(attention, "backward"),
               fmt_ratio(_ratio(attention, mamba, "backward"))]  # fmt: skip
        layer_rows.append(row)
        print(" | ".join(row), flush=True)

    body = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; load average {load:.1f} at the start.",
        "Command: `python benchmarks/bench_ssm.py`. Medians of "
        f"{repeats} calls after a compiling one, each point in a fresh process.",
        "",
        f"### The three scan forms (B=1, N={HEADS}, H={HEAD_DIM}, F={STATE}, chunks of {CHUNK}, float32)",
        "",
        "Milliseconds; `fwd+bwd` is the gradient of every input. Peak MB is the process's resident peak.",
        "",
        *markdown_table(
            ["T", "sequential fwd", "fwd+bwd", "associative fwd", "fwd+bwd", "chunked fwd", "fwd+bwd",
             "peak MB seq", "peak MB assoc", "peak MB chunked", "chunked GFLOP/s"],
            scan_rows,
        ),  # fmt: skip
        "",
        f"A 2048 x 2048 float32 matmul runs at {rate.get('gflops', float('nan')):.1f} GFLOP/s on this machine.",
        "",
        f"### One layer: Mamba-2 against causal attention (B=1, D={LAYER_WIDTH}, float32)",
        "",
        "Milliseconds; the ratio is attention's time over Mamba-2's (above 1: Mamba-2 is faster).",
        "",
        *markdown_table(
            ["T", "Mamba-2 fwd", "attention fwd", "ratio", "Mamba-2 fwd+bwd", "attention fwd+bwd", "ratio"],
            layer_rows,
        ),
    ]
    if args.quick or args.no_write:
        print("\n".join(body))
    else:
        write_section(SECTION, "\n".join(body))
        print(f"wrote the section {SECTION!r} of RESULTS.md")


if __name__ == "__main__":
    main()
