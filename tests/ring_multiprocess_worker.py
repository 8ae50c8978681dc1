"""One process of the two-process sequence-parallel check (started by tests/test_ring_multiprocess.py).

Usage: ``python ring_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT [LOCAL_DEVICES]``.
Every process joins the same JAX distributed runtime over localhost with gloo CPU collectives and
runs one training step of a one-layer ``TransformerLM`` whose attention is a zigzag ring over the
devices of all processes (packed documents, so segment ids travel around the ring too). It compares
the loss and the gradient of every parameter with the same step on one local device. Exit status 0
means every check passed.
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

    import functools

    import numpy as np
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import attention_jax as aj
    from attention_jax.distributed import SequenceParallel

    assert jax.process_count() == num_processes, jax.process_count()
    num_devices = len(jax.devices())
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("sp",))
    vocab, features, b, t = 32, 32, 2, 16 * num_devices
    rng = np.random.default_rng(0)  # the same global arrays in every process
    tokens = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
    segment_ids = np.sort(rng.integers(0, 3, (b, t)), axis=1).astype(np.int32)

    def lm(sequence_parallel):  # the same parameters in every process and for both runs: Rngs(0)
        # One layer: its forward and backward rings hold every collective the check is about.
        attention = functools.partial(
            aj.nn.MultiHeadAttention, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(),
            sequence_parallel=sequence_parallel,
        )  # fmt: skip
        return aj.nn.TransformerLM(vocab, features, 1, attention=attention, rngs=nnx.Rngs(0))

    # The parameters, initialised in one compiled program (eagerly, each initialiser compiles its own);
    # the sharded and the one-device model differ only in their static configuration.
    params, rest = jax.jit(lambda: nnx.split(lm(None), nnx.Param, ...)[1:])()

    def step(sequence_parallel, place=lambda x: x, **jit_options):
        graphdef = nnx.split(nnx.eval_shape(lambda: lm(sequence_parallel)), nnx.Param, ...)[0]

        def run(params, rest, tokens, segment_ids):
            def loss(params):
                logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], segment_ids=segment_ids)  # [B, T, V]
                return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

            return jax.value_and_grad(loss)(params)

        def to_mesh(x):  # a process-local array onto the mesh (random keys through their data)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                return jax.random.wrap_key_data(place(np.asarray(jax.random.key_data(x))), impl=jax.random.key_impl(x))
            return place(np.asarray(x))

        args = jax.tree.map(to_mesh, (params, rest, tokens, segment_ids))
        return jax.jit(run, **jit_options)(*args)

    # Sharded: every input replicated over the global mesh (each process supplies the same values),
    # and so are the loss and the gradients, so each process can read them whole.
    replicated = NamedSharding(mesh, P())
    place = lambda x: jax.device_put(x, replicated)
    loss, grads = step(SequenceParallel("sp", mesh=mesh), place, out_shardings=replicated)
    loss, grads = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), (loss, grads))

    with jax.default_device(jax.local_devices()[0]):
        ref_loss, ref_grads = step(None)
    np.testing.assert_allclose(loss, ref_loss, atol=1e-5, rtol=1e-5, err_msg="loss")
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(ref_grads)
    assert [path for path, _ in flat] == [path for path, _ in ref_flat]
    for (path, got), (_, want) in zip(flat, ref_flat):
        name = jax.tree_util.keystr(path)
        want = np.asarray(want)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert np.abs(want).max() > 0, name  # a gradient that is there to compare
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)
    print(
        f"process {process_id}: {num_devices} devices over {jax.process_count()} processes, LM step loss "
        f"{float(loss):.4f} and {len(flat)} gradients: ring == one device"
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
