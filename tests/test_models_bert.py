"""BERT loaded from a tiny random ``transformers`` checkpoint equals it: hidden states, pooler, padding, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.models import bert

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

TOL = dict(rtol=2e-5, atol=2e-5)
V = 64


def _hf_config(**overrides):
    return transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, **overrides,
    )  # fmt: skip


def _perturb(hf):
    """Every parameter moved off its init (zero biases and identity LayerNorms would hide mapping errors)."""
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = _perturb(transformers.BertModel(_hf_config()).float().eval())
    path = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(path)
    return hf, bert.from_pretrained(path)


def _inputs(seed: int, b: int, t: int):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (b, t)).astype(np.int64), rng.integers(0, 2, (b, t)).astype(np.int64)


def _hf(hf, tokens, types, attention_mask=None):
    with torch.no_grad():
        out = hf(
            torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
            attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
        )  # fmt: skip
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@nnx.jit
def _forward(model, tokens, types, lengths=None, mask=None):
    hidden = model(tokens, token_types=types, lengths=lengths, mask=mask)
    return hidden, model.pool(hidden)


def test_hidden_states_and_pooler_match(pair):
    hf, model = pair
    tokens, types = _inputs(1, 2, 12)
    hidden, pooled = _forward(model, jnp.asarray(tokens, jnp.int32), jnp.asarray(types, jnp.int32))
    assert hidden.shape == (2, 12, 32) and hidden.dtype == jnp.float32 and pooled.shape == (2, 32)
    ref_hidden, ref_pooled = _hf(hf, tokens, types)
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, **TOL)
    np.testing.assert_allclose(np.asarray(pooled), ref_pooled, **TOL)


def test_padded_batch(pair):
    """Right padding as ``lengths`` or as a padding mask equals transformers' ``attention_mask``."""
    hf, model = pair
    lengths = np.array([12, 7])
    tokens, types = _inputs(2, 2, 12)
    attention_mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
    ref_hidden, ref_pooled = _hf(hf, tokens, types, attention_mask)
    args = jnp.asarray(tokens, jnp.int32), jnp.asarray(types, jnp.int32)
    by_lengths = _forward(model, *args, lengths=jnp.asarray(lengths))
    by_mask = _forward(model, *args, mask=aj.masks.padding(kv_lengths=jnp.asarray(lengths)))
    for hidden, pooled in (by_lengths, by_mask):
        for row, n in enumerate(lengths):  # padded query rows are free to differ
            np.testing.assert_allclose(np.asarray(hidden[row, :n]), ref_hidden[row, :n], **TOL)
        np.testing.assert_allclose(np.asarray(pooled), ref_pooled, **TOL)
    # The short row alone, unpadded, gives the same states: the padding is invisible.
    alone, _ = _hf(hf, tokens[1:, :7], types[1:, :7])
    np.testing.assert_allclose(np.asarray(by_lengths[0][1, :7]), alone[0], **TOL)


def test_gradients_match(pair):
    hf, model = pair
    tokens, types = _inputs(3, 2, 10)
    lengths = np.array([10, 6])
    rng = np.random.default_rng(4)
    w_hidden, w_pooled = rng.normal(size=(2, 10, 32)), rng.normal(size=(2, 32))
    w_hidden[1, 6:] = 0.0  # padded rows out of the loss
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        m = nnx.merge(graphdef, params, rest)
        args = jnp.asarray(tokens, jnp.int32), jnp.asarray(types, jnp.int32), jnp.asarray(lengths)
        hidden = m(args[0], token_types=args[1], lengths=args[2])
        return jnp.sum(hidden * w_hidden) + jnp.sum(m.pool(hidden) * w_pooled)

    ours_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    ours = bert.to_hf_weights(nnx.merge(graphdef, grads, rest))  # gradients under the checkpoint's names

    hf.zero_grad()
    out = hf(
        torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types),
        attention_mask=torch.from_numpy((np.arange(10)[None] < lengths[:, None]).astype(np.int64)),
    )  # fmt: skip
    ref_loss = (out.last_hidden_state * torch.from_numpy(w_hidden).float()).sum() + (
        out.pooler_output * torch.from_numpy(w_pooled).float()
    ).sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(ours_loss), ref_loss.item(), rtol=1e-5, atol=1e-4)
    ref = {name: p.grad.numpy() for name, p in hf.named_parameters()}
    assert set(ref) == set(ours)
    for name, g in ref.items():
        np.testing.assert_allclose(ours[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_export_round_trip(pair, tmp_path):
    hf, model = pair
    bert.to_pretrained(model, tmp_path)
    back = transformers.BertModel.from_pretrained(tmp_path).float().eval()
    tokens, types = _inputs(5, 1, 9)
    for ours, ref in zip(_hf(back, tokens, types), _hf(hf, tokens, types), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_task_checkpoint_without_pooler(tmp_path):
    """A ``BertForMaskedLM`` checkpoint (``bert.`` names, no pooler) loads its encoder."""
    torch.manual_seed(1)
    hf = _perturb(transformers.BertForMaskedLM(_hf_config(hidden_act="gelu_new")).float().eval())
    hf.save_pretrained(tmp_path)
    model = bert.from_pretrained(tmp_path)
    assert model.pooler is None and model.config.mlp == "gelu"
    tokens, types = _inputs(6, 2, 8)
    with torch.no_grad():
        ref = hf.bert(torch.from_numpy(tokens), token_type_ids=torch.from_numpy(types)).last_hidden_state.numpy()
    hidden = model(jnp.asarray(tokens, jnp.int32), token_types=jnp.asarray(types, jnp.int32))
    np.testing.assert_allclose(np.asarray(hidden), ref, **TOL)
    with pytest.raises(ValueError, match="no pooler"):
        model.pool(hidden)


def test_errors():
    with pytest.raises(ValueError, match="position_embedding_type"):
        bert.BertConfig.from_hf(_hf_config(position_embedding_type="relative_key").to_dict())
    with pytest.raises(ValueError, match="hidden_act"):
        bert.BertConfig.from_hf(_hf_config(hidden_act="swish").to_dict())
    model = bert.BertModel(bert.BertConfig(vocab_size=8, max_positions=8, features=8, num_layers=1, num_heads=2,
                                           mlp_features=8), rngs=nnx.Rngs(0))  # fmt: skip
    with pytest.raises(ValueError, match="token_types must have the shape"):
        model(jnp.zeros((1, 4), jnp.int32), token_types=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="tokens must be integers"):
        model(jnp.zeros((1, 4)))
