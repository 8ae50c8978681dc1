"""Mamba and Mamba2 against float64 transcriptions of the papers' blocks, decoding, packing, hybrids, the protocol."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.nn import Mamba, Mamba2, RecurrentCache, SSMState

D, HEAD, STATE, GROUPS, WIDTH = 16, 4, 3, 2, 4
TOL = dict(rtol=1e-4, atol=1e-4)


def _layer(seed: int = 0, kind: str = "mamba2", **options) -> Mamba | Mamba2:
    if kind == "mamba":
        return Mamba(D, state_dim=STATE, dt_rank=3, conv_width=WIDTH, rngs=nnx.Rngs(seed), **options)
    options = dict(head_dim=HEAD, state_dim=STATE, num_groups=GROUPS, conv_width=WIDTH, chunk_size=4) | options
    return Mamba2(D, rngs=nnx.Rngs(seed), **options)


def _silu(v):
    return v / (1 + np.exp(-v))


def _conv64(layer, u: np.ndarray) -> np.ndarray:
    """``silu`` of the causal depthwise convolution of ``u [T, C]`` in float64."""
    w, bias = np.asarray(layer.conv_weight[...], np.float64), np.asarray(layer.conv_bias[...], np.float64)
    padded = np.concatenate([np.zeros((WIDTH - 1, u.shape[1])), u])
    return _silu(np.stack([(padded[t : t + WIDTH] * w).sum(0) + bias for t in range(len(u))]))


def _mamba64(layer: Mamba, x: np.ndarray) -> np.ndarray:
    """The Mamba block in float64, token by token, from the paper (one sequence ``x [T, D]``)."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    e, f, r = layer.inner, STATE, layer.dt_rank
    xz = x @ p(layer.in_proj.kernel)
    u, z = _conv64(layer, xz[:, :e]), xz[:, e:]
    low = u @ p(layer.x_proj.kernel)
    dt = np.log1p(np.exp(low[:, :r] @ p(layer.dt_proj.kernel) + p(layer.dt_proj.bias)))  # [T, E]
    bs, cs = low[:, r : r + f], low[:, r + f :]
    a = -np.exp(p(layer.a_log))  # [E, F]
    h = np.zeros((e, f))
    ys = []
    for t in range(len(x)):
        h = np.exp(dt[t][:, None] * a) * h + (dt[t] * u[t])[:, None] * bs[t][None]
        ys.append(h @ cs[t] + p(layer.d) * u[t])
    return (np.stack(ys) * _silu(z)) @ p(layer.out_proj.kernel)


