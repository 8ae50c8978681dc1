"""GPT-2 loaded from a tiny random ``transformers`` checkpoint equals it: logits, gradients, greedy generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import gpt2

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOL = dict(rtol=2e-5, atol=2e-5)
V = 64


def _hf_model(seed: int = 0, **overrides):
    """A tiny GPT-2 with every parameter perturbed (biases and LayerNorms are not the identity at init)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, **overrides)
    hf = transformers.GPT2LMHeadModel(config).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = _hf_model()
    path = tmp_path_factory.mktemp("gpt2")
    hf.save_pretrained(path)
    return hf, gpt2.from_pretrained(path), path


def _tokens(seed: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, shape).astype(np.int64)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def _hf_logits(hf, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.from_numpy(tokens)).logits.numpy()


def test_logits_match(pair):
    hf, model, _ = pair
    tokens = _tokens(1, (2, 12))
    ours = _logits(model, jnp.asarray(tokens, jnp.int32))
    assert ours.shape == (2, 12, V) and ours.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, tokens), **TOL)


def _cross_entropy(logits, tokens):
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [B, T-1, V]
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_gradients_match(pair):
    hf, model, _ = pair
    tokens = _tokens(2, (2, 10))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return _cross_entropy(nnx.merge(graphdef, params, rest)(jnp.asarray(tokens, jnp.int32)), tokens)

    ours_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    config = gpt2.GPT2Config.from_hf(hf.config.to_dict())
    ours = gpt2.to_hf_weights(nnx.merge(graphdef, grads, rest), config)  # gradients under the checkpoint's names

    hf.zero_grad()
    logits = hf(torch.from_numpy(tokens)).logits
    targets = torch.from_numpy(tokens[:, 1:]).reshape(-1)
    ref_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), targets)
    ref_loss.backward()
    np.testing.assert_allclose(float(ours_loss), ref_loss.item(), **TOL)
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}  # tied lm_head is listed once, as wte
    assert set(ref) == set(ours)
    for name, g in ref.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-6, err_msg=name)


def _hf_greedy(hf, prompt: np.ndarray, n: int) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(
            torch.from_numpy(prompt[None]), attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            max_new_tokens=n, do_sample=False, pad_token_id=0,
        )  # fmt: skip
    return out[0, len(prompt) :].numpy()


@pytest.mark.parametrize("kind", ["dense", "paged"])
def test_greedy_generation_ragged_batch(pair, kind):
    hf, model, _ = pair
    lengths = [9, 4]
    prompts = [_tokens(3 + i, (n,)) for i, n in enumerate(lengths)]
    padded = np.zeros((2, max(lengths)), np.int32)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
    n = 6
    ours = aj.generate(
        model, jnp.asarray(padded), max_new_tokens=n, prompt_lengths=jnp.asarray(lengths), cache_kind=kind,
        cache_options={"page_size": 4} if kind == "paged" else None,
    )  # fmt: skip
    ref = np.stack([_hf_greedy(hf, p, n) for p in prompts])
    np.testing.assert_array_equal(np.asarray(ours), ref)


def test_export_round_trip(pair, tmp_path):
    hf, model, _ = pair
    config = gpt2.GPT2Config.from_hf(hf.config.to_dict())
    gpt2.to_pretrained(model, config, tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).float().eval()
    tokens = _tokens(5, (1, 8))
    np.testing.assert_allclose(_hf_logits(back, tokens), _hf_logits(hf, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_untied_head_and_bfloat16(tmp_path):
    hf = _hf_model(seed=1, tie_word_embeddings=False)
    hf.save_pretrained(tmp_path)
    tokens = _tokens(6, (1, 7))
    model = gpt2.from_pretrained(tmp_path)
    assert model.head is not None
    ours = _logits(model, jnp.asarray(tokens, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours), _hf_logits(hf, tokens), **TOL)
    half = gpt2.from_pretrained(tmp_path, dtype=jnp.bfloat16)
    logits = _logits(half, jnp.asarray(tokens, jnp.int32))
    assert logits.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(logits, np.float32), _hf_logits(hf, tokens), rtol=0.05, atol=0.1)


def test_config_errors():
    with pytest.raises(ValueError, match="activation_function"):
        gpt2.GPT2Config.from_hf(dict(vocab_size=8, n_embd=8, n_layer=1, n_head=2, activation_function="swish"))
    with pytest.raises(ValueError, match="num_heads must divide features"):
        gpt2.GPT2Config(features=10, num_heads=4)
