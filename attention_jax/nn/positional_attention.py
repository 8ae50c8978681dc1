"""``PositionalAttention``: attention weights learned per position pair, alone or gated with content attention.

It follows :class:`~attention_jax.nn.AttentionLayer`: ``inputs_q [B, T, D]`` (and ``inputs_kv
[B, S, D]`` for cross-attention) to ``[B, T, out_features]``, with MultiHeadAttention's
projections (``value [D, K, Hv]`` and ``out [N, Hv, D]``; ``query [D, N, H]`` and ``key [D, K, H]``
only when ``gated``). The learned table is read at the tokens' positions: ``positions``, the
position within each segment with ``segment_ids``, or the cache's positions when decoding.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> x = jnp.ones((2, 6, 16))
>>> PositionalAttention(16, num_heads=2, max_length=8, rngs=nnx.Rngs(0))(x).shape
(2, 6, 16)
>>> layer = PositionalAttention(16, num_heads=2, max_length=8, rank=4, gated=True, mask=aj.masks.causal(),
...                             rngs=nnx.Rngs(0))
>>> y, cache = layer(x, cache=layer.init_cache(2, 8))          # prefill, then one token at a time
>>> y, cache = layer(x[:, :1], cache=cache)
>>> y.shape, cache.lengths.tolist()
((2, 1, 16), [7, 7])
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax.functional.positional_attention import (
    factorized_positional_logits,
    gated_positional_attention,
    positional_attention,
)
from attention_jax.nn import _common, recording
from attention_jax.nn._heads import ProjectedHeads, positive_int

Array = jax.Array

__all__ = ["PositionalAttention"]


class PositionalAttention(_common.CacheMixin, ProjectedHeads):
    """Content-independent attention from learned positions, optionally mixed with content attention.

    Args:
      in_features, num_heads: D and N.
      max_length: the number of learned positions (``0 .. max_length - 1``).
      rank: None learns a full logit table ``[N, max_length, max_length]``; an int R learns position embeddings
        ``E_q, E_k [max_length, N, R]`` with logits ``E_q E_k^T / sqrt(R)`` (the factorized low-rank form).
      gated: mix with content attention per head, ``(1 - sigmoid(g)) content + sigmoid(g) positional``; the gate
        logits ``g [N]`` start at ``gate_init`` (1.0, as ConViT).
      mask: the layer's default ``Mask`` (or boolean array) for both terms, e.g. ``masks.causal()``
        (with which the layer decodes with a KV cache).
      num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype, param_dtype: the
        projections, as in ``MultiHeadAttention``.
      implementation: passed to ``dot_product_attention`` for the content term.
      record_weights: record the (mixed) attention weights ``[B, N, T, S]``.
      rngs: ``nnx.Rngs`` for the parameters.

    Without ``gated`` the layer projects only values: its weights never look at the input, and its
    cache holds values only. Positions at or past ``max_length`` raise where they are known (eager
    code); under ``jit`` the table's last entry is read. It has no dropout (``deterministic`` is
    accepted and ignored).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        max_length: int,
        rank: int | None = None,
        gated: bool = False,
        gate_init: float = 1.0,
        mask: masks_lib.Mask | Array | None = None,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        implementation: str | None = None,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        self.init_projections(
            in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, value_head_dim=value_head_dim,
            out_features=out_features, query_key=gated, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs,
        )  # fmt: skip
        self.max_length = positive_int("max_length", max_length)
        init = nnx.initializers.normal(0.02)
        if rank is None:
            self.logits = nnx.data(nnx.Param(init(rngs.params(), (num_heads, max_length, max_length), param_dtype)))
            self.query_positions = self.key_positions = nnx.data(None)
        else:
            positive_int("rank", rank)
            self.logits = nnx.data(None)
            shape = (max_length, num_heads, rank)
            self.query_positions = nnx.data(nnx.Param(init(rngs.params(), shape, param_dtype)))
            self.key_positions = nnx.data(nnx.Param(init(rngs.params(), shape, param_dtype)))
        self.gate = nnx.data(nnx.Param(jnp.full((num_heads,), gate_init, param_dtype)) if gated else None)
        self.mask = _common.as_attribute(mask)
        self.dtype, self.param_dtype = dtype, param_dtype
        self.implementation, self.record_weights = implementation, record_weights

    def position_logits(self, q_positions: Array, kv_positions: Array) -> Array:
        """The positional logits ``[B|1, N, T, S]`` of queries at ``q_positions [T] | [B, T]`` and keys at
        ``kv_positions [S] | [B, S]`` (clipped into the table)."""
        q_pos, kv_pos = (jnp.clip(jnp.atleast_2d(p), 0, self.max_length - 1) for p in (q_positions, kv_positions))
        if self.logits is not None:
            table = self.logits[...]  # [N, L, L]
            return jnp.moveaxis(table[:, q_pos[:, :, None], kv_pos[:, None, :]], 0, 1).astype(jnp.float32)
        e_q, e_k = self.query_positions[...], self.key_positions[...]  # [L, N, R]
        return factorized_positional_logits(e_q[q_pos], e_k[kv_pos])  # [B|1, N, T, S]

    def _check_positions(self, name: str, positions: Array) -> None:
        if isinstance(positions, jax.core.Tracer):
            return
        top = int(jnp.max(positions)) if jnp.size(positions) else 0
        if top >= self.max_length or int(jnp.min(positions, initial=0)) < 0:
            raise ValueError(
                f"PositionalAttention learned positions 0..{self.max_length - 1} (max_length={self.max_length}), "
                f"got {name} up to {top}."
            )

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: Any = None,
        deterministic: bool | None = None,
    ):
        """Attend from ``inputs_q [B, T, D]`` (to ``inputs_kv [B, S, D]``), as in ``AttentionLayer``.

        Returns ``y [B, T, out_features]``, or ``(y, cache)`` with a cache.
        """
        _common.check_features("inputs_q", inputs_q, self.in_features)
        cross = inputs_kv is not None
        if cross:
            _common.check_features("inputs_kv", inputs_kv, self.in_features)
            if cache is not None or lengths is not None or segment_ids is not None:
                raise ValueError(
                    "PositionalAttention: cross-attention takes no cache, lengths or segment_ids (they describe "
                    "self-attention); mask a padded context with masks.padding(kv_lengths=)."
                )
            if inputs_kv.shape[0] != inputs_q.shape[0]:
                raise ValueError(f"inputs_q and inputs_kv must share B, got {inputs_q.shape} and {inputs_kv.shape}.")
        context = inputs_kv if cross else inputs_q
        too_long = [(name, x.shape[1]) for name, x, check in (("T", inputs_q, cache is None and positions is None),
                    ("S", context, cross)) if check and x.shape[1] > self.max_length]  # fmt: skip
        if too_long:
            name, length = too_long[0]
            raise ValueError(f"sequence length {name}={length} exceeds the layer's max_length={self.max_length}.")
        segment_ids = _common.check_segment_ids(segment_ids, inputs_q)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids packs documents for training; a cache decodes one sequence per row.")
        if positions is None and segment_ids is not None:
            positions = _common.segment_positions(segment_ids)  # [B, T]: restart at each document
        if positions is not None:
            self._check_positions("positions", positions)
        q_pos = _common.positions_for(inputs_q, positions, cache)  # [T] | [B, T]
        value = self.values(context)  # [B, S, K, Hv]
        query, key = (self.queries(inputs_q), self.keys(context)) if self.gate is not None else (None, None)

        mask = self.mask if mask is None else mask
        offsets = {}
        if cache is not None:
            # Without a gate there are no keys: the values take the keys' place in a keys-only cache.
            cache, view = cache.update(value if key is None else key, None if key is None else value, lengths=lengths)
            value = (view.keys if key is None else view.values).astype(value.dtype)
            key = None if key is None else view.keys.astype(key.dtype)
            kv_pos = view.kv_offset[:, None] + jnp.arange(value.shape[1], dtype=jnp.int32)  # [B, S]
            offsets = view.offsets()
        elif cross:
            kv_pos = jnp.arange(context.shape[1], dtype=jnp.int32)
        else:
            kv_pos = q_pos
            mask = _common.segmented(_common.padded(mask, lengths), segment_ids)
        logits = self.position_logits(q_pos, kv_pos)  # [B|1, N, T, S]
        record = recording.should_record(None, self.record_weights)
        if self.gate is None:
            out = positional_attention(value, logits, mask=mask, return_weights=record, **offsets)
        else:
            out = gated_positional_attention(
                query, key, value, logits, self.gate[...], mask=mask, implementation=self.implementation,
                return_weights=record, **offsets,
            )  # fmt: skip
        if record:
            out, weights = out
            out = recording.record(self, out, weights, value)
        y = self.merge(out)  # [B, T, out_features]
        return y if cache is None else (y, cache)

    def cache_shape(self) -> tuple[int, int, int]:
        """``(K, H, Hv)`` for the gated layer; ``(K, Hv, 0)`` (values in the keys' place) without a gate."""
        if self.gate is None:
            return (self.num_kv_heads, self.value_head_dim, 0)
        return (self.num_kv_heads, self.head_dim, self.value_head_dim)

    def init_cache(self, batch_size: int, max_length: int, **options: Any):
        """A KV cache (see ``MultiHeadAttention.init_cache``) for up to ``max_length <= self.max_length`` tokens."""
        if max_length > self.max_length:
            raise ValueError(
                f"PositionalAttention learned {self.max_length} positions, so it decodes at most that many tokens; "
                f"got max_length={max_length}."
            )
        return super().init_cache(batch_size, max_length, **options)
