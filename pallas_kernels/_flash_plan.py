"""Geometry and visit plans of the flash kernels: padded sizes, per-kernel block maps, visit tables.

The kernels work on *rows*: the ``G = N // K`` query heads that share a key/value head are
interleaved with the query positions, row ``r = t * G + g`` holding position ``t`` of head
``k * G + g``. A tile of ``block_rows`` rows therefore covers ``block_rows / G`` positions of all
``G`` heads, and one loaded K/V block serves the whole group (GQA/MQA without repeating K/V).

A :class:`~pallas_kernels.mask_info.MaskSpec` describes the mask with a block map over
``(spec.block_q, spec.block_k)`` tiles of the ``[T, S]`` score matrix. Each kernel has its own
tiles, so :func:`kernel_block_map` resamples the map: a kernel tile is EMPTY if every spec tile it
overlaps is, FULL if every one is, PARTIAL otherwise (exact when the kernel tiles are unions of
spec tiles, conservative otherwise). It runs on the runtime map with a few gathers, so a ring step
can pick its map with ``axis_index``. :func:`visit_table` then orders each row of a map as
``[FULL..., PARTIAL..., EMPTY...]`` so a kernel loops over exactly the tiles it must compute.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dropout
from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL, MaskSpec, num_blocks

MIN_BLOCK = 16  # smallest tile side a kernel uses (Triton's dot needs 16)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static sizes of one kernel call (hashable: part of the kernels' static configuration).

    ``fwd``, ``dkv`` and ``dq`` are the ``(block_rows, block_k)`` tiles of the three kernels,
    already clamped to the problem; ``rows_padded`` and ``kv_padded`` are multiples of all of them.
    """

    batch: int
    q_len: int  # T
    kv_len: int  # S
    num_kv_heads: int  # K
    group: int  # G = N // K
    head_dim: int  # H
    value_head_dim: int  # Hv
    head_dim_padded: int
    value_head_dim_padded: int
    fwd: tuple[int, int]
    dkv: tuple[int, int]
    dq: tuple[int, int]
    rows_padded: int  # Rp >= T * G
    kv_padded: int  # Sp >= S

    @property
    def rows(self) -> int:
        return self.q_len * self.group

    @property
    def num_heads(self) -> int:
        return self.num_kv_heads * self.group


def make_geometry(q_shape, k_shape, v_shape, block_sizes, *, pad_head_dims: bool) -> Geometry:
    """Clamp the block sizes to the problem and derive the padded sizes.

    ``pad_head_dims`` rounds head dims up to a power of two (>= 16) for Triton, whose tiles must
    have power-of-two sides; Mosaic takes any head dim as a full block.
    """
    b, t, n, h = q_shape
    s, kh = k_shape[1], k_shape[2]
    hv = v_shape[-1]
    group = n // kh
    rows = t * group

    def fit(block: int, length: int) -> int:
        return min(block, max(MIN_BLOCK, next_power_of_2(length)))

    bs = block_sizes
    fwd = (fit(bs.block_q, rows), fit(bs.block_k, s))
    dkv = (fit(bs.block_q_dkv, rows), fit(bs.block_k_dkv, s))
    dq = (fit(bs.block_q_dq, rows), fit(bs.block_k_dq, s))
    # Block sides are powers of two, so the largest one is a multiple of all the others.
    rows_padded = round_up(rows, max(fwd[0], dkv[0], dq[0]))
    kv_padded = round_up(s, max(fwd[1], dkv[1], dq[1]))

    def pad_dim(d: int) -> int:
        return max(MIN_BLOCK, next_power_of_2(d)) if pad_head_dims else d

    return Geometry(b, t, s, kh, group, h, hv, pad_dim(h), pad_dim(hv), fwd, dkv, dq, rows_padded, kv_padded)


# -- block maps ------------------------------------------------------------------------------------


