"""attention_jax.explain: rollout, flow and gradient maps against hand computations; capture on real modules."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import assert_close
from matplotlib.figure import Figure
from scipy.optimize import linprog

import attention_jax as aj
from attention_jax import explain


def random_weights(seed, b=2, n=3, t=5, layers=2, causal=False):
    """Softmax rows ``[L][B, N, T, T]`` (float32), optionally causal."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        logits = rng.normal(size=(b, n, t, t)) * 2
        if causal:
            logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        out.append((w / w.sum(-1, keepdims=True)).astype(np.float32))
    return out


def residual_np(a):
    """Row-normalised ``A + I`` in float64 numpy."""
    a = np.asarray(a, np.float64) + np.eye(a.shape[-1])
    return a / a.sum(-1, keepdims=True)


# --- rollout ---------------------------------------------------------------------------------------


def test_rollout_of_identity_attention_is_identity():
    eye = np.broadcast_to(np.eye(4, dtype=np.float32), (2, 3, 4, 4))
    r = explain.attention_rollout([eye, eye, eye])
    assert r.shape == (2, 4, 4) and r.dtype == jnp.float32
    np.testing.assert_allclose(r, np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-7)


def test_rollout_two_layers_by_hand():
    # One head, T = 2. Layer 1 sends everything to token 1; layer 2 is uniform.
    a1 = np.array([[[[0.0, 1.0], [0.0, 1.0]]]], np.float32)
    a2 = np.full((1, 1, 2, 2), 0.5, np.float32)
    # A_hat1 = [[.5, .5], [0, 1]], A_hat2 = [[.75, .25], [.25, .75]] -> R = A_hat2 @ A_hat1
    expected = np.array([[0.375, 0.625], [0.125, 0.875]])
    np.testing.assert_allclose(explain.attention_rollout([a1, a2])[0], expected, atol=1e-6)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("causal", [False, True])
