"""Sequence parallelism as a layer option: a TransformerLM training step on 8 CPU devices equals one device.

Ring, all-to-all (DeepSpeed-Ulysses) and hybrid, each against the same model run unsharded: the loss
and the gradient of every parameter. Also eager (un-jitted) ``jax.grad`` through
``sequence_parallel_attention`` and the arguments a sharded layer must refuse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import assert_close, random_qkv
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import attention_jax as aj
from attention_jax.distributed import SequenceParallel
from attention_jax.functional.multi_head import multi_head_attention

VOCAB, FEATURES, LAYERS, B, T = 32, 32, 1, 2, 64  # one layer: its rings hold every collective checked


def _lm(sequence_parallel, **options):
    attention = functools.partial(
        aj.nn.MultiHeadAttention, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(),
        sequence_parallel=sequence_parallel, **options,
    )  # fmt: skip
    return aj.nn.TransformerLM(VOCAB, FEATURES, LAYERS, attention=attention, rngs=nnx.Rngs(0))


def _step(model, tokens, **call):
    """Loss and gradients of every parameter of one next-token training step (jitted)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, rest, tokens, call):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest)(tokens[:, :-1], **call)  # [B, T, V]
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        return jax.value_and_grad(loss)(params)

    return run(params, rest, tokens, call)


def _tokens(seed):
    return jax.random.randint(jax.random.key(seed), (B, T + 1), 0, VOCAB)


def _check_lm_step(sequence_parallel, seed, options=None, **call):
    options = options or {}
    tokens = _tokens(seed)
    loss, grads = _step(_lm(sequence_parallel, **options), tokens, **call)
    ref_loss, ref_grads = _step(_lm(None, **options), tokens, **call)
    assert_close(loss, ref_loss)
    flat, ref_flat = jax.tree.leaves_with_path(grads), jax.tree.leaves_with_path(ref_grads)
    assert [path for path, _ in flat] == [path for path, _ in ref_flat]
    assert len(flat) >= 6 * LAYERS  # q, k, v, out kernels, norms, MLP, ... of every layer
    for (path, grad), (_, ref_grad) in zip(flat, ref_flat):
        grad, ref_grad = np.asarray(grad), np.asarray(ref_grad)  # numpy: no eager program per leaf shape
        assert float(np.abs(ref_grad).max()) > 0, jax.tree_util.keystr(path)  # the comparison means something
        assert_close(grad, ref_grad, grad=True)


def _segment_ids(seed):
    return jnp.asarray(np.sort(np.random.default_rng(seed).integers(0, 3, (B, T)), axis=1), jnp.int32)


@pytest.mark.slow
def test_lm_step_ring_equals_one_device():
    """Zigzag ring over 8 devices, packed documents (segment data travels with the ring)."""
    mesh = jax.make_mesh((8,), ("sp",))
    _check_lm_step(SequenceParallel("sp", mesh=mesh), 0, segment_ids=_segment_ids(0))


@pytest.mark.slow
def test_lm_step_all_to_all_equals_one_device():
    """Ulysses over 4 devices (K=2 key/value heads replicated to 4), batch over 2, mesh from jax.set_mesh,
    right padding (lengths)."""
    mesh = jax.make_mesh((2, 4), ("dp", "sp"), axis_types=(AxisType.Auto,) * 2)
    with jax.set_mesh(mesh):
        _check_lm_step(
            SequenceParallel("sp", kind="all_to_all", batch_axis="dp"), 1, lengths=jnp.array([T, T - 20])
        )


@pytest.mark.slow
def test_lm_step_hybrid_equals_one_device():
    """All-to-all over 2 devices, striped ring over 4, with attention sinks and a softcap."""
    mesh = jax.make_mesh((2, 4), ("heads", "ring"))
    sp = SequenceParallel(("heads", "ring"), kind="hybrid", layout="striped", mesh=mesh)
    _check_lm_step(sp, 2, options=dict(sinks=True, softcap=5.0))


def test_explicit_mesh_in_context_keeps_the_callers_sharding():
    """Under jax.set_mesh with Explicit axes, activations sharded over the sequence stay so, and
    replicated ones come back replicated (the next op of the model sees the type it passed)."""
    mesh = jax.make_mesh((2, 4), ("heads", "ring"), axis_types=(AxisType.Explicit,) * 2)
    sp = SequenceParallel(("heads", "ring"), kind="hybrid")
    q, k, v = random_qkv(3, b=2, t=32, n=4, k=2, h=8)
    ref = jax.jit(functools.partial(aj.dot_product_attention, mask=aj.masks.causal(), implementation="reference"))
    ref = ref(q, k, v)
    with jax.set_mesh(mesh):
        for spec in (P(), sp.spec(4)):
            args = [jax.sharding.reshard(x, spec) for x in (q, k, v)]
            out = jax.jit(functools.partial(sp, mask=aj.masks.causal()))(*args)
            assert jax.typeof(out).sharding.spec == jax.typeof(args[0]).sharding.spec
            assert_close(out, ref)


