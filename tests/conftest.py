"""Test configuration: 8 CPU devices before JAX initialises, and shared helpers."""

import os

# Must run before jax is imported anywhere: ring-attention tests shard over 8 fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# Test programs are tiny and each compiles once, so the suite's time is mostly XLA compiling. Two switches
# cut it without changing what the tests check (they compare numbers; the HLO passes still run): skipping
# the LLVM optimisation (JAX_DISABLE_MOST_OPTIMIZATIONS, about half the compile time) and XLA's older CPU
# loop emitters instead of its fusion emitters (about 40% less CPU time again). Both are set in the
# environment, so the examples, notebooks and README blocks that tests run in subprocesses inherit them
# (the two that train to an accuracy turn them off: tests/test_examples.py). ATTENTION_JAX_TEST_OPTIMIZE=1
# compiles as users do.
FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("ATTENTION_JAX_TEST_OPTIMIZE", "0") != "1":
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {FAST_COMPILE_XLA_FLAG}"

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_disable_most_optimizations", os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS") == "1")

