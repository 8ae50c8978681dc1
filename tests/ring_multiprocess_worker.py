"""One process of the two-process ring attention check (started by tests/test_ring_multiprocess.py).

Usage: ``python ring_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT [LOCAL_DEVICES]``.
Every process joins the same JAX distributed runtime over localhost with gloo CPU collectives,
shards one sequence over the devices of all processes, runs ``sequence_parallel_attention``
forward and backward, and compares its part of the result with the single-device reference.
Exit status 0 means every check passed.
"""

from __future__ import annotations

import sys


def main(process_id: int, num_processes: int, port: int, local_devices: int = 2) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_num_cpu_devices", local_devices)
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=num_processes, process_id=process_id
    )

    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import attention_jax as aj

    assert jax.process_count() == num_processes, jax.process_count()
    num_devices = len(jax.devices())
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("sp",))
    b, t, n, k, h = 2, 16 * num_devices, 4, 2, 16
    rng = np.random.default_rng(0)  # the same global arrays in every process
    q, key, v, dout = (
        rng.standard_normal(shape).astype(np.float32)
        for shape in ((b, t, n, h), (b, t, k, h), (b, t, k, h), (b, t, n, h))
    )
    segment_ids = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)
    mask = aj.masks.causal() & aj.masks.segments(segment_ids)

    def loss(q, key, v, attention):
        out, lse = attention(q, key, v)
        return jnp.sum(out * dout) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0)), (out, lse)

    ring = lambda q, key, v: aj.sequence_parallel_attention(
        q, key, v, mesh=mesh, axis="sp", mask=mask, layout="zigzag", return_lse=True
    )
    reference = lambda q, key, v: aj.dot_product_attention(
        q, key, v, mask=mask, implementation="reference", return_lse=True
    )
    sharding = NamedSharding(mesh, P(None, "sp"))
    global_args = [jax.device_put(x, sharding) for x in (q, key, v)]
    grad = lambda attention: jax.jit(jax.grad(lambda *a: loss(*a, attention), argnums=(0, 1, 2), has_aux=True))
    ring_grads, (ring_out, ring_lse) = grad(ring)(*global_args)
    ring_results = multihost_utils.process_allgather((ring_out, ring_lse) + tuple(ring_grads), tiled=True)

    local = jax.local_devices()[0]
    with jax.default_device(local):
        ref_grads, (ref_out, ref_lse) = grad(reference)(q, key, v)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, got, want in zip(names, ring_results, (ref_out, ref_lse) + tuple(ref_grads)):
        got, want = np.asarray(got), np.asarray(want)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        finite = np.isfinite(want)
        np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)
        np.testing.assert_allclose(got[finite], want[finite], atol=1e-4, rtol=1e-4, err_msg=name)
    print(f"process {process_id}: {num_devices} devices over {jax.process_count()} processes, ring == reference")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
