"""``MultiHeadLatentAttention``: DeepSeek-V2 MLA with a latent-only cache and absorbed decoding."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax import positional
from attention_jax.functional.cached import cached_attention
from attention_jax.functional.latent import latent_attention, latent_values
from attention_jax.nn import _common, recording

Array = jax.Array


class MultiHeadLatentAttention(_common.CacheMixin, nnx.Module):
    """Multi-head latent attention (DeepSeek-V2) over :func:`attention_jax.functional.latent.latent_attention`.

    Queries: ``x W_Q`` or, with ``q_lora_rank``, ``RMSNorm(x W_DQ) W_UQ``, split per head into
    ``Hn = qk_nope_head_dim`` channels and ``R = qk_rope_head_dim`` RoPE channels. Keys and values:
    ``x W_DKV`` gives a latent ``c [L = kv_lora_rank]`` (RMS-normalised) and one RoPE key ``[R]``
    shared by the heads; ``k_n = [c W_UK_n, k_rope]`` and ``v_n = c W_UV_n`` (``Hv = v_head_dim``).

    The cache holds only ``[c, k_rope]``: ``kv_lora_rank + qk_rope_head_dim`` elements per token,
    whatever the number of heads. With ``absorb`` (default: when decoding with a cache) ``W_UK`` and
    ``W_UV`` are folded into the query and output, so attention reads the latent directly and the
    cache is never decompressed; without it keys and values are decompressed (training).

    Args:
      in_features: D.
      num_heads: N.
      kv_lora_rank: L. q_lora_rank: query compression rank (None: a full query projection).
      qk_nope_head_dim, qk_rope_head_dim, v_head_dim: Hn, R, Hv.
      rope: the :class:`attention_jax.positional.RoPE` of the R channels (default ``RoPE()``).
      mask, sliding_window, softcap, scale, dropout_rate, deterministic, implementation,
      record_weights: as in :class:`attention_jax.nn.MultiHeadAttention`; ``scale`` defaults to
        ``1 / sqrt(Hn + R)``.
      absorb: None (absorbed exactly when a cache is given), True or False.
      out_features, norm_epsilon, use_bias, dtype, param_dtype, precision, kernel_init, rngs: as usual.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> layer = aj.nn.MultiHeadLatentAttention(32, num_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
    ...                                        qk_rope_head_dim=4, v_head_dim=8, mask=aj.masks.causal(),
    ...                                        rngs=nnx.Rngs(0))
    >>> cache = layer.init_cache(1, 10)
    >>> y, cache = layer(jnp.ones((1, 3, 32)), cache=cache)
    >>> y.shape, cache.elements_per_token            # kv_lora_rank + qk_rope_head_dim
    ((1, 3, 32), 20)
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_heads: int,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        out_features: int | None = None,
        rope: positional.RoPE | None = None,
        mask: masks_lib.Mask | Array | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        scale: float | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        absorb: bool | None = None,
        norm_epsilon: float = 1e-6,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = _common.default_kernel_init,
        implementation: str | None = None,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        _common.check_positive(
            in_features=in_features, num_heads=num_heads, kv_lora_rank=kv_lora_rank,
            qk_nope_head_dim=qk_nope_head_dim, qk_rope_head_dim=qk_rope_head_dim, v_head_dim=v_head_dim,
        )  # fmt: skip
        rope = positional.RoPE() if rope is None else rope
        rope.dim(qk_rope_head_dim)  # raises if it cannot rotate R channels
        self.in_features, self.num_heads = in_features, num_heads
        self.out_features = in_features if out_features is None else out_features
        self.kv_lora_rank, self.q_lora_rank = kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.rope, self.softcap, self.scale, self.absorb = rope, softcap, scale, absorb
        self.mask = _common.as_attribute(mask)
        self.sliding_window = sliding_window
        self.dropout_rate, self.deterministic = dropout_rate, deterministic
        self.dtype, self.param_dtype, self.precision = dtype, param_dtype, precision
        self.implementation, self.record_weights = implementation, record_weights

        dense = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
            rngs=rngs,
        )  # fmt: skip
        norm = dict(epsilon=norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        q_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_down, self.q_norm = nnx.data(None), nnx.data(None)
            self.q_up = nnx.LinearGeneral(in_features, (num_heads, q_dim), **dense)
        else:
            self.q_down = nnx.Linear(in_features, q_lora_rank, **dense)
            self.q_norm = nnx.RMSNorm(q_lora_rank, **norm)
            self.q_up = nnx.LinearGeneral(q_lora_rank, (num_heads, q_dim), **dense)
        self.kv_down = nnx.Linear(in_features, kv_lora_rank + qk_rope_head_dim, **dense)
        self.kv_norm = nnx.RMSNorm(kv_lora_rank, **norm)

        def up(width):  # [L, N, width], initialised as the [L, N * width] matrix it is
            w = kernel_init(rngs.params(), (kv_lora_rank, num_heads * width), param_dtype)
            return nnx.Param(w.reshape(kv_lora_rank, num_heads, width))

        self.w_uk = up(qk_nope_head_dim)
        self.w_uv = up(v_head_dim)
        self.out = nnx.LinearGeneral((num_heads, v_head_dim), self.out_features, axis=(-2, -1), **dense)
        self.rngs = _common.dropout_stream(rngs, dropout_rate)

    def __call__(
        self,
        inputs: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache=None,
        absorb: bool | None = None,
        deterministic: bool | None = None,
        implementation: str | None = None,
        record_weights: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        """Self-attention over ``inputs [B, T, D]``; arguments as in ``MultiHeadAttention.__call__``.

        ``absorb`` overrides the constructor's choice for this call.
        """
        _common.check_features("inputs", inputs, self.in_features)
        hn, lr = self.qk_nope_head_dim, self.kv_lora_rank
        q_in = inputs if self.q_down is None else self.q_norm(self.q_down(inputs))
        query = self.q_up(q_in)  # [B, T, N, Hn + R]
        compressed = self.kv_down(inputs)  # [B, T, L + R]
        latent = self.kv_norm(compressed[..., :lr])  # [B, T, L]
        k_rope = compressed[..., lr:]  # [B, T, R]
        pos, segment_ids = _common.self_attention_positions(self, inputs, inputs_kv, positions, segment_ids, cache)
        q_nope, q_rope = query[..., :hn], _common.rotate(self.rope, query[..., hn:], pos)  # [B, T, N, Hn], [B, T, N, R]
        k_rope = _common.rotate(self.rope, k_rope, pos)  # [B, T, R] (one key shared by all heads)

        mask = _common.layer_mask(self.mask if mask is None else mask, self.sliding_window)
        absorb = next(a for a in (absorb, self.absorb, cache is not None) if a is not None)
        record = recording.should_record(record_weights, self.record_weights)
        dropout_rng = _common.dropout_key(self, deterministic, rngs)
        if cache is not None and absorb and not record:
            # Absorbed decoding through the decode kernels: MQA of [q_nope W_UK, q_rope] over the latent
            # cache [c, k_rope] (keys only, values = its first L channels), then W_UV on the latent output.
            dtype = q_nope.dtype
            q_latent = jnp.einsum("BTNH,LNH->BTNL", q_nope, self.w_uk[...].astype(dtype), precision=self.precision)
            query = jnp.concatenate([q_latent, q_rope.astype(dtype)], axis=-1)  # [B, T, N, L + R]
            entry = jnp.concatenate([latent, k_rope.astype(latent.dtype)], axis=-1)[:, :, None, :]  # [B, T, 1, L + R]
            scale = 1.0 / float(hn + self.qk_rope_head_dim) ** 0.5 if self.scale is None else self.scale
            out, cache = cached_attention(
                query, entry, None, cache, lengths=lengths, mask=mask, scale=scale, softcap=self.softcap,
                dropout_rate=self.dropout_rate, dropout_rng=dropout_rng, value_dim=lr,
                implementation=self.implementation if implementation is None else implementation,
            )  # fmt: skip
            out = jnp.einsum("BTNL,LNV->BTNV", out, self.w_uv[...].astype(dtype), precision=self.precision)
            return self.out(out), cache
        offsets = {}
        if cache is not None:
            entry = jnp.concatenate([latent, k_rope.astype(latent.dtype)], axis=-1)[:, :, None, :]  # [B, T, 1, L + R]
            cache, view = cache.update(entry, None, lengths=lengths)
            stored = view.keys[:, :, 0, :].astype(latent.dtype)  # [B, S, L + R]
            latent, k_rope = stored[..., :lr], stored[..., lr:]
            offsets = view.offsets()
        else:
            mask = _common.segmented(_common.padded(mask, lengths), segment_ids)
        out = latent_attention(
            q_nope,
            q_rope.astype(q_nope.dtype),
            latent.astype(q_nope.dtype),
            k_rope.astype(q_nope.dtype),
            self.w_uk[...],
            self.w_uv[...],
            absorb=absorb,
            mask=mask,
            scale=self.scale,
            softcap=self.softcap,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            implementation=self.implementation if implementation is None else implementation,
            precision=self.precision,
            return_weights=record,
            **offsets,
        )
        if record:
            out, weights = out
            values = None if dropout_rng is not None else latent_values(latent.astype(out.dtype), self.w_uv[...])
            out = recording.record(self, out, weights, values)
        y = self.out(out)  # [B, T, out_features]
        return y if cache is None else (y, cache)

    def cache_shape(self) -> tuple[int, int, int]:
        """The cache holds one "key" per token, ``[latent, k_rope]``, and no values."""
        return (1, self.kv_lora_rank + self.qk_rope_head_dim, 0)
