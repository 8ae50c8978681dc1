"""Low-rank attention modules: ``Linformer`` and ``Nystromformer`` (non-causal self-attention).

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> x = jnp.ones((2, 16, 32))
>>> Linformer(32, num_heads=4, max_length=16, projected_length=4, rngs=nnx.Rngs(0))(x).shape
(2, 16, 32)
>>> Nystromformer(32, num_heads=4, num_landmarks=4, rngs=nnx.Rngs(0))(x).shape
(2, 16, 32)
"""

from __future__ import annotations

import jax
from flax import nnx

from attention_jax.functional.lowrank import linformer_attention, nystrom_attention
from attention_jax.nn._common import check_features
from attention_jax.nn._heads import HeadProjections, positive_int

Array = jax.Array

__all__ = ["Linformer", "Nystromformer"]


class Linformer(nnx.Module):
    """Linformer self-attention: keys and values projected along the sequence by learned ``E, F [P, max_length]``.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      max_length: the longest sequence; a shorter one uses the first T columns of ``E`` and ``F``.
      projected_length: P, the length keys and values are projected to.
      share_projections: one matrix for keys and values (the paper's key-value sharing).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        max_length: int,
        projected_length: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        share_projections: bool = False,
        implementation: str | None = None,
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.max_length = positive_int("max_length", max_length)
        positive_int("projected_length", projected_length)
        init = nnx.initializers.normal(stddev=1.0 / max_length**0.5)
        shape = (projected_length, max_length)
        self.key_projection = nnx.Param(init(rngs.params(), shape))
        self.value_projection = nnx.data(None if share_projections else nnx.Param(init(rngs.params(), shape)))
        self.implementation = implementation

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        t = x.shape[1]
        if t > self.max_length:
            raise ValueError(f"sequence length T={t} exceeds the layer's max_length={self.max_length}.")
        q, k, v = self.heads(x)
        e = self.key_projection[...][:, :t]
        f = None if self.value_projection is None else self.value_projection[...][:, :t]
        out = linformer_attention(q, k, v, key_projection=e, value_projection=f, implementation=self.implementation)
        return self.heads.merge(out)


class Nystromformer(nnx.Module):
    """Nystromformer self-attention with ``num_landmarks`` segment-mean landmarks (m must divide T).

    Args:
      in_features, num_heads, num_kv_heads, head_dim: the usual multi-head sizes.
      num_landmarks: m.
      pinv_iterations: iterations of the Moore-Penrose approximation (6 in the paper).

    The paper's optional depthwise convolution on the values is left out.
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
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.num_landmarks = positive_int("num_landmarks", num_landmarks)
        self.pinv_iterations = positive_int("pinv_iterations", pinv_iterations)

    def __call__(self, x: Array) -> Array:
        check_features("x", x, self.heads.in_features)
        q, k, v = self.heads(x)
        out = nystrom_attention(q, k, v, num_landmarks=self.num_landmarks, pinv_iterations=self.pinv_iterations)
        return self.heads.merge(out)
