"""Selective state spaces: the scan forms against each other, and a Mamba-2 layer against attention.

1. **The scan forms** (``attention_jax.functional.selective_scan``) at T = 1k..64k, one sequence, Mamba-2's
   shapes: N=8 heads of H=32 channels (E=256), a state of F=32 per head, one group of ``b``/``c``, a scalar
   decay per head, chunks of 64. Forward time, forward+backward time (gradients of every input), and the
   peak memory of the process that ran the point. The chunked form is linear in T by construction; the table
   shows whether the others are too, and the chunked forms' achieved GFLOP/s against a large matmul's on the
   same machine. The ``pallas`` form (the SSD kernel, ``pallas_kernels.ssd_scan``) runs on GPUs and TPUs
   only: on a CPU it would be Pallas' interpreter, which is for testing, so its cells say so.
2. **One layer**: ``nn.Mamba2`` (D=256, H=64, F=64) against ``nn.MultiHeadAttention`` (D=256, 4 heads of 64,
   causal, the default implementation: the blockwise flash path on CPU) at T = 1k..16k, batch 1, forward
   and forward+backward: what a user choosing a sequence mixer for a long context compares.

Each point runs in a fresh process (clean peak memory; an out-of-memory point is reported, not fatal), timed
as a median of repeats after a compiling call. Run it on a quiet machine.

    python benchmarks/bench_ssm.py                   # the suite (~5 min on 2 cores); updates RESULTS.md
    python benchmarks/bench_ssm.py --quick           # T = 256, 512; prints only
    python benchmarks/bench_ssm.py --quick --forms chunked,pallas --no-layer --in-process --lengths 256  # smoke

The section written is named after the platform (``Selective state spaces (CPU)``, ``(GPU)``, ``(TPU)``).
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

SECTION = "Selective state spaces ({})"  # the platform, upper case
SCRIPT = Path(__file__).resolve()
FORMS = ("sequential", "associative", "chunked", "pallas")
CHUNKED = ("chunked", "pallas")  # the forms whose GFLOP/s the table shows
ACCELERATOR_ONLY = "GPU/TPU only"
HEADS, HEAD_DIM, STATE, CHUNK = 8, 32, 32, 64
LAYER_WIDTH = 256


def scan_flops(length: int) -> float:
    """Multiply-adds x 2 of the chunked form: intra-chunk scores and values, the state's read and update."""
    per_token = CHUNK * (STATE + HEAD_DIM) + 2 * HEAD_DIM * STATE
    return 2.0 * HEADS * length * per_token


def measure_scan(form: str, length: int, repeats: int, dtype: str = "float32") -> dict:
    import jax
    import jax.numpy as jnp

    from attention_jax.functional import selective_scan

    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (1, length, HEADS, HEAD_DIM), dtype)
    dt = jax.nn.softplus(jax.random.normal(keys[1], (1, length, HEADS)) - 3.0)
    b, c = (jax.random.normal(k, (1, length, 1, STATE), dtype) for k in keys[2:])
    a = -jnp.linspace(1.0, 8.0, HEADS)
    run = lambda *args: selective_scan(*args, implementation=form, chunk_size=CHUNK)  # noqa: E731
    forward = jax.jit(run)
    loss = lambda *args: jnp.sum(run(*args).astype(jnp.float32) ** 2)  # noqa: E731
    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    fwd = time_fn(lambda: forward(x, dt, a, b, c), repeats=repeats)
    bwd = time_fn(lambda: backward(x, dt, a, b, c), repeats=repeats)
    return dict(forward=fwd["median"], backward=bwd["median"], peak_mb=peak_rss_mb())


