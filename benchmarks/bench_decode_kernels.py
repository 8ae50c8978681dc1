"""One decode step over a long paged cache: the decode kernel against the dense-gather path and torch SDPA.

A decode step is memory-bound: its cost should be one read of the live K/V bytes. This script times
one attention step of ``B=8`` sequences (one new query token each, GQA 32 query / 8 key-value heads,
H=128, causal) over a cache of ``L`` tokens per sequence, stored as pages of 16 tokens in a shared
pool, the pages of each sequence scattered over the pool:

* ours: ``pallas_kernels.decode_attention(kernel="xla")``, the CPU default: it reads the pages
  through the page table tile by tile (split-K, logsumexp merge) and never builds the dense cache;
* dense gather (up to 16k): what decoding did before the kernel: gather every page of every sequence into
  ``[B, S, K, H]`` (``PagedKVCache``'s old view), then ``aj.dot_product_attention`` over it with the
  written slots as a mask;
* torch SDPA over the same tokens held as one dense ``[B, K, L, H]`` tensor (no paging: the best case
  for torch), ``enable_gqa=True``.

Each length and dtype runs in a fresh process; the three are timed in interleaved rounds and reported
as medians, with the bandwidth ours reaches (live K/V bytes / time) and the compiled temporaries of the
two JAX paths (``compiled.memory_analysis()``). Run it on a quiet machine.

    python benchmarks/bench_decode_kernels.py           # L = 1k .. 64k, float32 and bfloat16; updates RESULTS.md
    python benchmarks/bench_decode_kernels.py --quick   # L = 256, 1024, float32; prints only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import fmt_ms, fmt_ratio, load_average, machine, markdown_table, run_child, write_section  # noqa: E402

SECTION = "Decode kernels over a paged cache (CPU)"
SCRIPT = Path(__file__).resolve()
B, N, K, H, PAGE = 8, 32, 8, 128, 16


def _inputs(length: int, dtype: str):
    """Queries, a shuffled page pool holding ``length`` tokens per sequence, its table, and torch's dense copy."""
    import numpy as np

    rng = np.random.default_rng(0)
    pages_per_seq = length // PAGE
    num_pages = B * pages_per_seq
    q = rng.standard_normal((B, 1, N, H), dtype=np.float32)
    k_pages = rng.standard_normal((num_pages, PAGE, K, H), dtype=np.float32)
    v_pages = rng.standard_normal((num_pages, PAGE, K, H), dtype=np.float32)
    table = rng.permutation(num_pages).astype(np.int32).reshape(B, pages_per_seq)
    return q, k_pages, v_pages, table


