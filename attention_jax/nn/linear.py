"""Linear-attention modules: ``LinearAttention``, ``FastWeightProgrammer`` (delta rule) and ``Performer``.

Each projects ``x [B, T, D]`` to heads, calls one functional op and projects back. Causal layers decode: pass
``state=`` (from ``init_state``) and get ``(y, new_state)`` back, one token or a whole prefix at a time.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> layer = LinearAttention(16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
>>> x = jnp.ones((1, 6, 16))
>>> layer(x).shape                                            # training: the chunked form
(1, 6, 16)
>>> y, state = layer(x[:, :1], state=layer.init_state(1))      # decoding: one token, state carried
>>> y.shape, state.kv.shape                                   # kv: [B, K, F, Hv]
((1, 1, 16), (1, 2, 8, 8))
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from attention_jax.functional.delta_rule import FastWeightState, delta_rule_attention, normalized_elu_feature_map
from attention_jax.functional.linear import (
    FeatureMap,
    LinearAttentionState,
    check_chunk_size,
    check_implementation,
    elu_feature_map,
    linear_attention,
)
from attention_jax.functional.performer import PerformerState, orthogonal_random_features, performer_attention
from attention_jax.nn._common import check_features
from attention_jax.nn._heads import HeadProjections, positive_int

Array = jax.Array

__all__ = ["LinearAttention", "FastWeightProgrammer", "Performer", "RandomFeatures"]


class RandomFeatures(nnx.Variable):
    """Performer's random projection: state, not a trainable parameter (``nnx.Param`` filters skip it)."""


def _finish(heads: HeadProjections, result, state):
    if state is None:
        return heads.merge(result)
    out, new_state = result
    return heads.merge(out), new_state


class LinearAttention(nnx.Module):
    """Multi-head linear attention (Katharopoulos et al., 2020) over one call of ``linear_attention``.

    Args:
      in_features: model width D.
      num_heads: N query heads; ``num_kv_heads`` K (divides N) and ``head_dim`` H as usual.
      feature_map: ``phi`` (default ``elu(x) + 1``); any positive elementwise map works.
      causal: causal attention (then ``state=`` decodes).
      implementation: ``"parallel"``, ``"chunked"`` or ``"recurrent"`` (see the functional op).
      chunk_size: positions per chunk of the chunked form.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        feature_map: FeatureMap = elu_feature_map,
        causal: bool = False,
        implementation: str | None = None,
        chunk_size: int = 64,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.feature_map, self.causal, self.eps = feature_map, causal, eps
        self.implementation = check_implementation(implementation, causal)
        self.chunk_size = check_chunk_size(chunk_size)

    def init_state(self, batch_size: int) -> LinearAttentionState:
        """The empty decoding state (feature dimension from ``feature_map`` on a probe of width H)."""
        h = self.heads.head_dim
        features = jax.eval_shape(self.feature_map, jax.ShapeDtypeStruct((h,), "float32")).shape[-1]
        return LinearAttentionState.zeros(batch_size, self.heads.num_kv_heads, features, self.heads.value_head_dim)

    def __call__(self, x: Array, *, state: LinearAttentionState | None = None):
        check_features("x", x, self.heads.in_features)
        if state is not None and not self.causal:
            raise ValueError("state= decodes causal attention; this layer has causal=False.")
        q, k, v = self.heads(x)
        result = linear_attention(
            q,
            k,
            v,
            feature_map=self.feature_map,
            causal=self.causal,
            implementation=self.implementation,
            chunk_size=self.chunk_size,
            eps=self.eps,
            state=state,
            return_state=state is not None,
        )
        return _finish(self.heads, result, state)


class FastWeightProgrammer(nnx.Module):
    """Delta-rule fast weight programmer (Schlag et al., 2021): causal, with a learned per-token ``beta``.

    ``beta_t = sigmoid(W_beta x_t)`` per key/value head; keys and queries go through ``feature_map`` (default:
    sum-normalised ``elu + 1``). See :func:`attention_jax.functional.delta_rule.delta_rule_attention`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = FastWeightProgrammer(8, num_heads=2, chunk_size=4, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((1, 6, 8))).shape
    (1, 6, 8)
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        feature_map: FeatureMap | None = normalized_elu_feature_map,
        implementation: str = "chunked",
        chunk_size: int = 64,
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        self.beta = nnx.Linear(in_features, self.heads.num_kv_heads, rngs=rngs)
        if implementation not in ("chunked", "recurrent"):
            raise ValueError(f"implementation must be 'chunked' or 'recurrent', got {implementation=!r}.")
        self.feature_map, self.implementation = feature_map, implementation
        self.chunk_size = check_chunk_size(chunk_size)

    def init_state(self, batch_size: int) -> FastWeightState:
        h = self.heads.head_dim
        fm = self.feature_map or (lambda z: z)
        features = jax.eval_shape(fm, jax.ShapeDtypeStruct((h,), "float32")).shape[-1]
        return FastWeightState.zeros(batch_size, self.heads.num_kv_heads, features, self.heads.value_head_dim)

    def __call__(self, x: Array, *, state: FastWeightState | None = None):
        check_features("x", x, self.heads.in_features)
        q, k, v = self.heads(x)
        result = delta_rule_attention(
            q,
            k,
            v,
            jax.nn.sigmoid(self.beta(x)),
            feature_map=self.feature_map,
            implementation=self.implementation,
            chunk_size=self.chunk_size,
            state=state,
            return_state=state is not None,
        )
        return _finish(self.heads, result, state)


