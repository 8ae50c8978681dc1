"""Transformer blocks and stacks: pluggable attention, decoding, NNX transforms, training, checkpoints."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import attention_jax as aj
from attention_jax.functional.differential import lambda_init

V, D = 16, 16


def _tokens(seed, b=2, t=8):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, V)


def _lm(num_layers=2, **kw):
    return aj.nn.TransformerLM(V, D, num_layers, num_heads=2, rngs=nnx.Rngs(0), **kw)


def test_lm_is_causal():
    lm = _lm()
    tokens = _tokens(0)
    changed = tokens.at[:, 5:].set((tokens[:, 5:] + 1) % V)
    a, b = nnx.jit(lambda m, t, u: (m(t), m(u)))(lm, tokens, changed)
    chex.assert_shape(a, (2, 8, V))
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert not np.allclose(a[:, 5:], b[:, 5:])


def test_encoder_ignores_padding():
    enc = aj.nn.TransformerEncoder(2, D, num_heads=2, mlp="gelu", norm="layer", rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (2, 6, D))
    padded, short = nnx.jit(lambda m, x: (m(x, lengths=jnp.array([4, 4])), m(x[:, :4])))(enc, x)
    np.testing.assert_allclose(padded[:, :4], short, atol=1e-5)


def test_decoder_decode_equals_full_forward():
    dec = aj.nn.TransformerDecoder(2, D, num_heads=2, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(4), (2, 6, D))
    context = jax.random.normal(jax.random.key(5), (2, 5, D))
    context_lengths = jnp.array([5, 3])

    @nnx.jit
    def run(dec, x, context):
        full = dec(x, context, context_lengths=context_lengths)
        cache = dec.init_cache(2, 6)
        first, cache = dec(x[:, :3], context, context_lengths=context_lengths, cache=cache)
        rest = []
        for t in range(3, 6):
            y, cache = dec(x[:, t : t + 1], context, context_lengths=context_lengths, cache=cache)
            rest.append(y)
        return full, jnp.concatenate([first, *rest], axis=1)

    full, decoded = run(dec, x, context)
    np.testing.assert_allclose(decoded, full, atol=2e-5)
    # context padding is masked: changing padded context positions changes nothing
    other = context.at[1, 3:].set(100.0)
    np.testing.assert_allclose(nnx.jit(lambda m, a, c: m(a, c, context_lengths=context_lengths))(dec, x, other), full,
                               atol=1e-5)  # fmt: skip


class _MeanAttention(nnx.Module):
    """A user's own attention following the protocol: causal running mean of a projection."""

    def __init__(self, features, *, rngs):
        self.proj = nnx.Linear(features, features, rngs=rngs)

    def __call__(self, x, inputs_kv=None, *, mask=None, positions=None, segment_ids=None, lengths=None, cache=None,
                 deterministic=None):  # fmt: skip
        h = self.proj(x)
        return jnp.cumsum(h, axis=1) / jnp.arange(1, x.shape[1] + 1)[None, :, None]


def test_pluggable_attention_factories():
    diff = functools.partial(aj.nn.DifferentialAttention, num_heads=2)
    lm = aj.nn.TransformerLM(V, D, 3, attention=diff, rngs=nnx.Rngs(0))
    assert [b.attention.lambda_init for b in lm.stack.blocks] == pytest.approx([lambda_init(i) for i in (1, 2, 3)])
    mla = functools.partial(aj.nn.MultiHeadLatentAttention, num_heads=2, kv_lora_rank=8, qk_nope_head_dim=4,
                            qk_rope_head_dim=4, v_head_dim=8)  # fmt: skip
    mixed = [mla, functools.partial(aj.nn.MultiHeadAttention, num_heads=2, sliding_window=2), _MeanAttention]
    lm = aj.nn.TransformerLM(V, D, 3, attention=mixed, rngs=nnx.Rngs(0))
    assert isinstance(lm.stack.blocks[2].attention, _MeanAttention)
    logits = nnx.jit(lambda m, t: m(t))(lm, _tokens(1))
    chex.assert_shape(logits, (2, 8, V))
    assert np.all(np.isfinite(logits))
    with pytest.raises(ValueError, match="2 factories for num_layers=3"):
        aj.nn.TransformerLM(V, D, 3, attention=mixed[:2], rngs=nnx.Rngs(0))


