"""Native Sparse Attention (Yuan et al., DeepSeek, 2025): three causal branches mixed by learned gates.

For query ``t`` and each key/value head (one GQA group of G query heads):

* compressed: attention over compressed keys/values, one per block of ``compress_block`` positions taken every
  ``compress_stride`` positions; compressed block ``m`` covers ``[m d, m d + l)`` and is visible once it is
  complete (``m d + l - 1 <= t``);
* selected: the compressed attention probabilities, summed over the G heads of the group and mapped onto
  selection blocks of ``select_block`` positions (a selection block scores the sum of the compressed blocks
  that overlap it), pick the top ``num_selected`` blocks that start at or before ``t`` (the block holding ``t``
  is always taken); the query attends, causally, to the tokens of those blocks;
* window: the last ``window`` keys before ``t`` and ``t`` itself.

``out_t = g_cmp o_cmp + g_slc o_slc + g_win o_win`` with per-head gates ``[B, T, N, 3]`` (sigmoids in the
paper). The block choice carries no gradient; the compressed branch learns from its own output.

Positions are absolute: key slot ``s`` holds position ``s`` and query ``i`` sits at ``q_offset + i``, so
the same function serves the full forward (``q_offset = 0``, ``T == S``) and decoding from a cache
(``q_offset`` the cache's length per sequence, ``S`` its capacity). :func:`new_blocks` and
:func:`gather_blocks` say which compressed blocks a step of decoding completes and read their tokens.

>>> import jax.numpy as jnp
>>> q, kv = jnp.ones((1, 16, 4, 8)), jnp.ones((1, 16, 2, 8))  # [B, T, N, H], [B, S, K, H]
>>> kc = compress_blocks(kv, block=4, stride=2).mean(3)        # mean-pooled blocks
>>> kc.shape                                                   # [B, M, K, H], M = (16 - 4) // 2 + 1
(1, 7, 2, 8)
>>> gates = jnp.full((1, 16, 4, 3), 0.5)
>>> native_sparse_attention(q, kv, kv, kc, kc, gates, compress_block=4, compress_stride=2, select_block=4,
...                         num_selected=2, window=3).shape
(1, 16, 4, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attention_jax import masks
from attention_jax.functional import _checks
from attention_jax.functional.dot_product import attention_weights, dot_product_attention
from attention_jax.functional.reference import masked_softmax

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = [
    "num_compressed_blocks",
    "compress_blocks",
    "new_blocks",
    "gather_blocks",
    "selection_overlap",
    "selection_members",
    "native_sparse_attention",
]


def num_compressed_blocks(seq_len: int, block: int, stride: int) -> int:
    """How many complete blocks of ``block`` positions start every ``stride`` positions in ``seq_len``."""
    return 0 if seq_len < block else (seq_len - block) // stride + 1


def compress_blocks(x: Array, *, block: int, stride: int) -> Array:
    """The blocks a compression function reads: ``[B, S, K, H] -> [B, M, K, block, H]``."""
    m = num_compressed_blocks(x.shape[1], block, stride)
    index = np.arange(m)[:, None] * stride + np.arange(block)[None, :]  # [M, block]
    return jnp.swapaxes(x[:, index], 2, 3)  # [B, M, block, K, H] -> [B, M, K, block, H]


def new_blocks(start: Array, end: Array, num_new: int, *, block: int, stride: int, max_blocks: int):
    """The compressed blocks that become complete when positions ``start .. end - 1`` are appended.

    Block ``m`` covers ``[m stride, m stride + block)`` and completes with position ``m stride + block - 1``.
    ``start, end [B]`` (``end - start <= num_new``, the static step length). Returns ``index [B, U]`` and
    ``complete [B, U]`` bool with ``U = ceil(num_new / stride)``: block ``index`` completes now where
    ``complete`` (and lies below ``max_blocks``).

    >>> import jax.numpy as jnp
    >>> index, complete = new_blocks(jnp.array([0, 5]), jnp.array([6, 6]), 6, block=4, stride=2, max_blocks=8)
    >>> index.tolist(), complete.tolist()
    ([[0, 1, 2], [1, 2, 3]], [[True, True, False], [True, False, False]])
    """
    u = -(-num_new // stride)
    first = jnp.maximum(start - block + 1, 0)  # the earliest start of a block that completes at or after `start`
    index = (first + stride - 1)[:, None] // stride + jnp.arange(u, dtype=jnp.int32)  # [B, U]
    done = index * stride + block - 1
    complete = (done >= start[:, None]) & (done < end[:, None]) & (index < max_blocks)
    return index, complete


def gather_blocks(x: Array, index: Array, *, block: int, stride: int) -> Array:
    """The tokens of compressed blocks ``index [B, U]``: ``x [B, S, K, H] -> [B, U, K, block, H]`` (clipped to S)."""
    positions = jnp.clip(index[..., None] * stride + jnp.arange(block), 0, x.shape[1] - 1)  # [B, U, block]
    picked = jnp.take_along_axis(x, positions.reshape(x.shape[0], -1)[:, :, None, None], axis=1)  # [B, U block, K, H]
    return jnp.swapaxes(picked.reshape(x.shape[0], *positions.shape[1:], *x.shape[2:]), 2, 3)


def selection_overlap(num_cmp: int, compress_block: int, compress_stride: int, select_block: int, seq_len: int):
    """Static ``[M, nb]`` 0/1 matrix: compressed block ``m`` overlaps selection block ``j``."""
    num_select = -(-seq_len // select_block)
    start = np.arange(num_cmp)[:, None] * compress_stride
    j = np.arange(num_select)[None, :]
    hits = (start <= (j + 1) * select_block - 1) & (j * select_block <= start + compress_block - 1)
    return hits.astype(np.float32)


def selection_members(num_cmp: int, compress_block: int, compress_stride: int, select_block: int, seq_len: int):
    """Static ``[nb, c]`` indices: the compressed blocks that overlap selection block ``j`` (the nonzero rows
    of column ``j`` of :func:`selection_overlap`), padded with ``num_cmp`` (an index past the last block).

    A selection block overlaps at most ``c ~ (l' + l) / d`` compressed blocks, so a query scores the
    ``nb`` selection blocks in O(nb c) instead of the O(nb M) of a product with the overlap matrix.

    >>> selection_members(5, 4, 2, 4, 12).tolist()        # blocks [0, 4), [2, 6), [4, 8), [6, 10), [8, 12)
    [[0, 1, 5], [1, 2, 3], [3, 4, 5]]
    """
    num_select = -(-seq_len // select_block)
    j = np.arange(num_select)
    first = np.maximum(0, -(-(j * select_block - compress_block + 1) // compress_stride))  # [nb]
    last = np.minimum(((j + 1) * select_block - 1) // compress_stride, num_cmp - 1)  # [nb]
    width = max(1, int(np.max(last - first + 1, initial=0)))
    members = first[:, None] + np.arange(width)  # [nb, c]
    return np.where(members <= last[:, None], members, num_cmp).astype(np.int32)


def check_config(compress_block, compress_stride, select_block, num_selected, window):
    for name, value in (
        ("compress_block", compress_block),
        ("compress_stride", compress_stride),
        ("select_block", select_block),
        ("num_selected", num_selected),
        ("window", window),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}.")
    if compress_block % compress_stride:
        raise ValueError(f"compress_stride must divide compress_block, got {compress_stride=} and {compress_block=}.")
    if select_block % compress_stride:
        raise ValueError(f"compress_stride must divide select_block, got {compress_stride=} and {select_block=}.")


def _selected_branch(q, key, value, p_cmp, members, pos, *, select_block, num_selected, scale, return_weights):
    """Top-n block attention. ``q [B, T, K, G, H]``, ``p_cmp [B, K, G, T, M]``, query positions ``pos [B, T]``
    -> ``[B, T, K, G, Hv]`` (and the weights on the key slots ``[B, K, G, T, S]``)."""
    b, t, k_heads, _, h = q.shape
    s = key.shape[1]
    num_blocks = members.shape[0]
    # Importance of each selection block: the compressed probability of the blocks that overlap it, summed over
    # them and over the G query heads of the group (which share the selection).
    p_group = jnp.pad(p_cmp.sum(axis=2), [(0, 0)] * 3 + [(0, 1)])  # [B, K, T, M + 1]: index M reads 0
    importance = jnp.take(p_group, jnp.asarray(members), axis=-1).sum(-1)  # [B, K, T, nb]
    q_block = (pos // select_block)[:, None, :, None]  # [B, 1, T, 1]
    j = jnp.arange(num_blocks)
    importance = jnp.where(j == q_block, jnp.inf, jnp.where(j < q_block, importance, -jnp.inf))
    top, chosen = jax.lax.top_k(importance, min(num_selected, num_blocks))  # [B, K, T, n]; ties: lower j first
    n = chosen.shape[-1]

    def gather(x):  # [B, S, K, D] -> tokens of the chosen blocks [B, K, T, n * select_block, D]
        pad = num_blocks * select_block - x.shape[1]
        x = jnp.pad(x, [(0, 0), (0, pad), (0, 0), (0, 0)])
        blocks = jnp.moveaxis(x.reshape(b, num_blocks, select_block, k_heads, -1), 3, 1)  # [B, K, nb, l', D]
        picked = jnp.take_along_axis(blocks, chosen.reshape(b, k_heads, t * n)[..., None, None], axis=2)
        return picked.reshape(b, k_heads, t, n * select_block, x.shape[-1])

    keys, values = gather(key), gather(value)
    positions = (chosen[..., None] * select_block + np.arange(select_block)).reshape(b, k_heads, t, -1)
    allowed = (positions <= pos[:, None, :, None]) & jnp.repeat(top > -jnp.inf, select_block, axis=-1)
    scores = jnp.einsum("BTKGH,BKTXH->BKGTX", q, keys, precision=_HI) * scale
    probs, _ = masked_softmax(scores, allowed[:, :, None])  # [B, K, G, T, n l']
    out = jnp.einsum("BKGTX,BKTXV->BTKGV", probs, values, precision=_HI)
    if not return_weights:
        return out, None
    slots = jax.nn.one_hot(positions, s, dtype=probs.dtype)  # [B, K, T, n l', S]; padding past S: all zero
    return out, jnp.einsum("BKGTX,BKTXS->BKGTS", probs, slots, precision=_HI)


def native_sparse_attention(
    query: Array,
    key: Array,
    value: Array,
    key_cmp: Array,
    value_cmp: Array,
    gates: Array,
    *,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    num_selected: int,
    window: int,
    window_key: Array | None = None,
    window_value: Array | None = None,
    scale: float | None = None,
    q_offset: int | Array = 0,
    return_weights: bool = False,
):
    """Causal NSA self-attention: gated sum of compressed, top-n selected and sliding-window attention.

    Args:
      query: ``[B, T, N, H]``.
      key, value: ``[B, S, K, H]``, ``[B, S, K, Hv]`` for the selected branch (and the window branch);
        slot ``s`` holds position ``s``.
      key_cmp, value_cmp: compressed keys/values ``[B, M, K, H]``, ``[B, M, K, Hv]``, one per block of
        ``compress_block`` positions every ``compress_stride``, ``M = num_compressed_blocks(S, ...)`` (see
        :func:`compress_blocks`); a block a query cannot see yet may hold anything.
      gates: ``[B, T, N, 3]``, the weights of the compressed, selected and window outputs.
      compress_block, compress_stride: l and d of the paper (d must divide l).
      select_block: l', positions per selection block (a multiple of d).
      num_selected: n, blocks each query attends to in the selected branch.
      window: keys before ``t`` in the window branch (``t - window .. t``).
      window_key, window_value: the window branch's own keys/values (the paper's independent branches);
        default ``key`` and ``value``.
      scale: defaults to ``1 / sqrt(H)``.
      q_offset: position of the first query, an int or ``[B]`` (decoding: the cache's lengths); query
        ``i`` reads the slots at positions up to ``q_offset + i``, which must have been written.
      return_weights: also return the weights ``[B, N, T, S]`` float32: the gated sum of the selected and
        window branches' weights and the compressed branch's, each compressed block's weight spread
        evenly over its ``compress_block`` tokens (an attribution: the compression is an MLP, so the
        output is not these weights applied to ``value``).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the weights). Row ``t`` reads no position after ``t``.
    """
    shape = _checks.check_qkv(query, key, value)
    check_config(compress_block, compress_stride, select_block, num_selected, window)
    if shape.q_len > shape.kv_len:
        raise ValueError(f"NSA is causal self-attention: T <= S, got T={shape.q_len} and S={shape.kv_len}.")
    b, t, n, h = query.shape
    s, k_heads, g, hv = shape.kv_len, shape.num_kv_heads, shape.group_size, shape.value_head_dim
    m = num_compressed_blocks(s, compress_block, compress_stride)
    if jnp.shape(key_cmp) != (b, m, k_heads, h) or jnp.shape(value_cmp) != (b, m, k_heads, hv):
        raise ValueError(
            f"key_cmp and value_cmp must be [B, M, K, H]={[b, m, k_heads, h]} and [B, M, K, Hv]={[b, m, k_heads, hv]}, "
            f"got {jnp.shape(key_cmp)} and {jnp.shape(value_cmp)}."
        )
    if jnp.shape(gates) != (b, t, n, 3):
        raise ValueError(f"gates must have shape [B, T, N, 3]={[b, t, n, 3]}, got gates.shape={jnp.shape(gates)}.")
    if jnp.ndim(q_offset) not in (0, 1) or jnp.size(q_offset) not in (1, b):
        raise ValueError(f"q_offset must be an int or [B]=[{b}], got shape {jnp.shape(q_offset)}.")
    scale = _checks.check_scale(scale, h)
    f32 = jnp.float32
    q = query.astype(f32).reshape(b, t, k_heads, g, h)  # [B, T, K, G, H]
    first = jnp.asarray(q_offset, jnp.int32).reshape(-1, 1)  # [B|1, 1]; q_offset itself stays static if an int
    pos = jnp.broadcast_to(first + jnp.arange(t, dtype=jnp.int32), (b, t))  # [B, T]

    # Compressed branch: only complete blocks are visible.
    if m:
        scores = jnp.einsum("BTKGH,BMKH->BKGTM", q, key_cmp.astype(f32), precision=_HI) * scale
        visible = np.arange(m) * compress_stride + compress_block - 1 <= pos[:, :, None]  # [B, T, M]
        p_cmp, _ = masked_softmax(scores, visible[:, None, None])  # [B, K, G, T, M]
        o_cmp = jnp.einsum("BKGTM,BMKV->BTKGV", p_cmp, value_cmp.astype(f32), precision=_HI)
    else:  # shorter than one compressed block: the branch sees nothing
        p_cmp = jnp.zeros((b, k_heads, g, t, 0), f32)
        o_cmp = jnp.zeros((b, t, k_heads, g, hv), f32)

    members = selection_members(m, compress_block, compress_stride, select_block, s)
    o_slc, w_slc = _selected_branch(
        q, key.astype(f32), value.astype(f32), p_cmp, members, pos, select_block=select_block,
        num_selected=num_selected, scale=scale, return_weights=return_weights,
    )  # fmt: skip

    window_key = key if window_key is None else window_key
    window_value = value if window_value is None else window_value
    window_mask = masks.causal() & masks.sliding_window(window)
    o_win = dot_product_attention(
        query.astype(f32), window_key.astype(f32), window_value.astype(f32), mask=window_mask, scale=scale,
        q_offset=q_offset,
    )  # fmt: skip
    # o_win: [B, T, N, Hv]

    gates = gates.astype(f32)
    out = (
        gates[..., 0:1] * o_cmp.reshape(b, t, n, hv)
        + gates[..., 1:2] * o_slc.reshape(b, t, n, hv)
        + gates[..., 2:3] * o_win
    )
    out = out.astype(query.dtype)
    if not return_weights:
        return out
    start = np.arange(m)[:, None] * compress_stride
    cover = ((start <= np.arange(s)) & (np.arange(s) < start + compress_block)) / compress_block  # [M, S]
    w_cmp = jnp.einsum("BKGTM,MS->BKGTS", p_cmp, jnp.asarray(cover, f32), precision=_HI)
    w_win = attention_weights(query.astype(f32), window_key.astype(f32), mask=window_mask, scale=scale,
                              q_offset=q_offset)  # fmt: skip
    g_n = jnp.moveaxis(gates, 1, 2)[..., None]  # [B, N, T, 3, 1]
    weights = (
        g_n[..., 0, :] * w_cmp.reshape(b, n, t, s) + g_n[..., 1, :] * w_slc.reshape(b, n, t, s) + g_n[..., 2, :] * w_win
    )
    return out, weights
