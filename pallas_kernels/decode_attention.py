"""Decode attention over a paged (or dense, or rolling) KV cache: a step costs one read of the live KV bytes.

``decode_attention(q, k_pages, v_pages, page_table, lengths, ...)`` attends a few query rows per
sequence (``T`` in 1..16: one decoded token, a block of draft tokens to verify, a chunk of a prefill)
to a cache stored as pages ``[P, ps, K, H]`` of a shared pool. ``page_table[b, i]`` is the page
holding the *logical slots* ``i * ps .. (i + 1) * ps - 1`` of sequence ``b``; slots
``[0, lengths[b])`` exist. Two layouts map logical slots to absolute positions:

* linear (the default): slot ``s`` holds position ``kv_offset[b] + s``;
* ring (``ring=W``, a rolling cache of ``W`` slots): slot ``s`` holds the latest position ``p`` with
  ``p % W == s``, i.e. ``s + W * floor((lengths[b] - 1 - s) / W)`` (plus ``kv_offset``); slots whose
  position would be negative do not exist yet.

A dense cache ``[B, C, K, H]`` is served without a copy as ``C / ps`` pages per sequence (a free
reshape ``[B * C / ps, ps, K, H]`` and ``page_table[b] = b * C / ps + arange(C / ps)``), see
:func:`dense_as_pages`.

Keys are visited in tiles of ``block_k`` logical slots. A per-sequence block map ``[B, nk]``
(EMPTY / PARTIAL / FULL, as in :mod:`pallas_kernels.mask_info`) decides which tiles are loaded:
EMPTY tiles never are, FULL tiles run without mask arithmetic, PARTIAL tiles evaluate the mask
function, the slots' existence (``lengths``, pages ``-1``) and zero the K/V rows that no query row
sees (an uninitialised page cannot leak NaN). The map given by the caller (a sliding window's, say)
is intersected with the one the lengths imply. Each sequence's visit list ``[FULL..., PARTIAL...]``
is cut into ``num_splits`` chunks computed in parallel (split-K, "flash decoding"); each chunk
gives a normalised partial output and its float32 logsumexp, and the chunks are merged by
logsumexp.

The ``G = N // K`` query heads that share a key/value head and the ``T`` query positions form one
tile of ``T * G`` rows (row ``t * G + g``), so a loaded K/V tile serves the whole group: GQA and MQA
never repeat K/V. Quantised caches (int8 or float8_e4m3fn pages with per-token-per-head float32
scales, ``x ~= q * scale``) are dequantised tile by tile inside the kernels. With ``v_pages=None``
the values are the first ``value_dim`` channels of the keys (MLA's absorbed latent cache).

Bodies, named by lowering: ``kernel="xla"`` (``_decode_xla``: a blockwise XLA loop over the visit
list, batched over sequences and splits; the CPU default), ``kernel="triton"`` (``_decode_triton``: one
program per (sequence, key/value head, split) that reads the page table inside its loop) and
``kernel="mosaic_tpu"`` (``_decode_mosaic_tpu``: page table and visit lists scalar-prefetched, K/V
index maps that follow them). Each Pallas body names what it cannot serve (``unsupported_reason``).
:func:`decode_attention_reference` gathers the dense cache and is the oracle of the tests.

>>> import jax, jax.numpy as jnp
>>> q = jax.random.normal(jax.random.key(0), (2, 1, 4, 16))        # [B, T, N, H]
>>> pages = jax.random.normal(jax.random.key(1), (6, 4, 2, 16))    # [P, ps, K, H]: GQA, G = 2
>>> table = jnp.array([[3, 0, 5], [1, 2, -1]])                     # [B, M]
>>> lengths = jnp.array([10, 5])
>>> out, lse = decode_attention(q, pages, pages, table, lengths, return_lse=True)
>>> ref = decode_attention_reference(q, pages, pages, table, lengths)
>>> bool(jnp.allclose(out, ref, atol=1e-5)), out.shape, lse.shape
(True, (2, 1, 4, 16), (2, 4, 1))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL, num_blocks

Array = jax.Array
KERNELS = ("xla", "triton", "mosaic_tpu")
QUANTIZED_DTYPES = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))
DEFAULT_BLOCK_K = {"xla": 128, "triton": 64, "mosaic_tpu": 128}

__all__ = ["decode_attention", "decode_attention_reference", "dense_as_pages"]


# -- static configuration --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static description of one decode call (hashable), shared by every body."""

    batch: int  # B
    q_len: int  # T
    num_kv_heads: int  # K
    group: int  # G = N // K
    head_dim: int  # H
    value_dim: int  # Hv
    page_size: int  # ps
    max_pages: int  # M
    num_slots: int  # logical slots: M * ps (linear) or W (ring)
    ring: int | None
    block_k: int
    num_splits: int
    scale: float
    softcap: float | None
    mask_fn: Callable | None
    score_fn: Callable | None  # MaskSpec.score_fn protocol; per-head parameters travel as arrays
    keys_only: bool  # values are the first Hv channels of the keys
    quantized: bool
    compute_dtype: jnp.dtype  # operands of the dots

    @property
    def rows(self) -> int:
        """Query rows of one (sequence, key/value head) tile: ``T * G``."""
        return self.q_len * self.group

    @property
    def num_tiles(self) -> int:
        return num_blocks(self.num_slots, self.block_k)

    def slot_position(self, slot, length, offset):
        """``(position, exists)`` of logical slots (any shape; ``length``/``offset`` broadcast against it).

        Elementwise jnp only, so the kernels call it on their tiles too. ``exists`` ignores the page table.
        """
        if self.ring is None:
            return offset + slot, (slot < length) & (slot < self.num_slots)
        w = self.ring
        # floor((length - 1 - slot) / W) with a non-negative numerator (slot < W): truncation is floor
        # (lax.div: Mosaic lowers floor division of signed ints only with a device to ask).
        wraps = lax.div(jnp.maximum(length - 1 - slot + w, 0), jnp.int32(w)) - 1
        return offset + slot + w * wraps, (slot < length) & (slot < w)


