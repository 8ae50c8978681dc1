"""Test configuration: 8 CPU devices before JAX initialises, and shared helpers."""

import os

# Must run before jax is imported anywhere: ring-attention tests shard over 8 fake CPU devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