def measure_matmul_rate(n: int = 2048) -> dict:
    """A float32 ``n x n`` matmul's GFLOP/s, and the platform the points run on."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n))
    mm = jax.jit(lambda a: jnp.dot(a, a))
    t = time_fn(lambda: mm(a), repeats=5)["median"]
    return dict(gflops=2.0 * n**3 / t / 1e9, platform=jax.default_backend(), size=n)


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


def measure(what: str, length: int, repeats: int, dtype: str = "float32") -> dict:
    start = time.perf_counter()
    if what == "matmul":
        result = measure_matmul_rate(length or 2048)
    elif what in FORMS:
        result = measure_scan(what, length, repeats, dtype)
    else:
        result = measure_layer(what, length, repeats)
    result["seconds"] = time.perf_counter() - start
    return result


def child(args) -> None:
    print(json.dumps(measure(args.what, args.length, args.repeats, args.dtype)))


def point(what: str, length: int, repeats: int, in_process: bool = False, dtype: str = "float32") -> dict:
    if in_process:  # no fresh process: quicker, but the peak memory is this process's so far
        try:
            return measure(what, length, repeats, dtype)
        except Exception as e:  # noqa: BLE001 - reported in the table, as a child's failure is
            return {"error": f"{type(e).__name__}: {e}"[:200]}
    return run_child(SCRIPT, ["--child", what, "--length", str(length), "--repeats", str(repeats), "--dtype", dtype])


def _cell(result: dict, key: str) -> str:
    if "skipped" in result:
        return result["skipped"]
    return f"error: {result['error']}" if "error" in result else fmt_ms(result[key])


def _gflops(result: dict, length: int) -> str:
    if "skipped" in result or "error" in result:
        return "n/a"
    return f"{scan_flops(length) / result['forward'] / 1e9:.1f}"


def _forms(text: str) -> tuple[str, ...]:
    forms = tuple(f for f in text.split(",") if f)
    unknown = [f for f in forms if f not in FORMS]
    if unknown or not forms:
        raise ValueError(f"--forms must name some of {FORMS}, got {text!r}.")
    return forms


def _ratio(slow: dict, fast: dict, key: str) -> float | None:
    return None if any(k in r for r in (slow, fast) for k in ("error", "skipped")) else slow[key] / fast[key]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 256, 512; print only")
    p.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    p.add_argument("--forms", default=",".join(FORMS), help=f"comma-separated scan forms (default: all of {FORMS})")
    p.add_argument("--no-layer", action="store_true", help="skip the Mamba-2 layer against attention")
    p.add_argument("--lengths", help="comma-separated T of the scan table (default: 256,512 --quick, else 1k..64k)")
    p.add_argument("--in-process", action="store_true", help="run every point in this process (a smoke run)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the scans' x, b and c (bfloat16: the kernel's matmuls on tensor cores / the MXU)",
    )
    p.add_argument("--child", dest="what", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.what:
        return child(args)
    forms = _forms(args.forms)
    scan_lengths = [256, 512] if args.quick else [1024, 4096, 16384, 65536]
    if args.lengths:
        scan_lengths = [int(t) for t in args.lengths.split(",")]
    layer_lengths = [] if args.no_layer else [256, 512] if args.quick else [1024, 4096, 16384]
    repeats = 1 if args.quick else 3
    load = load_average()
    if load > 1.0:
        print(f"warning: load average {load:.1f}; timings are noisy on a busy machine", file=sys.stderr)

    run = lambda what, length: point(what, length, repeats, args.in_process, args.dtype)  # noqa: E731
    rate = run("matmul", 1024 if args.quick else 2048)
    platform = rate.get("platform", "cpu")
    scan_rows = []
    for length in scan_lengths:
        # The SSD kernel on a CPU would run in Pallas' interpreter (a test mode): not timed.
        skip = {"skipped": ACCELERATOR_ONLY}
        results = {form: skip if form == "pallas" and platform == "cpu" else run(form, length) for form in forms}
        row = [f"{length:,}"]
        for form in forms:
            row += [_cell(results[form], "forward"), _cell(results[form], "backward")]
        row += [f"{results[f]['peak_mb']:,.0f}" if "peak_mb" in results[f] else "n/a" for f in forms]
        row += [_gflops(results[f], length) for f in forms if f in CHUNKED]
        scan_rows.append(row)
        print(" | ".join(row), flush=True)
    layer_rows = []
    for length in layer_lengths:
        mamba, attention = run("mamba2", length), run("attention", length)
        row = [f"{length:,}", _cell(mamba, "forward"), _cell(attention, "forward"),
               fmt_ratio(_ratio(attention, mamba, "forward")), _cell(mamba, "backward"), _cell(attention, "backward"),
               fmt_ratio(_ratio(attention, mamba, "backward"))]  # fmt: skip
        layer_rows.append(row)
        print(" | ".join(row), flush=True)

    header = ["T", *(h for f in forms for h in (f"{f} fwd", "fwd+bwd")), *(f"peak MB {f}" for f in forms)]
    header += [f"{f} GFLOP/s" for f in forms if f in CHUNKED]
    size = rate.get("size", 2048)
    body = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; load average {load:.1f} at the start.",
        "Command: `python benchmarks/bench_ssm.py`. Medians of "
        f"{repeats} calls after a compiling one, each point in "
        f"{'this one process (--in-process)' if args.in_process else 'a fresh process'}.",
        "",
        f"### The scan forms (B=1, N={HEADS}, H={HEAD_DIM}, F={STATE}, chunks of {CHUNK}, {args.dtype})",
        "",
        "Milliseconds; `fwd+bwd` is the gradient of every input. Peak MB is the process's resident peak. "
        f"`pallas` is the SSD kernel ({ACCELERATOR_ONLY}: on a CPU it would run in Pallas' interpreter).",
        "",
        *markdown_table(header, scan_rows),
        "",
        f"A {size} x {size} float32 matmul runs at {rate.get('gflops', float('nan')):.1f} GFLOP/s on this machine.",
    ]
    if layer_rows:
        body += [
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
    section = SECTION.format(platform.upper())
    partial = forms != FORMS or not layer_rows or args.lengths or args.dtype != "float32"
    if args.quick or args.no_write or args.in_process or partial:
        print("\n".join(body))
    else:
        write_section(section, "\n".join(body))
        print(f"wrote the section {section!r} of RESULTS.md")


if __name__ == "__main__":
    main()
