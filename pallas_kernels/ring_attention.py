"""Ring attention: exact attention over a sequence sharded along a mesh axis (inside ``shard_map``).

Every device holds a shard of the queries and of the keys/values. In ``P`` steps the K/V shards
travel around the ring (``ppermute`` to the next device); at each step the local queries attend
to the visiting shard with a per-block attention step (the flash kernel on GPU/TPU, the blockwise
XLA path on CPU), and the partial outputs merge through their logsumexp in float32. The send of
the next shard is issued before the step's compute so that they can overlap.

The ring knows nothing of masks beyond :class:`pallas_kernels.mask_info.MaskSpec`, and takes one:

* ``spec.block_map`` int ``[P, nq, nk]``: this device's row of the table ``[P, P, nq, nk]``
  whose entry ``[i, j]`` is the block map of device ``i``'s queries against device ``j``'s keys
  (built on the host from the shards' true positions; shard the table over the ring axis). The
  step against the shard of device ``j`` gets a spec with ``block_map[j]``; a step whose map is
  all ``EMPTY`` is skipped (``lax.cond``).
* ``spec.q_positions [T]`` / ``spec.kv_positions [S]``: the original positions of the local
  shards (any order: contiguous, zigzag or striped layouts), ``spec.fn`` the mask function,
  ``spec.q_vals [B, T]`` / ``spec.kv_vals [B, S]`` its per-position data (segment ids, lengths).
* ``spec.block_q`` / ``spec.block_k``: the tile sizes of the maps.

Key positions and key data travel around the ring with their K/V shard, so every step's spec
describes exactly the keys it sees and any layout stays exact. Score mods and boolean-array
masks (``spec.score_fn``, ``spec.array``) are refused: the steps do not take them.

>>> import jax, jax.numpy as jnp, numpy as np
>>> from jax.sharding import PartitionSpec as P
>>> from pallas_kernels import layouts, mask_info
>>> from pallas_kernels.ring_flash_step import step_fwd, step_bwd
>>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("sp",))
>>> p = mesh.size
>>> def local(q, k, v):  # [B, T / P, N, H] shards in the contiguous layout, no mask
...     spec = mask_info.MaskSpec(
...         fn=None, block_map=jnp.full((p, 1, 1), mask_info.FULL), block_q=q.shape[1], block_k=k.shape[1],
...         q_positions=layouts.shard_positions("sp", p * q.shape[1], "contiguous"),
...         kv_positions=layouts.shard_positions("sp", p * k.shape[1], "contiguous"))
...     return ring_attention(q, k, v, spec, axis_name="sp", step_fwd=step_fwd, step_bwd=step_bwd)
>>> x = jax.random.normal(jax.random.key(0), (1, 32, 2, 16))  # [B, T, N, H]
>>> seq = P(None, "sp")
>>> out = jax.shard_map(local, mesh=mesh, in_specs=seq, out_specs=seq, check_vma=False)(x, x, x)
>>> bool(jnp.allclose(out, jax.nn.dot_product_attention(x, x, x), atol=1e-5))
True

The backward pass (``custom_vjp``) runs the ring again: dq accumulates locally, and the float32
dk/dv of each K/V shard travel one step behind it and arrive home after ``P`` steps. Each step
uses the *global* logsumexp and ``delta = rowsum(out * dout)``, so the per-step gradients are
exact contributions and the sum is exact.

Step functions (the per-block interface)::

    step_fwd(q, k, v, spec, *, scale, softcap) -> (out [B, T, N, Hv] float32, lse [B, N, T] float32)
    step_bwd(q, k, v, spec, lse, delta, dout, *, scale, softcap) -> (dq, dk, dv)

``out`` is normalised by the step's own logsumexp; a row that sees nothing has ``out = 0`` and
``lse = -inf``. ``step_bwd`` returns the gradient contributions of one ``(q, k/v)`` pair given
the final ``lse`` and ``delta`` (any float dtype; the ring accumulates them in float32).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.mask_info import EMPTY, MaskSpec

Array = jax.Array


def ring_attention(
    q: Array,
    k: Array,
    v: Array,
    spec: MaskSpec,
    *,
    axis_name: str,
    step_fwd: Callable,
    step_bwd: Callable,
    scale: float | None = None,
    softcap: float | None = None,
    return_lse: bool = False,
):
    """Exact attention of the local queries against the keys/values of every device on ``axis_name``.

    Call inside ``jax.shard_map`` on local shards; differentiable (``custom_vjp``) in ``q``, ``k``, ``v``.

    Args:
      q: local queries ``[B, T, N, H]``.
      k: local keys ``[B, S, K, H]`` (``N % K == 0``; only the K heads travel).
      v: local values ``[B, S, K, Hv]``.
      spec: the mask of the local queries against every shard (see the module docstring):
        ``spec.block_map`` int ``[P, ceil(T / block_q), ceil(S / block_k)]`` is this device's row
        of the block-map table (entry ``j``: the local queries against device ``j``'s keys),
        ``spec.q_positions [T]`` / ``spec.kv_positions [S]`` the original positions of the local
        shards, ``spec.fn`` the mask function, ``spec.q_vals`` / ``spec.kv_vals`` its data, each
        ``[B, T]`` / ``[B, S]``. No score mod and no boolean array (``spec.score_fn``,
        ``spec.array``): the ring's steps do not take them.
      axis_name: the mesh axis the sequence is sharded over (``P`` devices).
      step_fwd, step_bwd: the per-block attention step (see the module docstring).
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(H)``.
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
      return_lse: also return the logsumexp ``[B, N, T]`` (float32) of the local queries.

    Returns:
      ``out [B, T, N, Hv]`` in the dtype of ``q`` (and ``lse`` when ``return_lse``).
    """
    num_shards = jax.lax.axis_size(axis_name)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of key/value heads K={kh} (N % K == 0).")
    spec = _check_spec(spec, num_shards, b, t, s)
    config = _RingConfig(
        axis_name=axis_name,
        num_shards=num_shards,
        step_fwd=step_fwd,
        step_bwd=step_bwd,
        scale=_static_float("scale", 1.0 / np.sqrt(h) if scale is None else scale),
        softcap=None if softcap is None else _static_float("softcap", softcap),
    )
    out, lse = _ring(config, q, k, v, spec)
    return (out, lse) if return_lse else out


def _check_spec(spec: MaskSpec, num_shards: int, b: int, t: int, s: int) -> MaskSpec:
    """``spec`` with JAX arrays of the ring's dtypes, or a ``ValueError`` naming the wrong field."""
    if not isinstance(spec, MaskSpec):
        raise TypeError(f"spec must be a pallas_kernels.mask_info.MaskSpec, got {type(spec).__name__}.")
    if spec.score_fn is not None or spec.score_params:
        raise ValueError("ring_attention takes no score mod: spec.score_fn and spec.score_params must be empty.")
    if spec.array is not None:
        raise ValueError("ring_attention takes no boolean-array mask: spec.array must be None (use spec.fn).")
    bq, bk = spec.block_q, spec.block_k
    expected = (num_shards, -(-t // bq), -(-s // bk))
    if jnp.shape(spec.block_map) != expected:
        raise ValueError(
            f"spec.block_map must have shape [P, nq, nk]={list(expected)} for P={num_shards}, T={t}, S={s}, "
            f"block_q={bq}, block_k={bk}; got spec.block_map.shape={jnp.shape(spec.block_map)}."
        )
    if jnp.shape(spec.q_positions) != (t,) or jnp.shape(spec.kv_positions) != (s,):
        raise ValueError(
            f"spec.q_positions and spec.kv_positions must have shapes [{t}] and [{s}], got "
            f"{jnp.shape(spec.q_positions)} and {jnp.shape(spec.kv_positions)}."
        )
    for name, vals, length in (("q_vals", spec.q_vals, t), ("kv_vals", spec.kv_vals, s)):
        for x in vals:
            if jnp.shape(x) != (b, length):
                raise ValueError(f"each of spec.{name} must have shape [B, {length}]=[{b}, {length}], got {x.shape}.")
    return dataclasses.replace(
        spec,
        block_map=jnp.asarray(spec.block_map, jnp.int32),
        q_positions=jnp.asarray(spec.q_positions, jnp.int32),
        kv_positions=jnp.asarray(spec.kv_positions, jnp.int32),
        q_vals=tuple(jnp.asarray(x) for x in spec.q_vals),
        kv_vals=tuple(jnp.asarray(x) for x in spec.kv_vals),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class _RingConfig:
    """Static configuration of one ring call (closed over by the custom_vjp)."""

    axis_name: str
    num_shards: int
    step_fwd: Callable
    step_bwd: Callable
    scale: float
    softcap: float | None

    def send(self, tree):
        """Every device sends ``tree`` to the next one on the ring (device i receives from i - 1)."""
        p = self.num_shards
        return jax.lax.ppermute(tree, self.axis_name, [(i, (i + 1) % p) for i in range(p)])

    def source(self, me, step):
        """Device whose K/V shard visits ``me`` at ``step``."""
        return (me - step) % self.num_shards


def _step_spec(spec: MaskSpec, block_map, kv) -> MaskSpec:
    """The spec of one step: the visiting shard's block map, key positions and key data."""
    _, _, kv_pos, kv_vals = kv
    return dataclasses.replace(spec, block_map=block_map, kv_positions=kv_pos, kv_vals=tuple(kv_vals))


def _static_float(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError(f"{name} must be a static number for ring attention, got {name}={value!r}.") from None


def _ring(config: _RingConfig, q, k, v, spec: MaskSpec):
    @jax.custom_vjp
    def ring(q, k, v, spec):
        return _ring_fwd(config, q, k, v, spec)[:2]

    def fwd(q, k, v, spec):
        out, lse, out_f32 = _ring_fwd(config, q, k, v, spec)
        return (out, lse), (q, k, v, spec, out_f32, lse)

    def bwd(residuals, cotangents):
        q, k, v, spec, out_f32, lse = residuals
        dout, dlse = cotangents
        dq, dk, dv = _ring_bwd(config, q, k, v, spec, out_f32, lse, dout, dlse)
        return dq, dk, dv, jax.tree.map(_no_gradient, spec)  # d query, d key, d value, the spec (no gradient)

    ring.defvjp(fwd, bwd)
    return ring(q, k, v, spec)


def _no_gradient(x):
    """Zero cotangent of mask data (block maps, positions, segment ids: float0 for integers)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _merge(out, lse, out_i, lse_i):
    """Combine two normalised partial results by their logsumexp, in float32, without overflow.

    ``out [B, T, N, Hv]``, ``lse [B, N, T]``; rows with ``lse = -inf`` (nothing seen) weigh 0.
    """
    top = jnp.maximum(lse, lse_i)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # both -inf: any finite shift works
    w, w_i = jnp.exp(lse - top), jnp.exp(lse_i - top)  # <= 1, and 0 for -inf
    total = w + w_i
    seen = total > 0
    safe = jnp.where(seen, total, 1.0)
    new_lse = jnp.where(seen, top + jnp.log(safe), -jnp.inf)
    a = jnp.swapaxes(w / safe, 1, 2)[..., None]  # [B, T, N, 1]
    a_i = jnp.swapaxes(w_i / safe, 1, 2)[..., None]
    return out * a + out_i * a_i, new_lse


def _ring_fwd(config: _RingConfig, q, k, v, spec: MaskSpec):
    me = jax.lax.axis_index(config.axis_name)
    b, t, n, _ = q.shape
    out = jnp.zeros_like(q, jnp.float32, shape=(b, t, n, v.shape[-1]))  # *_like keeps shard_map's vma
    lse = jnp.full_like(q, -jnp.inf, jnp.float32, shape=(b, n, t))

    def compute(step, carry, kv):
        out, lse = carry
        k_i, v_i = kv[:2]
        block_map = spec.block_map[config.source(me, step)]

        def attend():
            step_spec = _step_spec(spec, block_map, kv)
            out_i, lse_i = config.step_fwd(q, k_i, v_i, step_spec, scale=config.scale, softcap=config.softcap)
            return _merge(out, lse, out_i.astype(jnp.float32), lse_i.astype(jnp.float32))

        return jax.lax.cond(jnp.any(block_map != EMPTY), attend, lambda: (out, lse))

    def body(step, carry):
        acc, kv = carry
        # Issued first, so the transfer overlaps the compute below. The last step's send is not
        # needed; one loop body (instead of a peeled last step) halves the compile time.
        kv_next = config.send(kv)
        return compute(step, acc, kv), kv_next

    kv = (k, v, spec.kv_positions, spec.kv_vals)  # positions and key data travel with their shard
    (out, lse), kv = jax.lax.fori_loop(0, config.num_shards, body, ((out, lse), kv))
    return out.astype(q.dtype), lse, out


def _ring_bwd(config: _RingConfig, q, k, v, spec: MaskSpec, out, lse, dout, dlse):
    me = jax.lax.axis_index(config.axis_name)
    # delta = rowsum(out * dout); a cotangent on lse adds p * dlse to ds, i.e. delta -= dlse.
    delta = jnp.einsum("BTNH,BTNH->BNT", out, dout.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    delta = delta - jnp.where(jnp.isfinite(lse), dlse, 0.0)
    dq = jnp.zeros_like(q, jnp.float32)
    zeros_kv = (jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32))

    def compute(step, kv):
        k_i, v_i = kv[:2]
        block_map = spec.block_map[config.source(me, step)]

        def grads():
            step_spec = _step_spec(spec, block_map, kv)
            dq_i, dk_i, dv_i = config.step_bwd(
                q, k_i, v_i, step_spec, lse, delta, dout, scale=config.scale, softcap=config.softcap
            )
            return dq_i.astype(jnp.float32), dk_i.astype(jnp.float32), dv_i.astype(jnp.float32)

        return jax.lax.cond(jnp.any(block_map != EMPTY), grads, lambda: (jnp.zeros_like(dq),) + zeros_kv)

    # dk/dv travel one step behind their K/V shard: at step i, device d receives from d - 1 the
    # partial dk/dv of the shard d itself holds at step i, adds its own part, and passes it on at
    # step i + 1 (at step 0 the received accumulator is zero). Both sends of a step are issued
    # before its compute, which depends on neither.
    def body(step, carry):
        dq, dkv, kv = carry
        kv_next = config.send(kv)
        dkv_in = config.send(dkv)  # both issued before the compute
        dq_i, dk_i, dv_i = compute(step, kv)
        return dq + dq_i, (dkv_in[0] + dk_i, dkv_in[1] + dv_i), kv_next

    kv = (k, v, spec.kv_positions, spec.kv_vals)
    dq, dkv, kv = jax.lax.fori_loop(0, config.num_shards, body, (dq, zeros_kv, kv))
    dk, dv = config.send(dkv)  # the P-th hop: dk/dv arrive home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
