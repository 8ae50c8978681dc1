"""T5 loaded from a tiny random ``transformers`` checkpoint equals it: logits, gradients, greedy generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import t5

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOL = dict(rtol=2e-5, atol=2e-5)
V = 64


def _hf_model(feed_forward_proj: str, seed: int = 0):
    """A tiny T5 with every parameter perturbed off its init."""
    torch.manual_seed(seed)
    config = transformers.T5Config(
        vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, feed_forward_proj=feed_forward_proj
    )
    hf = transformers.T5ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _hf_model("relu")
    path = tmp_path_factory.mktemp("t5")
    hf.save_pretrained(path)
    return hf, t5.from_pretrained(path)


def _tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(2, V, shape).astype(np.int64)


def _mask(lengths, t: int) -> np.ndarray:
    return (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int64)


@nnx.jit
def _encode(model, inputs, lengths):
    return model.encode(inputs, lengths=lengths)


@nnx.jit
def _logits(model, inputs, lengths, targets):
    return model(targets, context=model.encode(inputs, lengths=lengths), context_lengths=lengths)


def _check_logits(hf, model, seed):
    inputs, targets, lengths = _tokens(seed, (2, 9)), _tokens(seed + 1, (2, 6)), np.array([9, 5])
    with torch.no_grad():
        ref = hf(
            input_ids=torch.from_numpy(inputs), attention_mask=torch.from_numpy(_mask(lengths, 9)),
            decoder_input_ids=torch.from_numpy(targets),
        ).logits.numpy()  # fmt: skip
    ours = _logits(model, jnp.asarray(inputs, jnp.int32), jnp.asarray(lengths), jnp.asarray(targets, jnp.int32))
    assert ours.shape == (2, 6, V) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), ref, **TOL)


def test_logits_match_with_padded_inputs(pair):
    _check_logits(*pair, seed=1)


@pytest.mark.slow
def test_gated_gelu_logits_match(tmp_path):
    hf = _hf_model("gated-gelu", seed=1)
    hf.save_pretrained(tmp_path)
    model = t5.from_pretrained(tmp_path)
    assert model.config.mlp == "geglu"
    _check_logits(hf, model, seed=3)


@pytest.mark.slow
def test_gradients_match(pair):
    hf, model = pair
    inputs, targets = _tokens(5, (2, 8)), _tokens(6, (2, 6))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        logits = m(jnp.asarray(targets[:, :-1], jnp.int32), context=m.encode(jnp.asarray(inputs, jnp.int32)))
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(targets[:, 1:, None]), axis=-1))

    ours_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    g = nnx.merge(graphdef, grads, rest)

    hf.zero_grad()
    ref_loss = hf(
        input_ids=torch.from_numpy(inputs), decoder_input_ids=torch.from_numpy(targets[:, :-1].copy()),
        labels=torch.from_numpy(targets[:, 1:].copy()),
    ).loss  # fmt: skip
    ref_loss.backward()
    np.testing.assert_allclose(float(ours_loss), ref_loss.item(), **TOL)
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    d = 32
    query, cross_out = g.encoder.blocks[0].attention.query.kernel, g.decoder.blocks[1].cross_attention.out.kernel
    ours = {
        "shared.weight": g.embed.embedding[...],
        "encoder.block.0.layer.0.SelfAttention.q.weight": query[...].reshape(d, -1).T,  # [D, N, H] -> [N*H, D]
        "decoder.block.1.layer.1.EncDecAttention.o.weight": cross_out[...].reshape(-1, d).T,
        "decoder.block.1.layer.2.DenseReluDense.wi.weight": g.decoder.blocks[1].mlp.up.kernel[...].T,
        "encoder.final_layer_norm.weight": g.encoder.final_norm.scale[...],
        # One table per stack, shared by every layer: its gradient sums every layer's use.
        **{
            f"{name}.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
                stack.blocks[0].attention.relative_bias[...]
            )
            for name, stack in (("encoder", g.encoder), ("decoder", g.decoder))
        },
    }
    assert all(b.attention.relative_bias is g.decoder.blocks[0].attention.relative_bias for b in g.decoder.blocks)
    for name, value in ours.items():
        np.testing.assert_allclose(np.asarray(value), ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("kind", ["dense", pytest.param("paged", marks=pytest.mark.slow)])
def test_greedy_generation_ragged_inputs(pair, kind):
    """Two inputs of different lengths, right-padded for us; transformers runs each alone."""
    hf, model = pair
    lengths, n = np.array([9, 4]), 6
    inputs = _tokens(7, (2, 9))
    context = _encode(model, jnp.asarray(inputs, jnp.int32), jnp.asarray(lengths))
    ours = aj.generate(
        model, jnp.zeros((2, 1), jnp.int32), max_new_tokens=n, eos_id=1, cache_kind=kind,
        cache_options={"page_size": 4} if kind == "paged" else None,
        model_inputs={"context": context, "context_lengths": jnp.asarray(lengths)},
    )  # fmt: skip
    for row, length in enumerate(lengths):
        with torch.no_grad():
            ref = hf.generate(
                torch.from_numpy(inputs[row : row + 1, :length]), max_new_tokens=n, do_sample=False,
                decoder_start_token_id=0,
            )[0, 1:].numpy()  # fmt: skip
        # transformers stops at eos (id 1); ours repeats it to the end.
        expected = np.concatenate([ref, np.full(n - len(ref), 1)])
        np.testing.assert_array_equal(np.asarray(ours[row]), expected)


def test_export_round_trip(pair, tmp_path):
    hf, model = pair
    t5.to_pretrained(model, tmp_path)
    back = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path).float().eval()
    inputs, targets = torch.from_numpy(_tokens(9, (1, 7))), torch.from_numpy(_tokens(10, (1, 5)))
    with torch.no_grad():
        ours, ref = (m(input_ids=inputs, decoder_input_ids=targets).logits.numpy() for m in (back, hf))
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_config_errors():
    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5.T5Config.from_hf(dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2, d_kv=4, d_ff=8,
                                 feed_forward_proj="gated-swish"))  # fmt: skip