def test_rollout_matches_numpy(fusion, causal):
    layers = random_weights(0, causal=causal, layers=3)
    expected = None
    for w in layers:
        a = residual_np(getattr(np, fusion)(w.astype(np.float64), axis=1))
        expected = a if expected is None else a @ expected
    r = explain.attention_rollout(layers, head_fusion=fusion)
    np.testing.assert_allclose(r, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
    if causal:  # a token only ever draws from the past
        assert np.all(np.triu(np.asarray(r)[0], 1) == 0)
    # every input form gives the same: list, mapping, stacked [L, ...] array
    np.testing.assert_array_equal(r, explain.attention_rollout({str(i): w for i, w in enumerate(layers)},
                                                               head_fusion=fusion))
    np.testing.assert_array_equal(r, explain.attention_rollout(np.stack(layers), head_fusion=fusion))


def test_discard_ratio_by_hand():
    # T = 2, one head: entries 0.1 < 0.2 < 0.3 < 0.4 (not a softmax: discard ranks values).
    a = np.array([[[[0.4, 0.1], [0.2, 0.3]]]], np.float32)
    # discard 0.5 of 4 entries -> 0.1 and 0.2 become 0: [[0.4, 0], [0, 0.3]] + I, rows normalised
    r = explain.attention_rollout([a], discard_ratio=0.5)
    np.testing.assert_allclose(r[0], np.eye(2), atol=1e-7)
    r = explain.attention_rollout([a], discard_ratio=0.25)  # only 0.1 goes
    np.testing.assert_allclose(r[0], [[1.0, 0.0], [0.2 / 1.5, 1.3 / 1.5]], atol=1e-6)


def test_rollout_errors():
    w = np.full((1, 2, 3, 4), 0.25, np.float32)
    with pytest.raises(ValueError, match="T == S"):
        explain.attention_rollout([w])
    square = np.full((1, 2, 3, 3), 1 / 3, np.float32)
    with pytest.raises(ValueError, match="head_fusion"):
        explain.attention_rollout([square], head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        explain.attention_rollout([square], discard_ratio=1.0)
    with pytest.raises(ValueError, match="one shape"):
        explain.attention_rollout([square, np.full((1, 2, 4, 4), 0.25)])
    with pytest.raises(ValueError, match="empty"):
        explain.attention_rollout([])


# --- flow ------------------------------------------------------------------------------------------


def test_flow_of_two_layers_is_sum_of_path_minima():
    # With two layers, the paths s -> u -> q are edge-disjoint: flow(s -> q) = sum_u min(A1[u, s], A2[q, u]).
    layers = random_weights(1, b=2, t=6)
    a1, a2 = (residual_np(w.mean(1)) for w in layers)  # [B, T, T]
    for q in (0, 3):
        expected = np.minimum(a1.transpose(0, 2, 1)[:, :, :], a2[:, q][:, None, :]).sum(-1)  # [B, S]
        flow = explain.attention_flow(layers, query_index=q)
        np.testing.assert_allclose(flow, expected, atol=1e-4)


def max_flow_lp(capacities, source, sink):
    """Max flow by linear programming (an independent oracle): one variable per edge."""
    edges = [(i, j) for i in range(len(capacities)) for j in range(len(capacities)) if capacities[i, j] > 0]
    nodes = len(capacities)
    a_eq = np.zeros((nodes, len(edges)))
    for e, (i, j) in enumerate(edges):
        a_eq[i, e] -= 1
        a_eq[j, e] += 1
    keep = [v for v in range(nodes) if v not in (source, sink)]
    gain = a_eq[sink]
    res = linprog(-gain, A_eq=a_eq[keep], b_eq=np.zeros(len(keep)), bounds=[(0, capacities[e]) for e in edges])
    return -res.fun


def test_flow_of_three_layers_matches_linear_program():
    layers = random_weights(2, b=1, t=4, layers=3)
    a_hat = [residual_np(w.mean(1))[0] for w in layers]
    t, nodes = 4, 16
    cap = np.zeros((nodes, nodes))
    for layer, a in enumerate(a_hat):
        for tt in range(t):
            for s in range(t):
                cap[layer * t + s, (layer + 1) * t + tt] = a[tt, s]
    expected = [max_flow_lp(cap, s, 3 * t + 1) for s in range(t)]
    np.testing.assert_allclose(explain.attention_flow(layers, query_index=1)[0], expected, atol=1e-4)
    every = explain.attention_flow(layers, query_index=None)
    assert every.shape == (1, t, t)
    np.testing.assert_allclose(every[0, 1], expected, atol=1e-4)


def test_flow_errors():
    with pytest.raises(ValueError, match="query_index"):
        explain.attention_flow(random_weights(0, t=3), query_index=3)


# --- gradient maps ---------------------------------------------------------------------------------


def test_gradient_weighted_rollout_matches_numpy():
    layers = random_weights(3, layers=3)
    grads = [np.random.default_rng(i).normal(size=w.shape).astype(np.float32) for i, w in enumerate(layers)]
    b, _, t, _ = layers[0].shape
    expected = np.broadcast_to(np.eye(t), (b, t, t))
    for w, g in zip(layers, grads):
        a_bar = np.maximum(w.astype(np.float64) * g, 0).mean(1)
        expected = expected + a_bar @ expected
    np.testing.assert_allclose(explain.gradient_weighted_rollout(layers, grads), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must match"):
        explain.gradient_weighted_rollout(layers, grads[:2])


def test_grad_cam_matches_numpy():
    rng = np.random.default_rng(4)
    x, g = rng.normal(size=(2, 7, 5)), rng.normal(size=(2, 7, 5))
    expected = np.maximum((x * g.mean(1, keepdims=True)).sum(-1), 0)
    np.testing.assert_allclose(explain.grad_cam(x, g), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        explain.grad_cam(x, g[:, :3])


# --- capture from modules --------------------------------------------------------------------------


class TwoLayers(nnx.Module):
    """Two causal attention layers with residuals and a linear read-out of token 0."""

    def __init__(self, implementation=None, *, rngs):
        make = lambda: aj.nn.MultiHeadAttention(
            8, num_heads=2, mask=aj.masks.causal(), implementation=implementation, rngs=rngs
        )
        self.layers = nnx.List([make(), make()])
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x[:, -1])


def available_implementations():
    q = jnp.ones((1, 8, 2, 4))
    found = []
    for impl in ("reference", "blockwise"):
        try:
            aj.dot_product_attention(q, q, q, mask=aj.masks.causal(), implementation=impl)
            found.append(impl)
        except ValueError:
            pass
    return found


def hand_weights(layer, x):
    """softmax(q k^T / sqrt(H)) under the causal mask, from the layer's own projections, float64 numpy."""
    q, k = (np.asarray(p(x), np.float64) for p in (layer.query, layer.key))  # [B, T, N, H]
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


@pytest.mark.parametrize("implementation", available_implementations())
def test_capture_equals_hand_computed_weights(implementation):
    model = TwoLayers(implementation, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    expected_out = model(x)
    out, weights = explain.capture(model, x)
    assert list(weights) == ["layers/0", "layers/1"]
    assert_close(out, expected_out)  # the output is the fast path's, unchanged by recording
    h = x
    for path, layer in zip(weights, model.layers):
        assert weights[path].shape == (2, 2, 8, 8) and weights[path].dtype == jnp.float32
        np.testing.assert_allclose(weights[path], hand_weights(layer, h), atol=2e-5)
        h = h + layer(h)
    assert all(not layer.record_weights for layer in model.layers)  # flags restored


def test_capture_names_repeated_calls():
    layer = aj.nn.MultiHeadAttention(8, num_heads=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (1, 5, 8))
    _, weights = explain.capture(layer, x, call=lambda m, x: m(m(x)))  # one module, called twice
    assert list(weights) == ["[0]", "[1]"]
    np.testing.assert_allclose(weights["[1]"], explain.capture(layer, layer(x))[1][""], atol=1e-6)


@pytest.mark.parametrize("at", ["input", "output"])
def test_layer_gradients_equal_direct_gradient(at):
    model = TwoLayers(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 8))
    score = lambda logits: logits[:, 1].sum()
    acts, grads = explain.layer_gradients(model, score, x, at=at)

    def direct(delta):  # the same model, with a perturbation added to the last attention layer's input or output
        h = x + model.layers[0](x)
        if at == "input":
            return score(model.head((h + model.layers[1](h + delta))[:, -1])), h
        out = model.layers[1](h)
        return score(model.head((h + out + delta)[:, -1])), out

    expected_grads, expected_acts = jax.grad(direct, has_aux=True)(jnp.zeros_like(x))
    assert_close(acts, expected_acts)
    assert_close(grads, expected_grads, grad=True)
    assert float(jnp.abs(grads).max()) > 0
    assert type(model.layers[1]) is aj.nn.MultiHeadAttention  # the probe is removed again
    cam = explain.grad_cam(acts, grads)
    assert cam.shape == (2, 6) and bool(jnp.all(cam >= 0))
    with pytest.raises(ValueError, match="at must be"):
        explain.layer_gradients(model, score, x, at="middle")


def test_attention_gradients_equal_hand_gradients():
    model = TwoLayers(rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (2, 6, 8))
    score = lambda logits: logits[:, 2].sum()
    weights, grads = explain.attention_gradients(model, score, x)
    assert list(weights) == list(grads) == ["layers/0", "layers/1"]

    def by_hand(deltas):  # the same forward, attention written out, with additive perturbations of the weights
        h = x
        for layer, delta in zip(model.layers, deltas):
            q, k, v = layer.query(h), layer.key(h), layer.value(h)  # [B, T, N, H]
            s = jnp.einsum("BTNH,BSNH->BNTS", q, k) / np.sqrt(q.shape[-1])
            s = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), s, -jnp.inf)
            w = jax.nn.softmax(s, axis=-1) + delta
            h = h + layer.out(jnp.einsum("BNTS,BSNH->BTNH", w, v))
        return score(model.head(h[:, -1]))

    expected = jax.grad(by_hand)([jnp.zeros((2, 2, 6, 6))] * 2)
    for path, want in zip(grads, expected):
        assert_close(grads[path], want, grad=True)
    assert float(jnp.abs(grads["layers/0"]).max()) > 0
    relevance = explain.gradient_weighted_rollout(weights, grads)
    assert relevance.shape == (2, 6, 6)
    assert all(not layer.record_weights for layer in model.layers)


class SowOnly(nnx.Module):
    """Records its weights but does not expose them for differentiation."""

    def __init__(self):
        self.record_weights = False

    def __call__(self, x):
        w = jax.nn.softmax(jnp.einsum("BTD,BSD->BTS", x, x))[:, None]  # [B, 1, T, S]
        if self.record_weights:
            self.sow(nnx.Intermediate, "attention_weights", w)
        return jnp.einsum("BNTS,BSD->BTD", w, x)


def test_attention_gradients_reports_missing_protocol():
    with pytest.raises(NotImplementedError, match="Perturbation"):
        explain.attention_gradients(SowOnly(), lambda y: y.sum(), jnp.ones((1, 3, 2)))


# --- plots -----------------------------------------------------------------------------------------


def test_plots_return_figures(tmp_path):
    labels = list("abcde")
    fig = explain.plot_attention(np.eye(5), x_labels=labels, y_labels=labels, title="t")
    assert isinstance(fig, Figure)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels
    fig.savefig(tmp_path / "a.png")
    fig = explain.plot_heads(random_weights(0, b=1, n=5)[0][0], x_labels=labels, y_labels=labels, ncols=3)
    assert sum(ax.get_title().startswith("head") for ax in fig.axes) == 5
    fig.savefig(tmp_path / "h.png")
    rng = np.random.default_rng(0)
    fig = explain.plot_patch_overlay(rng.random((3, 8, 8)), rng.random((3, 16)), titles=["x", "y", "z"])
    fig.savefig(tmp_path / "o.png")
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("a.png", "h.png", "o.png"))
    with pytest.raises(ValueError, match="labels"):
        explain.plot_attention(np.eye(3), x_labels=["a"])
    with pytest.raises(ValueError, match="one patch map per image"):
        explain.plot_patch_overlay(np.zeros((2, 8, 8)), np.zeros((3, 16)))
    with pytest.raises(ValueError, match="grid"):
        explain.plot_patch_overlay(np.zeros((1, 8, 8)), np.zeros((1, 7)))