def _tile_ranges(first: np.ndarray, last: np.ndarray, valid: np.ndarray, spec_block: int):
    """Spec tiles overlapped by each kernel tile whose sequence indices span ``[first, last]``."""
    lo = np.where(valid, first // spec_block, 0)
    hi = np.where(valid, last // spec_block, 0)
    return lo, hi


def _span_reduce(x: jax.Array, lo: np.ndarray, hi: np.ndarray, axis: int, op) -> jax.Array:
    """``op``-reduce ``x`` along ``axis`` over the inclusive index ranges ``[lo[i], hi[i]]``."""
    if np.array_equal(lo, hi) and np.array_equal(lo, np.arange(x.shape[axis])):
        return x
    out = None
    for r in range(int(np.max(hi - lo, initial=0)) + 1):
        part = jnp.take(x, jnp.asarray(np.minimum(lo + r, hi), jnp.int32), axis=axis)
        out = part if out is None else op(out, part)
    return out


def kernel_block_map(spec: MaskSpec | None, geom: Geometry, block_rows: int, block_k: int) -> jax.Array:
    """``[Bm, Rp / block_rows, Sp / block_k]`` int32 block map of one kernel's tiles (Bm: 1 or B).

    Tiles that lie wholly in the padding are EMPTY; a tile that holds padded keys is never FULL
    (the kernel masks ``key index >= S`` in PARTIAL tiles).
    """
    t, s, g = geom.q_len, geom.kv_len, geom.group
    nr, nk = geom.rows_padded // block_rows, geom.kv_padded // block_k
    row_start = np.arange(nr) * block_rows
    row_valid = row_start < geom.rows
    q_first = row_start // g
    q_last = (np.minimum(row_start + block_rows, geom.rows) - 1) // g
    kv_first = np.arange(nk) * block_k
    kv_valid = kv_first < s
    kv_last = np.minimum(kv_first + block_k, s) - 1
    ragged = kv_first + block_k > s

    if spec is None:
        kind = jnp.full((1, nr, nk), FULL, jnp.int32)
    else:
        src = jnp.asarray(spec.block_map, jnp.int32)
        expected = (num_blocks(t, spec.block_q), num_blocks(s, spec.block_k))
        batch_ok = src.ndim == 2 or src.ndim == 3 and src.shape[0] in (1, geom.batch)
        if src.shape[-2:] != expected or not batch_ok:
            raise ValueError(
                f"mask.block_map must have shape [{expected[0]}, {expected[1]}] (or [B, ...]) for B={geom.batch}, "
                f"T={t}, S={s}, block_q={spec.block_q}, block_k={spec.block_k}; got {src.shape}."
            )
        src = src.reshape((-1,) + expected)  # [Bm, nq, nk]
        qlo, qhi = _tile_ranges(q_first, q_last, row_valid, spec.block_q)
        klo, khi = _tile_ranges(kv_first, kv_last, kv_valid, spec.block_k)
        lo = _span_reduce(_span_reduce(src, qlo, qhi, 1, jnp.minimum), klo, khi, 2, jnp.minimum)
        hi = _span_reduce(_span_reduce(src, qlo, qhi, 1, jnp.maximum), klo, khi, 2, jnp.maximum)
        kind = jnp.where(hi == EMPTY, EMPTY, jnp.where(lo == FULL, FULL, PARTIAL))
    valid = jnp.asarray(row_valid[:, None] & kv_valid[None, :])
    kind = jnp.where(valid, kind, EMPTY)
    kind = jnp.where((kind == FULL) & jnp.asarray(ragged)[None, :], PARTIAL, kind)
    return kind.astype(jnp.int32)


def visit_table(kind: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row of ``kind [Bm, n_outer, n_inner]``: the inner indices ordered FULL, PARTIAL, EMPTY.

    Returns ``order [Bm, n_outer, n_inner]`` int32 and ``counts [Bm, n_outer, 2]`` int32 (number
    of FULL and of PARTIAL tiles). A kernel visits ``order[:counts[0]]`` without mask arithmetic,
    ``order[counts[0]:counts[0] + counts[1]]`` with the mask, and never the rest.
    """
    rank = jnp.where(kind == FULL, 0, jnp.where(kind == PARTIAL, 1, 2))
    order = jnp.argsort(rank, axis=-1, stable=True).astype(jnp.int32)
    counts = jnp.stack([jnp.sum(kind == FULL, -1), jnp.sum(kind == PARTIAL, -1)], axis=-1).astype(jnp.int32)
    return order, counts


@dataclasses.dataclass(frozen=True)
class Plan:
    """Runtime mask data of one call, in the kernels' layouts (a pytree of int arrays).

    ``fwd``/``dq`` tables run over key tiles per row tile; ``dkv`` over row tiles per key tile.
    """

    fwd: tuple[jax.Array, jax.Array]
    dq: tuple[jax.Array, jax.Array]
    dkv: tuple[jax.Array, jax.Array]
    q_pos: jax.Array  # [Bq, Rp] position of each row (Bq: 1, or B for per-sequence positions)
    kv_pos: jax.Array  # [Bk, Sp]
    q_vals: tuple[jax.Array, ...]  # each [B, Rp]
    kv_vals: tuple[jax.Array, ...]  # each [B, Sp]
    array: jax.Array | None = None  # [Bm, Rp, Km, Sp] int8 visibility (MaskSpec.array), like the bias
    head: jax.Array | None = None  # [K, Rp] int32 query head of each row (score mods only)
    row_seed: jax.Array | None = None  # [B, K, Rp] int32 dropout seed of each row (dropout only)

    @property
    def per_sequence(self) -> bool:
        """Whether positions differ between the sequences of the batch."""
        return self.q_pos.shape[0] > 1 or self.kv_pos.shape[0] > 1


# Registered with the class in the tree structure: ``register_dataclass`` structures of different classes
# with the same number of children compare equal (JAX 0.10), which can mix up jit-compiled programs.
_PLAN_FIELDS = tuple(f.name for f in dataclasses.fields(Plan))
jax.tree_util.register_pytree_node(
    Plan,
    lambda plan: (tuple(getattr(plan, name) for name in _PLAN_FIELDS), None),
    lambda _, children: Plan(*children),
)


def _rows(x: jax.Array, geom: Geometry, axis: int) -> jax.Array:
    """Repeat a per-position array ``G`` times along ``axis`` (row ``t * G + g``) and pad it to Rp."""
    x = jnp.repeat(x, geom.group, axis=axis) if geom.group > 1 else x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, geom.rows_padded - geom.rows)
    return jnp.pad(x, pad)


def _pad_kv(x: jax.Array, geom: Geometry, axis: int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, geom.kv_padded - geom.kv_len)
    return jnp.pad(x, pad)


def _positions(name: str, x, batch: int, length: int) -> jax.Array:
    """``[L]`` or ``[B, L]`` positions -> int32 ``[1 or B, L]``."""
    x = jnp.asarray(x, jnp.int32)
    if x.ndim == 1 and x.shape[0] == length:
        return x[None]
    if x.ndim == 2 and x.shape[0] in (1, batch) and x.shape[1] == length:
        return x
    raise ValueError(f"{name} must have shape [{length}] or [B, {length}] with B in (1, {batch}), got {x.shape}.")


def row_heads(geom: Geometry) -> jax.Array:
    """``[K, Rp]`` int32: the query head ``h * G + g`` of row ``r = t * G + g`` of key/value head ``h``."""
    g = np.arange(geom.rows_padded) % geom.group
    return jnp.asarray(np.arange(geom.num_kv_heads)[:, None] * geom.group + g[None, :], jnp.int32)


def params_to_rows(param: jax.Array, geom: Geometry) -> jax.Array:
    """A per-head parameter ``[N]`` -> per row ``[K, Rp]`` float32 (padding rows repeat the pattern)."""
    param = jnp.asarray(param, jnp.float32)
    if param.shape != (geom.num_heads,):
        raise ValueError(f"mask.score_params entries must have shape [N]=[{geom.num_heads}], got {param.shape}.")
    per_group = param.reshape(geom.num_kv_heads, 1, geom.group)  # [K, 1, G]
    reps = geom.rows_padded // geom.group + 1
    return jnp.broadcast_to(per_group, (geom.num_kv_heads, reps, geom.group)).reshape(geom.num_kv_heads, -1)[
        :, : geom.rows_padded
    ]


def array_to_rows(array: jax.Array, geom: Geometry) -> jax.Array:
    """bool ``[Bm, Nm, T, S]`` -> int8 ``[Bm, Rp, Km, Sp]`` (Km: 1 or K), the layout of the bias; padding 0."""
    array = jnp.asarray(array)
    t, s, kh, g = geom.q_len, geom.kv_len, geom.num_kv_heads, geom.group
    if array.ndim != 4 or array.shape[0] not in (1, geom.batch) or array.shape[1] not in (1, kh * g):
        raise ValueError(f"mask.array must have shape [B or 1, N or 1, {t}, {s}], got {array.shape}.")
    if array.shape[2:] != (t, s):
        raise ValueError(f"mask.array must have shape [B or 1, N or 1, {t}, {s}], got {array.shape}.")
    bm, nm = array.shape[:2]
    array = array.astype(jnp.int8)
    if nm == 1:  # shared by all heads: one copy per row of the group
        array = jnp.broadcast_to(array[:, 0, :, None, None, :], (bm, t, g, 1, s)).reshape(bm, t * g, 1, s)
    else:
        array = array.reshape(bm, kh, g, t, s).transpose(0, 3, 2, 1, 4).reshape(bm, t * g, kh, s)
    return jnp.pad(array, ((0, 0), (0, geom.rows_padded - geom.rows), (0, 0), (0, geom.kv_padded - s)))


def make_plan(spec: MaskSpec | None, geom: Geometry, *, score_mod: bool = False, dropout_seed=None) -> Plan:
    """Resample the mask to every kernel's tiles and lay out the mask data per row.

    ``score_mod`` adds each row's query head; a ``dropout_seed`` (int32 scalar) each row's seed.
    """
    fwd = visit_table(kernel_block_map(spec, geom, *geom.fwd))
    dq = visit_table(kernel_block_map(spec, geom, *geom.dq))
    dkv = visit_table(jnp.swapaxes(kernel_block_map(spec, geom, *geom.dkv), 1, 2))
    array = None
    if spec is None:
        q_pos = jnp.arange(geom.q_len, dtype=jnp.int32)[None]
        kv_pos = jnp.arange(geom.kv_len, dtype=jnp.int32)[None]
        q_vals = kv_vals = ()
    else:
        q_pos = _positions("mask.q_positions", spec.q_positions, geom.batch, geom.q_len)
        kv_pos = _positions("mask.kv_positions", spec.kv_positions, geom.batch, geom.kv_len)
        q_vals = tuple(_batched("mask.q_vals", x, geom.batch, geom.q_len) for x in spec.q_vals)
        kv_vals = tuple(_batched("mask.kv_vals", x, geom.batch, geom.kv_len) for x in spec.kv_vals)
        if spec.array is not None:
            array = array_to_rows(spec.array, geom)
    q_pos = _rows(q_pos, geom, 1)  # [Bq, Rp]
    head = row_heads(geom) if score_mod else None
    row_seed = None
    if dropout_seed is not None:
        seed = jnp.asarray(dropout_seed, jnp.int32)
        if seed.shape != ():
            raise ValueError(f"dropout_seed must be an int32 scalar, got shape {seed.shape}.")
        batch = jnp.arange(geom.batch, dtype=jnp.int32)[:, None, None]
        row_seed = dropout.row_seed(seed, batch, row_heads(geom)[None], q_pos[:, None, :])  # [B, K, Rp]
        row_seed = jnp.broadcast_to(row_seed, (geom.batch, geom.num_kv_heads, geom.rows_padded))
    return Plan(
        fwd=fwd,
        dq=dq,
        dkv=dkv,
        q_pos=q_pos,
        kv_pos=_pad_kv(kv_pos, geom, 1),
        q_vals=tuple(_rows(x, geom, 1) for x in q_vals),
        kv_vals=tuple(_pad_kv(x, geom, 1) for x in kv_vals),
        array=array,
        head=head,
        row_seed=row_seed,
    )


def _batched(name: str, x, batch: int, length: int) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[0] not in (1, batch) or x.shape[1] != length:
        raise ValueError(f"{name} entries must have shape [B, {length}] with B in (1, {batch}), got {x.shape}.")
    return jnp.broadcast_to(x, (batch, length))
