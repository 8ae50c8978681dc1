"""aj.checkpoint: a model with its optimizer saved and restored through orbax, sharded arrays included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import attention_jax as aj

V, D = 32, 16


def _model(seed, **kw):
    return aj.nn.TransformerLM(V, D, 1, num_heads=2, mlp_features=32, rngs=nnx.Rngs(seed), **kw)


def _randomize(node, seed):
    """Fresh random values in every float variable and a given count in every integer one: no two nodes agree."""
    state = nnx.state(node)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)  # numpy: no compilation per shape
    leaves = [jnp.asarray(rng.standard_normal(x.shape), x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
              else jnp.asarray(np.full(x.shape, seed + 3), x.dtype) if jnp.issubdtype(x.dtype, jnp.integer) else x
              for x in leaves]
    nnx.update(node, jax.tree.unflatten(treedef, leaves))


def _trained(seed=0):
    """A model with dropout (so a random-key state) and its Adam optimizer, as after some training steps."""
    model = _model(seed, dropout_rate=0.1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    _randomize(model, seed)
    _randomize(optimizer, seed + 1)  # Adam's moments, counts and the step
    return model, optimizer


def _leaves(node):
    return jax.tree.leaves(nnx.state(node))


def _assert_same(a, b):
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_model_and_optimizer_roundtrip(tmp_path):
    model, optimizer = _trained()
    aj.checkpoint.save(tmp_path, model, optimizer, step=2, metadata={"config": {"d": D}, "loss": [1.5, 1.25]})
    later, later_optimizer = _trained(seed=3)
    aj.checkpoint.save(tmp_path, later, later_optimizer, step=3)
    assert aj.checkpoint.latest_step(tmp_path) == 3
    assert aj.checkpoint.read_metadata(tmp_path, step=2) == {"config": {"d": D}, "loss": [1.5, 1.25]}
    assert aj.checkpoint.read_metadata(tmp_path) == {}

    fresh = _model(1, dropout_rate=0.1)  # other weights and random keys, same configuration
    fresh_optimizer = nnx.Optimizer(fresh, optax.adam(1e-2), wrt=nnx.Param)
    assert aj.checkpoint.restore(tmp_path, fresh, fresh_optimizer, step=2) == 2
    _assert_same(fresh, model)  # parameters and the dropout key state
    _assert_same(fresh_optimizer, optimizer)  # Adam's moments and counts
    assert int(fresh_optimizer.step[...]) == 4

    alone = _model(2, dropout_rate=0.1)  # the model alone from a step saved with its optimizer
    assert aj.checkpoint.restore(tmp_path, alone) == 3
    _assert_same(alone, later)


def test_sharded_arrays_restore_onto_the_target_shardings(tmp_path):
    """Saved from a 2x4 mesh, restored onto an 8-device layout: the values of the one, the shardings of the other."""
    devices = np.array(jax.devices()[:8])
    source_mesh = Mesh(devices.reshape(2, 4), ("data", "model"))
    target_mesh = Mesh(devices[::-1], ("x",))  # other devices in another order

    def source_spec(x):  # the first axis over "data", the last over "model", where they divide
        spec = [None] * x.ndim
        if x.ndim >= 2 and x.shape[0] % 2 == 0:
            spec[0] = "data"
        if x.ndim >= 1 and x.shape[-1] % 4 == 0:
            spec[-1] = "model"
        return NamedSharding(source_mesh, P(*spec))

    def target_spec(x):  # the last axis over all 8 devices, where it divides
        return NamedSharding(target_mesh, P(*([None] * (x.ndim - 1)), "x") if x.ndim and x.shape[-1] % 8 == 0
                             else P())

    def shard(node, spec):
        state = nnx.state(node)
        nnx.update(node, jax.tree.map(lambda x: jax.device_put(x, spec(x)), state))

    model = _model(0)
    shard(model, source_spec)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    shard(optimizer, source_spec)
    kernel = model.stack.blocks[0].mlp.up.kernel[...]
    assert kernel.sharding.spec == P("data", "model") and len(kernel.addressable_shards) == 8
    aj.checkpoint.save(tmp_path, model, optimizer, step=7)

    target = _model(1)
    shard(target, target_spec)
    target_optimizer = nnx.Optimizer(target, optax.adam(1e-2), wrt=nnx.Param)
    shard(target_optimizer, target_spec)
    want = [x.sharding for x in _leaves(target) + _leaves(target_optimizer)]
    aj.checkpoint.restore(tmp_path, target, target_optimizer)
    _assert_same(target, model)
    _assert_same(target_optimizer, optimizer)
    got = [x.sharding for x in _leaves(target) + _leaves(target_optimizer)]
    assert got == want
    assert target.stack.blocks[0].mlp.up.kernel[...].sharding.spec == P(None, "x")


def test_bad_inputs(tmp_path):
    model = _model(0)
    aj.checkpoint.save(tmp_path, model, step=1)
    with pytest.raises(ValueError, match="step 1 already exists"):
        aj.checkpoint.save(tmp_path, model, step=1)
    aj.checkpoint.save(tmp_path, _model(3), step=1, overwrite=True)
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        aj.checkpoint.save(tmp_path, model, step=-1)
    with pytest.raises(TypeError, match="model must be an NNX module"):
        aj.checkpoint.save(tmp_path, {"w": jnp.ones(2)})
    with pytest.raises(ValueError, match="holds no optimizer state"):
        aj.checkpoint.restore(tmp_path, model, nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))
    wider = aj.nn.TransformerLM(V, 2 * D, 1, num_heads=2, mlp_features=32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"has shape \(32, 32\), but step 1 .* holds \(32, 16\)"):
        aj.checkpoint.restore(tmp_path, wider)
    with pytest.raises(ValueError, match=r"step=5 is not in .* it holds steps \[1\]"):
        aj.checkpoint.restore(tmp_path, model, step=5)
    with pytest.raises(ValueError, match="does not exist"):
        aj.checkpoint.restore(tmp_path / "nowhere", model)
    assert aj.checkpoint.latest_step(tmp_path / "nowhere") is None
