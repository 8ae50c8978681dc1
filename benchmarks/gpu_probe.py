"""GPU probe: environment, bf16 matmul ceiling, cuDNN / XLA / tokamax attention baselines."""
import sys, time, traceback
import jax, jax.numpy as jnp
print("jax", jax.__version__, jax.devices())

def bench(f, *args, iters=20):
    out = f(*args); jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); times.append(time.perf_counter() - t0)
    times.sort(); return times[len(times)//2]

a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
b = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
mm = jax.jit(lambda a, b: a @ b)
t = bench(mm, a, b)
print(f"matmul bf16 8192^3: {2*8192**3/t/1e12:.1f} TFLOP/s")
try:
    import tokamax; print("tokamax", tokamax.__version__ if hasattr(tokamax, "__version__") else "?", [n for n in dir(tokamax) if "attention" in n])
except Exception as e:
    traceback.print_exc()
for causal in (False, True):
  for H in (64, 128):
    B, N, T = 2, 16, 8192
    q = jax.random.normal(jax.random.key(2), (B, T, N, H), jnp.bfloat16)
    k = jax.random.normal(jax.random.key(3), (B, T, N, H), jnp.bfloat16)
    v = jax.random.normal(jax.random.key(4), (B, T, N, H), jnp.bfloat16)
    flops = 4 * B * N * T * T * H / (2 if causal else 1)
    for impl in ("cudnn", "xla"):
        try:
            f = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl))
            t = bench(f, q, k, v)
            print(f"{impl:6s} causal={causal} H={H} T={T}: {t*1e3:.2f} ms {flops/t/1e12:.1f} TFLOP/s")
        except Exception as e:
            print(impl, "failed", str(e)[:200])
    try:
        import tokamax
        f = jax.jit(lambda q, k, v: tokamax.dot_product_attention(q, k, v, is_causal=causal))
        t = bench(f, q, k, v)
        print(f"tokamax causal={causal} H={H} T={T}: {t*1e3:.2f} ms {flops/t/1e12:.1f} TFLOP/s")
    except Exception as e:
        print("tokamax failed", str(e)[:300])
