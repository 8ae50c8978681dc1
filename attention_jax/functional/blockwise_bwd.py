"""Backward pass of the blockwise path: one sweep over the visible tiles, query block by query block.

For each tile the probabilities are recomputed from the saved logsumexp, ``p = exp(s - lse)``, and
with ``delta = rowsum(out * dout)`` (``out`` after dropout) precomputed per query block,

    dp = dout . v^T,   ds = p * (dp * keep / (1 - rate) - delta),
    dq += ds . k,      dk += ds^T . q,      dv += (p * keep / (1 - rate))^T . dout,

where ``keep`` is the dropout mask regenerated from its hash (all ones without dropout) and ``ds``
is first pulled back through the softcap, the score mod and the bias (which yields their
gradients too). dq accumulates for the current query block; dk and dv accumulate in place in
float32 buffers ``[B, K, H, Sp]`` (transposed, so that each tile's contribution is a plain matmul
written without a transpose), the ``G`` query heads of a group summing into their shared
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
    as_groups,
    as_heads,
    bias_tile,
    dropout_keep,
    dropout_rows,
    einsum,
    kv_tile,
    modify_scores,
    q_tile,
    q_untile,
    row_stat_tile,
    scan_tiles,
    tile_indices,
    tile_scores,
    visible_columns,
)

Array = jax.Array


class Wanted(NamedTuple):
    """Which optional gradients to compute (static)."""

    bias: bool = False
    scale: bool = False
    params: bool = False  # the score_fn parameters


class Grads(NamedTuple):
    dq: Array  # [B, Tp, N, H] float32
    dk: Array  # [B, Sp, K, H] float32
    dv: Array  # [B, Sp, K, Hv] float32
    dbias: Array | None  # like x.bias, float32
    dparams: tuple | None  # like x.params, float32
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
    b, tp, n, h = x.q.shape
    kv_heads, sp, hv = x.k.shape[1], x.k.shape[2], x.v.shape[-1]
    bq = cfg.block_q
    acc_dtype = jnp.promote_types(x.q.dtype, jnp.float32)

    def query_block(i, carry):
        dq, dk, dv, dbias, dparams, dscale = carry
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
        rows = dropout_rows(cfg, x, i, kv_heads)

        def update(j, visible, c):
            return _tile_grads(cfg, x, i, j, c, (qt, qt_t, dot, dot_t), lse_t, delta_t, rows, visible, wanted)

        c = (jnp.zeros_like(qt, acc_dtype), dk, dv, dbias, dparams, dscale)
        dq_t, dk, dv, dbias, dparams, dscale = scan_tiles(cfg, x, sched, i, c, update)
        dq = lax.dynamic_update_slice_in_dim(dq, q_untile(dq_t * x.scale, bq).astype(dq.dtype), i * bq, axis=1)
        return dq, dk, dv, dbias, dparams, dscale

    zeros = lambda a, shape=None: jnp.zeros_like(a, acc_dtype, shape=shape)
    dbias = zeros(x.bias) if wanted.bias and x.bias is not None else None
    dparams = tuple(zeros(p) for p in x.params) if wanted.params else None
    dscale = jnp.zeros_like(x.scale, jnp.float32) if wanted.scale else None
    carry = (zeros(x.q), zeros(x.k, (b, kv_heads, h, sp)), zeros(x.v, (b, kv_heads, hv, sp)), dbias, dparams, dscale)
    dq, dk_t, dv_t, dbias, dparams, dscale = lax.fori_loop(0, tp // bq, query_block, carry)
    dk, dv = dk_t.transpose(0, 3, 1, 2), dv_t.transpose(0, 3, 1, 2)  # [B, Sp, K, H]
    return Grads(dq, dk, dv, dbias, dparams, dscale)


def _tile_grads(cfg: Config, x: Operands, i, j, carry, qrows, lse_t, delta_t, rows, visible, wanted: Wanted):
    """Gradient contributions of tile ``(i, j)``, added into the carry."""
    dq_t, dk, dv, dbias, dparams, dscale = carry
    qt, qt_t, dot, dot_t = qrows
    kv_heads, n = x.k.shape[1], x.q.shape[2]
    bq, bk = cfg.block_q, cfg.block_k
    kt, vt = kv_tile(x.k, j, bk), kv_tile(x.v, j, bk)  # [B, K, bk, H], [B, K, bk, Hv]
    if visible is not None:  # unseen key/value rows may hold NaN (uninitialised cache slots): 0 * NaN in dq, dp
        seen = visible_columns(visible, kv_heads)
        kt, vt = jnp.where(seen, kt, jnp.zeros((), kt.dtype)), jnp.where(seen, vt, jnp.zeros((), vt.dtype))
    raw = tile_scores(cfg, qt, kt)  # [B, K, R, bk] float32, scale included

    modified = x.bias is not None or cfg.modifies_scores
    if modified:
        b_tile = bias_tile(x, i, j, cfg)
        b_tile = None if b_tile is None else b_tile.astype(raw.dtype)
        indices = tile_indices(x, i, j, bq, bk)
        chain = lambda s, bias_t, params: modify_scores(cfg, s, bias_t, params, indices)
        s, pullback = jax.vjp(chain, as_heads(raw, n), b_tile, x.params)
    else:
        s = as_heads(raw, n)
    if visible is not None:
        s = jnp.where(visible, s, -jnp.inf)
    p = jnp.exp(as_groups(s, kv_heads) - lse_t[..., None])  # [B, K, R, bk]
    dp = einsum("BKRH,BKSH->BKRS", dot, vt, cfg.compute_dtype)
    p_drop = p
    if rows is not None:
        keep = dropout_keep(cfg, x, rows, j)
        inv = 1.0 / (1.0 - cfg.dropout_rate)
        dp = jnp.where(keep, dp * inv, 0.0)
        p_drop = jnp.where(keep, p * inv, 0.0)
    ds = p * (dp - delta_t[..., None])
    if modified:
        ds_raw, d_bias, d_params = pullback(as_heads(ds, n))
        ds_raw = as_groups(ds_raw, kv_heads)
    else:
        ds_raw, d_bias, d_params = ds, None, None

    dq_t = dq_t + einsum("BKRS,BKSH->BKRH", ds_raw, kt, cfg.compute_dtype)
    dk = _add_kv(dk, j, bk, einsum("BKHR,BKRS->BKHS", qt_t, ds_raw, cfg.compute_dtype))
    dv = _add_kv(dv, j, bk, einsum("BKHR,BKRS->BKHS", dot_t, p_drop, cfg.compute_dtype))
    if dbias is not None:
        dbias = _add_broadcast_tile(dbias, i, j, bq, bk, d_bias)
    if dparams is not None:
        dparams = tuple(acc + d.astype(acc.dtype) for acc, d in zip(dparams, d_params))
    if dscale is not None:
        dscale = dscale + jnp.sum(ds_raw * raw) / x.scale
    return dq_t, dk, dv, dbias, dparams, dscale


def _add_kv(acc: Array, j, block: int, tile_t: Array) -> Array:
    """``acc [B, K, H, Sp]`` += the tile ``tile_t [B, K, H, bk]`` at key block ``j`` (in place)."""
    current = lax.dynamic_slice_in_dim(acc, j * block, block, axis=3)
    return lax.dynamic_update_slice_in_dim(acc, current + tile_t.astype(acc.dtype), j * block, axis=3)


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
