"""Recurrent-era attention modules: Bahdanau (additive), Luong (multiplicative) and an RNN encoder-decoder.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> model = Seq2SeqWithAttention(10, 12, embed_features=8, hidden_features=16, rngs=nnx.Rngs(0))
>>> logits, alignment = model(jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 4), jnp.int32))
>>> logits.shape, alignment.shape                 # [B, T, V], [B, T, S]
((2, 4, 12), (2, 4, 5))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.recurrent import RNNCellBase

from attention_jax.functional.additive import LUONG_SCORES, additive_attention, luong_attention
from attention_jax.nn._heads import positive_int

Array = jax.Array

__all__ = ["AdditiveAttention", "LuongAttention", "Seq2SeqWithAttention"]


def _vector(rngs: nnx.Rngs, size: int) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), (size,)) / size**0.5)


class AdditiveAttention(nnx.Module):
    """Bahdanau attention: ``alpha_tj = softmax_j(v^T tanh(W_s s_t + W_h h_j))``, context ``sum_j alpha_tj h_j``.

    Args:
      query_features: width of the decoder state ``s``.
      key_features: width of the encoder states ``h``.
      attention_features: width ``A`` of the tanh layer (defaults to ``key_features``).

    Call with ``query [B, T, Dq]`` (or one step ``[B, Dq]``), ``key [B, S, Dk]``, optional ``value`` (defaults to
    ``key``) and ``mask``; returns ``(context, alignment)`` as
    :func:`attention_jax.functional.additive.additive_attention`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> attend = AdditiveAttention(4, 6, rngs=nnx.Rngs(0))
    >>> context, alignment = attend(jnp.ones((2, 4)), jnp.ones((2, 3, 6)))
    >>> context.shape, alignment.shape
    ((2, 6), (2, 3))
    """

    def __init__(self, query_features: int, key_features: int, *, attention_features: int | None = None, rngs):
        attention_features = key_features if attention_features is None else attention_features
        positive_int("attention_features", attention_features)
        self.query_proj = nnx.Linear(query_features, attention_features, use_bias=False, rngs=rngs)
        self.key_proj = nnx.Linear(key_features, attention_features, use_bias=False, rngs=rngs)
        self.v = _vector(rngs, attention_features)

    def __call__(self, query: Array, key: Array, value: Array | None = None, *, mask=None) -> tuple[Array, Array]:
        value = key if value is None else value
        return additive_attention(self.query_proj(query), self.key_proj(key), value, v=self.v[...], mask=mask)


class LuongAttention(nnx.Module):
    """Luong attention with ``score`` in ``"dot"``, ``"scaled_dot"``, ``"general"`` (``s^T W h``) or ``"concat"``.

    Args:
      query_features, key_features: widths of ``s`` and ``h``.
      score: the score function (see :func:`attention_jax.functional.additive.luong_scores`).
      attention_features: width ``A`` of the ``concat`` layer (defaults to ``key_features``).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> attend = LuongAttention(4, 6, score="general", rngs=nnx.Rngs(0))
    >>> attend(jnp.ones((2, 3, 4)), jnp.ones((2, 5, 6)))[1].shape
    (2, 3, 5)
    """

    def __init__(
        self,
        query_features: int,
        key_features: int,
        *,
        score: str = "general",
        attention_features: int | None = None,
        rngs: nnx.Rngs,
    ):
        if score not in LUONG_SCORES:
            raise ValueError(f"score must be one of {LUONG_SCORES}, got {score=!r}.")
        if score in ("dot", "scaled_dot") and query_features != key_features:
            raise ValueError(
                f"score={score!r} needs query_features == key_features, got {query_features} and {key_features}."
            )
        self.score = score
        init = nnx.initializers.lecun_normal()
        weight = v = None
        if score == "general":
            weight = nnx.Param(init(rngs.params(), (query_features, key_features)))
        elif score == "concat":
            attention_features = key_features if attention_features is None else attention_features
            positive_int("attention_features", attention_features)
            weight = nnx.Param(init(rngs.params(), (query_features + key_features, attention_features)))
            v = _vector(rngs, attention_features)
        self.weight, self.v = nnx.data(weight), nnx.data(v)

    def __call__(self, query: Array, key: Array, value: Array | None = None, *, mask=None) -> tuple[Array, Array]:
        value = key if value is None else value
        weight = None if self.weight is None else self.weight[...]
        v = None if self.v is None else self.v[...]
        return luong_attention(query, key, value, score=self.score, weight=weight, v=v, mask=mask)


class _AttentionDecoderCell(RNNCellBase):
    """One decoder step. Its carry holds the RNN state and the encoder memory ``(state, memory, memory_mask)``.

    ``additive`` (Bahdanau): ``c_t = attend(s_{t-1})``, ``s_t = rnn(s_{t-1}, [y_{t-1}; c_t])``, features ``[s_t; c_t]``.
    Luong scores: ``h_t = rnn(h_{t-1}, y_{t-1})``, ``c_t = attend(h_t)``, features ``tanh(W_c [c_t; h_t])``.
    """

    def __init__(self, embed_features, hidden_features, vocab, *, cell, attention, rngs):
        self.bahdanau = attention == "additive"
        rnn_in = embed_features + hidden_features if self.bahdanau else embed_features
        cell_type = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell}[cell]
        self.rnn = cell_type(rnn_in, hidden_features, rngs=rngs)
        self.is_lstm = cell == "lstm"
        if self.bahdanau:
            self.attention = AdditiveAttention(hidden_features, hidden_features, rngs=rngs)
            self.combine = nnx.data(None)
        else:
            self.attention = LuongAttention(hidden_features, hidden_features, score=attention, rngs=rngs)
            self.combine = nnx.Linear(2 * hidden_features, hidden_features, use_bias=False, rngs=rngs)
        self.readout = nnx.Linear(2 * hidden_features if self.bahdanau else hidden_features, vocab, rngs=rngs)

    def _hidden(self, state):
        return state[1] if self.is_lstm else state  # LSTM carry is (c, h)

    def __call__(self, carry, embedded):
        state, memory, memory_mask = carry
        if self.bahdanau:
            context, alignment = self.attention(self._hidden(state), memory, mask=memory_mask)
            state, hidden = self.rnn(state, jnp.concatenate([embedded, context], axis=-1))
            features = jnp.concatenate([hidden, context], axis=-1)
        else:
            state, hidden = self.rnn(state, embedded)
            context, alignment = self.attention(hidden, memory, mask=memory_mask)
            features = jnp.tanh(self.combine(jnp.concatenate([context, hidden], axis=-1)))
        return (state, memory, memory_mask), (self.readout(features), alignment)

    def initialize_carry(self, input_shape, rngs=None):  # the encoder provides the carry
        raise NotImplementedError("the decoder's carry comes from the encoder; pass initial_carry.")

    @property
    def num_feature_axes(self) -> int:
        return 1


class Seq2SeqWithAttention(nnx.Module):
    """An RNN encoder-decoder with attention that returns its alignment matrix.

    The encoder runs a GRU or LSTM over the embedded source; its final state starts the decoder, which attends
    over the encoder states at every step (teacher forcing: ``target_inputs`` are the previous target tokens).

    Args:
      source_vocab, target_vocab: vocabulary sizes.
      embed_features, hidden_features: embedding and RNN widths.
      cell: ``"gru"`` or ``"lstm"`` (``flax.nnx`` cells).
      attention: ``"additive"`` (Bahdanau) or a Luong score: ``"dot"``, ``"scaled_dot"``, ``"general"``,
        ``"concat"``.

    Call: ``model(source [B, S] int, target_inputs [B, T] int, *, source_lengths [B] | None)`` returns
    ``(logits [B, T, target_vocab], alignment [B, T, S])``; padded source positions get zero weight.
    """

    def __init__(
        self,
        source_vocab: int,
        target_vocab: int,
        *,
        embed_features: int = 32,
        hidden_features: int = 64,
        cell: str = "gru",
        attention: str = "additive",
        rngs: nnx.Rngs,
    ):
        if cell not in ("gru", "lstm"):
            raise ValueError(f"cell must be 'gru' or 'lstm', got {cell=!r}.")
        if attention != "additive" and attention not in LUONG_SCORES:
            raise ValueError(f"attention must be 'additive' or one of {LUONG_SCORES}, got {attention=!r}.")
        for name, value in (("source_vocab", source_vocab), ("target_vocab", target_vocab)):
            positive_int(name, value)
        self.source_embed = nnx.Embed(source_vocab, embed_features, rngs=rngs)
        self.target_embed = nnx.Embed(target_vocab, embed_features, rngs=rngs)
        cell_type = {"gru": nnx.GRUCell, "lstm": nnx.LSTMCell}[cell]
        self.encoder = nnx.RNN(cell_type(embed_features, hidden_features, rngs=rngs), return_carry=True, rngs=rngs)
        self.decoder = nnx.RNN(
            _AttentionDecoderCell(
                embed_features, hidden_features, target_vocab, cell=cell, attention=attention, rngs=rngs
            ),
            rngs=rngs,
        )

    def __call__(self, source: Array, target_inputs: Array, *, source_lengths: Array | None = None):
        if source.ndim != 2 or target_inputs.ndim != 2 or source.shape[0] != target_inputs.shape[0]:
            raise ValueError(
                f"source and target_inputs must be [B, S] and [B, T] token ids, got {source.shape} and "
                f"{target_inputs.shape}."
            )
        state, memory = self.encoder(self.source_embed(source), seq_lengths=source_lengths)  # memory [B, S, Hd]
        if source_lengths is None:
            memory_mask = jnp.ones(source.shape, bool)
        else:
            memory_mask = jnp.arange(source.shape[1])[None, :] < source_lengths[:, None]  # [B, S]
        logits, alignment = self.decoder(self.target_embed(target_inputs), initial_carry=(state, memory, memory_mask))
        return logits, alignment
