"""Low-rank attention modules: ``Linformer`` and ``Nystromformer`` (bidirectional attention).

Both follow :class:`~attention_jax.nn.AttentionLayer` with MultiHeadAttention's projections
(``query [D, N, H]``, ``key [D, K, H]``, ``value [D, K, Hv]``, ``out [N, Hv, D]``):
``inputs_q [B, T, D]`` (and ``inputs_kv [B, S, D]`` for cross-attention) to ``[B, T, out_features]``.
Each key they attend to mixes the whole sequence, so they honour only a bidirectional mask
(``None`` / ``masks.full()``) and refuse ``masks.causal()``, ``segment_ids`` and caches (they
cannot decode) with the protocol's ``ValueError``; ``positions`` are accepted and ignored (no
positional parts).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> x = jnp.ones((2, 16, 32))
>>> call = nnx.jit(lambda layer, *inputs: layer(*inputs))                  # one program per shape
>>> call(Linformer(32, num_heads=4, max_length=16, projected_length=4, rngs=nnx.Rngs(0)), x).shape
(2, 16, 32)
>>> call(Nystromformer(32, num_heads=4, num_landmarks=4, rngs=nnx.Rngs(0)), x, jnp.ones((2, 8, 32))).shape
(2, 16, 32)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax.functional.lowrank import linformer_attention, nystrom_attention
from attention_jax.nn import _common, recording
from attention_jax.nn._heads import ProjectedHeads, positive_int
from attention_jax.nn.protocol import unsupported

Array = jax.Array

__all__ = ["Linformer", "Nystromformer"]


class _Bidirectional(ProjectedHeads):
    """The protocol checks the two low-rank layers share: what they refuse, and the context they read."""

    def _context(self, inputs_q, inputs_kv, mask, segment_ids, lengths, cache) -> Array:
        """Check the call; returns the keys' input ``[B, S, D]`` (``inputs_q`` for self-attention)."""
        _common.check_features("inputs_q", inputs_q, self.in_features)
        if _common.causal_from_mask(self, mask, default=False):
            raise unsupported(self, "mask=causal()", "each of its keys mixes the whole sequence, the future included")
        if segment_ids is not None:
            raise unsupported(self, "segment_ids", "each of its keys mixes the whole sequence, across documents")
        if cache is not None:
            raise unsupported(self, "cache", "it is bidirectional and cannot decode")
        if inputs_kv is None:
            return inputs_q
        _common.check_features("inputs_kv", inputs_kv, self.in_features)
        if inputs_kv.shape[0] != inputs_q.shape[0]:
            raise ValueError(f"inputs_q and inputs_kv must share B, got {inputs_q.shape} and {inputs_kv.shape}.")
        if lengths is not None:
            raise ValueError(f"{type(self).__name__}: lengths pads self-attention; cross-attention takes no lengths.")
        return inputs_kv

    def init_cache(self, batch_size: int, max_length: int, **options: Any):
        """Always raises: the layer is bidirectional, a token's output depends on later tokens."""
        raise ValueError(
            f"{type(self).__name__} cannot decode: each of its keys mixes the whole sequence, so a token's output "
            "depends on later tokens (init_cache has nothing to hold)."
        )

    def _finish(self, out, value: Array) -> Array:
        """Record the implicit weights if asked (``out`` is then ``(out, weights)``) and project out."""
        if isinstance(out, tuple):
            out, weights = out
            out = recording.record(self, out, weights, value)
        return self.merge(out)  # [B, T, out_features]


class Linformer(_Bidirectional):
    """Linformer: keys and values projected along the sequence by learned ``E, F [P, max_length]``.

    Args:
      in_features, num_heads: D and N.
      max_length: the longest key sequence S; a shorter one uses the first S columns of ``E`` and ``F``.
      projected_length: P, the length keys and values are projected to.
      share_projections: one matrix for keys and values (the paper's key-value sharing).
      num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype, param_dtype: the
        projections, as in ``MultiHeadAttention``.
      implementation: passed to ``dot_product_attention`` (over the P projected keys).
      record_weights: record the implicit weights ``softmax(Q (E K)^T) F`` ``[B, N, T, S]``.
      rngs: ``nnx.Rngs`` for the parameters.

    Call: see :class:`~attention_jax.nn.AttentionLayer`. ``lengths [B]`` is honoured exactly: padded
    keys and values are zeroed before the projection, so a padded row equals its real tokens run
    alone. Cross-attention (``inputs_kv [B, S, D]``, ``S <= max_length``) projects the context's keys.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        max_length: int,
        projected_length: int,
        share_projections: bool = False,
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
            out_features=out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.max_length = positive_int("max_length", max_length)
        positive_int("projected_length", projected_length)
        init = nnx.initializers.normal(stddev=1.0 / max_length**0.5)
        shape = (projected_length, max_length)
        self.key_projection = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.value_projection = nnx.data(
            None if share_projections else nnx.Param(init(rngs.params(), shape, param_dtype))
        )
        self.implementation, self.record_weights = implementation, record_weights

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
    ) -> Array:
        """``[B, T, D] -> [B, T, out_features]``; see the class docstring for what it honours."""
        context = self._context(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        s = context.shape[1]
        if s > self.max_length:
            raise ValueError(f"Linformer: key length S={s} exceeds the layer's max_length={self.max_length}.")
        q, k, v = self.queries(inputs_q), self.keys(context), self.values(context)  # [B, T, N, H], [B, S, K, H|Hv]
        e = self.key_projection[...][:, :s]  # [P, S]
        f = None if self.value_projection is None else self.value_projection[...][:, :s]
        kv_valid = None if lengths is None else jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]  # [B, S]
        out = linformer_attention(
            q, k, v, key_projection=e, value_projection=f, kv_valid=kv_valid, implementation=self.implementation,
            return_weights=recording.should_record(None, self.record_weights),
        )  # fmt: skip
        return self._finish(out, v)


class Nystromformer(_Bidirectional):
    """Nystromformer self-attention with ``num_landmarks`` segment-mean landmarks (m must divide T and S).

    Args:
      in_features, num_heads: D and N.
      num_landmarks: m.
      pinv_iterations: iterations of the Moore-Penrose approximation (6 in the paper).
      num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype, param_dtype: the
        projections, as in ``MultiHeadAttention``.
      record_weights: record the implicit weights ``[B, N, T, S]`` of the Nystrom factorisation.
      rngs: ``nnx.Rngs`` for the parameters.

    Call: see :class:`~attention_jax.nn.AttentionLayer`. It also refuses ``lengths``: its landmarks
    are means over whole segments of the sequence, padding included, so padding would change the
    real outputs. Cross-attention takes ``inputs_kv [B, S, D]`` with m dividing S. The paper's
    optional depthwise convolution on the values is left out.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_landmarks: int,
        pinv_iterations: int = 6,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        self.init_projections(
            in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, value_head_dim=value_head_dim,
            out_features=out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        self.num_landmarks = positive_int("num_landmarks", num_landmarks)
        self.pinv_iterations = positive_int("pinv_iterations", pinv_iterations)
        self.record_weights = record_weights

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
    ) -> Array:
        """``[B, T, D] -> [B, T, out_features]``; see the class docstring for what it honours."""
        context = self._context(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        if lengths is not None:
            raise unsupported(
                self, "lengths", "its landmarks are means over whole segments, padding included, so padding would "
                "change the real outputs",
            )  # fmt: skip
        q, k, v = self.queries(inputs_q), self.keys(context), self.values(context)
        out = nystrom_attention(
            q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations,
            return_weights=recording.should_record(None, self.record_weights),
        )  # fmt: skip
        return self._finish(out, v)
