"""Test configuration: 8 CPU devices before JAX initialises, and shared helpers."""

import os

# Must run before jax is imported anywhere: ring-attention tests shard over 8 fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# Test programs are tiny and each compiles once, so the suite's time is mostly XLA compiling; its
# LLVM optimisation levels do not change what the tests check (they compare numbers, and the HLO
# passes still run) but halve that time. ATTENTION_JAX_TEST_OPTIMIZE=1 compiles as users do. The
# example and notebook subprocesses train models, where run time dominates: they keep the default.
if os.environ.get("ATTENTION_JAX_TEST_OPTIMIZE", "0") != "1":
    jax.config.update("jax_disable_most_optimizations", True)
