"""Sequence parallelism: exact attention over a sequence sharded across devices.

Three ways to shard, chosen by one small config, :class:`SequenceParallel` (``kind=``):

* ``"ring"`` (ring attention): every device keeps ``T / P`` queries; the key/value shards travel
  around the mesh axis (:func:`pallas_kernels.ring_attention.ring_attention`). Each contiguous
  shard is first converted into a load-balanced layout (zigzag or striped) with collectives, and
  the per-device-pair block maps of the mask are built on the host from the shards' true positions.
* ``"all_to_all"`` (DeepSpeed-Ulysses): an all-to-all trades the sequence sharding for a head
  sharding, every device runs ordinary full-sequence attention on ``N / P`` heads (the usual
  fast path, block skipping included), and a second all-to-all trades back. Needs ``P | N``;
  key/value heads are replicated up to a multiple of ``P`` when ``K`` is not one.
* ``"hybrid"``: all-to-all over one mesh axis, then a ring over another (a ``2 x 4`` mesh runs
  a 4-device ring on ``N / 2`` heads).

:func:`sequence_parallel_attention` takes *global* arrays and runs inside ``jax.shard_map``, so
the same code serves 8 local CPU devices, a multi-host GPU cluster or a TPU slice. The mesh is
the config's ``mesh`` or the one set with ``jax.set_mesh``.

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
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks, blockwise
from pallas_kernels import layouts, ring_flash_step
from pallas_kernels.mask_info import EMPTY, FULL, PARTIAL, MaskSpec, kv_tiles_complete
from pallas_kernels.ring_attention import ring_attention

__all__ = [
    "SequenceParallel",
    "KINDS",
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


KINDS = ("ring", "all_to_all", "hybrid")


@dataclasses.dataclass(frozen=True)
class SequenceParallel:
    """How attention shards its sequence over a mesh: which axes, and ring, all-to-all or both.

    A layer option (``MultiHeadAttention(..., sequence_parallel=SequenceParallel(...))``) and the
    sharding half of :func:`sequence_parallel_attention`'s arguments; call it like that function.

    Attributes:
      axis: the mesh axis the sequence is sharded over; for ``kind="hybrid"`` a pair
        ``(all_to_all_axis, ring_axis)``.
      kind: ``"ring"``, ``"all_to_all"`` (DeepSpeed-Ulysses; needs the axis size P to divide N)
        or ``"hybrid"`` (all-to-all over the first axis, ring over the second).
      layout: the ring's layout, ``"zigzag"`` (default), ``"striped"`` or ``"contiguous"`` (see
        ``pallas_kernels.layouts``); ignored by ``"all_to_all"``.
      batch_axis: mesh axis the batch is sharded over (data parallelism), or None.
      mesh: a ``jax.sharding.Mesh``; None takes the one set with ``jax.set_mesh`` at call time.
      implementation: the per-device attention: for the ring its step (None, ``"blockwise"`` or
        ``"pallas"``), for all-to-all any ``implementation`` of ``dot_product_attention``.

    The sequence of ``[B, T, ...]`` arrays is sharded over :attr:`sequence_axes`, ring axis
    major; :meth:`spec` is that sharding, the one that makes the call move no activations.

    >>> import jax, numpy as np
    >>> import attention_jax as aj
    >>> d = len(jax.devices())  # 8 CPU devices in the tests: a 2 x 4 mesh (1 x 1 on one device)
    >>> mesh = jax.make_mesh((min(d, 2), max(d // 2, 1)), ("heads", "ring"))
    >>> sp = SequenceParallel(("heads", "ring"), kind="hybrid", mesh=mesh)
    >>> sp.spec()
    P(None, ('ring', 'heads'), None)
    >>> q = jax.random.normal(jax.random.key(0), (1, 64, 4, 8))  # [B, T, N, H]
    >>> out = sp(q, q, q, mask=aj.masks.causal())
    >>> bool(np.allclose(out, aj.dot_product_attention(q, q, q, mask=aj.masks.causal()), atol=1e-5))
    True
    """

    axis: str | tuple[str, str]
    kind: str = "ring"
    layout: str = "zigzag"
    batch_axis: str | None = None
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    implementation: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"SequenceParallel kind must be one of {KINDS}, got kind={self.kind!r}.")
        if self.kind == "hybrid":
            pair = isinstance(self.axis, (tuple, list)) and len(self.axis) == 2
            if not pair or not all(isinstance(a, str) for a in self.axis) or self.axis[0] == self.axis[1]:
                raise ValueError(
                    f"kind='hybrid' takes axis=(all_to_all_axis, ring_axis), two different mesh axis names; "
                    f"got axis={self.axis!r}."
                )
            object.__setattr__(self, "axis", tuple(self.axis))
        elif not isinstance(self.axis, str):
            raise ValueError(f"kind={self.kind!r} takes one mesh axis name, got axis={self.axis!r}.")
        if self.layout not in layouts.LAYOUTS:
            raise ValueError(f"layout must be one of {layouts.LAYOUTS}, got layout={self.layout!r}.")
        if self.batch_axis is not None and self.batch_axis in self.sequence_axes:
            raise ValueError(f"batch_axis and axis must differ, got both {self.batch_axis!r}.")
        if self.mesh is not None and not isinstance(self.mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
            raise TypeError(f"mesh must be a jax.sharding.Mesh or None, got {type(self.mesh).__name__}.")

    @property
    def ring_axis(self) -> str | None:
        return {"ring": self.axis, "all_to_all": None, "hybrid": self.axis[-1]}[self.kind]

    @property
    def all_to_all_axis(self) -> str | None:
        return {"ring": None, "all_to_all": self.axis, "hybrid": self.axis[0]}[self.kind]

    @property
    def sequence_axes(self) -> tuple[str, ...]:
        """The mesh axes the sequence is sharded over, major first (the ring's, then the all-to-all's)."""
        return tuple(a for a in (self.ring_axis, self.all_to_all_axis) if a is not None)

    def spec(self, ndim: int = 3) -> P:
        """``PartitionSpec`` of a ``[B, T, ...]`` array of rank ``ndim`` sharded as this config shards the sequence."""
        axes = self.sequence_axes
        return P(self.batch_axis, axes[0] if len(axes) == 1 else axes, *(None,) * (ndim - 2))

    def __call__(
        self, query, key, value, *, mask=None, scale=None, softcap=None, implementation=None, return_lse=False
    ):
        """:func:`sequence_parallel_attention` with this config (a call's ``implementation`` overrides it)."""
        return sequence_parallel_attention(
            query, key, value, mesh=self.mesh, axis=self.axis, kind=self.kind, layout=self.layout,
            batch_axis=self.batch_axis, mask=mask, scale=scale, softcap=softcap, return_lse=return_lse,
            implementation=self.implementation if implementation is None else implementation,
        )  # fmt: skip


def sequence_parallel_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
    axis: str | tuple[str, str],
    kind: str = "ring",
    mask: masks_lib.Mask | None = None,
    layout: str = "zigzag",
    scale: float | None = None,
    softcap: float | None = None,
    implementation: str | None = None,
    return_lse: bool = False,
    batch_axis: str | None = None,
):
    """Attention with the sequence sharded over the mesh axis ``axis`` (ring, all-to-all or both), exact.

    Args:
      query: global ``[B, T, N, H]``.
      key: global ``[B, S, K, H]`` (``N % K == 0``; only the K heads travel around the ring).
      value: global ``[B, S, K, Hv]``.
      mesh: a ``jax.sharding.Mesh`` with the axes named below; None: the mesh of ``jax.set_mesh``.
      axis: mesh axis to shard the sequence over (``P`` devices; each holds ``T / P`` positions);
        for ``kind="hybrid"`` a pair ``(all_to_all_axis, ring_axis)``.
      kind: ``"ring"``, ``"all_to_all"`` or ``"hybrid"`` (see :class:`SequenceParallel`).
      mask: an ``attention_jax.masks.Mask`` over original positions (None: full attention). Masks
        with data (segments, padding) have their arrays permuted along with the sequence.
      layout: the ring's layout: ``"zigzag"`` (default; balanced for causal masks, needs
        ``T % 2P == 0``), ``"striped"`` (balanced, needs ``T % P**2 == 0``) or ``"contiguous"``
        (``T % P == 0``). See ``pallas_kernels.layouts``. The result is in the original order.
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(H)``.
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
      implementation: the ring's step: None (Pallas on GPU/TPU, blockwise on CPU), ``"blockwise"``
        or ``"pallas"``; for ``"all_to_all"`` any ``implementation`` of ``dot_product_attention``.
      return_lse: also return the logsumexp ``[B, N, T]`` in float32.
      batch_axis: mesh axis to shard the batch over (data parallelism), or None.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the logsumexp). Under ``jax.set_mesh`` with
      Explicit axes the output is sharded like the query; otherwise over the sequence axes.
    """
    shape = _checks.check_qkv(query, key, value)
    scale = _static_number("scale", _checks.check_scale(scale, shape.head_dim))
    softcap = _checks.check_softcap(softcap)
    softcap = None if softcap is None else _static_number("softcap", softcap)
    if mask is not None:
        mask = jax.tree.map(jnp.asarray, masks_lib.as_mask(mask))
        _mask_arrays(mask, shape)  # the mask's data must fit B, T and S
    mesh, explicit = _resolve_mesh(mesh)
    config = SequenceParallel(axis, kind=kind, layout=layout, batch_axis=batch_axis, mesh=mesh)
    _check_mesh(mesh, config, shape)
    if config.ring_axis is not None:
        ring_step(implementation)  # a ring step it can run
    out, lse = _sharded(query, key, value, mask, _Static(config, explicit, scale, softcap, implementation))
    return (out, lse) if return_lse else out


@dataclasses.dataclass(frozen=True)
class _Static:
    """The static half of a call: the jit cache key of :func:`_sharded`."""

    config: SequenceParallel  # its mesh resolved
    explicit: bool  # the caller's Explicit mesh: keep the caller's sharding types
    scale: float
    softcap: float | None
    implementation: Any  # a name, a Backend instance (all-to-all) or None


# Under jit, also when called eagerly: shard_map outside jit runs its body op by op on every device
# (seconds per call on 8 CPU devices), and the jit caches the program across calls.
@functools.partial(jax.jit, static_argnums=4)
def _sharded(query, key, value, mask, static: _Static):
    """``(out, lse)`` of ``sequence_parallel_attention`` on validated arguments."""
    config, mesh = static.config, static.config.mesh
    shape = _checks.check_qkv(query, key, value)
    ring_axis, heads_axis = config.ring_axis, config.all_to_all_axis
    heads_size = 1 if heads_axis is None else mesh.shape[heads_axis]
    if ring_axis is None:
        ring_args, ring_specs = (), ()
        local_attention = _local_attention(static)
        check_vma = _is_xla(static.implementation)
    else:
        step = ring_step(static.implementation)
        ring_args, ring_specs, local_attention = _ring_plan(mask, shape, static, step)
        check_vma = step.check_vma
    repeat = _kv_repeat(shape.num_kv_heads, heads_size)

    seq = config.spec(4)  # [B, T, N, H]
    lse_spec = P(config.batch_axis, None, seq[1])  # [B, N, T]
    # The all-to-all path reads the mask's own data (segment ids, lengths: [B, T] integers) whole on
    # every device: it attends over the whole sequence.
    leaves, treedef = jax.tree.flatten(mask)
    leaves = leaves if heads_axis is not None and ring_axis is None else []
    leaf_specs = [P(config.batch_axis) if x.ndim and x.shape[0] == shape.batch else P() for x in leaves]

    def local(q, k, v, leaves, ring_args):
        if heads_axis is not None:  # [B, T / P, N, H] -> [B, T / Pr, N / Pa, H]: sequence for heads
            k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)
            q, k, v = (jax.lax.all_to_all(x, heads_axis, 2, 1, tiled=True) for x in (q, k, v))
        local_mask = jax.tree.unflatten(treedef, leaves) if leaves else mask
        out, lse = local_attention(q, k, v, local_mask, *ring_args)
        if heads_axis is not None:  # and back: heads for sequence
            out = jax.lax.all_to_all(out, heads_axis, 1, 2, tiled=True)  # [B, T / P, N, Hv]
            lse = jax.lax.all_to_all(lse, heads_axis, 2, 1, tiled=True)  # [B, N, T / P]
        return out, lse

    args = (query, key, value, leaves, ring_args)
    specs = (seq, seq, seq, leaf_specs, ring_specs)
    if static.explicit:
        args = jax.tree.map(lambda x, spec: _place(x, mesh, spec), args, specs, is_leaf=lambda x: isinstance(x, P))
    # Pallas calls do not annotate how their outputs vary over mesh axes, so shard_map's check of
    # that (check_vma) cannot follow them; the collectives are correct either way.
    run = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(seq, lse_spec), check_vma=check_vma)
    out, lse = run(*args)
    if static.explicit:  # give the caller the sharding type it passed in
        q_spec = tuple(jax.typeof(query).sharding.spec) + (None,) * 4  # [B, T, N, H]
        out = jax.sharding.reshard(out, P(*q_spec[:4]))
        lse = jax.sharding.reshard(lse, P(q_spec[0], q_spec[2], q_spec[1]))  # [B, N, T]
    return out, lse


def _static_number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name} must be a static number for sequence parallelism, got {name}={value!r}.") from None