def test_block_config_is_shared_and_keywords_override_it():
    config = aj.nn.BlockConfig(num_heads=2, mlp="gelu", mlp_features=24)
    enc = aj.nn.TransformerEncoder(2, D, config=config, norm="layer", rngs=nnx.Rngs(0))
    assert enc.config == dataclasses.replace(config, norm="layer")
    assert all(isinstance(b.attention_norm, nnx.LayerNorm) and b.mlp.up.out_features == 24 for b in enc.blocks)
    assert enc.blocks[0].attention.num_heads == 2
    with pytest.raises(TypeError, match="num_head"):
        aj.nn.TransformerLM(V, D, 1, num_head=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="mlp must be one of"):
        aj.nn.BlockConfig(mlp="swish")


def test_vmap_and_scan_over_blocks():
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
        return aj.nn.TransformerBlock(D, num_heads=2, rngs=rngs)

    blocks = make_blocks(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (2, 5, D))

    @nnx.jit
    def scanned(blocks, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def step(h, block):
            return block(h, mask=aj.masks.causal())

        return step(x, blocks)

    @jax.jit
    def one_by_one(state, x):  # the same blocks, sliced out of the stack and applied in a Python loop
        for i in range(3):
            block = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            x = block(x, mask=aj.masks.causal())
        return x

    graphdef, state = nnx.split(blocks)
    np.testing.assert_allclose(scanned(blocks, x), one_by_one(state, x), atol=1e-5)


def test_remat_gives_the_same_gradients():
    tokens = _tokens(7)

    def loss(model):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    grad = nnx.jit(nnx.grad(loss))
    chex.assert_trees_all_close(
        nnx.to_pure_dict(grad(_lm(1, remat=True))), nnx.to_pure_dict(grad(_lm(1))), atol=1e-5, rtol=1e-5
    )


def test_optax_steps_reduce_the_loss_and_checkpoint_roundtrips(tmp_path):
    model = _lm(1, dropout_rate=0.1)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    tokens = _tokens(8, b=4, t=12)

    def loss_fn(model, tokens):
        logits = model(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    @nnx.jit
    def train_step(model, optimizer, tokens):
        loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
        optimizer.update(model, grads)
        return loss

    losses = [float(train_step(model, optimizer, tokens)) for _ in range(8)]
    assert losses[-1] < 0.8 * losses[0], losses

    model.eval()
    eval_logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    aj.checkpoint.save(tmp_path, model, optimizer, step=8)
    restored = aj.nn.TransformerLM(V, D, 1, num_heads=2, dropout_rate=0.1, rngs=nnx.Rngs(1))  # other weights
    restored_optimizer = nnx.Optimizer(restored, optax.adam(1e-2), wrt=nnx.Param)
    assert aj.checkpoint.restore(tmp_path, restored, restored_optimizer) == 8
    restored.eval()
    np.testing.assert_array_equal(nnx.jit(lambda m, t: m(t))(restored, tokens), eval_logits)
    assert int(restored_optimizer.step[...]) == 8
    chex.assert_trees_all_equal(nnx.state(restored_optimizer), nnx.state(optimizer))  # Adam moments and counts


def test_bad_inputs():
    lm = _lm()
    with pytest.raises(ValueError, match=r"tokens must be integers of shape \[B, T\]"):
        lm(jnp.ones((2, 3)))
    block = aj.nn.TransformerBlock(D, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="without cross-attention|one without takes none"):
        block(jnp.ones((1, 2, D)), context=jnp.ones((1, 2, D)))
    with pytest.raises(ValueError, match="num_layers must be a positive integer"):
        aj.nn.TransformerEncoder(0, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="norm must be one of"):
        aj.nn.TransformerBlock(D, norm="batch", rngs=nnx.Rngs(0))


def test_stack_masks_may_carry_arrays():
    """A model-level mask with data (segments, padding) is a pytree leaf of the model, not static config."""
    ids = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
    tokens = jax.random.randint(jax.random.key(3), (1, 8), 0, V)
    lm = aj.nn.TransformerLM(V, D, 1, num_heads=2, mask=aj.masks.causal() & aj.masks.segments(ids), rngs=nnx.Rngs(0))
    plain = aj.nn.TransformerLM(V, D, 1, num_heads=2, rngs=nnx.Rngs(0))
    dec = aj.nn.TransformerDecoder(1, D, num_heads=2, mask=aj.masks.causal() & aj.masks.segments(ids), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda lm, plain, dec, t: (lm(t), plain(t[:, :3]), dec(jnp.ones((1, 8, D)), jnp.ones((1, 4, D)))))
    packed, alone, decoded = run(lm, plain, dec, tokens)
    np.testing.assert_allclose(packed[:, :3], alone, atol=2e-5, rtol=2e-5)
    assert decoded.shape == (1, 8, D)


@pytest.mark.parametrize("position", ["pre", "post", "sandwich"])
def test_block_norm_positions(position):
    block = aj.nn.TransformerBlock(D, num_heads=2, norm_position=position, mlp="gelu_exact", mlp_bias=True,
                                   norm="rms_offset", rngs=nnx.Rngs(0))  # fmt: skip
    x = jax.random.normal(jax.random.key(4), (2, 5, D))
    causal = aj.masks.causal()
    attn = lambda h: block.attention(h, mask=causal)
    ffn = lambda h: block.mlp.down(jax.nn.gelu(block.mlp.up(h), approximate=False))
    if position == "pre":
        h = x + attn(block.attention_norm(x))
        expected = h + ffn(block.mlp_norm(h))
    elif position == "post":
        h = block.attention_norm(x + attn(x))
        expected = block.mlp_norm(h + ffn(h))
    else:
        h = x + block.post_attention_norm(attn(block.attention_norm(x)))
        expected = h + block.post_mlp_norm(ffn(block.mlp_norm(h)))
    np.testing.assert_allclose(block(x, mask=causal), expected, atol=2e-5, rtol=2e-5)
    assert block.mlp.up.bias is not None and block.mlp.gate is None
    with pytest.raises(ValueError, match="norm_position must be one of"):
        aj.nn.BlockConfig(norm_position="middle")


def test_offset_rms_norm_is_rms_norm_with_one_plus_w():
    w = jax.random.normal(jax.random.key(5), (D,))
    offset = aj.nn.blocks.OffsetRMSNorm(D, epsilon=1e-6)
    offset.scale[...] = w
    plain = nnx.RMSNorm(D, epsilon=1e-6, rngs=nnx.Rngs(0))
    plain.scale[...] = 1.0 + w
    x = jax.random.normal(jax.random.key(6), (2, 3, D))
    np.testing.assert_allclose(offset(x), plain(x), atol=1e-5, rtol=1e-5)


def test_lm_learned_positions_scale_and_softcap_decode_like_the_full_forward():
    make = functools.partial(aj.nn.TransformerLM, V, D, 2, num_heads=2, position_embedding=16, embedding_scale=D**0.5,
                             tie_embeddings=False)  # fmt: skip
    lm, raw_lm = make(logit_softcap=3.0, rngs=nnx.Rngs(0)), make(rngs=nnx.Rngs(0))  # the same weights
    assert lm.stack.blocks[0].attention.rope is None  # absolute positions replace RoPE by default
    tokens = jax.random.randint(jax.random.key(7), (2, 10), 0, V)
    lengths = jnp.array([4, 7])
    rows = jnp.arange(2)

    @nnx.jit  # one program: the eager forward passes of a two-layer LM cost five times more
    def run(lm, raw_lm, tokens, lengths):
        logits, cache = lm(tokens[:, :7], cache=lm.init_cache(2, 12), lengths=lengths)
        step, _ = lm(tokens[rows, lengths][:, None], cache=cache)
        return lm(tokens), raw_lm(tokens), logits, step

    full, raw, logits, step = run(lm, raw_lm, tokens, lengths)
    assert float(jnp.abs(full).max()) < 3.0
    np.testing.assert_allclose(full, 3.0 * jnp.tanh(raw / 3.0), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(logits[rows, lengths - 1], full[rows, lengths - 1], atol=5e-5, rtol=5e-5)
    np.testing.assert_allclose(step[:, 0], full[rows, lengths], atol=5e-5, rtol=5e-5)


def test_per_projection_biases():
    """Qwen2's layout: biases on the query, key and value projections, none on the output."""
    layer = aj.nn.MultiHeadAttention(D, num_heads=2, qkv_bias=True, rngs=nnx.Rngs(0))
    assert all(p.bias is not None for p in (layer.query, layer.key, layer.value)) and layer.out.bias is None
    layer.key.bias[...] = jnp.ones_like(layer.key.bias[...])  # a key bias shifts every score of a row alike
    x = jax.random.normal(jax.random.key(8), (1, 4, D))
    no_key_bias = nnx.merge(*nnx.split(layer))
    no_key_bias.key.bias[...] = jnp.zeros_like(layer.key.bias[...])
    np.testing.assert_allclose(*nnx.jit(lambda a, b, x: (a(x), b(x)))(layer, no_key_bias, x), atol=2e-5, rtol=2e-5)
    assert aj.nn.MultiHeadAttention(D, num_heads=2, use_bias=True, out_bias=False, rngs=nnx.Rngs(0)).out.bias is None


def test_post_norm_stack_has_no_final_norm():
    """Post-norm blocks end in a norm; the stack adds none (BERT)."""
    enc = aj.nn.TransformerEncoder(2, D, num_heads=2, norm="layer", norm_position="post", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(9), (1, 4, D))
    np.testing.assert_allclose(enc(x), enc.blocks[1](enc.blocks[0](x)), atol=1e-6, rtol=1e-6)
    assert enc.final_norm is None


def test_shared_attention_parameters_are_one_variable_whose_gradient_sums_the_layers():
    """T5's one relative-bias table per stack: shared, it equals per-layer copies with summed gradients."""
    relative = functools.partial(aj.nn.MultiHeadAttention, num_heads=2, relative_buckets=8)
    shared = aj.nn.TransformerEncoder(2, D, attention=relative, shared_attention=("relative_bias",),
                                      rngs=nnx.Rngs(0))  # fmt: skip
    copies = aj.nn.TransformerEncoder(2, D, attention=relative, rngs=nnx.Rngs(1))
    table = jax.random.normal(jax.random.key(10), shared.blocks[0].attention.relative_bias.shape)
    shared.blocks[0].attention.relative_bias[...] = table
    nnx.update(copies, nnx.state(shared))  # the same weights (the shared state holds the table once: set below)
    for block in copies.blocks:
        block.attention.relative_bias[...] = table
    assert shared.blocks[1].attention.relative_bias is shared.blocks[0].attention.relative_bias
    n_params = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert n_params(copies) - n_params(shared) == table.size

    x = jax.random.normal(jax.random.key(11), (2, 6, D))
    value_and_grad = nnx.jit(nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2)))
    (loss_shared, grad_shared), (loss_copies, grad_copies) = value_and_grad(shared), value_and_grad(copies)
    np.testing.assert_allclose(loss_shared, loss_copies, rtol=1e-5)
    summed = grad_copies.blocks[0].attention.relative_bias[...] + grad_copies.blocks[1].attention.relative_bias[...]
    np.testing.assert_allclose(grad_shared.blocks[0].attention.relative_bias[...], summed, rtol=1e-4, atol=1e-6)

    with pytest.raises(ValueError, match="shared_attention names 'nope'"):
        aj.nn.TransformerEncoder(2, D, num_heads=2, shared_attention=("nope",), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence of attribute names"):
        aj.nn.TransformerEncoder(2, D, num_heads=2, shared_attention="relative_bias", rngs=nnx.Rngs(0))


def test_logits_at_computes_the_chosen_tokens_logits_only():
    """``logits_at [B, P]`` equals gathering the full logits (generate's prefill asks for one per row)."""
    lm, tokens = _lm(), _tokens(12, t=7)
    at = jnp.array([[6, 0], [3, 3]])
    full = lm(tokens)
    np.testing.assert_allclose(lm(tokens, logits_at=at), jnp.take_along_axis(full, at[..., None], axis=1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match=r"logits_at must be integers of shape \[B, P\] with B=2"):
        lm(tokens, logits_at=jnp.array([1, 2]))
