"""Transformer stacks: ``TransformerEncoder``, ``TransformerDecoder`` and a small decoder-only ``TransformerLM``.

Every stack is built from :class:`~attention_jax.nn.TransformerBlock` and takes any attention module
that follows :class:`~attention_jax.nn.AttentionLayer`: one factory for every layer, or one per layer
(hybrids). The block options are one :class:`~attention_jax.nn.BlockConfig` (``config=``) whose
fields may also be given as keywords. Each call passes ``mask``, ``positions``, ``segment_ids``,
``lengths``, ``cache`` and ``deterministic`` to every layer, as the protocol defines them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax import positional
from attention_jax.nn import _common
from attention_jax.nn.blocks import AttentionFactory, BlockConfig, TransformerBlock, block_config, make_norm

Array = jax.Array

Attention = AttentionFactory | Sequence[AttentionFactory] | None


def _factories(attention, num_layers: int, config: BlockConfig) -> list:
    if attention is None:
        attention = config.default_attention()
    if isinstance(attention, Sequence):
        if len(attention) != num_layers:
            raise ValueError(f"attention has {len(attention)} factories for num_layers={num_layers}.")
        return list(attention)
    return [attention] * num_layers


def _check_logits_at(logits_at, tokens_shape) -> Array:
    """``logits_at`` as int32 ``[B, P]``, after checking its shape and dtype against ``tokens [B, T]``."""
    logits_at = jnp.asarray(logits_at)
    if logits_at.ndim != 2 or logits_at.shape[0] != tokens_shape[0] or not jnp.issubdtype(logits_at.dtype, jnp.integer):
        raise ValueError(f"logits_at must be integers of shape [B, P] with B={tokens_shape[0]}, got "
                         f"{logits_at.dtype} {logits_at.shape}.")  # fmt: skip
    return logits_at.astype(jnp.int32)


def _share(blocks: Sequence[TransformerBlock], names: Sequence[str]) -> None:
    """Make every block's ``attention.<name>`` the first block's variable: one parameter, read by every layer.

    NNX keeps shared references shared (``nnx.split`` stores the variable once), so its gradient is
    the sum of every layer's use and an optimizer updates it once.
    """
    if isinstance(names, str):
        raise ValueError(f"shared_attention must be a sequence of attribute names, got the string {names!r}.")
    for name in names:
        first = getattr(blocks[0].attention, name, None)
        if not isinstance(first, nnx.Variable):
            raise ValueError(f"shared_attention names {name!r}, which is no parameter of the first layer's "
                             f"{type(blocks[0].attention).__name__} (got {type(first).__name__}).")  # fmt: skip
        for depth, block in enumerate(blocks[1:], start=2):
            other = getattr(block.attention, name, None)
            if not isinstance(other, nnx.Variable) or other.shape != first.shape:
                raise ValueError(f"shared_attention {name!r}: layer {depth} has {getattr(other, 'shape', other)}, "
                                 f"the first layer a parameter of shape {first.shape}.")  # fmt: skip
            setattr(block.attention, name, first)


class _Stack(nnx.Module):
    """``num_layers`` pre-norm blocks and a final norm; the shared body of the three stacks."""

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        attention: Attention,
        cross_attention: AttentionFactory | None,
        config: BlockConfig,
        shared_attention: Sequence[str] = (),
        rngs: nnx.Rngs,
    ):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers=!r}.")
        self.config = config
        self.blocks = nnx.List(
            [
                TransformerBlock(
                    features, attention=factory, cross_attention=cross_attention, config=config, depth=i + 1, rngs=rngs
                )
                for i, factory in enumerate(_factories(attention, num_layers, config))
            ]
        )
        _share(self.blocks, shared_attention)
        # A post-norm block already ends in a norm (BERT has no final one); pre-norm stacks need it.
        self.final_norm = (
            nnx.data(None)
            if config.norm_position == "post"
            else make_norm(
                config.norm, features, epsilon=config.norm_epsilon, dtype=config.dtype,
                param_dtype=config.param_dtype, rngs=rngs,
            )  # fmt: skip
        )

    def run(self, x: Array, *, cache: Sequence | None = None, **kwargs):
        """Every block over ``x [B, T, D]`` with the same call keywords, one cache per block."""
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache must hold one entry per layer ({len(self.blocks)}), got {len(cache)}.")
        new_caches = []
        for i, block in enumerate(self.blocks):
            layer_kwargs = dict(kwargs, cache=None if cache is None else cache[i])
            if self.config.remat:
                # Keyword arguments hold static flags (deterministic) as well as arrays: close over them.
                out = nnx.remat(lambda b, h, kw=layer_kwargs: b(h, **kw))(block, x)
            else:
                out = block(x, **layer_kwargs)
            x, layer_cache = out if cache is not None else (out, None)
            new_caches.append(layer_cache)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if cache is None else (x, tuple(new_caches))

    def init_cache(self, batch_size: int, max_length: int, **options) -> tuple:
        return tuple(block.init_cache(batch_size, max_length, **options) for block in self.blocks)


_STACK_DOC = """
    Args:
      num_layers: number of blocks.
      features: D.
      attention: an attention factory (``factory(features, rngs=rngs)`` building an
        :class:`~attention_jax.nn.AttentionLayer`, see
        :data:`attention_jax.nn.blocks.AttentionFactory`) or a sequence of one per layer (hybrid
        stacks); default ``MultiHeadAttention`` with ``config.num_heads`` heads.
      config: a :class:`~attention_jax.nn.BlockConfig`; keyword ``options`` (its field names:
        ``num_heads``, ``mlp``, ``mlp_features``, ``norm``, ``norm_epsilon``, ``dropout_rate``,
        ``deterministic``, ``remat``, ``dtype``, ``param_dtype``) override it.
      shared_attention: names of attention parameters that every layer shares with the first one,
        e.g. ``("relative_bias",)`` for T5's one relative-bias table per stack (the layers must have
        the parameter, with one shape); its gradient sums every layer's use.
      rngs: as usual.
