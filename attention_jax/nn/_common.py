"""Small pieces the attention modules share: input checks, masks, positions, caches, dropout keys."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import cache as cache_lib
from attention_jax import masks as masks_lib

Array = jax.Array

CACHE_KINDS = ("dense", "rolling", "paged")

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()


def check_features(name: str, x: Any, features: int) -> None:
    """``x`` must be ``[B, T, D]`` with ``D == features``."""
    if jnp.ndim(x) != 3 or jnp.shape(x)[-1] != features:
        raise ValueError(f"{name} must have shape [B, T, D] with D={features}, got {name}.shape={jnp.shape(x)}.")


def check_positive(**values: Any) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")


def layer_mask(mask: masks_lib.Mask | Array | None, sliding_window: int | None, pattern: masks_lib.Mask | None = None):
    """The call's mask under the layer's structural restrictions.

    ``mask`` (the call's, or the layer's default) is ANDed with ``pattern`` (a sparse pattern such as
    Longformer's, always applied) and, if set, a causal window of ``sliding_window`` previous tokens.
    """
    restrictions = [r for r in (pattern, None if sliding_window is None else masks_lib.causal()
                                & masks_lib.sliding_window(sliding_window)) if r is not None]  # fmt: skip
    if not restrictions:
        return mask
    restriction = restrictions[0] if len(restrictions) == 1 else restrictions[0] & restrictions[1]
    if mask is None:
        return restriction
    if not isinstance(mask, masks_lib.Mask):
        raise ValueError(
            f"a layer with a structural mask ({restriction!r}) takes a Mask (positions are known to it), not a "
            f"boolean array of shape {jnp.shape(mask)}; put the restriction into the array yourself or pass a Mask."
        )
    return mask & restriction


def segmented(mask, segment_ids: Array | None):
    """Add packed-document isolation (``segment_ids [B, T]``) to a self-attention mask."""
    if segment_ids is None:
        return mask
    seg = masks_lib.segments(segment_ids)
    if mask is None:
        return seg
    if isinstance(mask, masks_lib.Mask):
        return mask & seg
    t = segment_ids.shape[-1]
    return mask & seg.dense(t, t)[:, None]


def padded(mask, lengths: Array | None):
    """Add right padding of the keys (``lengths [B]`` real tokens) to a self-attention mask."""
    if lengths is None:
        return mask
    pad = masks_lib.padding(kv_lengths=lengths)
    if mask is None:
        return pad
    if isinstance(mask, masks_lib.Mask):
        return mask & pad
    return mask & pad.dense(mask.shape[-2], mask.shape[-1])[:, None]


@functools.partial(jax.jit, static_argnums=0)
def rotate(rope, x: Array, positions: Array) -> Array:
    """``rope(x, positions)`` compiled once per shape (an eager call would compile each small op)."""
    return rope(x, positions)


def positions_for(x: Array, positions: Array | None, cache) -> Array:
    """Absolute positions of the tokens of ``x [B, T, .]``: given, from the cache, or ``arange(T)``."""
    if positions is not None and cache is not None:
        raise ValueError("pass either positions or a cache (which knows the positions), not both.")
    if cache is not None:
        return cache.positions(x.shape[1])
    if positions is None:
        return jnp.arange(x.shape[1], dtype=jnp.int32)
    return positions


def as_attribute(value):
    """A module attribute: static configuration, or ``nnx.data`` when it holds arrays (a padding mask)."""
    return nnx.data(value) if jax.tree.leaves(value) else value


class CacheMixin:
    """``init_cache`` for attention modules that define ``cache_shape() -> (K, H, Hv)`` (``Hv = 0``: keys only)."""

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
    ):
        """An empty cache for decoding ``batch_size`` sequences of up to ``max_length`` tokens.

        ``kind`` is ``"dense"``, ``"rolling"`` (a ring of the layer's ``sliding_window``, whatever
        ``max_length``) or ``"paged"`` (pages of ``page_size`` tokens; ``num_pages`` defaults to
        enough for every sequence); ``quantized`` stores int8 with per-token-per-head scales.
        ``dtype`` defaults to the module's dtype (or param dtype).
        """
        num_kv_heads, head_dim, value_head_dim = self.cache_shape()
        return make_cache(
            kind,
            batch_size,
            max_length,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            value_head_dim=value_head_dim,
            dtype=dtype or self.dtype or self.param_dtype,
            quantized=quantized,
            window=getattr(self, "sliding_window", None),
            page_size=page_size,
            num_pages=num_pages,
        )


def make_cache(
    kind: str,
    batch_size: int,
    max_length: int,
    *,
    num_kv_heads: int,
    head_dim: int,
    value_head_dim: int,
    dtype,
    quantized: bool,
    window: int | None,
    page_size: int,
    num_pages: int | None,
):
    """The cache of ``kind`` for a layer; ``"rolling"`` needs the layer's sliding window."""
    sizes = dict(num_kv_heads=num_kv_heads, head_dim=head_dim, value_head_dim=value_head_dim, dtype=dtype)
    if kind == "dense":
        return cache_lib.KVCache.create(batch_size, max_length, quantized=quantized, **sizes)
    if kind == "rolling":
        if window is None:
            raise ValueError("kind='rolling' needs a layer with sliding_window set; use kind='dense' or 'paged'.")
        return cache_lib.RollingKVCache.create(batch_size, window, quantized=quantized, **sizes)
    if kind == "paged":
        check_positive(page_size=page_size, max_length=max_length)
        max_pages = -(-max_length // page_size)
        num_pages = batch_size * max_pages if num_pages is None else num_pages
        return cache_lib.PagedKVCache.create(
            batch_size, num_pages=num_pages, page_size=page_size, max_pages=max_pages, quantized=quantized, **sizes
        )
    raise ValueError(f"kind must be one of {CACHE_KINDS}, got {kind=!r}.")


def dropout_stream(rngs: nnx.Rngs, rate: float):
    """The stream a module keeps for attention dropout (None without dropout)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must lie in [0, 1), got dropout_rate={rate!r}.")
    return rngs.dropout.fork() if rate > 0 else nnx.data(None)


def dropout_key(module, deterministic: bool | None, rngs: nnx.Rngs | None) -> Array | None:
    """A key for this call's attention dropout, or None when it is off."""
    deterministic = module.deterministic if deterministic is None else deterministic
    if deterministic or module.dropout_rate == 0.0:
        return None
    if rngs is not None:
        return rngs.dropout()
    if module.rngs is None:
        raise ValueError(
            "attention dropout needs rngs: pass rngs= to the call or build the module with dropout_rate > 0."
        )
    return module.rngs()


def segment_positions(segment_ids: Array) -> Array:
    """``[B, T]`` position of each token within its segment (0 at each segment's first token).

    >>> segment_positions(jnp.array([[0, 0, 1, 1, 1, 2]])).tolist()
    [[0, 1, 0, 1, 2, 0]]
    """
    t = segment_ids.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1
    )
    start_index = jax.lax.cummax(jnp.where(starts, index, 0), axis=segment_ids.ndim - 1)
    return index - start_index


def check_segment_ids(segment_ids: Any, x: Array) -> Array | None:
    """``segment_ids`` must be integers ``[B, T]`` matching ``x [B, T, D]``."""
    if segment_ids is None:
        return None
    if jnp.shape(segment_ids) != x.shape[:2] or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
        raise ValueError(
            f"segment_ids must be integers of shape [B, T]={x.shape[:2]}, got {jnp.result_type(segment_ids)} "
            f"{jnp.shape(segment_ids)}."
        )
    return jnp.asarray(segment_ids)


def check_lengths(module, lengths: Any, x: Array) -> None:
    """``lengths`` must be None or integers ``[B]`` matching ``x [B, T, D]``."""
    if lengths is not None and (
        jnp.shape(lengths) != x.shape[:1] or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer)
    ):
        raise ValueError(
            f"{type(module).__name__}: lengths must be integers of shape [B]=[{x.shape[0]}], got "
            f"{jnp.result_type(lengths)} {jnp.shape(lengths)}."
        )


