"""Mamba-2 (Dao & Gu, 2024) as a layer of the attention-layer protocol: it drops into any stack, next to attention.

One layer maps ``x [B, T, D]`` to ``[B, T, out_features]`` the way the paper's block does:

    z, xbc, dt = in_proj(x)                       # gate [B, T, E], conv input [B, T, E + 2 K F], steps [B, T, N]
    xbc = silu(causal_conv1d(xbc))                # a short depthwise causal convolution (width 4)
    x, b, c = split(xbc)                          # x [B, T, N, H], b, c [B, T, K, F]
    y = selective_scan(x, softplus(dt + dt_bias), -exp(A_log), b, c, D)   # the SSD scan, state in float32
    out = out_proj(rms_norm(y * silu(z)))         # gated RMS norm over groups of E / K channels

with ``E = expand * D`` inner channels in ``N = E / H`` heads. It is causal by construction: ``mask`` may be
None or ``masks.causal()``, and ``inputs_kv`` raises. Packed documents (``segment_ids``) reset the
convolution's window and the scan's state; ``lengths`` leaves the cache after each row's last real token;
positions are not read. :meth:`Mamba2.init_cache` holds the convolution's last ``W - 1`` inputs and the scan
state, a constant size whatever ``max_length``, so :func:`attention_jax.generate` decodes it token by token.

>>> import functools, jax.numpy as jnp
>>> from flax import nnx
>>> import attention_jax as aj
>>> layer = Mamba2(16, head_dim=8, state_dim=4, chunk_size=4, rngs=nnx.Rngs(0))
>>> x = jnp.ones((2, 6, 16))
>>> layer(x).shape
(2, 6, 16)
>>> y, cache = layer(x, cache=layer.init_cache(2, 32))          # prefill, then decode token by token
>>> cache.state.shape                                           # [B, N, H, F]
(2, 4, 8, 4)
>>> hybrid = aj.nn.TransformerLM(64, 16, num_layers=2, rngs=nnx.Rngs(0), attention=[
...     functools.partial(Mamba2, head_dim=8, state_dim=4), functools.partial(aj.nn.MultiHeadAttention, num_heads=2)])
>>> hybrid(jnp.zeros((1, 5), jnp.int32)).shape
(1, 5, 64)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax._pytree import register_dataclass
from attention_jax.functional.short_conv import causal_conv1d
from attention_jax.functional.ssm import IMPLEMENTATIONS, selective_scan, selective_scan_weights
from attention_jax.nn import _common, recording
from attention_jax.nn.protocol import unsupported

Array = jax.Array

__all__ = ["Mamba2", "SSMCache"]


@register_dataclass
@dataclasses.dataclass(frozen=True)
class SSMCache:
    """The decoding cache of a state-space layer: the convolution's window and the scan's state.

    ``conv [B, W - 1, C]`` holds the last ``W - 1`` inputs of the convolution (in the layer's dtype),
    ``state [B, N, H, F]`` the scan state (float32), ``lengths [B]`` int32 the real tokens read per row. Its
    size does not grow with the sequence, so it never overflows.
    """

    conv: Array
    state: Array
    lengths: Array

    def positions(self, num_new: int) -> Array:
        """Absolute positions ``[B, T]`` the next ``T = num_new`` tokens take (as a KV cache's)."""
        return self.lengths[:, None] + jnp.arange(num_new, dtype=jnp.int32)

    def check(self) -> None:
        """Nothing to check: a constant-size state cannot overflow (``aj.generate`` checks every cache)."""


def _inverse_softplus(x: Array) -> Array:
    return x + jnp.log(-jnp.expm1(-x))


class Mamba2(nnx.Module):
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
      implementation: the scan's form (``"chunked"``, ``"associative"``, ``"sequential"``); None: chunked.
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
        inner = expand * in_features
        if inner % head_dim:
            raise ValueError(f"expand * in_features = {inner} inner channels must divide into heads of {head_dim=}.")
        heads = inner // head_dim
        if heads % num_groups:
            raise ValueError(f"the {heads} heads must divide into {num_groups=} groups.")
        if implementation is not None and implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=!r}.")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min=} and {dt_max=}.")
        self.in_features, self.head_dim, self.state_dim, self.num_groups = in_features, head_dim, state_dim, num_groups
        self.inner, self.num_heads, self.conv_width = inner, heads, conv_width
        self.chunk_size, self.implementation, self.norm_epsilon = chunk_size, implementation, norm_epsilon
        self.out_features = out_features or in_features
        self.dtype, self.record_weights = dtype, record_weights
        self.conv_channels = inner + 2 * num_groups * state_dim
        dtypes = dict(dtype=dtype, param_dtype=param_dtype)
        projected = inner + self.conv_channels + heads  # [z | x b c | dt]
        self.in_proj = nnx.Linear(in_features, projected, use_bias=use_bias, **dtypes, rngs=rngs)
        bound = 1.0 / math.sqrt(conv_width)  # PyTorch's Conv1d default for a depthwise kernel (fan-in W)
        uniform = lambda key, shape, lo, hi: jax.random.uniform(key, shape, param_dtype, lo, hi)  # noqa: E731
        self.conv_weight = nnx.Param(uniform(rngs.params(), (conv_width, self.conv_channels), -bound, bound))
        self.conv_bias = nnx.Param(uniform(rngs.params(), (self.conv_channels,), -bound, bound)) if conv_bias else None
        log_dt = uniform(rngs.params(), (heads,), math.log(dt_min), math.log(dt_max))
        self.dt_bias = nnx.Param(_inverse_softplus(jnp.maximum(jnp.exp(log_dt), dt_init_floor)))
        self.a_log = nnx.Param(jnp.log(uniform(rngs.params(), (heads,), *a_init_range)))
        self.d = nnx.Param(jnp.ones((heads,), param_dtype))
        self.norm_scale = nnx.Param(jnp.ones((inner,), param_dtype))
        self.out_proj = nnx.Linear(inner, self.out_features, use_bias=use_bias, **dtypes, rngs=rngs)

    def init_cache(
        self, batch_size: int, max_length: int, *, kind: str = "dense", quantized: bool = False, dtype=None, **options
    ) -> SSMCache:
        """The empty :class:`SSMCache` for ``batch_size`` rows.

        Constant size: ``max_length`` (checked positive), ``kind`` (any of the protocol's kinds),
        ``quantized`` and the other options are accepted so a stack can ask every layer alike, and change
        nothing. ``dtype`` is that of the convolution window (default: the layer's dtype, else float32).
        """
        _common.check_positive(batch_size=batch_size, max_length=max_length)
        if kind not in _common.CACHE_KINDS:
            raise ValueError(f"kind must be one of {_common.CACHE_KINDS}, got {kind=!r}.")
        conv_dtype = dtype or self.dtype or jnp.float32
        return SSMCache(
            jnp.zeros((batch_size, self.conv_width - 1, self.conv_channels), conv_dtype),
            jnp.zeros((batch_size, self.num_heads, self.head_dim, self.state_dim), jnp.float32),
            jnp.zeros((batch_size,), jnp.int32),
        )

    def _check_call(self, inputs_q, inputs_kv, mask, segment_ids, lengths, cache):
        _common.check_features("inputs_q", inputs_q, self.in_features)
        if inputs_kv is not None:
            raise unsupported(self, "inputs_kv", "it is causal self-attention (a state-space scan)")
        if not _common.causal_from_mask(self, mask, default=True):
            raise unsupported(self, "mask", f"it is causal only, got mask={mask!r}")
        segment_ids = _common.check_segment_ids(segment_ids, inputs_q)
        if lengths is not None and (
            jnp.shape(lengths) != inputs_q.shape[:1] or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer)
        ):
            raise ValueError(
                f"{type(self).__name__}: lengths must be integers of shape [B]=[{inputs_q.shape[0]}], got "
                f"{jnp.result_type(lengths)} {jnp.shape(lengths)}."
            )
        if cache is None:
            return segment_ids
        if segment_ids is not None:
            raise unsupported(self, "segment_ids with a cache", "a cache decodes one sequence per row")
        if not isinstance(cache, SSMCache):
            raise ValueError(f"{type(self).__name__} takes the SSMCache of its init_cache, got {type(cache).__name__}.")
        if cache.lengths.shape != inputs_q.shape[:1]:
            raise ValueError(
                f"{type(self).__name__}: the cache holds {cache.lengths.shape[0]} rows, inputs_q has "
                f"B={inputs_q.shape[0]}."
            )
        return segment_ids

    def _gated_norm(self, y: Array, z: Array) -> Array:
        """RMS norm of ``y * silu(z)`` over each group's ``E / K`` channels (float32), times the scale."""
        gated = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
        grouped = gated.reshape(*gated.shape[:-1], self.num_groups, -1)
        grouped = grouped * jax.lax.rsqrt(jnp.mean(grouped**2, axis=-1, keepdims=True) + self.norm_epsilon)
        return grouped.reshape(gated.shape) * self.norm_scale[...].astype(jnp.float32)

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: SSMCache | None = None,
        deterministic: bool | None = None,
    ):
        """``y [B, T, out_features]``, or ``(y, cache)`` with a cache (see the module docstring)."""
        segment_ids = self._check_call(inputs_q, inputs_kv, mask, segment_ids, lengths, cache)
        batch, length = inputs_q.shape[:2]
        heads, groups, f = self.num_heads, self.num_groups, self.state_dim
        projected = self.in_proj(inputs_q)
        z, xbc, dt = jnp.split(projected, [self.inner, self.inner + self.conv_channels], axis=-1)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        conv = causal_conv1d(
            xbc, self.conv_weight[...].astype(xbc.dtype), conv_bias, segment_ids=segment_ids, lengths=lengths,
            state=None if cache is None else cache.conv.astype(xbc.dtype), return_state=cache is not None,
        )  # fmt: skip
        conv, window = conv if cache is not None else (conv, None)
        xbc = jax.nn.silu(conv)
        x, b, c = jnp.split(xbc, [self.inner, self.inner + groups * f], axis=-1)
        x = x.reshape(batch, length, heads, self.head_dim)
        b, c = b.reshape(batch, length, groups, f), c.reshape(batch, length, groups, f)
        dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32))  # [B, T, N]
        a = -jnp.exp(self.a_log[...].astype(jnp.float32))  # [N]
        d = self.d[...]
        result = selective_scan(
            x, dt, a, b, c, d, implementation=self.implementation, chunk_size=self.chunk_size,
            segment_ids=segment_ids, lengths=lengths, state=None if cache is None else cache.state,
            return_state=cache is not None,
        )  # fmt: skip
        y, state = result if cache is not None else (result, None)
        if recording.should_record(None, self.record_weights):
            if cache is not None:
                raise unsupported(self, "record_weights with a cache", "the state does not keep the earlier tokens")
            weights = selective_scan_weights(dt, a, b, c, d, segment_ids=segment_ids, lengths=lengths)
            y = recording.record(self, y, weights, x)
        out = self.out_proj(self._gated_norm(y.reshape(batch, length, self.inner), z).astype(projected.dtype))
        if cache is None:
            return out
        added = length if lengths is None else jnp.asarray(lengths, jnp.int32)
        return out, SSMCache(window.astype(cache.conv.dtype), state, cache.lengths + added)
