"""``cached_attention``: new queries attend to a KV cache through the decode kernels.

A decode step (one token, a block of draft tokens to verify, a small chunk: ``T <= 16`` query rows)
writes its keys/values into the cache and attends with
:func:`pallas_kernels.decode_attention.decode_attention`, which reads the cache's pages in place
(:mod:`attention_jax.cache.layout`): no dense gather of pages, no dequantisation of the whole
cache, only the tiles the mask leaves (a sliding window over a long cache visits its window).
Larger ``T`` (a prefill) takes today's path, the cache's dense view and
:func:`~attention_jax.functional.multi_head.multi_head_attention`: its cost is ``T x S`` compute
and the gather is negligible beside it.

The layer's ``Mask`` is resolved once per call into the kernel's mask function, its per-query and
per-slot data and a per-sequence block map over the cache's logical slots (from each tile's
smallest and largest position, :meth:`~attention_jax.masks.Mask.runtime_block_map`).

A rolling cache is attended in two parts merged by logsumexp: its ring *before* the write (ring
layout), then the ``T`` new tokens (one page per sequence): a ring of ``W`` slots no longer holds,
after the write, the oldest key a query of window ``W`` needs.

**Fallbacks.** :func:`fallback_reason` is the one place that decides that a call keeps today's
path; it says why. Today: ``T > 16``; a cache kind without a kernel layout; an ``implementation``
the kernels do not serve (``"cudnn"``, a ``Backend`` instance such as a test's recording backend,
``"pallas"`` on CPU); a boolean-array mask; mask data that does not index the cache's slots (per-key data
with a rolling cache, or of another length); dropout. (Modules also keep today's path to record
attention weights, which are ``[B, N, T, S]`` by definition.)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax import score_mods as score_mods_lib
from attention_jax.cache import layout as layout_lib
from attention_jax.cache.base import Cache
from attention_jax.functional.backends import Backend
from attention_jax.functional.dot_product import dot_product_attention
from attention_jax.functional.multi_head import multi_head_attention
from pallas_kernels import mask_info
from pallas_kernels.decode_attention import DEFAULT_BLOCK_K, KERNELS, decode_attention, decode_attention_reference
from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL

Array = jax.Array

__all__ = ["MAX_KERNEL_ROWS", "cached_attention", "decode_kernel", "fallback_reason"]

MAX_KERNEL_ROWS = 16  # query rows per sequence the decode kernels take (decode, speculative verify, small chunks)


def decode_kernel(implementation: str | Backend | None, platform: str | None = None) -> str | None:
    """The decode body that serves ``implementation`` on ``platform`` (default JAX's), or None (today's path).

    None/``"auto"``: ``"xla"`` on CPU, ``"triton"`` on GPU, ``"mosaic_tpu"`` on TPU when the kernels
    have it (else ``"xla"``). ``"blockwise"``: ``"xla"`` (the blockwise XLA body). ``"pallas"``: the
    platform's Pallas body (None on CPU). ``"reference"``: the gathering reference.

    >>> decode_kernel(None, "cpu"), decode_kernel("pallas", "gpu"), decode_kernel("cudnn", "gpu")
    ('xla', 'triton', None)
    """
    if not isinstance(implementation, str | None):
        return None  # a Backend instance: the caller wants that backend to run
    platform = platform or jax.default_backend()
    pallas = {"gpu": "triton", "cuda": "triton", "tpu": "mosaic_tpu"}.get(platform)
    if pallas is not None and pallas not in KERNELS:
        pallas = None
    if implementation in (None, "auto"):
        return pallas or "xla"
    return {"blockwise": "xla", "reference": "reference", "pallas": pallas}.get(implementation)


def fallback_reason(
    query: Array,
    cache: Cache,
    *,
    mask: Any = None,
    score_mod: Any = None,
    dropout_rng: Array | None = None,
    implementation: str | Backend | None = None,
) -> str | None:
    """Why this call keeps today's path (dense view + ``multi_head_attention``), or None: the kernel serves it."""
    t = jnp.shape(query)[1]
    if t > MAX_KERNEL_ROWS:
        return f"T={t} > {MAX_KERNEL_ROWS} query rows: a prefill, whose T x S compute dwarfs the gather"
    if decode_kernel(implementation) is None:
        return f"implementation={implementation!r} has no decode kernel on {jax.default_backend()}"
    try:
        layout = jax.eval_shape(type(cache).kernel_layout, cache)  # shapes only: nothing is computed
    except TypeError as e:
        return str(e)
    if dropout_rng is not None:
        return "dropout is not in the decode kernels"
    if mask is not None and not isinstance(mask, masks_lib.Mask):
        return "a boolean-array mask has no block map over the cache's slots"
    if isinstance(mask, masks_lib.Mask) and mask.num_kv_arrays:
        if layout.ring is not None:
            return "per-key mask data indexes the dense view, whose slots a ring reorders"
        try:
            _, kv_vals = mask.arrays(t, layout.num_slots)
        except ValueError as e:
            return f"the mask's per-key data does not index the cache's {layout.num_slots} slots: {e}"
        if any(jnp.shape(x)[-1] != layout.num_slots for x in kv_vals):
            return f"the mask's per-key data does not index the cache's {layout.num_slots} slots"
    return None