def _jax_calls(q, k_pages, v_pages, table, length: int, dtype: str, gather: bool) -> dict:
    """name -> (compiled call, temporaries in bytes); the dense gather only with ``gather``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import attention_jax as aj
    from pallas_kernels.decode_attention import decode_attention

    args = [jnp.asarray(x, dtype) for x in (q, k_pages, v_pages)] + [jnp.asarray(table)]
    lengths = jnp.full((B,), length, jnp.int32)
    q_positions = jnp.full((B, 1), length - 1, jnp.int32)

    def ours(q, k_pages, v_pages, table):
        causal = lambda q_pos, kv_pos, q_vals, kv_vals: kv_pos <= q_pos
        return decode_attention(q, k_pages, v_pages, table, lengths, q_positions=q_positions, mask_fn=causal)

    def dense_gather(q, k_pages, v_pages, table):
        keys = k_pages[table].reshape(B, -1, K, H)  # [B, S, K, H]: every page of every sequence
        values = v_pages[table].reshape(B, -1, K, H)
        written = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]  # [B, S]
        mask = aj.masks.causal() & aj.masks.valid_keys(written)
        return aj.dot_product_attention(q, keys, values, mask=mask, q_offset=q_positions[:, 0])

    calls, outputs = {}, []
    for name, fn in (("ours", ours), ("dense gather", dense_gather))[: 2 if gather else 1]:
        compiled = jax.jit(fn).trace(*args).lower().compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        calls[name] = (lambda c=compiled: jax.block_until_ready(c(*args)), temp)
        outputs.append(np.asarray(compiled(*args), np.float32))
    # Time only what agrees: both paths compute the same attention (bfloat16: rounding of the inputs alike).
    if gather:
        np.testing.assert_allclose(outputs[0], outputs[1], atol=2e-2 if dtype == "bfloat16" else 1e-4)
    return calls


def _torch_call(q, k_pages, v_pages, table, dtype: str):
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]

    def dense(pages):  # [B, K, L, H] contiguous
        tokens = pages[table].reshape(B, -1, K, H).transpose(0, 2, 1, 3)
        return torch.from_numpy(np.ascontiguousarray(tokens)).to(tdtype)

    tq = torch.from_numpy(np.ascontiguousarray(q.transpose(0, 2, 1, 3))).to(tdtype)  # [B, N, 1, H]
    tk, tv = dense(k_pages), dense(v_pages)

    def call():  # the query is the last position: it sees every key, no mask needed
        with torch.inference_mode():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)

    return call


def child(spec: dict) -> dict:
    """Time one length and dtype (after checking that ours and the dense gather agree); return JSON-able medians."""
    import numpy as np

    length, dtype, rounds = spec["length"], spec["dtype"], spec["rounds"]
    arrays = list(_inputs(length, dtype))
    torch_call = _torch_call(*arrays, dtype) if spec["torch"] else None
    jax_calls = _jax_calls(*arrays, length, dtype, spec.get("gather", True))
    del arrays  # the host copies: at 64k each side holds 4 GB of K/V already
    calls = {name: call for name, (call, _) in jax_calls.items()}
    temps = {name: temp for name, (_, temp) in jax_calls.items()}
    if torch_call is not None:
        calls["torch SDPA"] = torch_call
    for call in calls.values():  # warm up (torch's first calls are slow)
        for _ in range(3):
            call()
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - start)
    return {"median": {n: float(np.median(s)) for n, s in samples.items()}, "temp": temps, "load": load_average()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, float32, print only")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    lengths = (256, 1024) if args.quick else (1024, 4096, 16384, 65536)
    dtypes = ("float32",) if args.quick else ("float32", "bfloat16")
    started, load_start = time.perf_counter(), load_average()
    rows = []
    for dtype in dtypes:
        for length in lengths:
            # The dense gather copies the whole cache once more: not at 64k (24 GB of RAM here).
            spec = {"length": length, "dtype": dtype, "rounds": args.rounds, "torch": have_torch,
                    "gather": length <= 16384}  # fmt: skip
            res = run_child(SCRIPT, ["--child", json.dumps(spec)])
            print(f"  L={length} {dtype}: {res}", file=sys.stderr, flush=True)
            med, temp = res.get("median", {}), res.get("temp", {})
            ours, gather, sdpa = (med.get(n) for n in ("ours", "dense gather", "torch SDPA"))
            live = 2 * B * length * K * H * (4 if dtype == "float32" else 2)  # K and V bytes read
            rows.append([
                str(length), dtype, fmt_ms(ours), fmt_ms(gather), fmt_ms(sdpa),
                fmt_ratio(gather / ours if ours and gather else None),
                fmt_ratio(sdpa / ours if ours and sdpa else None),
                f"{live / ours / 1e9:.1f}" if ours else "n/a",
                *(f"{temp[n] / 2**20:,.1f}" if n in temp else "n/a" for n in ("ours", "dense gather")),
                f"{live / 2**20:,.0f}",
            ])  # fmt: skip
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M')} UTC with `python benchmarks/bench_decode_kernels.py"
        f"{' --quick' if args.quick else ''}` on {machine()}; load average {load_start:.1f} at the start and "
        f"{load_average():.1f} at the end ({time.perf_counter() - started:.0f} s). One decode step (T=1) of B={B} "
        f"sequences, {N} query / {K} key-value heads, H={H}, causal, pages of {PAGE} tokens shuffled over the pool; "
        f"median of {args.rounds} interleaved rounds, each length and dtype in a fresh process. 'gather / ours' and "
        "'torch / ours' > 1 mean ours is faster. Ours computes in float32 whatever the cache dtype.",
        "",
        *markdown_table(
            ["L", "dtype", "ours (ms)", "dense gather (ms)", "torch SDPA (ms)", "gather / ours", "torch / ours",
             "ours GB/s", "ours temp (MiB)", "gather temp (MiB)", "live K/V (MiB)"],
            rows,
        ),  # fmt: skip
    ]
    text = "\n".join(lines)
    print(text)
    if not args.quick:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
