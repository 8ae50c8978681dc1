"""Long-context attention with the sequence sharded over 8 devices (ring attention), on a laptop CPU.

Runs out of the box: it asks XLA for 8 CPU devices before JAX starts. The default sequence,
T = 32768 tokens with 4 heads, is one the reference implementation cannot hold on one device
(its score matrix alone is ``B * N * T * T * 4`` bytes = 17 GB); the ring keeps ``T / 8`` tokens
per device and never forms the score matrix. A few causal documents go through the ring with a
progress line, and the last one is checked against the reference on a slice of queries.

How the sequence is sharded is one ``attention_jax.distributed.SequenceParallel``; the same
object makes an ``aj.nn.MultiHeadAttention`` layer (and a ``TransformerLM`` built on it) run
sharded. ``--kind all_to_all`` swaps the ring for DeepSpeed-Ulysses all-to-alls (8 heads, one per
device), ``--kind hybrid`` runs all-to-all over 2 devices and a ring over 4.

    python examples/long_context_ring.py            # T = 32768 (about a minute on 2 CPU cores)
    python examples/long_context_ring.py --small    # T = 2048, a few seconds (used by the tests)
    python examples/long_context_ring.py --small --kind hybrid
"""

from __future__ import annotations

import argparse
import os
import sys
import time

NUM_DEVICES = 8
if "jax" not in sys.modules:  # XLA reads its flags when JAX initialises
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={NUM_DEVICES}"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import attention_jax as aj  # noqa: E402
from attention_jax.distributed import SequenceParallel  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="T = 2048: a quick run (used by the tests)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length T (default 32768)")
    parser.add_argument("--docs", type=int, default=3, help="how many documents to run through the ring")
    parser.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag", "striped"))
    parser.add_argument("--kind", default="ring", choices=aj.distributed.KINDS, help="how to shard the sequence")
    args = parser.parse_args(argv)
    t = args.seq_len or (2048 if args.small else 32768)
    n = 8 if args.kind == "all_to_all" else 4  # all-to-all splits the heads over the 8 devices
    b, k, h = 1, 2, 64  # [B, T, N, H] queries, [B, T, K, H] keys/values (GQA)

    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"this example needs several devices, got {len(devices)}; run it as a script.")
    p = len(devices)
    if args.kind == "hybrid":  # all-to-all over 2 devices, a ring over the rest
        mesh = jax.sharding.Mesh(np.array(devices).reshape(2, -1), ("heads", "sp"))
        sequence_parallel = SequenceParallel(("heads", "sp"), kind="hybrid", layout=args.layout, mesh=mesh)
    else:
        mesh = jax.sharding.Mesh(np.array(devices), ("sp",))
        sequence_parallel = SequenceParallel("sp", kind=args.kind, layout=args.layout, mesh=mesh)
    mask = aj.masks.causal()
    reference_gb = b * n * t * t * 4 / 1e9
    print(
        f"T={t} tokens over {p} devices ({t // p} per device), N={n} query heads, K={k} key/value heads, H={h}, "
        f"{args.kind}, layout={args.layout}; the reference's score matrix alone would take {reference_gb:.1f} GB."
    )

    ring = jax.jit(lambda q, key, v: sequence_parallel(q, key, v, mask=mask))
    start = time.perf_counter()
    ring = ring.lower(*_document(0, b, t, n, k, h)).compile()
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    for doc in range(args.docs):
        q, key, v = _document(doc, b, t, n, k, h)
        out = jax.block_until_ready(ring(q, key, v))
        elapsed = time.perf_counter() - start
        end = "\n" if doc + 1 == args.docs else ""
        print(
            f"\rdocument {doc + 1}/{args.docs}  {(doc + 1) * t / elapsed:,.0f} tokens/s  {elapsed:.1f} s",
            end=end,
            flush=True,
        )

    # The reference on a slice: the last 256 queries against every key (their offset keeps the mask exact).
    rows = min(256, t)
    expected = aj.dot_product_attention(q[:, -rows:], key, v, mask=mask, q_offset=t - rows, implementation="reference")
    error = float(jnp.max(jnp.abs(out[:, -rows:] - expected)))
    print(f"max |ring - reference| on the last {rows} queries: {error:.2e}")
    if not error < 1e-4:
        raise SystemExit(f"mismatch: {error=}")


def _document(seed: int, b: int, t: int, n: int, k: int, h: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (b, t, n, h))
    key = jax.random.normal(keys[1], (b, t, k, h))
    v = jax.random.normal(keys[2], (b, t, k, h))
    return q, key, v


if __name__ == "__main__":
    main()