def _block64(layer: Mamba2, x: np.ndarray) -> np.ndarray:
    """The Mamba-2 block in float64, token by token, from the paper (one sequence ``x [T, D]``)."""
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    e, n, k, f = layer.inner, layer.num_heads, GROUPS, STATE
    proj = x @ p(layer.in_proj.kernel)
    z, xbc, dt = proj[:, :e], proj[:, e : e + layer.conv_channels], proj[:, e + layer.conv_channels :]
    xbc = _conv64(layer, xbc)
    xs, bs, cs = xbc[:, :e].reshape(-1, n, HEAD), xbc[:, e : e + k * f], xbc[:, e + k * f :]
    bs, cs = bs.reshape(-1, k, f), cs.reshape(-1, k, f)
    dt = np.log1p(np.exp(dt + p(layer.dt_bias)))
    a = -np.exp(p(layer.a_log))
    h = np.zeros((n, HEAD, f))
    ys = []
    for t in range(len(x)):
        for head in range(n):
            g = head // (n // k)
            h[head] = np.exp(dt[t, head] * a[head]) * h[head] + dt[t, head] * np.outer(xs[t, head], bs[t, g])
        ys.append(np.einsum("NHF,NF->NH", h, cs[t, np.arange(n) // (n // k)]) + p(layer.d)[:, None] * xs[t])
    y = np.stack(ys).reshape(len(x), e) * _silu(z)
    y = y.reshape(len(x), k, -1)
    y = (y / np.sqrt((y**2).mean(-1, keepdims=True) + layer.norm_epsilon)).reshape(len(x), e) * p(layer.norm_scale)
    return y @ p(layer.out_proj.kernel)


@jax.jit
def _forward(layer, x, segment_ids=None, lengths=None):
    return layer(x, segment_ids=segment_ids, lengths=lengths)


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_matches_the_float64_block(kind):
    layer = _layer(0, kind)
    x = np.random.default_rng(0).normal(size=(2, 7, D))
    y = _forward(layer, jnp.asarray(x, jnp.float32))
    assert y.shape == (2, 7, D) and y.dtype == jnp.float32
    block64 = _block64 if kind == "mamba2" else _mamba64
    for row in range(2):
        np.testing.assert_allclose(y[row], block64(layer, x[row]), **TOL)


@pytest.mark.parametrize("kind,implementation", [("mamba2", "chunked"), ("mamba2", "sequential"), ("mamba", None)])
def test_prefill_then_decode_equals_the_full_forward_with_ragged_rows(kind, implementation):
    layer = _layer(1, kind, implementation=implementation)
    x = jax.random.normal(jax.random.key(0), (2, 9, D))
    full = _forward(layer, x)
    step = jax.jit(lambda layer, x, cache, lengths=None: layer(x, cache=cache, lengths=lengths))
    prompt = jnp.array([5, 3])  # row 1's prompt is shorter: its tokens 3, 4 are padding here
    y, cache = step(layer, x[:, :5], layer.init_cache(2, 16), prompt)
    np.testing.assert_allclose(y[0], full[0, :5], **TOL)
    np.testing.assert_allclose(y[1, :3], full[1, :3], **TOL)
    assert cache.lengths.tolist() == [5, 3]
    # Row 1 resumes at its own position 3; decode one token per row at a time.
    positions = np.array([5, 3])
    for _ in range(4):
        tokens = jnp.stack([x[0, positions[0]], x[1, positions[1]]])[:, None]
        y, cache = step(layer, tokens, cache)
        np.testing.assert_allclose(y[:, 0], jnp.stack([full[0, positions[0]], full[1, positions[1]]]), **TOL)
        positions += 1
    assert cache.lengths.tolist() == positions.tolist()


@pytest.mark.parametrize("kind", ["mamba2", "mamba"])
def test_packed_documents_equal_running_them_alone(kind):
    layer = _layer(2, kind)
    x = jax.random.normal(jax.random.key(1), (1, 9, D))
    packed = _forward(layer, x, segment_ids=jnp.array([[4, 4, 4, 4, 4, 1, 1, 1, 1]]))
    np.testing.assert_allclose(packed[:, :5], _forward(layer, x[:, :5]), **TOL)
    np.testing.assert_allclose(packed[:, 5:], _forward(layer, x[:, 5:]), **TOL)


def test_recorded_weights_are_causal_and_stay_within_documents():
    layer = _layer(3)
    x = jax.random.normal(jax.random.key(2), (1, 6, D))
    segments = np.array([[0, 0, 0, 0, 1, 1]])
    y, weights = aj.explain.capture(layer, x, segment_ids=jnp.asarray(segments))
    weights = np.asarray(weights[""])
    assert weights.shape == (1, layer.num_heads, 6, 6) and y.shape == (1, 6, D)
    np.testing.assert_array_equal(np.triu(weights[0], 1), 0.0)
    np.testing.assert_array_equal(weights[0][:, segments[0][:, None] != segments[0][None, :]], 0.0)
    assert np.all(np.abs(np.diagonal(weights[0], axis1=1, axis2=2)) > 0)


def test_a_hybrid_stack_trains_and_generates_like_its_full_forward():
    attention = [
        functools.partial(Mamba2, head_dim=HEAD, state_dim=STATE, chunk_size=4),
        functools.partial(aj.nn.MultiHeadAttention, num_heads=2),
    ]
    model = aj.nn.TransformerLM(32, D, num_layers=2, attention=attention, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 0, 32)

    @jax.jit
    def loss_and_grads(model, tokens):
        def loss(model):
            logits = model(tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        return nnx.value_and_grad(loss)(model)

    value, grads = loss_and_grads(model, tokens)
    a_log = [v for path, v in jax.tree_util.tree_flatten_with_path(grads)[0] if "a_log" in jax.tree_util.keystr(path)]
    assert np.isfinite(value) and len(a_log) == 1 and np.all(np.isfinite(a_log[0])) and np.any(a_log[0] != 0)
    out = aj.generate(model, tokens[:, :3], max_new_tokens=3)
    logits = jax.jit(lambda m, t: m(t))(model, out[:, :-1])
    np.testing.assert_array_equal(out[:, 3:], jnp.argmax(logits[:, 2:], -1))


def test_protocol_errors_name_the_module_and_argument():
    layer = _layer()
    x = jnp.ones((1, 4, D))
    with pytest.raises(ValueError, match="Mamba2 cannot take inputs_kv"):
        layer(x, x)
    with pytest.raises(ValueError, match="Mamba2 cannot take mask"):
        layer(x, mask=aj.masks.full())
    with pytest.raises(ValueError, match="Mamba2 cannot take segment_ids with a cache"):
        layer(x, segment_ids=jnp.zeros((1, 4), jnp.int32), cache=layer.init_cache(1, 8))
    with pytest.raises(ValueError, match="RecurrentCache of its init_cache"):
        layer(x, cache=aj.cache.KVCache.create(1, 8, num_kv_heads=1, head_dim=4))
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2(D, head_dim=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="chunked"):
        Mamba(D, implementation="chunked", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="Mamba cannot take mask"):
        _layer(0, "mamba")(x, mask=aj.masks.sliding_window(2))
    cache = layer.init_cache(1, 8)
    assert isinstance(layer, aj.nn.AttentionLayer)
    assert isinstance(cache, RecurrentCache) and isinstance(cache.state, SSMState)
