"""Backward pass of the blockwise path: one sweep over the visible tiles, query block by query block.

For each tile the probabilities are recomputed from the saved logsumexp, ``p = exp(s - lse)``, and
with ``delta = rowsum(out * dout)`` precomputed,

    dp = dout . v^T,   ds = p * (dp - delta),
    dq += ds . k,      dk += ds^T . q,      dv += p^T . dout,

where ``ds`` is first pulled back through the softcap, the score mod and the bias (which yields
their gradients too). dq accumulates for the current query block; dk and dv accumulate in place
in float32 ``[B, Sp, K, H]`` buffers, the ``G`` query heads of a group summing into their shared
key/value head. Each tile's scores are computed once (no second sweep for dk/dv).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from attention_jax.functional.blockwise_tiles import (
    Config,
    Operands,
    Schedule,
    apply_mask,
    as_groups,
    bias_tile,
    einsum,
    kv_tile,
    modify_scores,
    q_tile,
    q_untile,
    row_stat_tile,
    run_tile,
    tile_indices,
    tile_scores,
)
from pallas_kernels.mask_info import PARTIAL

Array = jax.Array


class Wanted(NamedTuple):
    """Which optional gradients to compute (static)."""

    bias: bool = False
    scale: bool = False
    mod: tuple[bool, ...] = ()  # per score-mod leaf


class Grads(NamedTuple):
    dq: Array  # [B, Tp, N, H] float32
    dk: Array  # [B, Sp, K, H] float32
    dv: Array  # [B, Sp, K, Hv] float32
    dbias: Array | None  # like x.bias, float32
    dmod: tuple  # per score-mod leaf: float32 cotangent or None
    dscale: Array | None  # float32 scalar


def backward(
    cfg: Config,
    x: Operands,
    sched: Schedule,
    lse: Array,
    delta: Array | None,
    dout: Array,
    wanted: Wanted | None = None,
    out: Array | None = None,
) -> Grads:
    """Gradients of the blockwise attention given ``lse, delta [B, N, Tp]`` and ``dout [B, Tp, N, Hv]``.

    ``lse`` and ``delta`` may be the *global* statistics of a longer key sequence (a ring step):
    the result is then this key block's exact contribution to the gradients. With ``delta=None``
    it is computed per query block from ``out [B, Tp, N, Hv]`` (``delta = rowsum(out * dout)``;
    no full-size temporary).
    """
    wanted = wanted or Wanted()
    tp = x.q.shape[1]
    kv_heads = x.k.shape[2]
    bq = cfg.block_q
    acc_dtype = jnp.promote_types(x.q.dtype, jnp.float32)
    wanted_mod = tuple(wanted.mod) or (False,) * len(x.mod_leaves)
    diff_pos = tuple(p for p, w in enumerate(wanted_mod) if w)

    def query_block(i, carry):
        dq, dk, dv, dbias, dmod, dscale = carry
        qt = (q_tile(x.q, i, bq, kv_heads).astype(acc_dtype) * x.scale).astype(cfg.compute_dtype)
        dot = q_tile(dout, i, bq, kv_heads).astype(cfg.compute_dtype)  # [B, K, R, Hv]
        # dk/dv contract over the rows R: with q and dout transposed once per query block, each
        # tile's dk^T = q^T . ds and dv^T = dout^T . p are plain matmuls (the transposed-operand
        # form is several times slower on CPU).
        qt_t, dot_t = jnp.swapaxes(qt, 2, 3), jnp.swapaxes(dot, 2, 3)  # [B, K, H, R], [B, K, Hv, R]
        lse_t = row_stat_tile(lse, i, bq, kv_heads)
        lse_t = jnp.where(lse_t == -jnp.inf, jnp.inf, lse_t)  # rows that see nothing: p = 0
        if delta is None:  # rowsum(out * dout) on this query block's rows, in float32
            o_t = q_tile(out, i, bq, kv_heads).astype(jnp.float32)
            delta_t = jnp.sum(o_t * dot.astype(jnp.float32), axis=-1)  # [B, K, R]
        else:
            delta_t = row_stat_tile(delta, i, bq, kv_heads)

        def body(jj, c):
            j, partial = sched.idx[i, jj], sched.kind[i, jj] == PARTIAL
            update = lambda visible: _tile_grads(
                cfg, x, i, j, c, (qt, qt_t, dot, dot_t), lse_t, delta_t, partial, visible, diff_pos, wanted
            )
            return run_tile(cfg, x, i, j, partial, c, update)

        dq_t = jnp.zeros_like(qt, acc_dtype)
        c = (dq_t, dk, dv, dbias, dmod, dscale)
        dq_t, dk, dv, dbias, dmod, dscale = lax.fori_loop(0, sched.count[i], body, c)
        dq = lax.dynamic_update_slice_in_dim(dq, q_untile(dq_t * x.scale, bq).astype(dq.dtype), i * bq, axis=1)
        return dq, dk, dv, dbias, dmod, dscale

    zeros = lambda a: jnp.zeros_like(a, acc_dtype)
    dbias = zeros(x.bias) if wanted.bias and x.bias is not None else None
    dmod = tuple(zeros(x.mod_leaves[p]) for p in diff_pos)
    dscale = jnp.zeros_like(x.scale, jnp.float32) if wanted.scale else None
    carry = (zeros(x.q), zeros(x.k), zeros(x.v), dbias, dmod, dscale)
    dq, dk, dv, dbias, dmod, dscale = lax.fori_loop(0, tp // bq, query_block, carry)
    full_dmod = [None] * len(x.mod_leaves)
    for p, d in zip(diff_pos, dmod):
        full_dmod[p] = d
    return Grads(dq, dk, dv, dbias, tuple(full_dmod), dscale)


def _tile_grads(cfg: Config, x: Operands, i, j, carry, rows, lse_t, delta_t, partial, visible, diff_pos, wanted):
    """Gradient contributions of tile ``(i, j)``, added into the carry."""
    dq_t, dk, dv, dbias, dmod, dscale = carry
    qt, qt_t, dot, dot_t = rows
    kv_heads = x.k.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    kt, vt = kv_tile(x.k, j, bk), kv_tile(x.v, j, bk)  # [B, K, bk, H], [B, K, bk, Hv]
    raw = tile_scores(cfg, qt, kt)  # [B, N, bq, bk] float32, scale included
    b_tile = bias_tile(x, i, j, cfg)
    b_tile = None if b_tile is None else b_tile.astype(raw.dtype)
    indices = tile_indices(x, i, j, bq, bk)

    def chain(s, bias_t, diff_leaves):
        leaves = list(x.mod_leaves)
        for p, leaf in zip(diff_pos, diff_leaves):
            leaves[p] = leaf
        return modify_scores(cfg, s, bias_t, tuple(leaves), indices)

    diff_leaves = tuple(x.mod_leaves[p] for p in diff_pos)
    s, pullback = jax.vjp(chain, raw, b_tile, diff_leaves)
    s = as_groups(apply_mask(cfg, x, i, j, s, partial, visible), kv_heads)  # [B, K, R, bk]
    p = jnp.exp(s - lse_t[..., None])
    dp = einsum("BKRH,BKSH->BKRS", dot, vt, cfg.compute_dtype)
    ds = p * (dp - delta_t[..., None])
    ds_raw, d_bias, d_leaves = pullback(ds.reshape(raw.shape))
    ds_raw = as_groups(ds_raw, kv_heads)

    dq_t = dq_t + einsum("BKRS,BKSH->BKRH", ds_raw, kt, cfg.compute_dtype)
    dk = _add_kv(dk, j, bk, einsum("BKHR,BKRS->BKHS", qt_t, ds_raw, cfg.compute_dtype))
    dv = _add_kv(dv, j, bk, einsum("BKHR,BKRS->BKHS", dot_t, p, cfg.compute_dtype))
    if dbias is not None:
        dbias = _add_broadcast_tile(dbias, i, j, bq, bk, d_bias)
    dmod = tuple(acc + d.astype(acc.dtype) for acc, d in zip(dmod, d_leaves))
    if dscale is not None:
        dscale = dscale + jnp.sum(ds_raw * as_groups(raw, kv_heads)) / x.scale
    return dq_t, dk, dv, dbias, dmod, dscale


def _add_kv(acc: Array, j, block: int, tile_t: Array) -> Array:
    """``acc [B, Sp, K, H]`` += the transposed tile ``tile_t [B, K, H, bk]`` at key block ``j`` (in place)."""
    tile = tile_t.transpose(0, 3, 1, 2).astype(acc.dtype)
    current = lax.dynamic_slice_in_dim(acc, j * block, block, axis=1)
    return lax.dynamic_update_slice_in_dim(acc, current + tile, j * block, axis=1)


def _add_broadcast_tile(acc: Array, i, j, block_q: int, block_k: int, tile: Array) -> Array:
    """Add a tile into an array broadcastable to ``[B, N, Tp, Sp]`` (size-1 dims were summed)."""
    start = (
        0,
        0,
        i * block_q if acc.shape[2] > 1 else 0,
        j * block_k if acc.shape[3] > 1 else 0,
    )
    current = lax.dynamic_slice(acc, start, tile.shape)
    return lax.dynamic_update_slice(acc, current + tile.astype(acc.dtype), start)