def _is_power_of_2(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0 and x & (x - 1) == 0


def _check(cond: bool, message: str):
    if not cond:
        raise ValueError(message)


def _prepare(q, k_pages, v_pages, page_table, lengths, *, q_positions=None, kv_offset=0, ring=None, k_scales=None,
             v_scales=None, mask_fn=None, q_vals=(), kv_vals=(), block_map=None, scale=None, softcap=None,
             score_fn=None, score_params=(), value_dim=None, block_k=None, num_splits=None,
             kernel="xla"):  # fmt: skip
    """Validate every argument once; return the static config and the arrays in canonical form."""
    _check(kernel in KERNELS, f"kernel must be one of {KERNELS}, got {kernel=!r}.")
    _check(jnp.ndim(q) == 4, f"q must be [B, T, N, H], got q.shape={jnp.shape(q)}.")
    _check(jnp.issubdtype(q.dtype, jnp.floating), f"q must be floating, got q.dtype={q.dtype}.")
    b, t, n, h = q.shape
    _check(jnp.ndim(k_pages) == 4, f"k_pages must be [P, ps, K, H], got k_pages.shape={jnp.shape(k_pages)}.")
    p, ps, kh, hk = k_pages.shape
    _check(hk == h, f"k_pages must have head dim H={h} like q, got k_pages.shape={k_pages.shape}.")
    _check(kh > 0 and n % kh == 0, f"q heads N={n} must be a multiple of the KV heads K={kh} of k_pages.")
    kdt = jnp.dtype(k_pages.dtype)
    quantized = kdt in QUANTIZED_DTYPES
    _check(quantized or jnp.issubdtype(kdt, jnp.floating),
           f"k_pages must be floating, int8 or float8_e4m3fn, got k_pages.dtype={kdt}.")  # fmt: skip
    if v_pages is None:
        _check(value_dim is not None, "v_pages=None (values are the keys' first channels) needs value_dim.")
        _check(isinstance(value_dim, int) and 0 < value_dim <= h, f"value_dim must be in [1, H={h}], got {value_dim=}.")
        hv = value_dim
    else:
        _check(jnp.shape(v_pages)[:3] == (p, ps, kh) and jnp.ndim(v_pages) == 4,
               f"v_pages must be [P, ps, K, Hv]=[{p}, {ps}, {kh}, Hv], got {jnp.shape(v_pages)}.")  # fmt: skip
        _check(jnp.dtype(v_pages.dtype) == kdt,
               f"v_pages must have the dtype of k_pages ({kdt}), got v_pages.dtype={v_pages.dtype}.")  # fmt: skip
        hv = v_pages.shape[-1]
        _check(
            value_dim is None or value_dim == hv, f"value_dim={value_dim} disagrees with v_pages.shape={v_pages.shape}."
        )
    scale_shape = (p, ps, kh)
    if quantized:
        _check(k_scales is not None and jnp.shape(k_scales) == scale_shape,
               f"quantised k_pages need k_scales [P, ps, K]={list(scale_shape)}, got "
               f"{None if k_scales is None else jnp.shape(k_scales)}.")  # fmt: skip
        if v_pages is not None:
            _check(v_scales is not None and jnp.shape(v_scales) == scale_shape,
                   f"quantised v_pages need v_scales [P, ps, K]={list(scale_shape)}, got "
                   f"{None if v_scales is None else jnp.shape(v_scales)}.")  # fmt: skip
        else:
            _check(v_scales is None, "v_pages=None reads the values with k_scales: pass v_scales=None.")
    else:
        _check(k_scales is None and v_scales is None, f"k_scales/v_scales apply to int8/fp8 pages only, got {kdt}.")
    _check(jnp.ndim(page_table) == 2 and page_table.shape[0] == b,
           f"page_table must be [B, M] with B={b}, got page_table.shape={jnp.shape(page_table)}.")  # fmt: skip
    _check(jnp.issubdtype(page_table.dtype, jnp.integer), f"page_table must be integer, got {page_table.dtype}.")
    m = page_table.shape[1]
    _check(jnp.shape(lengths) == (b,), f"lengths must be [B]=[{b}], got lengths.shape={jnp.shape(lengths)}.")
    kv_offset = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (b,)) if jnp.ndim(kv_offset) <= 1 else None
    _check(kv_offset is not None, "kv_offset must be a scalar or [B].")
    if ring is not None:
        _check(isinstance(ring, int) and 0 < ring <= m * ps,
               f"ring must be a static int in [1, M * ps={m * ps}], got {ring=}.")  # fmt: skip
    if mask_fn is not None or q_vals:
        _check(q_positions is not None, "mask_fn needs q_positions [B, T].")
    if q_positions is None:
        q_positions = jnp.zeros((b, t), jnp.int32)
    _check(jnp.shape(q_positions) == (b, t), f"q_positions must be [B, T]=[{b}, {t}], got {jnp.shape(q_positions)}.")
    q_vals, kv_vals = tuple(q_vals), tuple(kv_vals)
    for i, x in enumerate(q_vals):
        _check(jnp.shape(x) == (b, t), f"q_vals[{i}] must be [B, T]=[{b}, {t}], got {jnp.shape(x)}.")
    for i, x in enumerate(kv_vals):
        _check(jnp.shape(x) == (b, m * ps), f"kv_vals[{i}] must be [B, M * ps]=[{b}, {m * ps}], got {jnp.shape(x)}.")
    if softcap is not None:
        _check(float(softcap) > 0, f"softcap must be positive, got {softcap=}.")
    score_params = tuple(jnp.asarray(x, jnp.float32) for x in score_params)
    _check(score_fn is not None or not score_params, "score_params need a score_fn.")
    if score_fn is not None:
        _check(q_positions is not None, "score_fn needs q_positions [B, T].")
    for i, x in enumerate(score_params):
        _check(x.shape == (n,), f"score_params[{i}] must be [N]=[{n}] (one value per query head), got {x.shape}.")
    num_slots = m * ps if ring is None else ring
    if block_k is None:
        _check(block_map is None, "block_map needs the block_k its tiles were built for.")
        block_k = min(DEFAULT_BLOCK_K[kernel], max(16, 1 << (num_slots - 1).bit_length()))
    _check(_is_power_of_2(block_k) and block_k >= 16, f"block_k must be a power of two >= 16, got {block_k=}.")
    nk = num_blocks(num_slots, block_k)
    if block_map is not None:
        _check(jnp.shape(block_map) == (b, nk),
               f"block_map must be [B, nk]=[{b}, {nk}] for {block_k=}, got {jnp.shape(block_map)}.")  # fmt: skip
    if num_splits is None:
        num_splits = max(1, min(nk, 128 // max(1, b * kh))) if kernel == "triton" else 1
    _check(isinstance(num_splits, int) and num_splits >= 1, f"num_splits must be a positive int, got {num_splits=}.")
    cfg = DecodeConfig(
        batch=b, q_len=t, num_kv_heads=kh, group=n // kh, head_dim=h, value_dim=hv, page_size=ps, max_pages=m,
        num_slots=num_slots, ring=ring, block_k=block_k, num_splits=min(num_splits, nk),
        scale=float(1.0 / math.sqrt(h) if scale is None else scale),
        softcap=None if softcap is None else float(softcap), mask_fn=mask_fn, score_fn=score_fn,
        keys_only=v_pages is None,
        quantized=quantized, compute_dtype=jnp.dtype(q.dtype if quantized else kdt),
    )  # fmt: skip
    arrays = dict(
        page_table=jnp.asarray(page_table, jnp.int32),
        lengths=jnp.asarray(lengths, jnp.int32),
        kv_offset=kv_offset,
        q_positions=jnp.asarray(q_positions, jnp.int32),
        q_vals=q_vals,
        kv_vals=kv_vals,
        block_map=block_map,
        score_params=score_params,
    )
    return cfg, arrays


# -- block maps and visit plans --------------------------------------------------------------------


def _tile_existence(cfg: DecodeConfig, page_table, lengths, kv_offset):
    """``(any_exists, all_exist)`` per key tile, each ``[B, nk]``: slots that exist and have a page."""
    nk, bk = cfg.num_tiles, cfg.block_k
    slots = jnp.arange(nk * bk, dtype=jnp.int32)[None, :]  # [1, nk * bk]
    _, exists = cfg.slot_position(slots, lengths[:, None], kv_offset[:, None])
    page_index = jnp.minimum(slots // cfg.page_size, cfg.max_pages - 1)
    has_page = jnp.take_along_axis(page_table, jnp.broadcast_to(page_index, exists.shape), axis=1) >= 0
    live = (exists & has_page).reshape(-1, nk, bk)
    return live.any(axis=-1), live.all(axis=-1)


def decode_block_map(cfg: DecodeConfig, page_table, lengths, kv_offset, block_map=None) -> Array:
    """``[B, nk]`` int8 block map of the call: the caller's map (if any) AND the one the lengths imply.

    Tiles with no existing slot are EMPTY; tiles whose slots all exist are FULL when the call has no
    mask function (else the caller's map decides, PARTIAL by default); the rest PARTIAL.
    """
    any_live, all_live = _tile_existence(cfg, page_table, lengths, kv_offset)
    full_ok = all_live if cfg.mask_fn is None else jnp.zeros_like(all_live)
    implied = jnp.where(any_live, jnp.where(full_ok, FULL, PARTIAL), EMPTY).astype(jnp.int8)
    if block_map is None:
        return implied
    given = jnp.asarray(block_map).astype(jnp.int8)
    if cfg.mask_fn is None:  # no mask function to evaluate: the caller's FULL needs existence only
        given = jnp.where(given == EMPTY, EMPTY, FULL).astype(jnp.int8)
    return jnp.where(any_live, jnp.minimum(given, jnp.where(all_live, FULL, PARTIAL)), EMPTY).astype(jnp.int8)


@dataclasses.dataclass(frozen=True)
class VisitPlan:
    """Which tiles each (sequence, split) visits: ``order [B, nk]`` lists the tile indices as
    ``[FULL..., PARTIAL..., EMPTY...]``; ``meta [B, 8]`` int32 holds ``(length, kv_offset, num_full,
    num_partial, per_split, 0, 0, 0)``: split ``c`` visits list entries ``[c * per_split,
    min((c + 1) * per_split, num_full + num_partial))``."""

    order: Array
    meta: Array

    @property
    def num_visits(self) -> Array:
        return self.meta[:, 2] + self.meta[:, 3]


# Registered with the class in the tree structure (see ``_flash_plan.Plan``): JAX 0.10's
# ``register_dataclass`` structures of different classes with the same children compare equal.
jax.tree_util.register_pytree_node(VisitPlan, lambda p: ((p.order, p.meta), None), lambda _, c: VisitPlan(*c))


def visit_plan(cfg: DecodeConfig, block_map, lengths, kv_offset) -> VisitPlan:
    """The per-sequence visit lists of ``block_map [B, nk]`` cut into ``cfg.num_splits`` balanced chunks."""
    rank = jnp.where(block_map == FULL, 0, jnp.where(block_map == PARTIAL, 1, 2))
    order = jnp.argsort(rank, axis=1, stable=True).astype(jnp.int32)  # [B, nk]
    num_full = jnp.sum(block_map == FULL, axis=1, dtype=jnp.int32)
    num_partial = jnp.sum(block_map == PARTIAL, axis=1, dtype=jnp.int32)
    per_split = -(-(num_full + num_partial) // cfg.num_splits)
    zero = jnp.zeros_like(num_full)
    meta = jnp.stack([lengths, kv_offset, num_full, num_partial, per_split, zero, zero, zero], axis=1)
    return VisitPlan(order, meta.astype(jnp.int32))


# -- layouts ---------------------------------------------------------------------------------------


def dense_as_pages(cache: Array, page_size: int) -> tuple[Array, Array]:
    """A dense cache ``[B, C, K, H]`` as pages ``[B * C / ps, ps, K, H]`` (free reshape) and a table ``[B, C / ps]``.

    >>> pages, table = dense_as_pages(jnp.zeros((2, 8, 1, 4)), 4)
    >>> pages.shape, table.tolist()
    ((4, 4, 1, 4), [[0, 1], [2, 3]])
    """
    b, c = cache.shape[:2]
    if c % page_size:
        raise ValueError(f"the cache length must be a multiple of page_size, got C={c} and {page_size=}.")
    m = c // page_size
    table = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
    return cache.reshape(b * m, page_size, *cache.shape[2:]), table


def _to_rows(q: Array, cfg: DecodeConfig) -> Array:
    """``q [B, T, N, H] -> [B, K, T * G, H]`` (row ``t * G + g``)."""
    b, t, _, h = q.shape
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.group, h).transpose(0, 2, 1, 3, 4)
    return q.reshape(b, cfg.num_kv_heads, t * cfg.group, h)


def _from_rows(out: Array, lse: Array, cfg: DecodeConfig):
    """``out [B, K, R, Hv] -> [B, T, N, Hv]`` and ``lse [B, K, R] -> [B, N, T]``."""
    b, kh, g, t = cfg.batch, cfg.num_kv_heads, cfg.group, cfg.q_len
    out = out.reshape(b, kh, t, g, -1).transpose(0, 2, 1, 3, 4).reshape(b, t, kh * g, -1)
    lse = lse.reshape(b, kh, t, g).transpose(0, 1, 3, 2).reshape(b, kh * g, t)
    return out, lse


def combine_splits(out: Array, lse: Array) -> tuple[Array, Array]:
    """Merge split partials ``out [..., C, R, Hv]`` (normalised) and ``lse [..., C, R]`` by logsumexp.

    Rows no split saw keep ``lse = -inf`` and output zeros.
    """
    m = jnp.max(lse, axis=-2, keepdims=True)  # [..., 1, R]
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    w = jnp.exp(lse - m_safe)  # [..., C, R], 0 for empty splits
    total = jnp.sum(w, axis=-2)  # [..., R]
    empty = total == 0.0
    lse_out = jnp.where(empty, -jnp.inf, m_safe[..., 0, :] + jnp.log(jnp.where(empty, 1.0, total)))
    weights = w / jnp.where(empty, 1.0, total)[..., None, :]
    return jnp.sum(weights[..., None] * out, axis=-3), lse_out


def _flat_pages(x: Array | None) -> Array | None:
    """``[P, ps, ...] -> [P * ps, ...]``: a free reshape, so a slot's row is ``page * ps + slot % ps``."""
    return None if x is None else x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def decode_attention(
    q: Array,
    k_pages: Array,
    v_pages: Array | None,
    page_table: Array,
    lengths: Array,
    *,
    q_positions: Array | None = None,
    kv_offset: Array | int = 0,
    ring: int | None = None,
    k_scales: Array | None = None,
    v_scales: Array | None = None,
    mask_fn: Callable | None = None,
    q_vals: tuple = (),
    kv_vals: tuple = (),
    block_map: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_fn: Callable | None = None,
    score_params: tuple = (),
    value_dim: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    kernel: str = "xla",
    interpret: bool = False,
    return_lse: bool = False,
):
    """Attention of a few query rows per sequence over a paged KV cache, reading only the live tiles.

    Args:
      q: ``[B, T, N, H]`` queries (T small: 1..16).
      k_pages: ``[P, ps, K, H]`` key pages, float (any float dtype), int8 or float8_e4m3fn (quantised).
      v_pages: ``[P, ps, K, Hv]`` value pages of the same dtype, or None: the values are the first
        ``value_dim`` channels of the keys (MLA's absorbed latent cache, ``K == 1``).
      page_table: ``[B, M]`` int32, the page of logical slots ``i * ps .. (i + 1) * ps - 1`` of
        sequence ``b`` (-1: none; such slots do not exist).
      lengths: ``[B]`` int32, logical slots ``[0, lengths[b])`` exist (ring: the tokens written so far).
      q_positions: ``[B, T]`` int32 absolute position of each query (needed with ``mask_fn``).
      kv_offset: scalar or ``[B]`` int32 absolute position of logical slot 0 (added in both layouts).
      ring: static ``W`` for the ring layout of a rolling cache (see the module docstring), or None.
      k_scales, v_scales: ``[P, ps, K]`` float32 per-token-per-head scales of quantised pages.
      mask_fn: ``fn(q_pos [rows, 1], kv_pos [1, bk], q_vals, kv_vals) -> bool`` (the
        :class:`~pallas_kernels.mask_info.MaskSpec` protocol) or None: every existing slot is visible.
      q_vals: per-query data for ``mask_fn``, each ``[B, T]``; kv_vals: per logical slot, each ``[B, M * ps]``.
      block_map: ``[B, nk]`` int8 EMPTY/PARTIAL/FULL per tile of ``block_k`` logical slots, or None.
        Intersected with the map the lengths imply; EMPTY tiles are never loaded (and count as masked).
      scale: score scale, default ``1 / sqrt(H)``; softcap: ``c * tanh(s / c)`` before masking.
      score_fn: ``fn(score, batch, head, q_pos, kv_pos, params) -> score`` applied after the scale and
        before softcap (the :class:`~pallas_kernels.mask_info.MaskSpec` protocol: ALiBi, relative
        biases), with ``score_params`` per query head, each ``[N]``. The XLA body only, for now.
      value_dim: ``Hv`` when ``v_pages`` is None.
      block_k: key tile (power of two >= 16), any page size works with any tile; num_splits: split-K chunks.
      kernel: ``"xla"`` (blockwise XLA, the CPU default), ``"triton"`` (Pallas Triton, GPU) or
        ``"mosaic_tpu"`` (Pallas Mosaic, TPU).
      interpret: run a Pallas body in Pallas' interpreter (CPU tests).
      return_lse: also return the float32 natural-log logsumexp ``[B, N, T]`` (-inf: nothing visible).

    Returns:
      ``out [B, T, N, Hv]`` in ``q.dtype`` (zeros for rows that see nothing), and ``lse`` if asked.

    >>> import jax.numpy as jnp
    >>> q, pages = jnp.ones((1, 2, 2, 16)), jnp.ones((2, 8, 1, 16))
    >>> causal = lambda qp, kp, qv, kv: kp <= qp
    >>> out = decode_attention(q, pages, pages, jnp.array([[1, 0]]), jnp.array([12]),
    ...                        q_positions=jnp.array([[10, 11]]), mask_fn=causal)
    >>> out.shape
    (1, 2, 2, 16)
    """
    out, lse, _ = _decode(
        q, k_pages, v_pages, page_table, lengths, q_positions=q_positions, kv_offset=kv_offset, ring=ring,
        k_scales=k_scales, v_scales=v_scales, mask_fn=mask_fn, q_vals=q_vals, kv_vals=kv_vals, block_map=block_map,
        scale=scale, softcap=softcap, score_fn=score_fn, score_params=score_params, value_dim=value_dim,
        block_k=block_k, num_splits=num_splits, kernel=kernel, interpret=interpret,
    )  # fmt: skip
    return (out, lse) if return_lse else out


def _decode(q, k_pages, v_pages, page_table, lengths, *, interpret: bool = False, **options):
    """``(out, lse, steps)``: :func:`decode_attention`'s work; ``steps`` is the XLA body's loop trip count
    (None for the Pallas bodies), which tests read to count the tiles a call visits."""
    cfg, arrays = _prepare(q, k_pages, v_pages, page_table, lengths, **options)
    block_map = decode_block_map(cfg, arrays["page_table"], arrays["lengths"], arrays["kv_offset"],
                                 arrays["block_map"])  # fmt: skip
    plan = visit_plan(cfg, block_map, arrays["lengths"], arrays["kv_offset"])
    q_rows = _to_rows(q, cfg).astype(cfg.compute_dtype)  # [B, K, R, H]
    k_scales = options.get("k_scales")
    # The values of a keys-only cache are the keys' first channels: their scales too.
    v_scales = k_scales if cfg.keys_only else options.get("v_scales")
    kernel, steps = options.get("kernel", "xla"), None
    if kernel == "xla":
        from pallas_kernels import _decode_xla

        out, lse, steps = _decode_xla.forward(cfg, q_rows, k_pages, v_pages, k_scales, v_scales, plan, arrays)
    elif kernel == "mosaic_tpu":
        from pallas_kernels import _decode_mosaic_tpu

        out, lse = _decode_mosaic_tpu.forward(cfg, q_rows, k_pages, v_pages, k_scales, v_scales, plan, arrays,
                                              interpret=interpret)  # fmt: skip
    else:
        from pallas_kernels import _decode_triton

        flat = tuple(_flat_pages(x) for x in (k_pages, v_pages, k_scales, v_scales))
        out, lse = _decode_triton.forward(cfg, q_rows, *flat, plan, arrays, interpret=interpret)
    out, lse = combine_splits(out, lse)  # [B, K, R, Hv], [B, K, R]
    out, lse = _from_rows(out, lse, cfg)
    return out.astype(q.dtype), lse, steps


# -- reference -------------------------------------------------------------------------------------


def decode_attention_reference(
    q: Array,
    k_pages: Array,
    v_pages: Array | None,
    page_table: Array,
    lengths: Array,
    *,
    q_positions: Array | None = None,
    kv_offset: Array | int = 0,
    ring: int | None = None,
    k_scales: Array | None = None,
    v_scales: Array | None = None,
    mask_fn: Callable | None = None,
    q_vals: tuple = (),
    kv_vals: tuple = (),
    block_map: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_fn: Callable | None = None,
    score_params: tuple = (),
    value_dim: int | None = None,
    block_k: int | None = None,
    num_splits: int | None = None,
    kernel: str = "xla",
    interpret: bool = False,
    return_lse: bool = False,
):
    """The oracle: gathers the dense cache ``[B, S, K, H]``, dequantises it and evaluates the mask densely.

    Same signature and result as :func:`decode_attention` (``num_splits``, ``kernel`` and ``interpret``
    are ignored); float32 softmax. A tile that ``block_map`` calls EMPTY counts as masked.

    >>> import jax.numpy as jnp
    >>> out = decode_attention_reference(jnp.ones((1, 1, 1, 16)), jnp.ones((1, 4, 1, 16)), None,
    ...                                  jnp.array([[0]]), jnp.array([0]), value_dim=8)
    >>> out.shape, float(abs(out).max())  # nothing to attend to: zeros
    ((1, 1, 1, 8), 0.0)
    """
    cfg, arrays = _prepare(
        q, k_pages, v_pages, page_table, lengths, q_positions=q_positions, kv_offset=kv_offset, ring=ring,
        k_scales=k_scales, v_scales=v_scales, mask_fn=mask_fn, q_vals=q_vals, kv_vals=kv_vals, block_map=block_map,
        scale=scale, softcap=softcap, score_fn=score_fn, score_params=score_params, value_dim=value_dim,
        block_k=block_k, num_splits=num_splits,
    )  # fmt: skip
    b, t, n, h = q.shape
    kh, g, s_len = cfg.num_kv_heads, cfg.group, cfg.num_slots
    table = arrays["page_table"]

    def dense(pages, scales):  # [B, S, K, *] float32, the first S logical slots
        x = pages[jnp.maximum(table, 0)].astype(jnp.float32)  # [B, M, ps, K, *]
        if scales is not None:
            x = x * scales[jnp.maximum(table, 0)][..., None]
        return x.reshape(b, cfg.max_pages * cfg.page_size, *x.shape[3:])[:, :s_len]

    keys = dense(k_pages, k_scales)
    values = keys[..., : cfg.value_dim] if v_pages is None else dense(v_pages, v_scales)
    slot = jnp.arange(s_len, dtype=jnp.int32)[None, :]
    length, offset = arrays["lengths"][:, None], arrays["kv_offset"][:, None]
    exists = slot < length  # [B, S]
    if ring is None:
        kv_pos = offset + slot
    else:  # the latest position p < length with p % W == slot (written independently of the kernels' form)
        kv_pos = offset + length - 1 - jnp.mod(length - 1 - slot, ring)
    has_page = jnp.repeat(table >= 0, cfg.page_size, axis=1)[:, :s_len]
    visible = (exists & has_page)[:, None, :]  # [B, 1, S]
    if cfg.mask_fn is not None:
        q_pos = arrays["q_positions"][:, :, None]
        q_v = tuple(jnp.asarray(x)[:, :, None] for x in arrays["q_vals"])
        kv_v = tuple(jnp.asarray(x)[:, None, :s_len] for x in arrays["kv_vals"])
        visible = visible & cfg.mask_fn(q_pos, kv_pos[:, None, :], q_v, kv_v)
    if arrays["block_map"] is not None:
        tiles = jnp.repeat(jnp.asarray(arrays["block_map"]) != EMPTY, cfg.block_k, axis=1)[:, None, :s_len]
        visible = visible & tiles
    visible = jnp.broadcast_to(visible, (b, t, s_len))
    qf = q.astype(jnp.float32).reshape(b, t, kh, g, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", qf, keys, precision=lax.Precision.HIGHEST) * cfg.scale
    if cfg.score_fn is not None:
        head = jnp.arange(n, dtype=jnp.int32).reshape(1, kh, g, 1, 1)
        scores = cfg.score_fn(
            scores, jnp.arange(b, dtype=jnp.int32).reshape(b, 1, 1, 1, 1), head,
            arrays["q_positions"][:, None, None, :, None], kv_pos[:, None, None, None, :],
            tuple(x[head] for x in arrays["score_params"]),
        )  # fmt: skip
    if cfg.softcap is not None:
        scores = cfg.softcap * jnp.tanh(scores / cfg.softcap)
    mask = visible[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(mask, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    p = jnp.where(mask, jnp.exp(scores - m), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom == 0.0, 1.0, denom)
    values = jnp.where(jnp.any(visible, axis=1)[:, :, None, None], values, 0.0)  # [B, S, K, Hv], NaN-safe
    out = jnp.einsum("BKGTS,BSKV->BTKGV", p / safe, values, precision=lax.Precision.HIGHEST)
    out = out.reshape(b, t, n, cfg.value_dim).astype(q.dtype)
    lse = jnp.where(denom == 0.0, -jnp.inf, m + jnp.log(safe))[..., 0].reshape(b, n, t)
    return (out, lse) if return_lse else out