"""


class TransformerEncoder(_Stack):
    __doc__ = (
        """Bidirectional encoder over ``x [B, T, D]``.
"""
        + _STACK_DOC
        + """
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> enc = TransformerEncoder(2, 16, num_heads=2, rngs=nnx.Rngs(0))
    >>> enc(jnp.ones((1, 5, 16)), lengths=jnp.array([3])).shape
    (1, 5, 16)
    """
    )

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        attention: Attention = None,
        config: BlockConfig | None = None,
        shared_attention: Sequence[str] = (),
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = block_config(config, options)
        super().__init__(
            num_layers, features, attention=attention, cross_attention=None, config=config,
            shared_attention=shared_attention, rngs=rngs,
        )  # fmt: skip

    def __call__(
        self,
        x: Array,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        deterministic: bool | None = None,
    ):
        """``x [B, T, D]`` to ``[B, T, D]``; the keywords as in :class:`~attention_jax.nn.AttentionLayer`."""
        return self.run(
            x, mask=mask, positions=positions, segment_ids=segment_ids, lengths=lengths, deterministic=deterministic
        )


class TransformerDecoder(_Stack):
    __doc__ = (
        """Causal decoder over ``x [B, T, D]`` with cross-attention to an encoder output ``context [B, S, D]``.

    ``cross_attention`` is the cross-attention factory (default ``MultiHeadAttention`` with
    ``config.num_heads``); ``mask`` the self-attention's default (``causal()``). Decoding caches the
    self-attention only: cross-attention reads ``context`` at every step.