def cached_attention(
    query: Array,
    key: Array,
    value: Array | None,
    cache: Cache,
    *,
    lengths: Array | None = None,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | Backend | None = None,
    value_dim: int | None = None,
    return_lse: bool = False,
    kernel: str | None = None,
    interpret: bool = False,
):
    """Write ``key``/``value`` into ``cache`` and attend ``query`` to everything it holds; returns ``(out, cache)``.

    Args:
      query: ``[B, T, N, H]`` at positions ``cache.lengths + arange(T)``.
      key: ``[B, T, K, H]``; value: ``[B, T, K, Hv]``, or None for a keys-only cache, whose values are
        the keys' first ``value_dim`` channels (MLA's absorbed latent cache).
      cache: a :class:`~attention_jax.cache.KVCache`, ``RollingKVCache`` or ``PagedKVCache`` (``lengths``
        before this step); its ``update`` API is unchanged.
      lengths: ``[B]`` real new tokens (right padding), as in ``cache.update``.
      mask, scale, softcap, score_mod, sinks, dropout_rate, dropout_rng, implementation: as in
        :func:`~attention_jax.functional.multi_head.multi_head_attention`; ``implementation`` picks
        the decode body (:func:`decode_kernel`).
      value_dim: ``Hv`` of a keys-only cache.
      return_lse: also return the float32 logsumexp ``[B, N, T]`` of each row's scores (with sinks,
        the sink's logit included).
      kernel, interpret: force a decode body (``"xla"``, ``"triton"``, ...) and run Pallas bodies in
        the interpreter (tests).

    Returns:
      ``(out [B, T, N, Hv], new_cache)``, or ``((out, lse), new_cache)``. Calls the kernels cannot
      serve (:func:`fallback_reason`) run today's path: ``cache.update`` and attention over its view.

    >>> import jax, jax.numpy as jnp
    >>> import attention_jax as aj
    >>> cache = aj.cache.PagedKVCache.create(2, num_pages=8, page_size=4, num_kv_heads=1, head_dim=8,
    ...                                      quantized=True)
    >>> kv = jax.random.normal(jax.random.key(0), (2, 3, 1, 8))
    >>> q = jax.random.normal(jax.random.key(1), (2, 3, 2, 8))
    >>> out, cache = cached_attention(q, kv, kv, cache, mask=aj.masks.causal())
    >>> out.shape, cache.lengths.tolist()
    ((2, 3, 2, 8), [3, 3])
    """
    if jnp.ndim(query) != 4:
        raise ValueError(f"query must be [B, T, N, H], got query.shape={jnp.shape(query)}.")
    if sinks is not None and jnp.shape(sinks) != (query.shape[2],):
        raise ValueError(f"sinks must have shape [N]=[{query.shape[2]}], got sinks.shape={jnp.shape(sinks)}.")
    if score_mod is not None and not isinstance(score_mod, score_mods_lib.ScoreMod):
        raise ValueError(
            f"score_mod must be an attention_jax.score_mods.ScoreMod (see score_mods.from_fn), got "
            f"{type(score_mod).__name__}."
        )
    if not dropout_rate or dropout_rng is None:
        dropout_rate, dropout_rng = 0.0, None
    reason = fallback_reason(
        query, cache, mask=mask, score_mod=score_mod, dropout_rng=dropout_rng, implementation=implementation
    )
    if reason is not None and kernel is None:
        return _fallback(query, key, value, cache, lengths, value_dim, return_lse, mask=mask, scale=scale,
                         softcap=softcap, score_mod=score_mod, sinks=sinks, dropout_rate=dropout_rate,
                         dropout_rng=dropout_rng, implementation=implementation)  # fmt: skip
    if reason is not None:
        raise ValueError(f"kernel={kernel!r} cannot serve this call: {reason}.")
    kernel = kernel or decode_kernel(implementation)
    new = _new_tokens(key, lengths)
    try:
        out, lse, cache = _kernel_step(query, key, value, cache, new, mask, score_mod, sinks, scale=scale,
                                       softcap=softcap, value_dim=value_dim, kernel=kernel,
                                       interpret=interpret)  # fmt: skip
    except ValueError:
        if kernel not in ("triton", "mosaic_tpu") or implementation not in (None, "auto"):
            raise
        # A Pallas body refuses some shapes (Triton: a non-power-of-two Hv; Mosaic TPU: pages smaller than
        # its native tile), saying why; chosen automatically, the XLA body serves every shape instead.
        out, lse, cache = _kernel_step(query, key, value, cache, new, mask, score_mod, sinks, scale=scale,
                                       softcap=softcap, value_dim=value_dim, kernel="xla",
                                       interpret=False)  # fmt: skip
    return ((out, lse) if return_lse else out), cache


