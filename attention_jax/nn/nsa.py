"""``NativeSparseAttention``: DeepSeek's NSA as a causal self-attention layer that decodes with a cache.

Three branches with their own keys and values (the paper's independent branches): compressed blocks, top-n
selected blocks and a sliding window, mixed per head by sigmoid gates computed from the input. The
selected branch uses MultiHeadAttention's projections (``query [D, N, H]``, ``key [D, K, H]``,
``value [D, K, Hv]``, ``out [N, Hv, D]``); ``inputs_q [B, T, D] -> [B, T, out_features]``.

Decoding (:meth:`NativeSparseAttention.init_cache`): an :class:`NSACache` holds, per token, the selected
branch's and the window branch's keys and values and the compression source, and the compressed blocks
as they complete; each step compresses only the blocks it completes, so a step costs O(S), like a KV
cache's.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, compress_block=4, compress_stride=2,
...                               select_block=4, num_selected=2, window=4, rngs=nnx.Rngs(0))
>>> x = jnp.ones((2, 16, 32))
>>> call = nnx.jit(lambda layer, x, cache=None: layer(x, cache=cache))  # one program per shape
>>> call(layer, x).shape
(2, 16, 32)
>>> y, cache = call(layer, x, layer.init_cache(2, 20))            # prefill ...
>>> y, cache = call(layer, x[:, :1], cache)                       # ... then one token at a time
>>> y.shape, cache.lengths.tolist()
((2, 1, 32), [17, 17])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict

from attention_jax import masks as masks_lib
from attention_jax._pytree import register_dataclass
from attention_jax.functional.nsa import (
    check_config,
    compress_blocks,
    gather_blocks,
    native_sparse_attention,
    new_blocks,
    num_compressed_blocks,
)
from attention_jax.nn import _common, recording
from attention_jax.nn._heads import ProjectedHeads
from attention_jax.nn.protocol import unsupported

Array = jax.Array

__all__ = ["NativeSparseAttention", "BlockCompressor", "NSACache"]


class BlockCompressor(nnx.Module):
    """The compression function ``phi``: a block of ``block`` keys (or values) to one, per key/value head.

    ``phi(x_block) = W_2 gelu(W_1 flatten(x_block + P))`` with a learned intra-block position encoding ``P``.
    """

    def __init__(self, block: int, head_dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.position = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (block, head_dim), param_dtype))
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden = nnx.Linear(block * head_dim, head_dim, **dense)
        self.output = nnx.Linear(head_dim, head_dim, **dense)

    def __call__(self, blocks: Array) -> Array:
        """``[B, M, K, block, H] -> [B, M, K, H]``."""
        x = blocks + self.position[...]
        return self.output(jax.nn.gelu(self.hidden(x.reshape(*x.shape[:-2], -1))))


@register_dataclass
@dataclasses.dataclass(frozen=True)
class NSACache:
    """The decoding state of :class:`NativeSparseAttention` (an immutable pytree).

    ``tokens`` is a KV cache (dense or paged, optionally int8) whose keys per token are
    ``[k_selected | k_window | k_source]`` ``[.., K, 3H]`` and values ``[v_selected | v_window | v_source]``
    ``[.., K, 3Hv]``; ``key_cmp [B, M, K, H]`` and ``value_cmp [B, M, K, Hv]`` hold the compressed blocks
    completed so far (``M`` blocks fit the cache's slots). ``lengths``, ``positions`` and ``check`` are the
    token cache's.
    """

    tokens: Any
    key_cmp: Array
    value_cmp: Array

    @property
    def lengths(self) -> Array:
        return self.tokens.lengths

    @property
    def overflow(self) -> Array:
        return self.tokens.overflow

    @property
    def batch_size(self) -> int:
        return self.tokens.batch_size

    def positions(self, num_new: int) -> Array:
        return self.tokens.positions(num_new)

    def check(self) -> None:
        self.tokens.check()


class NativeSparseAttention(ProjectedHeads):
    """Native Sparse Attention (Yuan et al., 2025), causal self-attention.

    Args:
      in_features, num_heads: D and N.
      num_kv_heads, head_dim, value_head_dim, out_features, use_bias, dtype, param_dtype: the projections,
        as in ``MultiHeadAttention`` (selection is shared by the ``N // K`` query heads of a group).
      compress_block, compress_stride: l and d, the compressed blocks (d divides l).
      select_block: l', positions per selection block (a multiple of d).
      num_selected: n, blocks each query reads in the selected branch.
      window: keys before the query in the sliding-window branch.
      record_weights: record ``[B, N, T, S]`` weights: the gated sum of the branches' weights, each
        compressed block's weight spread evenly over its tokens (see ``native_sparse_attention``).
      rngs: ``nnx.Rngs`` for the parameters.

    Call: see :class:`~attention_jax.nn.AttentionLayer`. The mask is ``None`` or ``masks.causal()``;
    ``positions`` are accepted and ignored (NSA has no positional parts: blocks are counted from the
    start of the sequence); ``lengths`` are honoured (causal: right padding changes no real output, and
    a cache appends only the real tokens, so rows with different prompt lengths decode together). It
    refuses ``inputs_kv``, other masks and ``segment_ids`` (blocks would span documents). It has no
    dropout (``deterministic`` is ignored).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        compress_block: int = 32,
        compress_stride: int = 16,
        select_block: int = 64,
        num_selected: int = 16,
        window: int = 512,
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        record_weights: bool = False,
        rngs: nnx.Rngs,
    ):
        check_config(compress_block, compress_stride, select_block, num_selected, window)
        self.init_projections(
            in_features, num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, value_head_dim=value_head_dim,
            out_features=out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )  # fmt: skip
        k, h, hv = self.num_kv_heads, self.head_dim, self.value_head_dim
        dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.compress_kv = nnx.Linear(in_features, k * (h + hv), use_bias=False, **dense)
        self.window_kv = nnx.Linear(in_features, k * (h + hv), use_bias=False, **dense)
        self.compress_key = BlockCompressor(compress_block, h, **dense)
        self.compress_value = BlockCompressor(compress_block, hv, **dense)
        self.gates = nnx.Linear(in_features, 3 * num_heads, **dense)
        # Hashable: the config is static graph data, and jit (e.g. inside aj.generate) hashes it.
        self.config = FrozenDict(
            compress_block=compress_block,
            compress_stride=compress_stride,
            select_block=select_block,
            num_selected=num_selected,
            window=window,
        )
        self.dtype, self.param_dtype, self.record_weights = dtype, param_dtype, record_weights

    def _branches(self, x: Array):
        """Per-token inputs of the three branches: ``(q, k, v)``, window ``(k, v)``, compression source ``(k, v)``."""
        b, t, _ = x.shape
        k_heads, h = self.num_kv_heads, self.head_dim
        q, k, v = self.project(x)  # [B, T, N, H], [B, T, K, H], [B, T, K, Hv]: the selected branch
        source = self.compress_kv(x).reshape(b, t, k_heads, -1)
        window = self.window_kv(x).reshape(b, t, k_heads, -1)
        return (q, k, v), (window[..., :h], window[..., h:]), (source[..., :h], source[..., h:])

    def _compress(self, key_blocks: Array, value_blocks: Array) -> tuple[Array, Array]:
        return self.compress_key(key_blocks), self.compress_value(value_blocks)  # [B, M, K, H], [B, M, K, Hv]

    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache: NSACache | None = None,
        deterministic: bool | None = None,
    ):
        """Causal NSA over ``inputs_q [B, T, D]``; returns ``y [B, T, out_features]`` (and the cache)."""
        _common.check_features("inputs_q", inputs_q, self.in_features)
        if inputs_kv is not None:
            raise unsupported(self, "inputs_kv", "it is causal self-attention")
        if not _common.causal_from_mask(self, mask, default=True):
            raise unsupported(self, "mask=full()", "it is causal attention by construction")
        if segment_ids is not None:
            raise unsupported(
                self, "segment_ids", "its compressed and selected blocks are counted from the row's start and would "
                "span documents; run documents one per row",
            )  # fmt: skip
        (q, k, v), (k_win, v_win), (k_src, v_src) = self._branches(inputs_q)
        gates = jax.nn.sigmoid(self.gates(inputs_q).reshape(*inputs_q.shape[:2], self.num_heads, 3))
        block, stride = self.config["compress_block"], self.config["compress_stride"]
        q_offset = 0
        if cache is None:
            k_cmp, v_cmp = self._compress(
                compress_blocks(k_src, block=block, stride=stride), compress_blocks(v_src, block=block, stride=stride)
            )
        else:
            cache, (k, v, k_win, v_win, k_cmp, v_cmp), q_offset = self._decode(
                cache, (k, k_win, k_src), (v, v_win, v_src), lengths
            )
            k, v, k_win, v_win = (x.astype(q.dtype) for x in (k, v, k_win, v_win))
        record = recording.should_record(None, self.record_weights)
        out = native_sparse_attention(
            q, k, v, k_cmp, v_cmp, gates, window_key=k_win, window_value=v_win, q_offset=q_offset,
            return_weights=record, **self.config,
        )  # fmt: skip
        if record:
            out, weights = out
            out = recording.record(self, out, weights, None)  # the compressed branch is no weighted sum of v
        y = self.merge(out)  # [B, T, out_features]
        return y if cache is None else (y, cache)

    def _decode(self, cache: NSACache, keys, values, lengths):
        """Append the new tokens and compress the blocks they complete.

        Returns the new cache, every slot's ``(k, v, k_win, v_win)`` and the compressed blocks
        ``(k_cmp, v_cmp)``, and ``q_offset [B]`` (the position of each row's first new token).
        """
        if not isinstance(cache, NSACache):
            raise ValueError(f"NativeSparseAttention takes the cache of its init_cache, got {type(cache).__name__}.")
        h, hv = self.head_dim, self.value_head_dim
        t = keys[0].shape[1]
        start = cache.lengths  # [B]
        tokens, view = cache.tokens.update(jnp.concatenate(keys, -1), jnp.concatenate(values, -1), lengths=lengths)
        k, k_win, k_src = (view.keys[..., i * h : (i + 1) * h] for i in range(3))  # [B, S, K, H] each
        v, v_win, v_src = (view.values[..., i * hv : (i + 1) * hv] for i in range(3))
        block, stride = self.config["compress_block"], self.config["compress_stride"]
        m = cache.key_cmp.shape[1]
        index, complete = new_blocks(start, tokens.lengths, t, block=block, stride=stride, max_blocks=m)  # [B, U]
        new_k, new_v = self._compress(
            gather_blocks(k_src, index, block=block, stride=stride),
            gather_blocks(v_src, index, block=block, stride=stride),
        )  # [B, U, K, H], [B, U, K, Hv]
        rows = jnp.arange(index.shape[0])[:, None]
        slot = jnp.where(complete, index, m)  # slot m is out of range: dropped
        key_cmp = cache.key_cmp.at[rows, slot].set(new_k.astype(cache.key_cmp.dtype), mode="drop")
        value_cmp = cache.value_cmp.at[rows, slot].set(new_v.astype(cache.value_cmp.dtype), mode="drop")
        new_cache = NSACache(tokens, key_cmp, value_cmp)
        return new_cache, (k, v, k_win, v_win, key_cmp, value_cmp), view.q_offset

    def init_cache(
        self,
        batch_size: int,
        max_length: int,
        *,
        kind: str = "dense",
        quantized: bool = False,
        dtype: Any = None,
        page_size: int = 16,
        num_pages: int | None = None,
    ) -> NSACache:
        """An empty :class:`NSACache` for ``batch_size`` sequences of up to ``max_length`` tokens.

        ``kind`` is ``"dense"`` or ``"paged"`` (``page_size``, ``num_pages`` as in
        ``MultiHeadAttention.init_cache``); ``"rolling"`` raises: selected blocks reach back to the
        first token. ``quantized`` stores the per-token keys and values as int8 (the compressed blocks
        stay in ``dtype``, default the module's dtype or param dtype).
        """
        if kind == "rolling":
            raise unsupported(self, "kind='rolling'", "its selected blocks reach back to the first token")
        dtype = dtype or self.dtype or self.param_dtype
        k, h, hv = self.num_kv_heads, self.head_dim, self.value_head_dim
        tokens = _common.make_cache(
            kind, batch_size, max_length, num_kv_heads=k, head_dim=3 * h, value_head_dim=3 * hv, dtype=dtype,
            quantized=quantized, window=None, page_size=page_size, num_pages=num_pages,
        )  # fmt: skip
        slots = max_length if kind == "dense" else tokens.page_table.shape[1] * page_size  # the view's S
        m = num_compressed_blocks(slots, self.config["compress_block"], self.config["compress_stride"])
        return NSACache(tokens, jnp.zeros((batch_size, m, k, h), dtype), jnp.zeros((batch_size, m, k, hv), dtype))