def causal_from_mask(module, mask, default: bool) -> bool:
    """Whether a layer that is not attention under a mask runs causally for this call's ``mask``.

    ``None`` keeps the layer's ``default``; ``masks.full()`` is bidirectional and ``masks.causal()``
    causal; any other mask raises the protocol's ``ValueError`` naming the module and ``mask``.
    """
    if mask is None:
        return default
    if isinstance(mask, masks_lib.Mask):
        if mask == masks_lib.causal():
            return True
        if mask == masks_lib.full():
            return False
    raise ValueError(
        f"{type(module).__name__} cannot take mask={mask!r}: it is not softmax attention under a mask, so it "
        "honours only None, masks.full() and masks.causal()."
    )


def self_attention_positions(module, inputs: Array, inputs_kv, positions, segment_ids, cache):
    """The prelude of a self-attention-only layer: refuse ``inputs_kv``, check ``segment_ids``, and
    return ``(positions [T] | [B, T], segment_ids | None)`` (positions restart at each segment)."""
    if inputs_kv is not None:
        raise ValueError(f"{type(module).__name__} cannot take inputs_kv: it is self-attention only.")
    segment_ids = check_segment_ids(segment_ids, inputs)
    if segment_ids is not None and cache is not None:
        raise ValueError(
            f"{type(module).__name__} cannot take segment_ids with a cache: packed documents are for training; "
            "a cache decodes one sequence per row."
        )
    if positions is None and segment_ids is not None:
        positions = segment_positions(segment_ids)
    return positions_for(inputs, positions, cache), segment_ids
