"""``MultiHeadAttention``: MHA / GQA / MQA, self- or cross-attention, with the usual options."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax import positional, score_mods
from attention_jax.functional.cached import cached_attention
from attention_jax.functional.multi_head import multi_head_attention
from attention_jax.nn import _common, recording

Array = jax.Array


class MultiHeadAttention(_common.CacheMixin, nnx.Module):
    """Multi-head attention over :func:`attention_jax.functional.multi_head.multi_head_attention`.

    Projects ``inputs_q [B, T, D]`` to queries ``[B, T, N, H]`` and ``inputs_kv [B, S, Dkv]``
    (default ``inputs_q``) to keys ``[B, S, K, H]`` and values ``[B, S, K, Hv]``, attends, and
    projects ``[B, T, N, Hv]`` back to ``[B, T, out_features]``.

    Args:
      in_features: D, the width of ``inputs_q``.
      num_heads: N query heads.
      num_kv_heads: K key/value heads (N % K == 0): N for MHA (default), 1 for MQA, else GQA.
      head_dim: H, default ``in_features // num_heads``.
      value_head_dim: Hv, default H.
      out_features: default ``in_features``.
      kv_features: width of ``inputs_kv`` for cross-attention, default ``in_features``.
      qk_norm: RMS-normalise queries and keys per head before RoPE (Gemma 3, Qwen 3).
      rope: an :class:`attention_jax.positional.RoPE` applied to queries and keys.
      alibi: add ALiBi biases (slopes from :func:`attention_jax.positional.alibi_slopes`).
      relative_buckets: if set, a learned T5 relative position bias with this many buckets;
        ``relative_max_distance`` and ``relative_bidirectional`` as in T5.
      softcap: cap the scores at ``softcap * tanh(s / softcap)`` (Gemma 2).
      sinks: learn one attention-sink logit per head (gpt-oss).
      mask: an :class:`attention_jax.masks.Mask` (or boolean array) of the layer, e.g. ``causal()``.
      sliding_window: if set, also restrict each query to the ``sliding_window`` previous tokens
        (``causal() & sliding_window(w)``); such a layer can decode with a ``RollingKVCache``. A query
        sees itself and ``w`` earlier tokens, ``w + 1`` keys; Hugging Face configs (Mistral, Gemma)
        count the query among their ``sliding_window`` keys, so their ``W`` is our ``W - 1`` (the
        loaders in :mod:`attention_jax.models` convert).
      pattern: a :class:`~attention_jax.masks.Mask` that always applies, ANDed with the call's (or
        the default) mask: a sparse pattern from :mod:`attention_jax.sparse_patterns` (this is how
        ``LongformerAttention``, ``BigBirdAttention`` and ``SparseTransformerAttention`` are built).
      scale: score scale, default ``1 / sqrt(H)``.
      dropout_rate: dropout on the attention weights when not ``deterministic``.
      deterministic: default for the call; ``model.eval()`` / ``model.train()`` set it.
      use_bias: biases in the four projections; ``qkv_bias`` / ``out_bias`` override it for the
        query/key/value and the output projections (Qwen2: biases on q, k, v only).
      dtype, param_dtype, precision, kernel_init, bias_init: as in ``flax.nnx.LinearGeneral``.
      implementation: passed to ``dot_product_attention``: None chooses, or a backend name or
        ``attention_jax.functional.backends.Backend`` instance.
      sequence_parallel: an :class:`attention_jax.distributed.SequenceParallel` to shard the
        attention's sequence over a mesh (ring, all-to-all or both); None runs it on one device.
      record_weights: record the attention weights (see :mod:`attention_jax.nn.recording`).
      rngs: ``nnx.Rngs`` for the parameters (and the ``dropout`` stream).

    Call with ``cache=`` (from :meth:`init_cache`) to decode: ``y, cache = layer(x, cache=cache)``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> layer = aj.nn.MultiHeadAttention(16, num_heads=4, num_kv_heads=2, rope=aj.positional.RoPE(),
    ...                                  mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    >>> x = jnp.ones((2, 5, 16))
    >>> layer(x).shape
    (2, 5, 16)
    >>> cache = layer.init_cache(2, 8)
    >>> y, cache = layer(x, cache=cache)               # prefill ...
    >>> y, cache = layer(x[:, :1], cache=cache)        # ... then one token at a time
    >>> y.shape, cache.lengths.tolist()
    ((2, 1, 16), [6, 6])
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        kv_features: int | None = None,
        qk_norm: bool = False,
        norm_epsilon: float = 1e-6,
        rope: positional.RoPE | None = None,
        alibi: bool = False,
        relative_buckets: int | None = None,
        relative_max_distance: int = 128,
        relative_bidirectional: bool = True,
        softcap: float | None = None,
        sinks: bool = False,
        mask: masks_lib.Mask | Array | None = None,
        sliding_window: int | None = None,
        pattern: masks_lib.Mask | None = None,
        scale: float | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        use_bias: bool = False,
        qkv_bias: bool | None = None,
        out_bias: bool | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = _common.default_kernel_init,
        bias_init: Any = _common.default_bias_init,
        implementation: str | Any | None = None,
        sequence_parallel: Any = None,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = in_features // num_heads if head_dim is None else head_dim
        value_head_dim = head_dim if value_head_dim is None else value_head_dim
        _common.check_positive(
            in_features=in_features, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
            value_head_dim=value_head_dim,
        )  # fmt: skip
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
        if sliding_window is not None:
            _common.check_positive(sliding_window=sliding_window)
        if pattern is not None and not isinstance(pattern, masks_lib.Mask):
            raise ValueError(f"pattern must be an attention_jax.masks.Mask, got {type(pattern).__name__}.")
        self.in_features = in_features
        self.kv_features = in_features if kv_features is None else kv_features
        self.out_features = in_features if out_features is None else out_features
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        self.rope, self.alibi, self.softcap, self.scale = rope, alibi, softcap, scale
        self.relative_buckets = relative_buckets
        self.relative_max_distance, self.relative_bidirectional = relative_max_distance, relative_bidirectional
        self.mask = _common.as_attribute(mask)
        self.sliding_window, self.pattern = sliding_window, _common.as_attribute(pattern)
        self.sequence_parallel = sequence_parallel
        self.dropout_rate, self.deterministic = dropout_rate, deterministic
        self.dtype, self.param_dtype = dtype, param_dtype
        self.implementation, self.record_weights = implementation, record_weights

        dense = dict(
            dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init, bias_init=bias_init,
            rngs=rngs,
        )  # fmt: skip
        qkv = dict(dense, use_bias=use_bias if qkv_bias is None else qkv_bias)
        self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **qkv)
        self.key = nnx.LinearGeneral(self.kv_features, (num_kv_heads, head_dim), **qkv)
        self.value = nnx.LinearGeneral(self.kv_features, (num_kv_heads, value_head_dim), **qkv)
        self.out = nnx.LinearGeneral(
            (num_heads, value_head_dim), self.out_features, axis=(-2, -1),
            use_bias=use_bias if out_bias is None else out_bias, **dense,
        )  # fmt: skip
        norm = dict(epsilon=norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query_norm = nnx.RMSNorm(head_dim, **norm) if qk_norm else nnx.data(None)
        self.key_norm = nnx.RMSNorm(head_dim, **norm) if qk_norm else nnx.data(None)
        self.sinks = nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks else nnx.data(None)
        self.relative_bias = (
            nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (relative_buckets, num_heads), param_dtype))
            if relative_buckets
            else nnx.data(None)
        )
        self.rngs = _common.dropout_stream(rngs, dropout_rate)

    def score_mod(self):
        """The layer's score modification (ALiBi and/or T5 bias), or None."""
        mods = []
        if self.alibi:
            mods.append(score_mods.alibi(jnp.asarray(positional.alibi_slopes(self.num_heads))))
        if self.relative_bias is not None:
            mods.append(
                score_mods.relative_position_bias(
                    self.relative_bias[...],
                    self.relative_buckets,
                    self.relative_max_distance,
                    self.relative_bidirectional,
                )  # fmt: skip
            )
        return None if not mods else mods[0] if len(mods) == 1 else score_mods.compose(*mods)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache=None,
        deterministic: bool | None = None,
        implementation: str | Any | None = None,
        record_weights: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        """Attend from ``inputs_q [B, T, D]`` to ``inputs_kv [B, S, Dkv]`` (default: self-attention).

        The arguments follow :class:`attention_jax.nn.AttentionLayer`.

        Args:
          mask: replaces the constructor's mask for this call (the sliding window and the pattern
            still apply).
          positions: ``[T]`` or ``[B, T]`` positions for RoPE (default ``arange(T)``, or the
            position within each segment); not with a cache.
          segment_ids: ``[B, T]`` packed documents of self-attention: tokens attend within their
            segment only.
          lengths: ``[B]`` real tokens of ``inputs_q`` (right padding): later keys are masked, and
            with a cache only these tokens are appended.
          cache: a cache from :meth:`init_cache`; the call then returns ``(y, new_cache)``.
          deterministic, implementation, record_weights, rngs: override the constructor for this call.

        Returns:
          ``y [B, T, out_features]``, or ``(y, cache)`` when a cache is given.
        """
        _common.check_features("inputs_q", inputs_q, self.in_features)
        cross = inputs_kv is not None
        if cross:
            _common.check_features("inputs_kv", inputs_kv, self.kv_features)
            if cache is not None:
                raise ValueError("cross-attention takes no cache: its keys come from inputs_kv at every step.")
            if lengths is not None:
                raise ValueError("lengths pads self-attention; mask a padded context with masks.padding(kv_lengths=).")
            if segment_ids is not None:
                raise ValueError("segment_ids packs self-attention; mask packed contexts with masks.segments(q, kv).")
            if inputs_kv.shape[0] != inputs_q.shape[0]:
                raise ValueError(f"inputs_q and inputs_kv must share B, got {inputs_q.shape} and {inputs_kv.shape}.")
        context = inputs_kv if cross else inputs_q
        query = self.query(inputs_q)  # [B, T, N, H]
        key = self.key(context)  # [B, S, K, H]
        value = self.value(context)  # [B, S, K, Hv]
        if self.query_norm is not None:
            query, key = self.query_norm(query), self.key_norm(key)
        segment_ids = _common.check_segment_ids(segment_ids, inputs_q)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids packs documents for training; a cache decodes one sequence per row.")
        if positions is None and segment_ids is not None:
            positions = _common.segment_positions(segment_ids)
        q_positions = _common.positions_for(inputs_q, positions, cache)
        if self.rope is not None:
            query = _common.rotate(self.rope, query, q_positions)
            key = _common.rotate(self.rope, key, jnp.arange(context.shape[1]) if cross else q_positions)

        mask = _common.layer_mask(self.mask if mask is None else mask, self.sliding_window, self.pattern)
        record = recording.should_record(record_weights, self.record_weights)
        dropout_rng = _common.dropout_key(self, deterministic, rngs)
        options = dict(
            mask=mask, scale=self.scale, softcap=self.softcap, score_mod=self.score_mod(),
            sinks=None if self.sinks is None else self.sinks[...], dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng, implementation=self.implementation if implementation is None else implementation,
        )  # fmt: skip
        if cache is not None and not record and self.sequence_parallel is None:
            # Decoding: write and attend through the decode kernels (cached_attention says when it cannot).
            out, cache = cached_attention(query, key, value, cache, lengths=lengths, **options)
            return self.out(out), cache
        offsets = {}
        if cache is not None:
            cache, view = cache.update(key, value, lengths=lengths)
            key, value = view.keys.astype(query.dtype), view.values.astype(query.dtype)
            offsets = view.offsets()
        elif not cross:
            options["mask"] = _common.segmented(_common.padded(mask, lengths), segment_ids)
        out = multi_head_attention(
            query, key, value, **options, sequence_parallel=self.sequence_parallel, return_weights=record, **offsets
        )
        if record:
            out, weights = out
            out = recording.record(self, out, weights, value if dropout_rng is None else None)
        y = self.out(out)  # [B, T, out_features]
        return y if cache is None else (y, cache)

    def cache_shape(self) -> tuple[int, int, int]:
        """K/V heads, head dim and value head dim of the cache (see ``init_cache``)."""
        return (self.num_kv_heads, self.head_dim, self.value_head_dim)