# --- capture from any attention module -------------------------------------------------------------


def vit_with(attention, seed=0):
    """A two-block ViT on 8x8 single-channel images: 2x2 patches of 4x4 pixels, so T = 5 tokens."""
    return aj.nn.VisionTransformer(image_size=8, patch_size=4, in_channels=1, num_classes=3, features=16, depth=2,
                                   num_heads=2, attention=attention, rngs=nnx.Rngs(seed))


VIT_ATTENTION = {
    "multi_head": dict(),
    "longformer_pattern": dict(pattern=aj.sparse_patterns.longformer(1, global_tokens=(0,))),
}


def softmax_weights(layer, x, allowed):
    """softmax(q k^T / sqrt(H)) where ``allowed [T, S]``, from the layer's own projections, float64 numpy."""
    q, k = (np.asarray(p(x), np.float64) for p in (layer.query, layer.key))  # [B, T, N, H]
    s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
    s = np.where(allowed, s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return w / w.sum(-1, keepdims=True)


@nnx.jit
def _capture_vit(model, images):
    """capture, the plain call and the last attention layer's input, in one compiled program (eager ViTs are slow)."""
    logits, weights = explain.capture(model, images)
    tokens, _ = explain.layer_gradients(model, lambda out: out.sum(), images)
    return logits, weights, model(images), tokens


@pytest.mark.parametrize("variant", sorted(VIT_ATTENTION))
def test_capture_records_one_map_per_layer_of_a_vit(variant):
    options = VIT_ATTENTION[variant]
    model = vit_with(functools.partial(aj.nn.MultiHeadAttention, num_heads=2, **options))
    images = jax.random.uniform(jax.random.key(5), (2, 8, 8, 1))
    logits, weights, plain, tokens = _capture_vit(model, images)
    assert list(weights) == ["encoder/blocks/0/attention", "encoder/blocks/1/attention"]
    assert_close(logits, plain)
    assert all(not block.attention.record_weights for block in model.encoder.blocks)  # flags restored
    allowed = np.ones((5, 5), bool) if not options else np.asarray(options["pattern"].dense(5, 5)).reshape(5, 5)
    if options:
        assert not allowed.all()  # the pattern hides something, so the check below can fail
    for w in weights.values():
        assert w.shape == (2, 2, 5, 5) and w.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(w).sum(-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(w)[..., ~allowed] == 0)
    # The last map against a hand computation from the tokens the last layer received.
    last = model.encoder.blocks[1].attention
    np.testing.assert_allclose(weights["encoder/blocks/1/attention"], softmax_weights(last, tokens, allowed),
                               atol=2e-5)


def test_capture_without_recording_modules_says_so():
    with pytest.raises(ValueError, match="no attention module that can record"):
        explain.capture(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="no attention module that can record"):
        explain.attention_gradients(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), jnp.sum, jnp.ones((1, 2)))


