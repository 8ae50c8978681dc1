"""Transformer stacks: ``TransformerEncoder``, ``TransformerDecoder`` and a small decoder-only ``TransformerLM``."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax import positional
from attention_jax.nn.blocks import AttentionFactory, TransformerBlock, make_norm
from attention_jax.nn.multi_head import MultiHeadAttention

Array = jax.Array


def _factories(attention, num_layers: int) -> list:
    if isinstance(attention, Sequence):
        if len(attention) != num_layers:
            raise ValueError(f"attention has {len(attention)} factories for num_layers={num_layers}.")
        return list(attention)
    return [attention] * num_layers


class _Stack(nnx.Module):
    """``num_layers`` pre-norm blocks and a final norm; the shared body of the three stacks."""

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        attention: AttentionFactory | Sequence[AttentionFactory] | None,
        cross_attention: AttentionFactory | None,
        num_heads: int,
        mlp: str,
        mlp_features: int | None,
        norm: str,
        norm_epsilon: float,
        dropout_rate: float,
        remat: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers <= 0:
            raise ValueError(f"num_layers must be a positive integer, got {num_layers=!r}.")
        block = dict(
            num_heads=num_heads, cross_attention=cross_attention, mlp=mlp, mlp_features=mlp_features, norm=norm,
            norm_epsilon=norm_epsilon, dropout_rate=dropout_rate, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.blocks = nnx.List(
            [
                TransformerBlock(features, attention=factory, depth=i + 1, **block)
                for i, factory in enumerate(_factories(attention, num_layers))
            ]
        )
        self.final_norm = make_norm(
            norm, features, epsilon=norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.remat = remat

    def run(self, x: Array, *, cache: Sequence | None = None, **kwargs):
        new_caches = []
        for i, block in enumerate(self.blocks):
            layer_kwargs = dict(kwargs, cache=None if cache is None else cache[i])
            if self.remat:
                # Keyword arguments hold static flags (deterministic) as well as arrays: close over them.
                out = nnx.remat(lambda b, h, kw=layer_kwargs: b(h, **kw))(block, x)
            else:
                out = block(x, **layer_kwargs)
            x, layer_cache = out if cache is not None else (out, None)
            new_caches.append(layer_cache)
        x = self.final_norm(x)
        return x if cache is None else (x, tuple(new_caches))

    def init_cache(self, batch_size: int, max_length: int, **options) -> tuple:
        return tuple(block.init_cache(batch_size, max_length, **options) for block in self.blocks)


_STACK_DOC = """
    Args:
      num_layers: number of blocks.
      features: D.
      attention: an attention factory (``factory(features, rngs=rngs)``, see
        :data:`attention_jax.nn.blocks.AttentionFactory`) or one per layer; default
        ``MultiHeadAttention`` with ``num_heads`` heads.
      mlp, mlp_features, norm, norm_epsilon, dropout_rate: as in :class:`TransformerBlock`.
      remat: rematerialise each block in the backward pass (``nnx.remat``).
      dtype, param_dtype, rngs: as usual.
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
        attention: AttentionFactory | Sequence[AttentionFactory] | None = None,
        num_heads: int = 4,
        mlp: str = "swiglu",
        mlp_features: int | None = None,
        norm: str = "rms",
        norm_epsilon: float = 1e-6,
        dropout_rate: float = 0.0,
        remat: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            num_layers, features, attention=attention, cross_attention=None, num_heads=num_heads, mlp=mlp,
            mlp_features=mlp_features, norm=norm, norm_epsilon=norm_epsilon, dropout_rate=dropout_rate, remat=remat,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x: Array, *, mask=None, lengths: Array | None = None, deterministic: bool | None = None):
        """``x [B, T, D]`` to ``[B, T, D]``; ``lengths [B]`` masks right padding of the keys."""
        given = dict(mask=mask, lengths=lengths, deterministic=deterministic)
        return self.run(x, **{k: v for k, v in given.items() if v is not None})