def _new_tokens(key: Array, lengths: Array | None) -> Array:
    b, t = jnp.shape(key)[:2]
    return jnp.full((b,), t, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)


# -- the kernel path ---------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("scale", "softcap", "value_dim", "kernel", "interpret"))
def _kernel_step(query, key, value, cache, new, mask, score_mod, sinks, *, scale, softcap, value_dim, kernel,
                 interpret):  # fmt: skip
    """One compiled program (inlined under an outer jit): write, attend (ring and new tokens apart), sinks."""
    q_positions = cache.lengths[:, None] + jnp.arange(query.shape[1], dtype=jnp.int32)  # [B, T]
    new_cache, _ = cache.update(key, value, lengths=new)  # the view is dead code: XLA drops its gather
    attend = functools.partial(_attend, query, q_positions, mask=mask, score_mod=score_mod, scale=scale,
                               softcap=softcap, value_dim=value_dim, kernel=kernel, interpret=interpret)  # fmt: skip
    if cache.holds_new_tokens:
        out, lse = attend(new_cache.kernel_layout())
    else:  # the ring before the write, then the new tokens, merged by logsumexp
        parts = [attend(cache.kernel_layout()), attend(layout_lib.tokens_layout(cache, key, value, new))]
        out, lse = merge_by_lse(*parts)
        out = out.astype(query.dtype)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return out, lse, new_cache