"""
        + _STACK_DOC
        + """
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> dec = TransformerDecoder(2, 16, num_heads=2, rngs=nnx.Rngs(0))
    >>> nnx.jit(lambda dec, x, context: dec(x, context))(dec, jnp.ones((1, 4, 16)), jnp.ones((1, 6, 16))).shape
    (1, 4, 16)
    """
    )

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        attention: Attention = None,
        cross_attention: AttentionFactory | None = None,
        mask: masks_lib.Mask | None = None,
        config: BlockConfig | None = None,
        shared_attention: Sequence[str] = (),
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = block_config(config, options)
        cross_attention = config.default_attention() if cross_attention is None else cross_attention
        super().__init__(
            num_layers, features, attention=attention, cross_attention=cross_attention, config=config,
            shared_attention=shared_attention, rngs=rngs,
        )  # fmt: skip
        self.mask = _common.as_attribute(masks_lib.causal() if mask is None else mask)  # arrays in a mask are data

    def __call__(
        self,
        x: Array,
        context: Array,
        *,
        mask: masks_lib.Mask | Array | None = None,
        context_lengths: Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: Sequence | None = None,
        deterministic: bool | None = None,
    ):
        """``x [B, T, D]`` attending causally to itself and to ``context [B, S, D]``.

        ``mask`` replaces the decoder's causal mask for this call; ``context_lengths [B]`` masks
        right padding of the context. With ``cache`` (from :meth:`init_cache`) returns ``(y, caches)``.
        """
        context_mask = None if context_lengths is None else masks_lib.padding(kv_lengths=context_lengths)
        return self.run(
            x, context=context, mask=self.mask if mask is None else mask, context_mask=context_mask,
            positions=positions, segment_ids=segment_ids, lengths=lengths, cache=cache, deterministic=deterministic,
        )  # fmt: skip


class TransformerLM(nnx.Module):
    """A small decoder-only language model: embedding, causal pre-norm blocks, final norm, logits.

    Args:
      vocab_size: V.
      features: D.
      num_layers: number of blocks.
      attention: any :class:`~attention_jax.nn.AttentionLayer` factory, or one per layer; default
        ``MultiHeadAttention`` with ``config.num_heads`` heads and RoPE. The model passes ``mask``
        (default ``causal()``) to every layer at every call, so a layer built bidirectional runs
        causally here; a layer's own structure (a sliding window, a sparse pattern) still applies.
      mask: the model's mask; a call's ``mask`` replaces it.
      tie_embeddings: logits use the embedding matrix (default) rather than a separate head.
      position_embedding: if set, a learned absolute position embedding of this many positions is
        added to the token embedding (GPT-2); read at ``positions`` (or the cache's, or within each
        segment).
      embedding_scale: multiply the token embedding by this (Gemma: ``sqrt(features)``).
      logit_softcap: cap the logits at ``c * tanh(logits / c)`` (Gemma 2).
      config, options: the block options, as in :class:`TransformerEncoder`.
      shared_attention: as in :class:`TransformerEncoder`.
      rngs: as usual.

    >>> import functools
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> lm = aj.nn.TransformerLM(32, 16, 2, num_heads=2, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((2, 5), jnp.int32)
    >>> call = nnx.jit(lambda lm, tokens, **kwargs: lm(tokens, **kwargs))       # one program per shape
    >>> call(lm, tokens).shape
    (2, 5, 32)
    >>> logits, cache = call(lm, tokens, cache=lm.init_cache(2, 8))
    >>> len(cache), int(cache[0].lengths[0])
    (2, 5)
    >>> hybrid = aj.nn.TransformerLM(32, 16, 2, attention=[
    ...     functools.partial(aj.nn.LinearAttention, num_heads=2),
    ...     functools.partial(aj.nn.MultiHeadAttention, num_heads=2)], rngs=nnx.Rngs(0))
    >>> call(hybrid, tokens, segment_ids=jnp.array([[0, 0, 1, 1, 1]] * 2)).shape
    (2, 5, 32)
    """

    def __init__(
        self,
        vocab_size: int,
        features: int,
        num_layers: int,
        *,
        attention: Attention = None,
        mask: masks_lib.Mask | None = None,
        tie_embeddings: bool = True,
        position_embedding: int | None = None,
        embedding_scale: float | None = None,
        logit_softcap: float | None = None,
        config: BlockConfig | None = None,
        shared_attention: Sequence[str] = (),
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = block_config(config, options)
        if attention is None:
            attention = config.default_attention(rope=None if position_embedding else positional.RoPE())
        if position_embedding is not None:
            _common.check_positive(position_embedding=position_embedding)
        if logit_softcap is not None and not logit_softcap > 0:
            raise ValueError(f"logit_softcap must be positive, got {logit_softcap=!r}.")
        self.embedding_scale, self.logit_softcap = embedding_scale, logit_softcap
        self.vocab_size, self.features, self.config = vocab_size, features, config
        self.mask = _common.as_attribute(masks_lib.causal() if mask is None else mask)  # arrays in a mask are data
        dtypes = dict(dtype=config.dtype, param_dtype=config.param_dtype)
        self.embed = nnx.Embed(vocab_size, features, **dtypes, rngs=rngs)
        self.position_embed = (
            nnx.Embed(position_embedding, features, **dtypes, rngs=rngs) if position_embedding else nnx.data(None)
        )
        self.stack = _Stack(
            num_layers, features, attention=attention, cross_attention=None, config=config,
            shared_attention=shared_attention, rngs=rngs,
        )  # fmt: skip
        self.head = (
            nnx.data(None)
            if tie_embeddings
            else nnx.Linear(features, vocab_size, use_bias=False, **dtypes, rngs=rngs)
        )

    def __call__(
        self,
        tokens: Array,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: Sequence | None = None,
        deterministic: bool | None = None,
        logits_at: Array | None = None,
    ):
        """Logits ``[B, T, V]`` for ``tokens [B, T]`` (int); with ``cache`` returns ``(logits, caches)``.

        ``segment_ids [B, T]``: packed documents (each attends within itself, positions restart);
        ``lengths [B]``: real tokens per row (right padding), appended to the cache when decoding;
        ``mask`` replaces the model's mask for this call; ``logits_at [B, P]`` (int, indices into
        ``T``): compute the logits of these tokens only, ``[B, P, V]`` (a prefill needs one per row, and
        the ``[B, T, V]`` logits of a long prompt cost more than its attention).
        """
        if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                f"tokens must be integers of shape [B, T], got {jnp.result_type(tokens)} {jnp.shape(tokens)}."
            )
        x = self.embed(tokens)  # [B, T, D]
        if self.embedding_scale is not None:
            x = x * jnp.asarray(self.embedding_scale, x.dtype)
        if self.position_embed is not None:
            x = x + self.position_embed(self._absolute_positions(tokens, positions, segment_ids, cache))
        out = self.stack.run(
            x, mask=self.mask if mask is None else mask, positions=positions, segment_ids=segment_ids,
            lengths=lengths, cache=cache, deterministic=deterministic,
        )  # fmt: skip
        x, cache = out if cache is not None else (out, None)
        if logits_at is not None:
            x = jnp.take_along_axis(x, _check_logits_at(logits_at, tokens.shape)[..., None], axis=1)  # [B, P, D]
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # [B, T, V]
        if self.logit_softcap is not None:
            logits = self.logit_softcap * jnp.tanh(logits / self.logit_softcap)
        return logits if cache is None else (logits, cache)

    def _absolute_positions(self, tokens: Array, positions, segment_ids, cache) -> Array:
        """``[T]`` or ``[B, T]`` positions of the learned position embedding."""
        if positions is not None:
            return positions
        if cache is not None:
            return cache[0].positions(tokens.shape[1])
        if segment_ids is not None:
            return _common.segment_positions(_common.check_segment_ids(segment_ids, tokens[..., None]))
        return jnp.arange(tokens.shape[1], dtype=jnp.int32)

    def init_cache(self, batch_size: int, max_length: int, *, kind: str = "dense", **options) -> tuple:
        """One cache per layer (see the protocol's ``init_cache``; ``kind="rolling"`` applies to the
        layers with a sliding window, the others get a dense cache; recurrent layers keep a state)."""
        return self.stack.init_cache(batch_size, max_length, kind=kind, **options)