def _ring_plan(mask, shape, static: _Static, step: RingStep):
    """The ring's extra shard_map arguments (mask data, block-map table), their specs, and its local attention."""
    config = static.config
    axis, layout = config.ring_axis, config.layout
    ring_size = config.mesh.shape[axis]
    block_q, block_k, block_maps = _plan(mask, shape.q_len, shape.kv_len, ring_size, layout, step.block_sizes)
    mask_fn = None if mask is None else mask.fn(shape.kv_len)
    q_vals, kv_vals = _mask_arrays(mask, shape)
    vals = P(config.batch_axis, axis)  # [B, T]: each ring shard's data (whole over an all-to-all axis)
    table = P(axis)  # [P, P, nq, nk]: each device gets its row

    def attend(q, k, v, _, q_vals, kv_vals, block_maps):
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
            q, k, v, spec, axis_name=axis, step_fwd=step.fwd, step_bwd=step.bwd, scale=static.scale,
            softcap=static.softcap, return_lse=True,
        )  # fmt: skip
        out = layouts.shard_from_layout(out, axis, layout, axis=1)
        lse = layouts.shard_from_layout(lse, axis, layout, axis=2)
        return out, lse

    args = (q_vals, kv_vals, block_maps)
    specs = ((vals,) * len(q_vals), (vals,) * len(kv_vals), table)
    return args, specs, attend