def _attend(query, q_positions, layout: layout_lib.KernelLayout, *, mask, score_mod, scale, softcap, value_dim,
            kernel, interpret):  # fmt: skip
    """``decode_attention`` (or its reference) of ``query [B, T, N, H]`` over one layout: ``(out, lse [B, N, T])``."""
    body = "xla" if kernel == "reference" else kernel
    num_slots = layout.num_slots
    block_k = min(DEFAULT_BLOCK_K.get(body, 64), max(16, 1 << (num_slots - 1).bit_length()))
    mask_fn, q_vals, kv_vals, block_map = resolve_cache_mask(mask, layout, q_positions, block_k)
    if value_dim is None and layout.v_pages is None:
        raise ValueError("a keys-only cache (values = the keys' first channels) needs value_dim.")
    fn = decode_attention_reference if kernel == "reference" else decode_attention
    return fn(
        query, layout.k_pages, layout.v_pages, layout.page_table, layout.lengths, q_positions=q_positions,
        mask_fn=mask_fn, q_vals=q_vals, kv_vals=kv_vals, block_map=block_map, scale=scale, softcap=softcap,
        score_fn=None if score_mod is None else score_mod.tile_fn(),
        score_params=() if score_mod is None else score_mod.head_params(),
        value_dim=value_dim if layout.v_pages is None else None, block_k=block_k, kernel=body, interpret=interpret,
        return_lse=True, **layout.kernel_arguments(),
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _HeldFrom:
    """A mask function that also hides keys below a per-sequence position (the last of ``q_vals``)."""

    fn: Callable | None
    num_q_vals: int

    def __call__(self, q_pos, kv_pos, q_vals=(), kv_vals=()):
        held = kv_pos >= q_vals[self.num_q_vals]
        if self.fn is None:
            return held
        return held & self.fn(q_pos, kv_pos, tuple(q_vals[: self.num_q_vals]), tuple(kv_vals))


def tile_bounds(layout: layout_lib.KernelLayout, block_k: int) -> tuple[Array, Array]:
    """Smallest and largest position of each tile of ``block_k`` logical slots, each ``[B, nk]``.

    Linear layouts are computed from the tile's first and last slot (nothing of length ``S``); a ring
    (``W`` slots, a window) from its slots' positions.
    """
    s = layout.num_slots
    if layout.ring is not None:
        return mask_info.position_block_bounds(layout_lib.slot_positions(layout), block_k)
    first = jnp.arange(0, s, block_k, dtype=jnp.int32)[None, :]  # [1, nk]
    last = jnp.minimum(first + block_k, s) - 1
    return layout.kv_offset[:, None] + first, layout.kv_offset[:, None] + last


def resolve_cache_mask(mask, layout: layout_lib.KernelLayout, q_positions: Array, block_k: int):
    """The layer's ``Mask`` over a cache layout: ``(mask_fn, q_vals, kv_vals, block_map [B, nk] | None)``.

    The block map classifies each tile of ``block_k`` logical slots from its position bounds
    (:func:`tile_bounds`); the kernel intersects it with the slots that exist.
    """
    b, t = q_positions.shape
    s = layout.num_slots
    if mask is None and layout.valid_from is None:
        return None, (), (), None
    lo, hi = tile_bounds(layout, block_k)  # [B, nk]
    nk = lo.shape[1]
    block_map = jnp.full((b, nk), FULL, jnp.int8)
    fn, q_vals, kv_vals = None, (), ()
    if mask is not None:
        fn = mask.fn(None)
        q_vals, kv_vals = mask.arrays(t, s)
        q_vals = tuple(jnp.broadcast_to(jnp.asarray(x), (b, t)) for x in q_vals)
        kv_vals = tuple(jnp.broadcast_to(jnp.asarray(x), (b, s)) for x in kv_vals)
        # Each tile as two "positions", its bounds: a block of 2 has exactly those bounds.
        pairs = jnp.stack([lo, hi], axis=-1).reshape(b, 2 * nk)
        block_map = mask.runtime_block_map(q_positions, pairs, t, 2)[:, 0].astype(jnp.int8)  # [B, nk]
        block_map = jnp.broadcast_to(block_map, (b, nk))
    if layout.valid_from is not None:
        vf = layout.valid_from[:, None]
        held = jnp.where(lo >= vf, FULL, jnp.where(hi >= vf, PARTIAL, EMPTY)).astype(jnp.int8)
        block_map = jnp.minimum(block_map, held)
        fn = _HeldFrom(fn, len(q_vals))
        q_vals = (*q_vals, jnp.broadcast_to(layout.valid_from[:, None], (b, t)))
    return fn, q_vals, kv_vals, block_map


def merge_by_lse(*parts: tuple[Array, Array]) -> tuple[Array, Array]:
    """Attention over disjoint key sets, ``(out [B, T, N, Hv], lse [B, N, T])`` each, as one: float32 out.

    Rows no part saw keep ``lse = -inf`` and output zeros.
    """
    lses = jnp.stack([lse for _, lse in parts])  # [P, B, N, T]
    m = jnp.max(lses, axis=0)
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w = jnp.exp(lses - m_safe)  # [P, B, N, T]
    total = jnp.sum(w, axis=0)
    empty = total == 0.0
    safe = jnp.where(empty, 1.0, total)
    out = sum(o.astype(jnp.float32) * jnp.swapaxes(wi / safe, 1, 2)[..., None] for (o, _), wi in zip(parts, w))
    return out, jnp.where(empty, -jnp.inf, m_safe + jnp.log(safe))


def apply_sinks(out: Array, lse: Array, sinks: Array) -> tuple[Array, Array]:
    """One more key per head with logit ``sinks [N]`` and a zero value: ``out * sigmoid(lse - sink)``."""
    sink = sinks.astype(jnp.float32)[None, :, None]  # [1, N, 1]
    factor = jax.nn.sigmoid(lse - sink)  # [B, N, T]
    out = (out.astype(jnp.float32) * jnp.swapaxes(factor, 1, 2)[..., None]).astype(out.dtype)
    return out, jnp.logaddexp(lse, sink)


# -- today's path ------------------------------------------------------------------------------------


def _fallback(query, key, value, cache, lengths, value_dim, return_lse, **options):
    """``cache.update`` and attention over its dense view (the path of every call the kernels do not serve)."""
    cache, view = cache.update(key, value, lengths=lengths)
    keys = view.keys.astype(query.dtype)
    values = keys[..., :value_dim] if view.values is None else view.values.astype(query.dtype)
    if not return_lse:
        return multi_head_attention(query, keys, values, **options, **view.offsets()), cache
    sinks, mask = options.pop("sinks"), options.pop("mask")
    if mask is None or isinstance(mask, masks_lib.Mask):
        valid = masks_lib.valid_keys(view.kv_valid)
        mask = valid if mask is None else mask & valid
    else:
        mask = jnp.asarray(mask, bool) & view.kv_valid[:, None, None, :]
    out, lse = dot_product_attention(query, keys, values, mask=mask, q_offset=view.q_offset,
                                     kv_offset=view.kv_offset, return_lse=True, **options)  # fmt: skip
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return (out, lse), cache
