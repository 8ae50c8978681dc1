"""``sequence_parallel_attention``: exact attention over a sequence sharded across devices (ring attention).

The user-level entry to :func:`pallas_kernels.ring_attention.ring_attention`. It takes *global*
arrays, shards batch and sequence over a mesh, converts each contiguous sequence shard into a
load-balanced layout with collectives (every device only ever holds ``T / P`` positions), builds
the per-device-pair block maps of the mask on the host from the shards' true positions, runs the
ring inside ``jax.shard_map`` and converts the result back.

The same code runs on 8 local CPU devices, a multi-host GPU cluster or a TPU slice: it only uses
``shard_map`` collectives of JAX's multi-controller runtime.

>>> import jax, numpy as np
>>> import attention_jax as aj
>>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
>>> q = jax.random.normal(jax.random.key(0), (1, 64, 4, 16))  # [B, T, N, H]
>>> kv = jax.random.normal(jax.random.key(1), (1, 64, 2, 16))  # [B, S, K, H]: GQA
>>> out = aj.sequence_parallel_attention(q, kv, kv, mesh=mesh, axis="sp", mask=aj.masks.causal())
>>> ref = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal())
>>> bool(np.allclose(out, ref, atol=1e-5))
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks, blockwise
from pallas_kernels import layouts, ring_flash_step
from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL, MaskSpec, kv_tiles_complete
from pallas_kernels.ring_attention import ring_attention

__all__ = [
    "sequence_parallel_attention",
    "RingStep",
    "RING_STEPS",
    "ring_step",
    "ring_block_maps",
    "blocks_per_device",
    "choose_block",
]

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RingStep:
    """The per-block attention a ring runs at each step (``pallas_kernels.ring_attention``'s interface).

    Attributes:
      fwd: ``fwd(q, k, v, spec, *, scale, softcap) -> (out float32, lse float32)``.
      bwd: ``bwd(q, k, v, spec, lse, delta, dout, *, scale, softcap) -> (dq, dk, dv)``.
      block_sizes: ``block_sizes(q_len, kv_len) -> (block_q, block_k)``, the tiles the step prefers
        for its MaskSpec.
      check_vma: whether ``shard_map`` may check how the step's outputs vary over mesh axes
        (``pallas_call`` does not annotate them, so the Pallas step needs the check off).
    """

    fwd: Callable
    bwd: Callable
    block_sizes: Callable[[int, int], tuple[int, int]]
    check_vma: bool = True


# The implementations that can run a ring step, by the name ``implementation`` takes.
RING_STEPS = {
    "blockwise": RingStep(blockwise.fwd, blockwise.bwd, blockwise.default_block_sizes),
    "pallas": RingStep(
        ring_flash_step.step_fwd, ring_flash_step.step_bwd, ring_flash_step.default_block_sizes, check_vma=False
    ),
}


def ring_step(implementation: str | None = None) -> RingStep:
    """The :class:`RingStep` of ``implementation``: None or ``"auto"`` is Pallas on GPU/TPU, blockwise on CPU.

    >>> ring_step("blockwise") is RING_STEPS["blockwise"]
    True
    """
    if implementation in (None, "auto"):
        implementation = "pallas" if jax.default_backend() in ("gpu", "tpu") else "blockwise"
    if not isinstance(implementation, str) or implementation not in RING_STEPS:
        raise ValueError(
            f"sequence_parallel_attention runs each ring step with {tuple(RING_STEPS)}, got {implementation=!r}."
        )
    return RING_STEPS[implementation]


def sequence_parallel_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mesh: jax.sharding.Mesh,
    axis: str,
    mask: masks_lib.Mask | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
    batch_axis: str | None = None,
):
    """Attention with the sequence sharded over the mesh axis ``axis`` (ring attention), exact.

    Args:
      query: global ``[B, T, N, H]``.
      key: global ``[B, S, K, H]`` (``N % K == 0``; only the K heads travel around the ring).
      value: global ``[B, S, K, Hv]``.
      mesh: a ``jax.sharding.Mesh`` with axis ``axis`` (and ``batch_axis`` if given).
      axis: mesh axis to shard the sequence over (``P`` devices; each holds ``T / P`` positions).
      mask: an ``attention_jax.masks.Mask`` over original positions (None: full attention). Masks
        with data (segments, padding) have their arrays permuted along with the sequence.
      layout: ``"zigzag"`` (default; balanced for causal masks, needs ``T % 2P == 0``),
        ``"striped"`` (balanced, needs ``T % P**2 == 0``) or ``"contiguous"`` (``T % P == 0``).
        See ``pallas_kernels.layouts``. The result is in the original order whatever the layout.
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(H)``.
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
      implementation: per-step attention: None (Pallas on GPU/TPU, blockwise on CPU),
        ``"blockwise"`` or ``"pallas"``.
      return_lse: also return the logsumexp ``[B, N, T]`` in float32.
      batch_axis: mesh axis to shard the batch over (data parallelism), or None.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, sharded like the inputs (and the logsumexp).
    """
    shape = _checks.check_qkv(query, key, value)
    scale = _checks.check_scale(scale, shape.head_dim)
    softcap = _checks.check_softcap(softcap)
    if mask is not None:
        mask = masks_lib.as_mask(mask)
    num_shards = _check_mesh(mesh, axis, batch_axis, shape.batch)
    for name, length in (("T", shape.q_len), ("S", shape.kv_len)):
        layouts.check_layout(length, num_shards, layout, name=name, in_place=True)
    step = ring_step(implementation)

    block_q, block_k, block_maps = _plan(mask, shape.q_len, shape.kv_len, num_shards, layout, step.block_sizes)
    mask_fn = None if mask is None else mask.fn(shape.kv_len)
    q_vals, kv_vals = _mask_arrays(mask, shape)

    seq = P(batch_axis, axis, None, None)  # [B, T, N, H]
    vals = P(batch_axis, axis)  # [B, T]
    lse_spec = P(batch_axis, None, axis)  # [B, N, T]
    table = P(axis)  # [P, P, nq, nk]: each device gets its row

    def local(q, k, v, q_vals, kv_vals, block_maps):
        to_layout = lambda x: layouts.shard_to_layout(x, axis, layout, axis=1)
        q, k, v = to_layout(q), to_layout(k), to_layout(v)
        q_vals, kv_vals = tuple(map(to_layout, q_vals)), tuple(map(to_layout, kv_vals))
        spec = MaskSpec(
            fn=mask_fn,
            block_map=block_maps[0],  # this device's row of the [P, P, nq, nk] table
            q_positions=layouts.shard_positions(axis, shape.q_len, layout),
            kv_positions=layouts.shard_positions(axis, shape.kv_len, layout),
            q_vals=q_vals,
            kv_vals=kv_vals,
            block_q=block_q,
            block_k=block_k,
        )
        out, lse = ring_attention(
            q,
            k,
            v,
            spec,
            axis_name=axis,
            step_fwd=step.fwd,
            step_bwd=step.bwd,
            scale=scale,
            softcap=softcap,
            return_lse=True,
        )
        out = layouts.shard_from_layout(out, axis, layout, axis=1)
        lse = layouts.shard_from_layout(lse, axis, layout, axis=2)
        return out, lse

    args = (query, key, value, q_vals, kv_vals, block_maps)
    specs = (seq, seq, seq, (vals,) * len(q_vals), (vals,) * len(kv_vals), table)
    args = jax.tree.map(lambda x, spec: _place(x, mesh, spec), args, specs, is_leaf=lambda x: isinstance(x, P))
    # Pallas calls do not annotate how their outputs vary over mesh axes, so shard_map's check of
    # that (check_vma) cannot follow them; the ring's collectives are correct either way.
    run = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(seq, lse_spec), check_vma=step.check_vma)
    out, lse = run(*args)
    return (out, lse) if return_lse else out


def blocks_per_device(
    mask: masks_lib.Mask | None, length: int, num_shards: int, layout: str, *, block: int | None = None
) -> np.ndarray:
    """``[P]``: the tiles each device computes in a ring self-attention (partial + full): its load.

    Tiles as :func:`sequence_parallel_attention` picks them: at most ``block`` positions (default:
    what the default implementation on this backend prefers), dividing the shards.

    >>> blocks_per_device(masks_lib.causal(), 1024, 4, "contiguous", block=128).tolist()
    [3, 7, 11, 15]
    >>> blocks_per_device(masks_lib.causal(), 1024, 4, "zigzag", block=128).tolist()
    [9, 9, 9, 9]
    """
    block_sizes = ring_step(None).block_sizes if block is None else (lambda t, s: (block, block))
    block_maps = _plan(mask, length, length, num_shards, layout, block_sizes)[-1]
    return (block_maps != EMPTY).sum(axis=(1, 2, 3))


def _plan(mask, q_len, kv_len, num_shards, layout, block_sizes):
    """Tile sizes and the block-map table ``[P, P, nq, nk]`` (int8) of a ring call.

    ``block_sizes(q_len, kv_len) -> (block_q, block_k)`` is the step implementation's preference.
    """
    unit = 2 if layout == "zigzag" else 1  # zigzag shards are two chunks: tiles must not straddle them
    q_unit, kv_unit = q_len // num_shards // unit, kv_len // num_shards // unit
    preferred_q, preferred_k = block_sizes(q_unit, kv_unit)
    block_q, block_k = choose_block(q_unit, preferred_q), choose_block(kv_unit, preferred_k)
    q_positions = layouts.layout_positions(q_len, num_shards, layout)
    kv_positions = layouts.layout_positions(kv_len, num_shards, layout)
    return block_q, block_k, ring_block_maps(mask, q_positions, kv_positions, block_q, block_k)


def ring_block_maps(
    mask: masks_lib.Mask | None, q_positions: np.ndarray, kv_positions: np.ndarray, block_q: int, block_k: int
) -> np.ndarray:
    """``[P, P, nq, nk]`` int8 block maps: entry ``[i, j]`` is shard ``i``'s queries against shard ``j``'s keys.

    ``q_positions [P, T / P]`` and ``kv_positions [P, S / P]`` are the shards' original positions
    (``pallas_kernels.layouts.layout_positions``); the tiles must divide the shards. One call of
    ``mask.block_map`` over the whole layout order builds every pair.

    >>> from pallas_kernels.layouts import layout_positions
    >>> pos = layout_positions(8, 2, "contiguous")
    >>> ring_block_maps(masks_lib.causal(), pos, pos, 4, 4)[:, :, 0, 0].tolist()
    [[1, 0], [2, 1]]
    """
    q_positions, kv_positions = np.asarray(q_positions), np.asarray(kv_positions)
    (p, t_local), s_local = q_positions.shape, kv_positions.shape[1]
    nq, nk = -(-t_local // block_q), -(-s_local // block_k)
    if mask is None:
        one = np.where(kv_tiles_complete(s_local, block_k, nq), FULL, PARTIAL).astype(np.int8)
        return np.broadcast_to(one, (p, p, nq, nk)).copy()
    if t_local % block_q or s_local % block_k:
        raise ValueError(
            f"tiles must divide the shards: {block_q=} and {block_k=} for shards of {t_local} queries and "
            f"{s_local} keys (see choose_block)."
        )
    q_order, kv_order = q_positions.reshape(-1), kv_positions.reshape(-1)
    try:
        with jax.ensure_compile_time_eval():  # host-side numpy, also when called under jit
            maps = _in_layout_order(mask, q_order, kv_order).block_map(
                p * t_local, p * s_local, block_q, block_k, q_positions=q_order, kv_positions=kv_order
            )  # [P * nq, P * nk]: tiles never straddle shards, so one call covers every pair
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        # A mask without structure (from_fn) combined with traced data (segment ids under jit) has
        # no static map: every tile is PARTIAL (exact; the steps skip what the data hides at run time).
        return np.full((p, p, nq, nk), PARTIAL, np.int8)
    return np.ascontiguousarray(maps.reshape(p, nq, p, nk).transpose(0, 2, 1, 3))


def _in_layout_order(mask: masks_lib.Mask, q_order: np.ndarray, kv_order: np.ndarray) -> masks_lib.Mask:
    """``mask`` with its per-position data (segment ids, valid keys: ``[B, T]`` / ``[B, S]``) permuted
    like the positions, so that slot ``i`` holds the data of position ``q_order[i]``.

    ``mask.block_map`` pairs the ``i``-th given position with the ``i``-th entry of the mask's data;
    where it evaluates the mask densely (``from_fn`` combined with data), unpermuted data would
    classify the tiles of a zigzag or striped layout from another position's segment id.
    """
    if mask.is_static:
        return mask
    t, s = len(q_order), len(kv_order)
    for name, order, length in (("q_positions", q_order, t), ("kv_positions", kv_order, s)):
        if not np.array_equal(np.sort(order), np.arange(length)):
            raise ValueError(f"{name} must be a permutation of the {length} positions of a ring layout.")
    if t == s and not np.array_equal(q_order, kv_order):
        raise ValueError("a mask with data needs the same layout for queries and keys when T == S.")

    def permute(x):
        if isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 2 and x.shape[1] in (t, s):
            return jnp.take(jnp.asarray(x), q_order if x.shape[1] == t else kv_order, axis=1)
        return x  # per-sequence lengths [B] and static parts do not depend on the order

    return jax.tree.map(permute, mask)


def choose_block(length: int, preferred: int) -> int:
    """The largest tile size <= ``preferred`` that divides ``length`` (tiles never straddle shards).

    >>> choose_block(96, 128), choose_block(512, 128), choose_block(100, 64)
    (96, 128, 50)
    """
    if length <= preferred:
        return length
    return max(d for d in range(1, preferred + 1) if length % d == 0)


def _check_mesh(mesh, axis, batch_axis, batch) -> int:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh has no axis {axis=!r}; its axes are {mesh.axis_names}.")
    if batch_axis is not None:
        if batch_axis not in mesh.axis_names:
            raise ValueError(f"mesh has no axis {batch_axis=!r}; its axes are {mesh.axis_names}.")
        if batch_axis == axis:
            raise ValueError(f"batch_axis and axis must differ, got both {axis!r}.")
        if batch % mesh.shape[batch_axis]:
            raise ValueError(
                f"batch size B={batch} must be divisible by the {mesh.shape[batch_axis]} devices of "
                f"batch_axis={batch_axis!r}."
            )
    return mesh.shape[axis]


def _mask_arrays(mask, shape):
    """The mask's per-position data, each broadcast to ``[B, T]`` / ``[B, S]`` (sharded like the sequence)."""
    if mask is None:
        return (), ()
    q_vals, kv_vals = mask.arrays(shape.q_len, shape.kv_len)

    def full_batch(x, length):
        if x.shape[0] not in (1, shape.batch):
            raise ValueError(f"the mask's arrays have batch size {x.shape[0]}, expected 1 or B={shape.batch}.")
        return jnp.broadcast_to(x, (shape.batch, length))

    return (
        tuple(full_batch(x, shape.q_len) for x in q_vals),
        tuple(full_batch(x, shape.kv_len) for x in kv_vals),
    )


def _place(x, mesh, spec):
    """Shard ``x`` as ``spec`` on the mesh axes that are Explicit (shard_map reshards Auto axes itself)."""
    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if not explicit:
        return x
    restricted = P(*(name if name in explicit else None for name in spec))
    return jax.sharding.reshard(x, NamedSharding(mesh, restricted))