def _local_attention(static: _Static):
    """All-to-all's per-device attention: the whole sequence on the local heads, the usual fast path."""
    from attention_jax.functional.dot_product import dot_product_attention  # functional imports this module

    def attend(q, k, v, local_mask):
        return dot_product_attention(
            q, k, v, mask=local_mask, scale=static.scale, softcap=static.softcap,
            implementation=static.implementation, return_lse=True,
        )  # fmt: skip

    return attend


def _is_xla(implementation) -> bool:
    """Whether the all-to-all's local attention surely runs in XLA (so shard_map can check its outputs)."""
    if implementation in (None, "auto"):
        return jax.default_backend() == "cpu"
    return implementation in ("reference", "blockwise") or getattr(implementation, "name", None) in (
        "reference",
        "blockwise",
    )


def _kv_repeat(num_kv_heads: int, num_shards: int) -> int:
    """How often each K/V head is repeated so that an all-to-all over ``num_shards`` splits them evenly.

    K is raised to ``lcm(K, P)``, which divides N because K and P do: every device then gets the
    K/V heads its ``N / P`` query heads read, in GQA order (query head n reads K/V head n // G).
    """
    return np.lcm(num_kv_heads, num_shards) // num_kv_heads


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


def _resolve_mesh(mesh):
    """The mesh to run on, and whether it is the caller's Explicit mesh (sharding in types).

    A mesh with Explicit axes types the arrays sharded over it, which only means something inside
    ``jax.set_mesh`` of that mesh. Called outside it (eagerly, or under a ``jax.jit`` without the
    mesh set) the inputs carry no such types, so the call runs on the same devices with Auto axes:
    its outputs are then ordinary sharded arrays. An Explicit output would leak into the caller's
    code, where the next op that builds an array of its type (``jax.grad`` seeding the
    cotangent of a scalar loss) fails: "Length of device assignment 1 is not equal to the size
    of the mesh".
    """
    context = jax.sharding.get_abstract_mesh()
    if mesh is None:
        if context.empty:
            raise ValueError(
                "sequence parallelism needs a mesh: pass mesh= (or SequenceParallel(mesh=...)) or call under "
                "jax.set_mesh(mesh)."
            )
        mesh = context
    if not isinstance(mesh, (jax.sharding.Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if AxisType.Explicit not in mesh.axis_types:
        return mesh, False
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else mesh.abstract_mesh
    if abstract == context:
        return mesh, True
    if isinstance(mesh, jax.sharding.AbstractMesh):
        raise ValueError(f"an abstract mesh must be the one set with jax.set_mesh, got {mesh}.")
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names)), False


