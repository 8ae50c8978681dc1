"""Linear-attention modules: ``LinearAttention``, ``FastWeightProgrammer`` (delta rule) and ``Performer``.

Each projects ``inputs_q [B, T, D]`` to queries ``[B, T, N, H]``, keys ``[B, S, K, H]`` and values
``[B, S, K, Hv]`` (``query``/``key``/``value``/``out`` with :class:`~attention_jax.nn.MultiHeadAttention`'s
kernel shapes), calls one functional op and projects ``[B, T, N, Hv]`` back to ``[B, T, out_features]``.
They implement :class:`attention_jax.nn.AttentionLayer`:

- ``mask``: ``None`` (the layer's ``causal``), ``masks.full()`` or ``masks.causal()`` (the causal form,
  whatever the constructor said: a decoder stack passes it); any other mask raises.
- ``positions``: accepted and ignored: these layers are position-free.
- ``segment_ids [B, T]``: packed documents; the state resets at each boundary (in the chunked and
  recurrent forms too), so a packed row equals its documents run one by one.
- ``lengths [B]``: right padding; padded keys contribute nothing (and are not absorbed into a cache).
- ``inputs_kv``: cross-attention for the non-causal ``LinearAttention`` and ``Performer``.
- ``cache``: :meth:`init_cache` returns a :class:`RecurrentCache`, the layer's constant-size recurrent
  state (``kind``, ``max_length``, ``quantized`` and ``dtype`` do not change it: it is float32 and never
  fills). Prefill a prompt, then decode token by token: the outputs equal the causal forward.
- ``deterministic``: accepted; there is no dropout here.
- ``record_weights``: sows the implicit attention weights ``[B, N, T, S]`` (float32): the normalised kernel
  matrix ``phi(q) phi(k)^T`` for linear attention and Performer, the exact matrix ``A`` with ``y = A v`` for
  the delta rule (see :func:`attention_jax.functional.delta_rule.delta_rule_weights`). Not with a cache:
  the state does not keep the keys.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> layer = LinearAttention(16, num_heads=2, causal=True, rngs=nnx.Rngs(0))
>>> x = jnp.ones((2, 6, 16))
>>> call = nnx.jit(lambda layer, x, cache=None, lengths=None: layer(x, cache=cache, lengths=lengths))
>>> call(layer, x).shape                                        # training: the chunked form
(2, 6, 16)
>>> cache = layer.init_cache(2, 8)
>>> y, cache = call(layer, x, cache, jnp.array([4, 6]))         # prefill right-padded prompts ...
>>> y, cache = call(layer, x[:, :1], cache)                     # ... then one token at a time
>>> y.shape, cache.state.kv.shape, cache.lengths.tolist()       # kv: [B, K, F, Hv], constant size
((2, 1, 16), (2, 2, 8, 8), [5, 7])
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax._pytree import register_dataclass
from attention_jax.functional.delta_rule import (
    FastWeightState,
    delta_rule_attention,
    delta_rule_weights,
    normalized_elu_feature_map,
)
from attention_jax.functional.linear import (
    FeatureMap,
    LinearAttentionState,
    check_chunk_size,
    check_implementation,
    elu_feature_map,
    linear_attention,
    linear_attention_weights,
)
from attention_jax.functional.performer import (
    PerformerState,
    orthogonal_random_features,
    performer_attention,
    performer_attention_weights,
)
from attention_jax.nn import _common, recording
from attention_jax.nn._heads import ProjectedHeads, positive_int
from attention_jax.nn.protocol import unsupported

Array = jax.Array

__all__ = ["LinearAttention", "FastWeightProgrammer", "Performer", "RandomFeatures", "RecurrentCache"]


class RandomFeatures(nnx.Variable):
    """Performer's random projection: state, not a trainable parameter (``nnx.Param`` filters skip it)."""


@register_dataclass
@dataclasses.dataclass(frozen=True)
class RecurrentCache:
    """The decoding cache of a recurrent layer: its constant-size state and the tokens it has read.

    ``state`` is the layer's state (``LinearAttentionState``, ``PerformerState`` or ``FastWeightState`` of
    the linear-attention layers, float32, one per key/value head; ``SSMState`` of Mamba and Mamba-2);
    ``lengths [B]`` int32 counts the real tokens absorbed per row. Its size does not grow with the sequence,
    so it never overflows.
    """

    state: Any
    lengths: Array

    def positions(self, num_new: int) -> Array:
        """Absolute positions ``[B, T]`` the next ``T = num_new`` tokens take (as a KV cache's)."""
        return self.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)

    def check(self) -> None:
        """Nothing to check: a constant-size state cannot overflow (``aj.generate`` checks every cache)."""

    def advanced(self, state: Any, num_tokens: int, lengths: Array | None) -> RecurrentCache:
        """The cache after a call that read ``num_tokens`` per row (``lengths [B]`` of them are real, if given)."""
        added = num_tokens if lengths is None else jnp.asarray(lengths, jnp.int32)
        return RecurrentCache(state, self.lengths + added)


