"""Run every implemented attention path on random data and print its max error against the reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import attention_jax as aj

IMPLEMENTATIONS = ("reference", "blockwise", "pallas")


def main() -> None:
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 256, 8, 64))  # [B, T, N, H]
    k = jax.random.normal(kk, (2, 256, 2, 64))  # [B, S, K, H]: GQA with G = 4
    v = jax.random.normal(kv, (2, 256, 2, 64))
    cases = {
        "full": None,
        "causal": aj.masks.causal(),
        "causal & window(64)": aj.masks.causal() & aj.masks.sliding_window(64),
        "chunked(64)": aj.masks.chunked(64),
        "prefix_lm(32)": aj.masks.prefix_lm(32),
    }
    print(f"{'mask':<22}{'implementation':<16}{'max |out - ref|':>18}")
    for name, mask in cases.items():
        expected = aj.dot_product_attention(q, k, v, mask=mask, implementation="reference")
        for impl in IMPLEMENTATIONS:
            try:
                out = aj.dot_product_attention(q, k, v, mask=mask, implementation=impl)
            except ValueError as e:
                print(f"{name:<22}{impl:<16}{'unavailable: ' + str(e)[:40]:>18}")
                continue
            err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected.astype(jnp.float32))))
            print(f"{name:<22}{impl:<16}{err:>18.2e}")


if __name__ == "__main__":
    main()
