"""``DifferentialAttention``: the Diff Transformer's difference of two softmax maps."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax import positional
from attention_jax.functional import differential as differential_lib
from attention_jax.functional.cached import cached_attention
from attention_jax.nn import _common, recording

Array = jax.Array


class DifferentialAttention(_common.CacheMixin, nnx.Module):
    """Differential attention (Ye et al., 2024) over ``functional.differential.differential_attention``.

    Each head has two query/key halves ``q1, q2 [H]``, ``k1, k2 [H]`` and a value of ``2 H``:
    ``(softmax(q1 k1) - lambda softmax(q2 k2)) v``, then a per-head RMSNorm (the paper's GroupNorm
    over heads) and the fixed scale ``(1 - lambda_init)``. ``lambda = exp(lq1 . lk1) -
    exp(lq2 . lk2) + lambda_init`` with learned ``[H]`` vectors and ``lambda_init = 0.8 - 0.6 *
    exp(-0.3 * (depth - 1))`` for the layer's 1-based ``depth``.

    Args:
      in_features: D.
      num_heads: N; num_kv_heads: K (GQA, default N).
      head_dim: H of each half, default ``in_features // num_heads // 2`` (the paper keeps the
        parameter count of a standard layer with N heads of 2H).
      depth: 1-based index of the layer (sets ``lambda_init``); ``lambda_init`` overrides it.
      rope, mask, sliding_window, softcap, scale, dropout_rate, deterministic, implementation,
      record_weights: as in :class:`attention_jax.nn.MultiHeadAttention`; the recorded weights are
        the differential map ``w1 - lambda * w2``.
      norm_epsilon, out_features, use_bias, dtype, param_dtype, precision, kernel_init, rngs: as usual.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> layer = aj.nn.DifferentialAttention(32, num_heads=2, depth=3, mask=aj.masks.causal(), rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 4, 32))).shape, round(layer.lambda_init, 4)
    ((1, 4, 32), 0.4707)
    """

    def __init__(
        self,
        in_features: int,
        *,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        depth: int = 1,
        lambda_init: float | None = None,
        out_features: int | None = None,
        rope: positional.RoPE | None = None,
        mask: masks_lib.Mask | Array | None = None,
        sliding_window: int | None = None,
        softcap: float | None = None,
        scale: float | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        norm_epsilon: float = 1e-5,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        precision: Any = None,
        kernel_init: Any = _common.default_kernel_init,
        implementation: str | None = None,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        head_dim = in_features // num_heads // 2 if head_dim is None else head_dim
        _common.check_positive(
            in_features=in_features, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim
        )
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}.")
        self.in_features, self.num_heads, self.num_kv_heads, self.head_dim = (
            in_features,
            num_heads,
            num_kv_heads,
            head_dim,
        )
        self.out_features = in_features if out_features is None else out_features
        self.depth = depth
        self.lambda_init = differential_lib.lambda_init(depth) if lambda_init is None else float(lambda_init)
        self.rope, self.softcap, self.scale = rope, softcap, scale
        self.mask = _common.as_attribute(mask)
        self.sliding_window = sliding_window
        self.dropout_rate, self.deterministic = dropout_rate, deterministic
        self.dtype, self.param_dtype = dtype, param_dtype
        self.implementation, self.record_weights = implementation, record_weights

        dense = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
            rngs=rngs,
        )  # fmt: skip
        self.query = nnx.LinearGeneral(in_features, (num_heads, 2, head_dim), **dense)
        self.key = nnx.LinearGeneral(in_features, (num_kv_heads, 2, head_dim), **dense)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, 2 * head_dim), **dense)
        self.out = nnx.LinearGeneral((num_heads, 2 * head_dim), self.out_features, axis=(-2, -1), **dense)
        self.head_norm = nnx.RMSNorm(
            2 * head_dim, epsilon=norm_epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        init = nnx.initializers.normal(0.1)
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nnx.Param(init(rngs.params(), (head_dim,), param_dtype)) for _ in range(4)
        )
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
        deterministic: bool | None = None,
        implementation: str | None = None,
        record_weights: bool | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        """Self-attention over ``inputs [B, T, D]``; arguments as in ``MultiHeadAttention.__call__``."""
        _common.check_features("inputs", inputs, self.in_features)
        h = self.head_dim
        query = self.query(inputs)  # [B, T, N, 2, H]
        key = self.key(inputs)  # [B, T, K, 2, H]
        value = self.value(inputs)  # [B, T, K, 2H]
        pos, segment_ids = _common.self_attention_positions(self, inputs, inputs_kv, positions, segment_ids, cache)
        q1, q2, k1, k2 = query[..., 0, :], query[..., 1, :], key[..., 0, :], key[..., 1, :]
        if self.rope is not None:
            q1, q2, k1, k2 = (_common.rotate(self.rope, x, pos) for x in (q1, q2, k1, k2))

        mask = _common.layer_mask(self.mask if mask is None else mask, self.sliding_window)
        lam = differential_lib.differential_lambda(
            self.lambda_q1[...], self.lambda_k1[...], self.lambda_q2[...], self.lambda_k2[...], self.lambda_init
        )
        record = recording.should_record(record_weights, self.record_weights)
        dropout_rng = _common.dropout_key(self, deterministic, rngs)
        if cache is not None and not record and dropout_rng is None:
            out, cache = self._decode(q1, q2, k1, k2, value, lam, cache, lengths, mask, implementation)
            return self.out(self.head_norm(out) * (1.0 - self.lambda_init)), cache
        offsets = {}
        if cache is not None:
            cache, view = cache.update(jnp.concatenate([k1, k2], axis=-1), value, lengths=lengths)  # [B, T, K, 2H]
            k1, k2 = view.keys[..., :h].astype(q1.dtype), view.keys[..., h:].astype(q1.dtype)
            value = view.values.astype(q1.dtype)
            offsets = view.offsets()
        else:
            mask = _common.segmented(_common.padded(mask, lengths), segment_ids)
        out = differential_lib.differential_attention(
            q1,
            q2,
            k1,
            k2,
            value,
            lam,
            mask=mask,
            scale=self.scale,
            softcap=self.softcap,
            dropout_rate=self.dropout_rate,
            dropout_rng=dropout_rng,
            implementation=self.implementation if implementation is None else implementation,
            return_weights=record,
            **offsets,
        )  # [B, T, N, 2H]
        if record:  # the differential map applied to v is the output: w1 v - lam w2 v
            out, weights = out
            out = recording.record(self, out, weights, value if dropout_rng is None else None)
        out = self.head_norm(out) * (1.0 - self.lambda_init)
        y = self.out(out)  # [B, T, out_features]
        return y if cache is None else (y, cache)

    def _decode(self, q1, q2, k1, k2, value, lam, cache, lengths, mask, implementation):
        """Both maps in one pass over the cache: for each K/V head its ``G`` rows of ``[q1, 0]`` and ``G`` rows
        of ``[0, q2]`` against the stored ``[k1, k2]`` (``2G`` query heads per K/V head, K/V read once)."""
        b, t, n, h = q1.shape
        k, g = self.num_kv_heads, n // self.num_kv_heads
        zeros = jnp.zeros_like(q1)
        pair = jnp.stack([jnp.concatenate([q1, zeros], -1), jnp.concatenate([zeros, q2], -1)], axis=3)  # [B,T,N,2,2H]
        query = pair.reshape(b, t, k, g, 2, 2 * h).swapaxes(3, 4).reshape(b, t, 2 * n, 2 * h)  # head k * 2G + m * G + g
        out, cache = cached_attention(
            query, jnp.concatenate([k1, k2], axis=-1), value, cache, lengths=lengths, mask=mask,
            scale=1.0 / float(h) ** 0.5 if self.scale is None else self.scale, softcap=self.softcap,
            implementation=self.implementation if implementation is None else implementation,
        )  # fmt: skip
        out = out.reshape(b, t, k, 2, g, -1).astype(jnp.float32)  # [B, T, K, 2, G, 2H]
        first, second = out[:, :, :, 0].reshape(b, t, n, -1), out[:, :, :, 1].reshape(b, t, n, -1)
        lam_out = lam if lam.ndim == 0 else lam[:, None]
        return (first - lam_out * second).astype(q1.dtype), cache

    def cache_shape(self) -> tuple[int, int, int]:
        """The cache holds ``[k1, k2]`` and ``v`` per token and K/V head."""
        return (self.num_kv_heads, 2 * self.head_dim, 2 * self.head_dim)
