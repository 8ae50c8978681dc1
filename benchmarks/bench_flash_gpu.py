"""GPU benchmark of the Pallas flash kernels against cuDNN, XLA and tokamax, in one run.

bf16, B=2, N=16, H in {64, 128}, T in {2048, ..., 16384}, causal and full, forward,
forward+backward and the backward alone (the difference of the two times). TFLOP/s count
4*B*N*T*S*H for the forward (half of it under a causal mask) and 2.5x that for the backward.
"ours" is the default dispatch (on sm90 the Mosaic GPU wgmma forward and dK/dV kernels, Triton dQ),
"ours (Triton)" forces the Triton kernels throughout. Also: the measured bf16 matmul rate (the ceiling), a compiled
correctness check of a few configurations, and the ring on one GPU with both step functions.

    python benchmarks/bench_flash_gpu.py [--budget SECONDS] [--out FILE]

Needs a CUDA GPU. tokamax is optional (its import needs xprof; benchmarks/gpu_stubs stands in).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import attention_jax as aj
from pallas_kernels.flash_attention import BlockSizes, flash_attention, mask_block_shape

B, N = 2, 16
LENGTHS = (2048, 4096, 8192, 16384)


def median_seconds(fn, *args, iters: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_ceiling() -> float:
    keys = jax.random.split(jax.random.key(0), 4)
    mats = [jax.random.normal(k, (8192, 8192), jnp.bfloat16) for k in keys]  # rotate: not the cache
    mm = jax.jit(lambda a, b, c, d: (a @ b, c @ d))
    return 2 * 2 * 8192**3 / median_seconds(mm, *mats) / 1e12


def peers(causal: bool):
    """name -> forward function (q, k, v) -> out."""
    fns = {
        "ours": None,  # filled per head dim (block sizes)
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="xla"),
    }
    try:
        import tokamax

        fns["tokamax"] = lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal)
    except Exception as e:  # noqa: BLE001 - optional peer
        print(f"tokamax unavailable: {type(e).__name__}: {e}", file=sys.stderr)
    return fns


def ours(causal: bool, t: int, h: int, forward_kernel: str | None = None):
    sizes = BlockSizes.for_backend("gpu", h)
    spec = aj.masks.causal().spec(t, t, *mask_block_shape(sizes, t, t)) if causal else None
    return lambda q, k, v: flash_attention(
        q, k, v, mask=spec, block_sizes=sizes, backend="gpu", forward_kernel=forward_kernel,
        backward_kernel=forward_kernel,
    )  # fmt: skip


def fwd_bwd(fn):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def correctness() -> list[str]:
    lines = []
    masks = aj.masks
    ids = jnp.asarray(np.sort(np.random.default_rng(0).integers(0, 3, (2, 333)), axis=1), jnp.int32)
    cases = [
        ("causal GQA H=128 bf16 T=333", 128, jnp.bfloat16, 8, 2, masks.causal()),
        ("segments MQA H=64 bf16", 64, jnp.bfloat16, 8, 1, masks.segments(ids)),
        ("window H=256 f16", 256, jnp.float16, 4, 4, masks.causal() & masks.sliding_window(70)),
        ("chunked H=64 bf16", 64, jnp.bfloat16, 4, 4, masks.chunked(96)),
        ("full H=96 (padded to 128) f16", 96, jnp.float16, 4, 2, None),
    ]
    for name, h, dtype, n, k, mask in cases:
        keys = jax.random.split(jax.random.key(h), 3)
        q = jax.random.normal(keys[0], (2, 333, n, h)).astype(dtype)
        kk = jax.random.normal(keys[1], (2, 333, k, h)).astype(dtype)
        v = jax.random.normal(keys[2], (2, 333, k, h)).astype(dtype)

        def loss(q, kk, v, impl, mask=mask):
            return jnp.sum(
                jnp.sin(aj.dot_product_attention(q, kk, v, mask=mask, implementation=impl).astype(jnp.float32))
            )

        got = jax.jit(jax.value_and_grad(lambda *a: loss(*a, "pallas"), argnums=(0, 1, 2)))(q, kk, v)
        f32 = [x.astype(jnp.float32) for x in (q, kk, v)]
        want = jax.jit(jax.value_and_grad(lambda *a: loss(*a, "reference"), argnums=(0, 1, 2)))(*f32)
        out = aj.dot_product_attention(q, kk, v, mask=mask, implementation="pallas").astype(jnp.float32)
        ref = aj.dot_product_attention(*f32, mask=mask, implementation="reference")
        errs = [float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))]
        errs += [
            float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b)) for a, b in zip(got[1], want[1])
        ]
        ok = all(np.isfinite(errs)) and max(errs) < 2e-2
        lines.append(f"| {name} | {errs[0]:.1e} | {max(errs[1:]):.1e} | {'ok' if ok else 'FAIL'} |")
    return lines


def ring_on_one_gpu() -> list[str]:
    mesh = jax.make_mesh((1,), ("sp",))
    keys = jax.random.split(jax.random.key(7), 3)
    q = jax.random.normal(keys[0], (1, 1024, 8, 64), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, 1024, 2, 64), jnp.bfloat16)
    v = jax.random.normal(keys[2], (1, 1024, 2, 64), jnp.bfloat16)
    ref = aj.dot_product_attention(q, k, v, mask=aj.masks.causal(), implementation="reference").astype(jnp.float32)
    lines = []
    for impl in ("blockwise", "pallas"):
        try:
            out = jax.jit(
                lambda q, k, v, impl=impl: aj.sequence_parallel_attention(
                    q, k, v, mesh=mesh, axis="sp", mask=aj.masks.causal(), implementation=impl
                )
            )(q, k, v).astype(jnp.float32)
            err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
            lines.append(f"| ring, 1 GPU, {impl} step | {err:.1e} | {'ok' if err < 2e-2 else 'FAIL'} |")
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking
            lines.append(f"| ring, 1 GPU, {impl} step | {type(e).__name__}: {str(e)[:80]} | FAIL |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=float, default=300.0, help="seconds for the timing part")
    parser.add_argument("--out", default="gpu_results.md")
    parser.add_argument(
        "--only", default="*:*:*", help="comma-separated H:mask:T patterns to time, '*' for any (e.g. 128:full:*)"
    )
    parser.add_argument("--skip-checks", action="store_true", help="skip the correctness and ring checks")
    args = parser.parse_args()
    patterns = [p.split(":") for p in args.only.split(",")]

    def selected(h: int, mask: str, t: int) -> bool:
        return any(all(w in ("*", str(x)) for w, x in zip(p, (h, mask, t))) for p in patterns)

    device = jax.devices()[0]
    report = [f"Device: {device.device_kind}, jax {jax.__version__}.", ""]
    if not args.skip_checks:
        report += [
            "| correctness (vs f32 reference) | out rel err | max grad rel err | |",
            "| --- | ---: | ---: | --- |",
        ]
        report += correctness()
        report += ["", "| ring check | rel err | |", "| --- | ---: | --- |"] + ring_on_one_gpu()
    ceiling = matmul_ceiling()
    report += ["", f"bf16 matmul 8192^3 (median, two products per call): {ceiling:.0f} TFLOP/s", ""]
    print("\n".join(report), flush=True)
    names = ("ours", "ours_triton", "cudnn", "xla", "tokamax")
    header = "| H | mask | T | pass | ours | ours (Triton) | cuDNN | XLA | tokamax | ours/cuDNN | ours/ceiling |"
    rows = [header, "|" + " --- |" * 11]
    deadline = time.perf_counter() + args.budget
    for h in (64, 128):
        for causal in (True, False):
            fns = peers(causal)
            for t in LENGTHS:
                if not selected(h, "causal" if causal else "full", t):
                    continue
                keys = jax.random.split(jax.random.key(t + h), 3)
                q, k, v = (jax.random.normal(kk, (B, t, N, h), jnp.bfloat16) for kk in keys)
                fns["ours"] = ours(causal, t, h)
                fns["ours_triton"] = ours(causal, t, h, forward_kernel="triton")
                flops = 4 * B * N * t * t * h * (0.5 if causal else 1.0)
                seconds = {}
                for label, mult, wrap in (("fwd", 1.0, jax.jit), ("fwd+bwd", 3.5, fwd_bwd), ("bwd", 2.5, None)):
                    if time.perf_counter() > deadline:
                        break
                    rates = {}
                    for name in names:
                        if name not in fns or (name == "xla" and t > 8192):
                            rates[name] = None
                            continue
                        if wrap is None:  # the backward alone: the difference of the two measured times
                            fb, f = seconds.get((name, "fwd+bwd")), seconds.get((name, "fwd"))
                            rates[name] = mult * flops / (fb - f) / 1e12 if fb and f and fb > f else None
                            continue
                        try:
                            seconds[name, label] = median_seconds(wrap(fns[name]), q, k, v)
                            rates[name] = mult * flops / seconds[name, label] / 1e12
                        except Exception as e:  # noqa: BLE001 - a peer that cannot run this case
                            print(f"{name} H={h} T={t} {label}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                            rates[name] = None
                    cells = " | ".join("-" if rates[n] is None else f"{rates[n]:.0f}" for n in names)
                    ratio = "-" if not (rates["ours"] and rates["cudnn"]) else f"{rates['ours'] / rates['cudnn']:.2f}"
                    frac = "-" if not rates["ours"] else f"{rates['ours'] / ceiling:.2f}"
                    row = f"| {h} | {'causal' if causal else 'full'} | {t} | {label} | {cells} | {ratio} | {frac} |"
                    rows.append(row)
                    print(row, flush=True)
    report += ["TFLOP/s (median of 10 after warm-up; bwd from the two medians):", ""] + rows
    with open(args.out, "w") as f:
        f.write("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