def test_all_to_all_repeats_kv_heads_to_lcm_and_takes_a_backend_instance():
    """K=3 key/value heads over 4 devices: each is repeated to lcm(3, 4) = 12 so every device gets the ones
    its 3 query heads read (query head n reads K/V head n // 4); the local attention is a configured backend."""
    mesh = jax.make_mesh((4,), ("sp",), devices=jax.devices()[:4])
    sp = SequenceParallel("sp", kind="all_to_all", mesh=mesh, implementation=aj.functional.backends.Blockwise(8, 8))
    q, k, v = random_qkv(7, b=2, t=32, n=12, k=3, h=8)
    mask = aj.masks.causal() & aj.masks.segments(_segment_ids(7)[:, :32])

    def loss(attention):
        return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask=mask))), (0, 1, 2)))

    (value, grads), (ref_value, ref_grads) = loss(sp)(q, k, v), loss(aj.dot_product_attention)(q, k, v)
    assert_close(value, ref_value)
    for grad, ref_grad in zip(grads, ref_grads):
        assert_close(grad, ref_grad, grad=True)


# -- eager grad -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, axis_type", [("ring", AxisType.Explicit), ("all_to_all", AxisType.Auto)])
def test_eager_grad(kind, axis_type):
    """Un-jitted jax.grad. An Explicit mesh (``jax.make_mesh``'s default) used outside jax.set_mesh used to
    fail: "Length of device assignment 1 is not equal to the size of the mesh 8"."""
    mesh = jax.make_mesh((8,), ("sp",), axis_types=(axis_type,))
    q, k, v = random_qkv(4, b=1, t=32, n=8, k=2, h=8)
    mask = aj.masks.causal() & aj.masks.segments(_segment_ids(4)[:1, :32])

    def loss(attention):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask=mask)))

    sp = functools.partial(aj.sequence_parallel_attention, mesh=mesh, axis="sp", kind=kind)
    grads = jax.grad(loss(sp), argnums=(0, 1, 2))(q, k, v)  # eager: the subject of this test
    reference = functools.partial(aj.dot_product_attention, implementation="reference")
    ref = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))  # the oracle may be compiled
    for grad, ref_grad in zip(grads, ref(q, k, v)):
        assert_close(grad, ref_grad, grad=True)


def test_eager_grad_under_set_mesh():
    mesh = jax.make_mesh((2, 4), ("dp", "sp"))
    q, k, v = random_qkv(5, b=2, t=32, n=4, k=4, h=8)
    with jax.set_mesh(mesh):
        sp = SequenceParallel("sp", batch_axis="dp", layout="contiguous")
        grad = jax.grad(lambda q: jnp.sum(sp(q, k, v, mask=aj.masks.causal()) ** 2))(q)
    ref = jax.jit(jax.grad(lambda q: jnp.sum(aj.dot_product_attention(q, k, v, mask=aj.masks.causal()) ** 2)))(q)
    assert_close(grad, ref, grad=True)


# -- the layer ------------------------------------------------------------------------------------


def test_multi_head_attention_layer_sharded_forward():
    """MultiHeadAttention with the config: the same output as the unsharded layer, sliding window included."""
    mesh = jax.make_mesh((8,), ("sp",))
    x = jax.random.normal(jax.random.key(6), (2, 32, 16))  # [B, T, D]
    layer = lambda sp: aj.nn.MultiHeadAttention(
        16, num_heads=8, num_kv_heads=4, mask=aj.masks.causal(), sliding_window=5, sequence_parallel=sp,
        rngs=nnx.Rngs(1),
    )  # fmt: skip
    ref = jax.jit(lambda x: layer(None)(x))(x)
    for sp in (SequenceParallel("sp", mesh=mesh), SequenceParallel("sp", kind="all_to_all", mesh=mesh)):
        assert_close(jax.jit(lambda x, sp=sp: layer(sp)(x))(x), ref)


# -- what cannot be sharded -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(kv_valid=jnp.ones((1, 16), bool)), "cannot shard kv_valid"),
        (dict(return_weights=True), "cannot shard return_weights"),
        (dict(dropout_rate=0.1, dropout_rng=jax.random.key(0)), "cannot shard dropout_rate"),
        (dict(bias=jnp.zeros((1, 1, 16, 16))), "cannot shard bias"),
        (dict(score_mod=aj.score_mods.alibi(jnp.ones(4))), "cannot shard score_mod"),
        (dict(q_offset=3), "cannot shard q_offset"),
        (dict(mask=jnp.ones((16, 16), bool)), "takes an attention_jax.masks.Mask"),
    ],
)
def test_multi_head_attention_refuses_what_it_cannot_shard(kwargs, message):
    q = jnp.zeros((1, 16, 4, 8))
    sp = SequenceParallel("sp", mesh=jax.make_mesh((2,), ("sp",)))
    with pytest.raises(ValueError, match=message):
        multi_head_attention(q, q, q, sequence_parallel=sp, **kwargs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(axis="sp", kind="tree"), "kind must be one of"),
        (dict(axis="sp", kind="hybrid"), "axis=\\(all_to_all_axis, ring_axis\\)"),
        (dict(axis=("a", "b")), "takes one mesh axis name"),
        (dict(axis="sp", layout="spiral"), "layout must be one of"),
        (dict(axis="sp", batch_axis="sp"), "batch_axis and axis must differ"),
    ],
)
def test_config_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SequenceParallel(**kwargs)


def test_heads_must_split_over_the_all_to_all_axis_and_a_mesh_is_needed():
    q = jnp.zeros((1, 16, 4, 8))
    with pytest.raises(ValueError, match="N must be divisible by 8"):
        SequenceParallel("sp", kind="all_to_all", mesh=jax.make_mesh((8,), ("sp",)))(q, q, q)
    with pytest.raises(ValueError, match="needs a mesh"):
        SequenceParallel("sp")(q, q, q)
    with pytest.raises(TypeError, match="must be an attention_jax.distributed.SequenceParallel"):
        multi_head_attention(q, q, q, sequence_parallel="ring")