def _check_mesh(mesh, config: SequenceParallel, shape: _checks.AttentionShape) -> None:
    """``ValueError`` for an axis the mesh lacks or a size that cannot be sharded over it."""
    names = mesh.axis_names
    for name, value in (("axis", config.axis), ("batch_axis", config.batch_axis)):
        for a in (value,) if isinstance(value, str) or value is None else value:
            if a is not None and a not in names:
                raise ValueError(f"mesh has no axis {name}={a!r}; its axes are {names}.")
    if config.batch_axis is not None and shape.batch % mesh.shape[config.batch_axis]:
        raise ValueError(
            f"batch size B={shape.batch} must be divisible by the {mesh.shape[config.batch_axis]} devices of "
            f"batch_axis={config.batch_axis!r}."
        )
    ring_size = 1 if config.ring_axis is None else mesh.shape[config.ring_axis]
    heads_size = 1 if config.all_to_all_axis is None else mesh.shape[config.all_to_all_axis]
    for name, length in (("T", shape.q_len), ("S", shape.kv_len)):
        if config.ring_axis is not None:  # the ring's shards, after an all-to-all gathered them
            layouts.check_layout(length, ring_size, config.layout, name=name, in_place=True)
        if length % (ring_size * heads_size):
            raise ValueError(
                f"a sequence sharded over {ring_size * heads_size} devices needs a length divisible by it, got "
                f"{name}={length}."
            )
    if shape.num_heads % heads_size:
        raise ValueError(
            f"kind={config.kind!r} splits the N={shape.num_heads} query heads over the {heads_size} devices of "
            f"axis {config.all_to_all_axis!r}: N must be divisible by {heads_size}."
        )


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

    def keep(entry):
        names = (entry,) if isinstance(entry, str) else entry or ()
        return entry if names and all(n in explicit for n in names) else None

    return jax.sharding.reshard(x, P(*map(keep, spec)))
