"""dot_product_attention's flow: validate once, resolve the mask once, ask the backends.

The backends are objects in a registry; each says what it cannot serve. These tests check the
selection (automatic order, explicit requests and their reasons), the single validation, the one
resolution of masks/offsets/score mods into a MaskSpec, and the argument errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import RecordingBackend, assert_close, random_qkv

import attention_jax as aj
from attention_jax import masks
from attention_jax.functional import _checks, backends, dot_product, resolve
from pallas_kernels import mask_info

# -- selection ---------------------------------------------------------------------------------------


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU order")
def test_auto_order_on_cpu_picks_the_reference_for_tiny_calls_and_blockwise_beyond():
    small, _, _ = random_qkv(0, t=16, n=2, h=8)
    big, _, _ = random_qkv(0, t=256, n=2, h=8)
    assert aj.functional.choose_implementation(small, small, small) == "reference"
    assert aj.functional.choose_implementation(big, big, big) == "blockwise"
    assert [b.name for b in backends.auto_order("cpu")] == ["reference", "blockwise"]
    assert [b.name for b in backends.auto_order("gpu")] == ["pallas", "blockwise"]


def test_explicit_backend_names_why_it_cannot_serve():
    q, k, v = random_qkv(1, t=8, n=2, h=8)
    with pytest.raises(ValueError, match=r"implementation='pallas' cannot serve this call: .*static scale"):
        jax.jit(lambda s: aj.dot_product_attention(q, k, v, scale=s, implementation="pallas"))(0.3)
    with pytest.raises(ValueError, match=r"cannot serve this call: .*max_scores=10"):
        aj.dot_product_attention(q, k, v, implementation=backends.Reference(max_scores=10))
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            aj.dot_product_attention(q, k, v, implementation="cudnn")


def test_auto_falls_through_to_the_next_backend(monkeypatch):
    class Refuses(backends.Reference):
        def check(self, call):
            raise NotImplementedError("never")

    q, k, v = random_qkv(2, t=8, n=2, h=8)
    monkeypatch.setattr(backends, "auto_order", lambda platform=None: (Refuses(), backends.BACKENDS["blockwise"]))
    assert dot_product.select_backend(dot_product.validate(q, k, v)).name == "blockwise"
    monkeypatch.setattr(backends, "auto_order", lambda platform=None: (Refuses(),))
    with pytest.raises(ValueError, match="no attention backend can serve this call: .*never"):
        aj.dot_product_attention(q, k, v)


def test_unknown_implementation_is_named():
    q, k, v = random_qkv(3, t=8, n=2, h=8)
    with pytest.raises(ValueError, match="implementation must be None, 'auto', one of"):
        aj.dot_product_attention(q, k, v, implementation="flash")


def test_a_backend_instance_runs_with_its_configuration():
    q, k, v = random_qkv(4, b=2, t=70, n=4, k=2, h=16)
    rec = RecordingBackend(block_q=16, block_k=32)
    out = aj.dot_product_attention(q, k, v, mask=masks.causal(), implementation=rec)
    assert (rec.specs[0].block_q, rec.specs[0].block_k) == (16, 32)
    assert_close(out, aj.dot_product_attention(q, k, v, mask=masks.causal(), implementation="reference"))


def test_validation_runs_once_per_call(monkeypatch):
    calls = []
    real = _checks.check_qkv
    monkeypatch.setattr(_checks, "check_qkv", lambda *a: calls.append(1) or real(*a))
    q, k, v = random_qkv(5, b=2, t=40, n=2, h=8)
    aj.dot_product_attention(q, k, v, mask=masks.causal(), implementation="blockwise")
    assert len(calls) == 1
    calls.clear()
    aj.functional.multi_head_attention(q, k, v, sinks=jnp.zeros(2), kv_valid=jnp.ones((2, 40), bool))
    assert len(calls) == 1


# -- resolution --------------------------------------------------------------------------------------


def _spec(mask=None, q_offset=0, kv_offset=0, t=40, s=40, b=2, block=16, score_mod=None):
    q, k, v = random_qkv(6, b=b, t=t, s=s, n=2, h=8)
    call = dot_product.validate(q, k, v, mask=mask, q_offset=q_offset, kv_offset=kv_offset, score_mod=score_mod)
    return resolve.resolve_spec(call, block, block)


def test_static_offsets_give_a_static_block_map():
    spec = _spec(masks.causal(), q_offset=24, kv_offset=0)
    assert isinstance(spec.block_map, np.ndarray) and isinstance(spec.q_positions, np.ndarray)
    np.testing.assert_array_equal(spec.block_map, masks.causal().block_map(40, 40, 16, 16, 24, 0))


def test_per_sequence_offsets_keep_a_structured_map_and_positions():
    spec = _spec(masks.causal() & masks.sliding_window(8), q_offset=jnp.array([0, 24]), t=8, s=40)
    assert spec.q_positions.shape == (2, 8) and spec.block_map.shape == (2, 1, 3)
    for b, off in enumerate([0, 24]):
        want = (masks.causal() & masks.sliding_window(8)).block_map(8, 40, 16, 16, off, 0)
        np.testing.assert_array_equal(np.asarray(spec.block_map[b]), want)


def test_traced_offsets_resolve_under_jit():
    got = jax.jit(lambda o: _spec(masks.causal(), q_offset=o).block_map)(jnp.int32(24))
    np.testing.assert_array_equal(np.asarray(got)[0], masks.causal().block_map(40, 40, 16, 16, 24, 0))


def test_a_boolean_array_travels_as_the_specs_array_with_its_block_map():
    dense = np.zeros((2, 1, 40, 40), bool)
    dense[0, :, :16, :16] = True
    spec = _spec(jnp.asarray(dense))
    assert spec.fn is None and spec.array.shape == (2, 1, 40, 40)
    assert spec.block_map.shape == (2, 3, 3)
    assert spec.block_map[0, 0, 0] == mask_info.FULL and spec.block_map[1].max() == mask_info.EMPTY


def test_score_mods_resolve_into_a_tile_function_and_per_head_params():
    mod = aj.score_mods.compose(aj.score_mods.alibi(jnp.array([0.5, 0.25])), aj.score_mods.softcap(20.0))
    spec = _spec(score_mod=mod)
    assert spec.score_fn == mod.tile_fn() and len(spec.score_params) == 1
    with pytest.raises(ValueError, match=r"per-head parameters must have shape \[N\]=\[2\]"):
        _spec(score_mod=aj.score_mods.alibi(jnp.ones(3)))


# -- argument errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scale="0.5"), "scale must be a real number"),
        (dict(scale=jnp.array([0.5, 1.0])), r"scale must be a scalar, got scale.shape=\(2,\)"),
        (dict(scale=jnp.array(1)), "scale must be a float"),
        (dict(softcap=-1.0), "softcap must be a positive number"),
        (dict(softcap="5"), "softcap must be a positive number"),
        (dict(q_offset=jnp.zeros(3, jnp.int32)), r"q_offset must have shape \[B\]=\[2\]"),
        (dict(kv_offset=1.5), "kv_offset must be an integer"),
        (dict(mask=jnp.ones((40, 40))), "mask must be a Mask or a boolean array, got dtype float32"),
        (dict(mask="causal"), "mask must be an attention_jax.masks.Mask or a boolean array"),
        (dict(bias=jnp.ones((3, 40))), r"bias must be broadcastable to \[B, N, T, S\]"),
        (dict(dropout_rate=1.0), r"dropout_rate must be a number in \[0, 1\)"),
        (dict(dropout_rate=0.1), "needs dropout_rng"),
        (dict(score_mod=lambda *a: a[0]), "score_mod must be an attention_jax.score_mods.ScoreMod"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    q, k, v = random_qkv(7, b=2, t=40, n=2, h=8)
    with pytest.raises(ValueError, match=match):
        aj.dot_product_attention(q, k, v, **kwargs)


def test_numpy_softcap_and_array_scale_are_accepted():
    q, k, v = random_qkv(8, b=1, t=12, n=2, h=8)
    ref = aj.dot_product_attention(q, k, v, softcap=5.0, scale=0.3)
    assert_close(aj.dot_product_attention(q, k, v, softcap=np.float32(5.0), scale=jnp.float32(0.3)), ref)


@pytest.mark.parametrize("implementation", ["reference", "blockwise", "pallas"])
@pytest.mark.parametrize(("t", "s"), [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths_give_empty_or_zero_outputs_on_every_backend(implementation, t, s):
    q = jnp.ones((2, t, 4, 8))
    kv = jnp.ones((2, s, 2, 8))
    out, lse = aj.dot_product_attention(q, kv, kv, mask=masks.causal(), implementation=implementation, return_lse=True)
    assert out.shape == (2, t, 4, 8) and lse.shape == (2, 4, t)
    assert not np.any(np.asarray(out)) and np.all(np.asarray(lse) == -np.inf)
    grad = jax.grad(lambda q: aj.dot_product_attention(q, kv, kv, implementation=implementation).sum())(q)
    assert grad.shape == q.shape and not np.any(np.asarray(grad))