class TransformerDecoder(_Stack):
    __doc__ = (
        """Causal decoder over ``x [B, T, D]`` with cross-attention to an encoder output ``context [B, S, D]``.

    ``cross_attention`` is the cross-attention factory (default ``MultiHeadAttention`` with
    ``num_heads``). Decoding caches the self-attention only: cross-attention reads ``context`` at
    every step.
"""
        + _STACK_DOC
        + """
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> dec = TransformerDecoder(2, 16, num_heads=2, rngs=nnx.Rngs(0))
    >>> dec(jnp.ones((1, 4, 16)), jnp.ones((1, 6, 16))).shape
    (1, 4, 16)
    """
    )

    def __init__(
        self,
        num_layers: int,
        features: int,
        *,
        attention: AttentionFactory | Sequence[AttentionFactory] | None = None,
        cross_attention: AttentionFactory | None = None,
        num_heads: int = 4,
        mask: masks_lib.Mask | None = None,
        mlp: str = "swiglu",
        mlp_features: int | None = None,
        norm: str = "rms",
        norm_epsilon: float = 1e-6,
        dropout_rate: float = 0.0,
        remat: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if cross_attention is None:
            cross_attention = functools.partial(
                MultiHeadAttention, num_heads=num_heads, dtype=dtype, param_dtype=param_dtype
            )
        super().__init__(
            num_layers, features, attention=attention, cross_attention=cross_attention, num_heads=num_heads, mlp=mlp,
            mlp_features=mlp_features, norm=norm, norm_epsilon=norm_epsilon, dropout_rate=dropout_rate, remat=remat,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.mask = masks_lib.causal() if mask is None else mask

    def __call__(
        self,
        x: Array,
        context: Array,
        *,
        context_lengths: Array | None = None,
        positions: Array | None = None,
        lengths: Array | None = None,
        cache: Sequence | None = None,
        deterministic: bool | None = None,
    ):
        """``x [B, T, D]`` attending causally to itself and to ``context [B, S, D]``.

        ``context_lengths [B]`` masks right padding of the context. With ``cache`` (from
        :meth:`init_cache`) returns ``(y, caches)``.
        """
        context_mask = None if context_lengths is None else masks_lib.padding(kv_lengths=context_lengths)
        given = dict(context_mask=context_mask, positions=positions, lengths=lengths, deterministic=deterministic)
        return self.run(
            x, context=context, mask=self.mask, cache=cache, **{k: v for k, v in given.items() if v is not None}
        )


class TransformerLM(nnx.Module):
    """A small decoder-only language model: embedding, causal pre-norm blocks, final norm, logits.

    Args:
      vocab_size: V.
      features: D.
      num_layers: number of blocks.
      attention: an attention factory or one per layer; default ``MultiHeadAttention`` with
        ``num_heads`` heads and RoPE. The model applies ``mask`` (default ``causal()``) at every
        call; a layer's ``sliding_window`` still restricts it.
      tie_embeddings: logits use the embedding matrix (default) rather than a separate head.
      mlp, mlp_features, norm, norm_epsilon, dropout_rate, remat, dtype, param_dtype, rngs: as in
        :class:`TransformerEncoder`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> lm = aj.nn.TransformerLM(32, 16, 2, num_heads=2, rngs=nnx.Rngs(0))
    >>> tokens = jnp.zeros((2, 5), jnp.int32)
    >>> lm(tokens).shape
    (2, 5, 32)
    >>> logits, cache = lm(tokens, cache=lm.init_cache(2, 8))
    >>> len(cache), int(cache[0].lengths[0])
    (2, 5)
    """

    def __init__(
        self,
        vocab_size: int,
        features: int,
        num_layers: int,
        *,
        attention: AttentionFactory | Sequence[AttentionFactory] | None = None,
        num_heads: int = 4,
        mask: masks_lib.Mask | None = None,
        mlp: str = "swiglu",
        mlp_features: int | None = None,
        norm: str = "rms",
        norm_epsilon: float = 1e-6,
        dropout_rate: float = 0.0,
        tie_embeddings: bool = True,
        remat: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if attention is None:
            attention = functools.partial(
                MultiHeadAttention, num_heads=num_heads, rope=positional.RoPE(), dtype=dtype, param_dtype=param_dtype
            )
        self.vocab_size, self.features = vocab_size, features
        self.mask = masks_lib.causal() if mask is None else mask
        self.embed = nnx.Embed(vocab_size, features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.stack = _Stack(
            num_layers, features, attention=attention, cross_attention=None, num_heads=num_heads, mlp=mlp,
            mlp_features=mlp_features, norm=norm, norm_epsilon=norm_epsilon, dropout_rate=dropout_rate, remat=remat,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.head = (
            nnx.data(None)
            if tie_embeddings
            else nnx.Linear(features, vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        )

    def __call__(
        self,
        tokens: Array,
        *,
        positions: Array | None = None,
        lengths: Array | None = None,
        cache: Sequence | None = None,
        deterministic: bool | None = None,
    ):
        """Logits ``[B, T, V]`` for ``tokens [B, T]`` (int); with ``cache`` returns ``(logits, caches)``.

        ``lengths [B]``: real tokens per row (right padding), appended to the cache when decoding.
        """
        if jnp.ndim(tokens) != 2 or not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
            raise ValueError(
                f"tokens must be integers of shape [B, T], got {jnp.result_type(tokens)} {jnp.shape(tokens)}."
            )
        x = self.embed(tokens)  # [B, T, D]
        given = dict(positions=positions, lengths=lengths, deterministic=deterministic)
        out = self.stack.run(x, mask=self.mask, cache=cache, **{k: v for k, v in given.items() if v is not None})
        x, cache = out if cache is not None else (out, None)
        logits = self.embed.attend(x) if self.head is None else self.head(x)  # [B, T, V]
        return logits if cache is None else (logits, cache)

    def init_cache(self, batch_size: int, max_length: int, *, kind: str = "dense", **options) -> tuple:
        """One cache per layer (see ``MultiHeadAttention.init_cache``; ``kind="rolling"`` applies to
        the layers with a sliding window, the others get a dense cache)."""
        return self.stack.init_cache(batch_size, max_length, kind=kind, **options)
