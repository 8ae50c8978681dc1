"""Long-context attention with the sequence sharded over 8 devices (ring attention), on a laptop CPU.

Runs out of the box: it asks XLA for 8 CPU devices before JAX starts. The default sequence,
T = 32768 tokens with 4 heads, is one the reference implementation cannot hold on one device
(its score matrix alone is ``B * N * T * T * 4`` bytes = 17 GB); the ring keeps ``T / 8`` tokens
per device and never forms the score matrix. A few causal documents go through the ring with a
progress line, and the last one is checked against the reference on a slice of queries.

    python examples/long_context_ring.py            # T = 32768 (about a minute on 2 CPU cores)
    python examples/long_context_ring.py --small    # T = 2048, a few seconds (used by the tests)
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="T = 2048: a quick run (used by the tests)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length T (default 32768)")
    parser.add_argument("--docs", type=int, default=3, help="how many documents to run through the ring")
    parser.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag", "striped"))
    args = parser.parse_args(argv)
    t = args.seq_len or (2048 if args.small else 32768)
    b, n, k, h = 1, 4, 2, 64  # [B, T, N, H] queries, [B, T, K, H] keys/values (GQA, G = 2)

    devices = jax.devices()
    if len(devices) < 2:
        raise SystemExit(f"this example needs several devices, got {len(devices)}; run it as a script.")
    mesh = jax.sharding.Mesh(np.array(devices), ("sp",))
    p = len(devices)
    mask = aj.masks.causal()
    reference_gb = b * n * t * t * 4 / 1e9
    print(
        f"T={t} tokens over {p} devices ({t // p} per device), N={n} query heads, K={k} key/value heads, H={h}, "
        f"layout={args.layout}; the reference's score matrix alone would take {reference_gb:.1f} GB."
    )

    ring = jax.jit(
        lambda q, key, v: aj.sequence_parallel_attention(q, key, v, mesh=mesh, axis="sp", mask=mask, layout=args.layout)
    )
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