class SilentRecorder(nnx.Module):
    """Has the recording flag but sows nothing: capture must not pretend that is an empty map."""

    def __init__(self):
        self.record_weights = False

    def __call__(self, x):
        return x


def test_capture_of_modules_that_record_nothing_raises():
    with pytest.raises(ValueError, match="were not called, or they do not sow"):
        explain.capture(SilentRecorder(), jnp.ones((1, 3, 2)))


# --- CDAM ------------------------------------------------------------------------------------------


def test_cdam_scores_match_numpy():
    rng = np.random.default_rng(6)
    x, g = rng.normal(size=(2, 7, 5)), rng.normal(size=(2, 7, 5))
    np.testing.assert_allclose(explain.cdam_scores(x, g), (x * g).sum(-1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        explain.cdam_scores(x, g[:, :3])


def test_cdam_equals_gradient_times_input_by_hand():
    model = TwoLayers(rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(7), (2, 6, 8))
    score = lambda logits: logits[:, 0].sum()
    h = x + model.layers[0](x)  # the tokens the last attention layer receives

    def by_hand(tokens):
        return score(model.head((h + model.layers[1](tokens))[:, -1]))

    expected = np.sum(np.asarray(h) * np.asarray(jax.grad(by_hand)(h)), axis=-1)  # [B, T]
    scores = explain.cdam(model, score, x)
    assert scores.shape == (2, 6) and scores.dtype == jnp.float32
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    assert float(jnp.abs(scores).max()) > 0

    def first_layer_by_hand(tokens):  # layer= picks another attention module: the first one's input
        h = x + model.layers[0](tokens)
        return score(model.head((h + model.layers[1](h))[:, -1]))

    expected = np.sum(np.asarray(x) * np.asarray(jax.grad(first_layer_by_hand)(x)), axis=-1)
    np.testing.assert_allclose(explain.cdam(model, score, x, layer="layers/0"), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VIT_ATTENTION))
def test_cdam_of_a_vit_is_class_discriminative(variant):
    model = vit_with(functools.partial(aj.nn.MultiHeadAttention, num_heads=2, **VIT_ATTENTION[variant]), seed=3)
    images = jax.random.uniform(jax.random.key(8), (2, 8, 8, 1))
    per_class = [explain.cdam(model, lambda out, c=c: out[:, c].sum(), images) for c in range(3)]
    assert all(s.shape == (2, 5) for s in per_class)
    assert float(jnp.abs(per_class[0] - per_class[1]).max()) > 1e-4  # another class, another map
    # The score is linear in the gradient: the map of a sum of class scores is the sum of their maps.
    summed = explain.cdam(model, lambda out: out.sum(), images)
    np.testing.assert_allclose(summed, sum(per_class), rtol=1e-4, atol=1e-5)


def test_signed_overlay_keeps_zero_at_zero():
    maps = np.array([[-2.0, 0.0, 1.0, 0.5]])  # 2 x 2 patches, one image
    fig = explain.plot_patch_overlay(np.zeros((1, 4, 4)), maps, signed=True)
    overlay = fig.axes[1].get_images()[-1]
    np.testing.assert_allclose(np.asarray(overlay.get_array()), [[-1.0, 0.0], [0.5, 0.25]])
    assert overlay.get_clim() == (-1.0, 1.0) and overlay.get_cmap().name == "bwr"
    unsigned = explain.plot_patch_overlay(np.zeros((1, 4, 4)), maps).axes[1].get_images()[-1]
    np.testing.assert_allclose(np.asarray(unsigned.get_array()), [[0.0, 2 / 3], [1.0, 2.5 / 3]], atol=1e-6)