def empty_cache(state: Any, batch_size: int, max_length: int, kind: str) -> RecurrentCache:
    """A :class:`RecurrentCache` holding ``state`` and no tokens, after checking the protocol's ``init_cache``
    options: a constant-size state accepts any ``kind`` and ``max_length`` (checked positive) and changes nothing."""
    _common.check_positive(batch_size=batch_size, max_length=max_length)
    if kind not in _common.CACHE_KINDS:
        raise ValueError(f"kind must be one of {_common.CACHE_KINDS}, got {kind=!r}.")
    return RecurrentCache(state, jnp.zeros((batch_size,), jnp.int32))


def check_cache(module, cache: Any, state_type: type, segment_ids, batch: int) -> None:
    """A decoding call's cache must be the ``RecurrentCache`` of the module's ``init_cache``, one row per sequence."""
    if segment_ids is not None:
        raise unsupported(module, "segment_ids with a cache", "a cache decodes one sequence per row")
    if not isinstance(cache, RecurrentCache) or not isinstance(cache.state, state_type):
        raise ValueError(
            f"{type(module).__name__} takes the RecurrentCache of its init_cache (holding a "
            f"{state_type.__name__}), got {type(cache).__name__}."
        )
    if cache.lengths.shape != (batch,):
        raise ValueError(
            f"{type(module).__name__}: the cache holds {cache.lengths.shape[0]} rows, inputs_q has B={batch}."
        )


class _Call(NamedTuple):
    causal: bool
    context: Array
    segment_ids: Array | None
    lengths: Array | None
    record: bool


class _RecurrentHeads(ProjectedHeads):
    """The protocol plumbing the three layers share: argument checks, the cache, recording."""

    cross_attention = False  # whether a non-causal call may take inputs_kv
    causal_only = False
    state_type: type = LinearAttentionState

    def empty_state(self, batch_size: int):
        raise NotImplementedError

    def init_cache(
        self, batch_size: int, max_length: int, *, kind: str = "dense", quantized: bool = False, dtype=None, **options
    ) -> RecurrentCache:
        """The empty :class:`RecurrentCache` for ``batch_size`` rows.

        The state has a constant size: ``max_length`` (checked positive), ``kind`` (any of the
        protocol's kinds), ``quantized``, ``dtype`` and the other options (``page_size``, ...) are
        accepted so that a stack can ask every layer alike, and change nothing (float32 state).
        """
        return empty_cache(self.empty_state(batch_size), batch_size, max_length, kind)

    def feature_dim(self, feature_map: FeatureMap | None) -> int:
        """F, the width ``feature_map`` gives a head of H (probed abstractly)."""
        probe = jax.ShapeDtypeStruct((self.head_dim,), jnp.float32)
        return jax.eval_shape(feature_map or (lambda z: z), probe).shape[-1]

    def _prepare(self, inputs_q, inputs_kv, mask, segment_ids, lengths, cache) -> _Call:
        """Check the call's arguments against the protocol; what this layer cannot honour raises."""
        _common.check_features("inputs_q", inputs_q, self.in_features)
        causal = _common.causal_from_mask(self, mask, default=self.causal)
        if self.causal_only and not causal:
            raise unsupported(self, "mask", f"it is causal only, got mask={mask!r}")
        if inputs_kv is not None:
            if causal or not self.cross_attention:
                why = "it is causal self-attention" if causal else "it is self-attention only"
                raise unsupported(self, "inputs_kv", why)
            _common.check_features("inputs_kv", inputs_kv, self.in_features)
            if inputs_kv.shape[0] != inputs_q.shape[0]:
                raise ValueError(f"inputs_q and inputs_kv must share B, got {inputs_q.shape} and {inputs_kv.shape}.")
            for name, value in (("segment_ids", segment_ids), ("lengths", lengths)):
                if value is not None:
                    raise unsupported(self, name, "it packs or pads self-attention only")
        if cache is not None:
            self._check_cache(cache, causal, segment_ids, inputs_q.shape[0])
        segment_ids = _common.check_segment_ids(segment_ids, inputs_q)
        _common.check_lengths(self, lengths, inputs_q)
        record = recording.should_record(None, self.record_weights)
        if record and cache is not None:
            raise unsupported(self, "record_weights with a cache", "the state does not keep the earlier keys")
        context = inputs_q if inputs_kv is None else inputs_kv
        return _Call(causal, context, segment_ids, lengths, record)

    def _check_cache(self, cache, causal: bool, segment_ids, batch: int) -> None:
        if not causal:
            raise unsupported(
                self, "cache", "a cache decodes the causal form; build with causal=True or pass mask=masks.causal()"
            )
        check_cache(self, cache, self.state_type, segment_ids, batch)

    def _finish(self, result, value: Array, weights, call: _Call, cache, num_tokens: int):
        """Record (``weights`` is a thunk), project back, and return ``y`` or ``(y, new cache)``."""
        out, state = result if cache is not None else (result, None)
        if call.record:
            out = recording.record(self, out, weights(), value)
        y = self.merge(out)  # [B, T, out_features]
        if cache is None:
            return y
        return y, cache.advanced(state, num_tokens, call.lengths)