class Performer(nnx.Module):
    """Performer (FAVOR+) self-attention: softmax attention estimated with M orthogonal random features.

    Args:
      in_features, num_heads, num_kv_heads, head_dim: as in ``LinearAttention``.
      num_features: M (default ``round(H log H)``, at least H, the paper's choice); must be positive.
      causal, implementation, chunk_size: as in ``LinearAttention``.

    The projection is a ``RandomFeatures`` variable drawn at construction; ``redraw(key)`` draws a new one.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = Performer(16, num_heads=2, num_features=32, rngs=nnx.Rngs(0))
    >>> layer.projection.shape, layer(jnp.ones((1, 5, 16))).shape
    ((32, 8), (1, 5, 16))
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        num_features: int | None = None,
        causal: bool = False,
        implementation: str | None = None,
        chunk_size: int = 64,
        rngs: nnx.Rngs,
    ):
        self.heads = HeadProjections(in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rngs=rngs)
        h = self.heads.head_dim
        if num_features is None:
            num_features = max(h, round(h * math.log(h)))
        self.num_features = positive_int("num_features", num_features)
        self.causal = causal
        self.implementation = check_implementation(implementation, causal)
        self.chunk_size = check_chunk_size(chunk_size)
        self.projection = RandomFeatures(orthogonal_random_features(rngs.params(), self.num_features, h))

    def redraw(self, key: Array) -> None:
        """Draw a fresh random projection (the paper redraws during training)."""
        self.projection[...] = orthogonal_random_features(key, self.num_features, self.heads.head_dim)

    def init_state(self, batch_size: int) -> PerformerState:
        return PerformerState.zeros(batch_size, self.heads.num_kv_heads, self.num_features, self.heads.value_head_dim)

    def __call__(self, x: Array, *, state: PerformerState | None = None):
        check_features("x", x, self.heads.in_features)
        if state is not None and not self.causal:
            raise ValueError("state= decodes causal attention; this layer has causal=False.")
        q, k, v = self.heads(x)
        result = performer_attention(
            q,
            k,
            v,
            projection=self.projection[...],
            causal=self.causal,
            implementation=self.implementation,
            chunk_size=self.chunk_size,
            state=state,
            return_state=state is not None,
        )
        return _finish(self.heads, result, state)
