"""Mamba (Gu & Dao, 2023) and Mamba-2 (Dao & Gu, 2024) as layers of the attention-layer protocol: they drop
into any stack, next to attention layers.

A Mamba-2 layer maps ``x [B, T, D]`` to ``[B, T, out_features]`` the way the paper's block does:

    z, xbc, dt = in_proj(x)                       # gate [B, T, E], conv input [B, T, E + 2 K F], steps [B, T, N]
    xbc = silu(causal_conv1d(xbc))                # a short depthwise causal convolution (width 4)
    x, b, c = split(xbc)                          # x [B, T, N, H], b, c [B, T, K, F]
    y = selective_scan(x, softplus(dt + dt_bias), -exp(A_log), b, c, D)   # the SSD scan, state in float32
    out = out_proj(rms_norm(y * silu(z)))         # gated RMS norm over groups of E / K channels

with ``E = expand * D`` inner channels in ``N = E / H`` heads. :class:`Mamba` is the first version: ``x`` and the
gate ``z`` from the in-projection, the convolution over ``x`` only, ``b``, ``c`` and a low-rank ``dt`` projected
from the convolved ``x``, a decay per channel and state entry (``A [E, F]``), and ``y * silu(z)`` without a
norm.

Both are causal by construction: ``mask`` may be None or ``masks.causal()``, and ``inputs_kv`` raises. Packed
documents (``segment_ids``) reset the convolution's window and the scan's state; ``lengths`` leaves the cache
after each row's last real token; positions are not read. ``init_cache`` holds the convolution's last ``W - 1``
inputs and the scan state (an :class:`SSMState` in a ``RecurrentCache``), a constant size whatever ``max_length``, so
:func:`attention_jax.generate` decodes them token by token.

>>> import functools, jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> layer = Mamba2(16, head_dim=8, state_dim=4, chunk_size=4, rngs=nnx.Rngs(0))
>>> x = jnp.ones((2, 6, 16))
>>> layer(x).shape
(2, 6, 16)
>>> y, cache = layer(x, cache=layer.init_cache(2, 32))          # prefill, then decode token by token
>>> cache.state.scan.shape                                      # [B, N, H, F]
(2, 4, 8, 4)
>>> hybrid = aj.nn.TransformerLM(64, 16, num_layers=2, rngs=nnx.Rngs(0), attention=[
...     functools.partial(Mamba2, head_dim=8, state_dim=4), functools.partial(aj.nn.MultiHeadAttention, num_heads=2)])
>>> hybrid(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 64)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax.functional.short_conv import causal_conv1d
from attention_jax.functional.ssm import IMPLEMENTATIONS, selective_scan, selective_scan_weights
from attention_jax.nn import _common, recording
from attention_jax.nn.linear import RecurrentCache, check_cache, empty_cache
from attention_jax.nn.protocol import unsupported

Array = jax.Array

__all__ = ["Mamba", "Mamba2", "SSMState"]


class SSMState(NamedTuple):
    """The decoding state of a state-space layer, held in a :class:`~attention_jax.nn.RecurrentCache`.

    ``conv [B, W - 1, C]`` holds the last ``W - 1`` inputs of the convolution (in the layer's dtype) and
    ``scan [B, N, H, F]`` the scan's state (float32). Its size does not grow with the sequence.
    """

    conv: Array
    scan: Array


def _inverse_softplus(x: Array) -> Array:
    return x + jnp.log(-jnp.expm1(-x))


def _uniform(rngs: nnx.Rngs, shape, low: float, high: float, dtype) -> Array:
    return jax.random.uniform(rngs.params(), shape, dtype, low, high)


class _Call(NamedTuple):
    segment_ids: Array | None
    lengths: Array | None
    cache: RecurrentCache | None
    record: bool


class _StateSpaceLayer(nnx.Module):
    """What Mamba and Mamba-2 share: the protocol's checks, the cache, the convolution, the scan, recording.

    A subclass sets ``in_features``, ``num_heads``, ``head_dim``, ``state_dim``, ``conv_channels``,
    ``conv_width``, ``chunk_size``, ``implementation``, ``dtype``, ``record_weights`` and the parameters
    ``conv_weight``, ``conv_bias``, ``d``.
    """

    def _init_conv(self, width: int, channels: int, use_bias: bool, param_dtype, rngs: nnx.Rngs) -> None:
        bound = 1.0 / math.sqrt(width)  # PyTorch's Conv1d default for a depthwise kernel (fan-in W)
        self.conv_width, self.conv_channels = width, channels
        self.conv_weight = nnx.Param(_uniform(rngs, (width, channels), -bound, bound, param_dtype))
        self.conv_bias = nnx.Param(_uniform(rngs, (channels,), -bound, bound, param_dtype)) if use_bias else None

    def init_cache(
        self, batch_size: int, max_length: int, *, kind: str = "dense", quantized: bool = False, dtype=None, **options
    ) -> RecurrentCache:
        """The empty ``RecurrentCache`` (holding an :class:`SSMState`) for ``batch_size`` rows.

        Constant size: ``max_length`` (checked positive), ``kind`` (any of the protocol's kinds),
        ``quantized`` and the other options are accepted so a stack can ask every layer alike, and change
        nothing. ``dtype`` is that of the convolution window (default: the layer's dtype, else float32).
        """
        state = SSMState(
            jnp.zeros((batch_size, self.conv_width - 1, self.conv_channels), dtype or self.dtype or jnp.float32),
            jnp.zeros((batch_size, self.num_heads, self.head_dim, self.state_dim), jnp.float32),
        )
        return empty_cache(state, batch_size, max_length, kind)

    def _check_call(self, inputs_q, inputs_kv, mask, segment_ids, lengths, cache) -> _Call:
        """The protocol's arguments, checked; what a causal scan cannot honour raises naming the argument."""
        _common.check_features("inputs_q", inputs_q, self.in_features)
        if inputs_kv is not None:
            raise unsupported(self, "inputs_kv", "it is causal self-attention (a state-space scan)")
        if not _common.causal_from_mask(self, mask, default=True):
            raise unsupported(self, "mask", f"it is causal only, got mask={mask!r}")
        segment_ids = _common.check_segment_ids(segment_ids, inputs_q)
        _common.check_lengths(self, lengths, inputs_q)
        record = recording.should_record(None, self.record_weights)
        if cache is not None:
            check_cache(self, cache, SSMState, segment_ids, inputs_q.shape[0])
            if record:
                raise unsupported(self, "record_weights with a cache", "the state does not keep the earlier tokens")
        return _Call(segment_ids, lengths, cache, record)

    def _convolve(self, inputs: Array, call: _Call) -> tuple[Array, Array | None]:
        """``silu(causal_conv1d(inputs))`` ``[B, T, C]`` and the cache's next window (None without a cache)."""
        bias = None if self.conv_bias is None else self.conv_bias[...]
        result = causal_conv1d(
            inputs, self.conv_weight[...].astype(inputs.dtype), bias, segment_ids=call.segment_ids,
            lengths=call.lengths, state=None if call.cache is None else call.cache.state.conv.astype(inputs.dtype),
            return_state=call.cache is not None,
        )  # fmt: skip
        conv, window = result if call.cache is not None else (result, None)
        return jax.nn.silu(conv), window

    def _scan(self, x, dt, a, b, c, call: _Call) -> tuple[Array, Array | None]:
        """``selective_scan`` from the cache's state (recorded when asked): ``(y [B, T, N, H], state | None)``."""
        d = self.d[...]
        result = selective_scan(
            x, dt, a, b, c, d, implementation=self.implementation, chunk_size=self.chunk_size,
            segment_ids=call.segment_ids, lengths=call.lengths,
            state=None if call.cache is None else call.cache.state.scan,
            return_state=call.cache is not None,
        )  # fmt: skip
        y, state = result if call.cache is not None else (result, None)
        if call.record:
            weights = selective_scan_weights(dt, a, b, c, d, segment_ids=call.segment_ids, lengths=call.lengths)
            y = recording.record(self, y, weights, x)
        return y, state

    def _mix(self, inputs: Array, call: _Call) -> tuple[Array, Array | None, Array | None]:
        """The block on ``inputs [B, T, D]``: ``(y [B, T, out_features], next conv window, next scan state)``."""
        raise NotImplementedError

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
        call = self._check_call(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        out, window, scan = self._mix(inputs_q, call)
        if cache is None:
            return out
        state = SSMState(window.astype(cache.state.conv.dtype), scan)
        return out, cache.advanced(state, inputs_q.shape[1], lengths)


def _check_options(implementation, dt_min, dt_max) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=!r}.")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min=} and {dt_max=}.")


def _initial_dt(rngs, shape, dt_min, dt_max, floor, dtype) -> Array:
    """Step sizes log-uniform in ``[dt_min, dt_max]`` (at least ``floor``), as the biases of a softplus."""
    dt = jnp.exp(_uniform(rngs, shape, math.log(dt_min), math.log(dt_max), jnp.float32))
    return _inverse_softplus(jnp.maximum(dt, floor)).astype(dtype)


class Mamba2(_StateSpaceLayer):
    """The Mamba-2 block (in-projection, causal convolution, SSD scan, gated RMS norm, out-projection).

    Args:
      in_features: model width D.
      head_dim: H, channels per head (the paper's P); ``expand * D`` must divide by it.
      state_dim: F, the state size per head (the paper's N).
      num_groups: K groups of ``b`` and ``c``, shared by ``N / K`` heads each (as keys in grouped-query
        attention); must divide the number of heads.
      expand: inner channels ``E = expand * D``.
      conv_width: W, the taps of the causal convolution.
      chunk_size: tokens per chunk of the chunked scan.
      implementation: the scan's form (``"chunked"``, ``"associative"``, ``"sequential"``, or ``"pallas"``: the
        SSD kernel on GPU/TPU, ``chunk_size`` a power of two >= 16); None: chunked.
      dt_min, dt_max, dt_init_floor: the initial step sizes, log-uniform in ``[dt_min, dt_max]``.
      a_init_range: the initial ``-A``, uniform in this range.
      out_features: output width (default D). use_bias: biases of the two projections; conv_bias of the
        convolution. norm_epsilon: of the gated RMS norm.
      dtype, param_dtype: computation and parameter dtypes (the scan runs in float32).
      record_weights: sow the scan's implicit attention weights ``[B, N, T, S]`` (its "matrix" form).
    """

    def __init__(
        self,
        in_features: int,
        *,
        head_dim: int = 64,
        state_dim: int = 128,
        num_groups: int = 1,
        expand: int = 2,
        conv_width: int = 4,
        chunk_size: int = 64,
        implementation: str | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        a_init_range: tuple[float, float] = (1.0, 16.0),
        out_features: int | None = None,
        use_bias: bool = False,
        conv_bias: bool = True,
        norm_epsilon: float = 1e-5,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        _common.check_positive(
            in_features=in_features, head_dim=head_dim, state_dim=state_dim, num_groups=num_groups, expand=expand,
            conv_width=conv_width, chunk_size=chunk_size,
        )  # fmt: skip
        _check_options(implementation, dt_min, dt_max)
        inner = expand * in_features
        if inner % head_dim:
            raise ValueError(f"expand * in_features = {inner} inner channels must divide into heads of {head_dim=}.")
        heads = inner // head_dim
        if heads % num_groups:
            raise ValueError(f"the {heads} heads must divide into {num_groups=} groups.")
        self.in_features, self.head_dim, self.state_dim, self.num_groups = in_features, head_dim, state_dim, num_groups
        self.inner, self.num_heads = inner, heads
        self.chunk_size, self.implementation, self.norm_epsilon = chunk_size, implementation, norm_epsilon
        self.out_features = out_features or in_features
        self.dtype, self.record_weights = dtype, record_weights
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self._init_conv(conv_width, inner + 2 * num_groups * state_dim, conv_bias, param_dtype, rngs)
        projected = inner + self.conv_channels + heads  # [z | x b c | dt]
        self.in_proj = nnx.Linear(in_features, projected, use_bias=use_bias, **dtypes, rngs=rngs)
        self.dt_bias = nnx.Param(_initial_dt(rngs, (heads,), dt_min, dt_max, dt_init_floor, param_dtype))
        self.a_log = nnx.Param(jnp.log(_uniform(rngs, (heads,), *a_init_range, param_dtype)))
        self.d = nnx.Param(jnp.ones((heads,), param_dtype))
        self.norm_scale = nnx.Param(jnp.ones((inner,), param_dtype))
        self.out_proj = nnx.Linear(inner, self.out_features, use_bias=use_bias, **dtypes, rngs=rngs)

    def _gated_norm(self, y: Array, z: Array) -> Array:
        """RMS norm of ``y * silu(z)`` over each group's ``E / K`` channels (float32), times the scale."""
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.num_groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, axis=-1, keepdims=True) + self.norm_epsilon)
        return grouped.reshape(gated.shape) * self.norm_scale[...].astype(jnp.float32)

    def _mix(self, inputs_q: Array, call: _Call) -> tuple[Array, Array | None, Array | None]:
        batch, length = inputs_q.shape[:2]
        groups, f = self.num_groups, self.state_dim
        projected = self.in_proj(inputs_q)
        z, xbc, dt = jnp.split(projected, [self.inner, self.inner + self.conv_channels], axis=-1)
        xbc, window = self._convolve(xbc, call)
        x, b, c = jnp.split(xbc, [self.inner, self.inner + groups * f], axis=-1)
        x = x.reshape(batch, length, self.num_heads, self.head_dim)
        b, c = b.reshape(batch, length, groups, f), c.reshape(batch, length, groups, f)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # [B, T, N]
        a = -jnp.exp(self.a_log[...].astype(jnp.float32))  # [N]
        y, state = self._scan(x, dt, a, b, c, call)
        out = self.out_proj(self._gated_norm(y.reshape(batch, length, self.inner), z).astype(projected.dtype))
        return out, window, state


class Mamba(_StateSpaceLayer):
    """The Mamba block: in-projection to ``x`` and a gate ``z``, causal convolution of ``x``, selective scan
    with a decay per channel and state entry, ``y * silu(z)``, out-projection.

    Its ``E = expand * D`` channels are the scan's heads of size 1 (``N = E``, ``H = 1``), with one group of
    ``b`` and ``c`` (``K = 1``); ``dt`` is a rank-``dt_rank`` projection of the convolved ``x``.

    Args:
      in_features: model width D.
      state_dim: F, the state size per channel (the paper's N).
      expand: inner channels ``E = expand * D``.
      dt_rank: rank of the ``dt`` projection; None: ``ceil(D / 16)``.
      conv_width: W, the taps of the causal convolution.
      implementation: the scan's form (``"associative"`` or ``"sequential"``; the chunked form needs a
        scalar decay per head); None: associative.
      dt_min, dt_max, dt_init_floor: the initial step sizes, log-uniform in ``[dt_min, dt_max]``.
      out_features: output width (default D). use_bias: biases of the in/out projections; conv_bias of the
        convolution.
      dtype, param_dtype: computation and parameter dtypes (the scan runs in float32).
      record_weights: sow the scan's implicit attention weights ``[B, E, T, S]``, one map per channel.
    """

    def __init__(
        self,
        in_features: int,
        *,
        state_dim: int = 16,
        expand: int = 2,
        dt_rank: int | None = None,
        conv_width: int = 4,
        implementation: str | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        out_features: int | None = None,
        use_bias: bool = False,
        conv_bias: bool = True,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        dt_rank = dt_rank or math.ceil(in_features / 16)
        _common.check_positive(
            in_features=in_features, state_dim=state_dim, expand=expand, dt_rank=dt_rank, conv_width=conv_width
        )
        _check_options(implementation, dt_min, dt_max)
        if implementation in ("chunked", "pallas"):
            raise ValueError(f"Mamba's decay is per channel and state entry; implementation={implementation!r} (SSD) "
                             "needs one per head: use Mamba2, or 'associative' / 'sequential'.")  # fmt: skip
        inner = expand * in_features
        self.in_features, self.state_dim, self.dt_rank = in_features, state_dim, dt_rank
        # The scan's heads are the channels, of size 1; chunk_size is unused (no chunked form for A [E, F]).
        self.inner, self.num_heads, self.head_dim, self.chunk_size = inner, inner, 1, 1
        self.implementation = implementation
        self.out_features = out_features or in_features
        self.dtype, self.record_weights = dtype, record_weights
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        self.in_proj = nnx.Linear(in_features, 2 * inner, use_bias=use_bias, **dtypes, rngs=rngs)  # [x | z]
        self._init_conv(conv_width, inner, conv_bias, param_dtype, rngs)
        self.x_proj = nnx.Linear(inner, dt_rank + 2 * state_dim, use_bias=False, **dtypes, rngs=rngs)  # [dt | b | c]
        bound = dt_rank**-0.5
        self.dt_proj = nnx.Linear(
            dt_rank, inner, kernel_init=lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            bias_init=lambda key, shape, dtype: _initial_dt(nnx.Rngs(params=key), shape, dt_min, dt_max,
                                                            dt_init_floor, dtype),
            **dtypes, rngs=rngs,
        )  # fmt: skip
        # S4D-real initialisation: A[e, f] = -(f + 1).
        a = jnp.broadcast_to(jnp.arange(1, state_dim + 1, dtype=param_dtype), (inner, state_dim))
        self.a_log = nnx.Param(jnp.log(a))
        self.d = nnx.Param(jnp.ones((inner,), param_dtype))
        self.out_proj = nnx.Linear(inner, self.out_features, use_bias=use_bias, **dtypes, rngs=rngs)

    def _mix(self, inputs_q: Array, call: _Call) -> tuple[Array, Array | None, Array | None]:
        batch, length = inputs_q.shape[:2]
        x, z = jnp.split(self.in_proj(inputs_q), 2, axis=-1)
        x, window = self._convolve(x, call)  # [B, T, E]
        dt, b, c = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.state_dim], axis=-1)
        dt = jax.nn.softplus(self.dt_proj(dt).astype(jnp.float32))  # [B, T, E]
        a = -jnp.exp(self.a_log[...].astype(jnp.float32))  # [E, F]
        y, state = self._scan(x[..., None], dt, a, b[:, :, None], c[:, :, None], call)  # heads of size 1
        y = y[..., 0].astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        out = self.out_proj(y.astype(x.dtype))
        return out, window, state
