"""Test configuration: 8 CPU devices before JAX initialises, and shared helpers."""

import os

# Must run before jax is imported anywhere: ring-attention tests shard over 8 fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Test programs are tiny and each compiles once, so the suite's time is mostly XLA compiling; the LLVM
# optimisation it skips does not change what the tests check (they compare numbers, and the HLO passes
# still run) but halves that time. Set in the environment, so the examples, notebooks and README blocks
# that tests run in subprocesses inherit it (the two that train to an accuracy turn it off).
# ATTENTION_JAX_TEST_OPTIMIZE=1 compiles as users do.
if os.environ.get("ATTENTION_JAX_TEST_OPTIMIZE", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_disable_most_optimizations", os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1")