class LinearAttention(_RecurrentHeads):
    """Multi-head linear attention (Katharopoulos et al., 2020) over one call of ``linear_attention``.

    ``inputs_q [B, T, D]`` (and ``inputs_kv [B, S, D]`` for non-causal cross-attention) to
    ``[B, T, out_features]``; see the module docstring for the protocol's arguments.

    Args:
      in_features: model width D.
      num_heads: N query heads; ``num_kv_heads`` K (divides N), ``head_dim`` H, ``value_head_dim`` Hv,
        ``out_features``, ``use_bias``, ``dtype``, ``param_dtype`` as in ``MultiHeadAttention``.
      feature_map: ``phi`` (default ``elu(x) + 1``); any positive elementwise map works.
      causal: the default form (``mask=masks.causal()`` or ``full()`` overrides it per call).
      implementation: ``"parallel"``, ``"chunked"`` or ``"recurrent"`` (see the functional op); None
        picks ``"chunked"`` for causal or packed calls, else ``"parallel"``.
      chunk_size: positions per chunk of the chunked form.
      eps: added to the denominator.
      record_weights: sow the implicit attention weights (see :mod:`attention_jax.nn.recording`).
    """

    cross_attention = True

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        feature_map: FeatureMap = elu_feature_map,
        causal: bool = False,
        implementation: str | None = None,
        chunk_size: int = 64,
        eps: float = 1e-6,
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
        self.feature_map, self.causal, self.eps = feature_map, causal, eps
        check_implementation(implementation, causal)  # validated now, resolved per call (causal may change)
        self.implementation, self.chunk_size = implementation, check_chunk_size(chunk_size)
        self.record_weights = record_weights

    def empty_state(self, batch_size: int) -> LinearAttentionState:
        f = self.feature_dim(self.feature_map)
        return LinearAttentionState.zeros(batch_size, self.num_kv_heads, f, self.value_head_dim)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: RecurrentCache | None = None,
        deterministic: bool | None = None,
    ):
        """``y [B, T, out_features]``, or ``(y, cache)`` with a cache (see the module docstring)."""
        call = self._prepare(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        q, k, v = self.queries(inputs_q), self.keys(call.context), self.values(call.context)
        options = dict(
            feature_map=self.feature_map, causal=call.causal, eps=self.eps, segment_ids=call.segment_ids,
            lengths=call.lengths,
        )  # fmt: skip
        result = linear_attention(
            q, k, v, implementation=self.implementation, chunk_size=self.chunk_size,
            state=None if cache is None else cache.state, return_state=cache is not None, **options,
        )  # fmt: skip
        weights = lambda: linear_attention_weights(q, k, **options)  # noqa: E731
        return self._finish(result, v, weights, call, cache, inputs_q.shape[1])


class FastWeightProgrammer(_RecurrentHeads):
    """Delta-rule fast weight programmer (Schlag et al., 2021): causal, with a learned per-token ``beta``.

    ``beta_t = sigmoid(W_beta x_t)`` per key/value head; keys and queries go through ``feature_map`` (default:
    sum-normalised ``elu + 1``). See :func:`attention_jax.functional.delta_rule.delta_rule_attention`.
    Causal only: ``mask=masks.full()`` and ``inputs_kv`` raise. The recorded weights are the exact
    matrix ``A`` with ``y = A v`` (signed; rows need not sum to one).

    Args:
      in_features, num_heads, num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype,
        param_dtype, record_weights: as in ``LinearAttention``.
      feature_map: ``phi`` for queries and keys (None: use them as they are).
      implementation: ``"chunked"`` (default) or ``"recurrent"``; chunk_size: tokens per chunk.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = FastWeightProgrammer(8, num_heads=2, chunk_size=4, rngs=nnx.Rngs(0))
    >>> x = jnp.ones((1, 6, 8))
    >>> call = nnx.jit(lambda layer, x, segment_ids=None, cache=None: layer(x, segment_ids=segment_ids, cache=cache))
    >>> call(layer, x, jnp.array([[0, 0, 0, 1, 1, 1]])).shape           # two packed documents
    (1, 6, 8)
    >>> y, cache = call(layer, x, cache=layer.init_cache(1, 16))
    >>> cache.state.weights.shape                                       # W: [B, K, F, Hv]
    (1, 2, 4, 4)
    """

    causal_only = True
    state_type = FastWeightState

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        feature_map: FeatureMap | None = normalized_elu_feature_map,
        implementation: str = "chunked",
        chunk_size: int = 64,
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
        self.beta = nnx.Linear(in_features, self.num_kv_heads, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if implementation not in ("chunked", "recurrent"):
            raise ValueError(f"implementation must be 'chunked' or 'recurrent', got {implementation=!r}.")
        self.feature_map, self.implementation, self.causal = feature_map, implementation, True
        self.chunk_size = check_chunk_size(chunk_size)
        self.record_weights = record_weights

    def empty_state(self, batch_size: int) -> FastWeightState:
        f = self.feature_dim(self.feature_map)
        return FastWeightState.zeros(batch_size, self.num_kv_heads, f, self.value_head_dim)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: RecurrentCache | None = None,
        deterministic: bool | None = None,
    ):
        """``y [B, T, out_features]``, or ``(y, cache)`` with a cache (see the module docstring)."""
        call = self._prepare(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        q, k, v = self.project(inputs_q)
        beta = jax.nn.sigmoid(self.beta(inputs_q))  # [B, T, K]
        options = dict(feature_map=self.feature_map, segment_ids=call.segment_ids, lengths=call.lengths)
        result = delta_rule_attention(
            q, k, v, beta, implementation=self.implementation, chunk_size=self.chunk_size,
            state=None if cache is None else cache.state, return_state=cache is not None, **options,
        )  # fmt: skip
        weights = lambda: delta_rule_weights(q, k, beta, **options)  # noqa: E731
        return self._finish(result, v, weights, call, cache, inputs_q.shape[1])


class Performer(_RecurrentHeads):
    """Performer (FAVOR+) attention: softmax attention estimated with M orthogonal random features.

    Args:
      in_features, num_heads, num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype,
        param_dtype, record_weights: as in ``LinearAttention``.
      num_features: M (default ``round(H log H)``, at least H, the paper's choice); must be positive.
      causal, implementation, chunk_size: as in ``LinearAttention`` (non-causal calls may cross-attend).

    The projection is a ``RandomFeatures`` variable drawn at construction; ``redraw(key)`` draws a new one.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> layer = Performer(16, num_heads=2, num_features=32, rngs=nnx.Rngs(0))
    >>> cross = nnx.jit(lambda layer, x, context: layer(x, context))                     # cross-attention
    >>> layer.projection.shape, cross(layer, jnp.ones((1, 5, 16)), jnp.ones((1, 7, 16))).shape
    ((32, 8), (1, 5, 16))
    """

    cross_attention = True
    state_type = PerformerState

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        num_features: int | None = None,
        causal: bool = False,
        implementation: str | None = None,
        chunk_size: int = 64,
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
        h = self.head_dim
        if num_features is None:
            num_features = max(h, round(h * math.log(h)))
        self.num_features = positive_int("num_features", num_features)
        self.causal = causal
        check_implementation(implementation, causal)  # validated now, resolved per call (causal may change)
        self.implementation, self.chunk_size = implementation, check_chunk_size(chunk_size)
        self.record_weights = record_weights
        self.projection = RandomFeatures(orthogonal_random_features(rngs.params(), self.num_features, h))

    def redraw(self, key: Array) -> None:
        """Draw a fresh random projection (the paper redraws during training)."""
        self.projection[...] = orthogonal_random_features(key, self.num_features, self.head_dim)

    def empty_state(self, batch_size: int) -> PerformerState:
        return PerformerState.zeros(batch_size, self.num_kv_heads, self.num_features, self.value_head_dim)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: RecurrentCache | None = None,
        deterministic: bool | None = None,
    ):
        """``y [B, T, out_features]``, or ``(y, cache)`` with a cache (see the module docstring)."""
        call = self._prepare(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        q, k, v = self.queries(inputs_q), self.keys(call.context), self.values(call.context)
        options = dict(
            projection=self.projection[...], causal=call.causal, segment_ids=call.segment_ids, lengths=call.lengths
        )
        result = performer_attention(
            q, k, v, implementation=self.implementation, chunk_size=self.chunk_size,
            state=None if cache is None else cache.state, return_state=cache is not None, **options,
        )  # fmt: skip
        weights = lambda: performer_attention_weights(q, k, **options)  # noqa: E731
        return self._finish(result, v, weights, call, cache, inputs_q.shape[1])
