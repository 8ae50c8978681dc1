"""Positional attention: attention weights from learned positions alone, and their gated mix with content.

* ``positional_attention``: ``softmax(P) V`` with logits ``P [N, T, S]`` that depend on positions only (a
  learned table: Synthesizer's "random" attention, Tay et al., 2021), the same for every input.
* ``factorized_positional_logits``: the low-rank form ``P_n = E_q,n E_k,n^T / sqrt(R)`` from learned position
  embeddings ``E_q [T, N, R]``, ``E_k [S, N, R]`` (the factorized synthesizer; TUPE's position-to-position
  term of Ke et al., 2021).
* ``gated_positional_attention``: per head, ``(1 - sigmoid(lambda)) softmax(q.k / sqrt(H)) V +
  sigmoid(lambda) softmax(P) V`` (ConViT's gated positional self-attention, d'Ascoli et al., 2021).

>>> import jax.numpy as jnp
>>> v = jnp.arange(6.0).reshape(1, 3, 1, 2)                  # [B, S, K, Hv]
>>> logits = jnp.zeros((1, 3, 3))                             # [N, T, S]: uniform weights
>>> positional_attention(v, logits)[0, :, 0].tolist()
[[2.0, 3.0], [2.0, 3.0], [2.0, 3.0]]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks
from attention_jax.functional.dot_product import dense_mask
from attention_jax.functional.multi_head import multi_head_attention
from attention_jax.functional.reference import masked_softmax

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

__all__ = ["positional_attention", "factorized_positional_logits", "gated_positional_attention"]


def factorized_positional_logits(query_embeddings: Array, key_embeddings: Array, *, scale=None) -> Array:
    """Low-rank positional logits ``E_q E_k^T * scale``: ``[T, N, R]``, ``[S, N, R]`` -> ``[N, T, S]``.

    With a batch of positions (embeddings gathered at ``[B, T]`` positions), ``[B, T, N, R]`` and
    ``[B|1, S, N, R]`` give ``[B, N, T, S]``. ``scale`` defaults to ``1 / sqrt(R)``.
    """
    q_shape, k_shape = jnp.shape(query_embeddings), jnp.shape(key_embeddings)
    batched = len(q_shape) == 4 or len(k_shape) == 4
    if len(q_shape) not in (3, 4) or len(k_shape) not in (3, 4) or q_shape[-2:] != k_shape[-2:]:
        raise ValueError(
            f"query_embeddings and key_embeddings must be [(B,) T, N, R] and [(B,) S, N, R], got {q_shape} and "
            f"{k_shape}."
        )
    scale = 1.0 / float(q_shape[-1]) ** 0.5 if scale is None else scale
    f32 = jnp.float32
    e_q, e_k = query_embeddings.astype(f32), key_embeddings.astype(f32)
    if not batched:
        return scale * jnp.einsum("TNR,SNR->NTS", e_q, e_k, precision=_HI)
    e_q, e_k = (e if e.ndim == 4 else e[None] for e in (e_q, e_k))
    b = max(e_q.shape[0], e_k.shape[0])
    e_q = jnp.broadcast_to(e_q, (b, *e_q.shape[1:]))  # [B, T, N, R]
    e_k = jnp.broadcast_to(e_k, (b, *e_k.shape[1:]))  # [B, S, N, R]
    return scale * jnp.einsum("BTNR,BSNR->BNTS", e_q, e_k, precision=_HI)


def _shape(value: Array, logits: Array, num_heads: int | None = None) -> _checks.AttentionShape:
    if jnp.ndim(value) != 4:
        raise ValueError(f"value must have rank 4 [B, S, K, Hv], got value.shape={jnp.shape(value)}.")
    if jnp.ndim(logits) not in (3, 4):
        raise ValueError(f"logits must be [N, T, S] or [B, N, T, S], got logits.shape={jnp.shape(logits)}.")
    b, s, k, hv = value.shape
    n, t, ls = logits.shape[-3:]
    if num_heads is not None and n != num_heads:
        raise ValueError(f"logits must have one row per query head, N={num_heads}, got logits.shape={logits.shape}.")
    if ls != s or n % k or (jnp.ndim(logits) == 4 and logits.shape[0] not in (1, b)):
        raise ValueError(
            f"logits [.., N, T, S] must match value [B, S, K, Hv] (S equal, N a multiple of K), got "
            f"logits.shape={logits.shape} and value.shape={value.shape}."
        )
    return _checks.AttentionShape(b, t, s, n, k, hv, hv)


def _and_valid(mask, kv_valid: Array | None):
    """``mask`` restricted to the existing key slots ``kv_valid [B, S]`` (a cache's written slots)."""
    if kv_valid is None:
        return mask
    if mask is None or isinstance(mask, masks_lib.Mask):
        valid = masks_lib.valid_keys(kv_valid)
        return valid if mask is None else mask & valid
    return jnp.asarray(mask, bool) & kv_valid[:, None, None, :]


def positional_attention(
    value: Array,
    logits: Array,
    *,
    mask: masks_lib.Mask | Array | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    kv_valid: Array | None = None,
    return_weights: bool = False,
):
    """Content-independent attention ``softmax(logits) V``.

    Args:
      value: ``[B, S, K, Hv]``.
      logits: ``[N, T, S]`` (or ``[B, N, T, S]``), N a multiple of K (query head ``n`` reads value head
        ``n // (N // K)``).
      mask: a ``Mask`` or a boolean array broadcastable to ``[B, N, T, S]``.
      q_offset, kv_offset: positions of the first query / key at which the mask is evaluated, an int
        or ``[B]`` (decoding: a cache's :class:`~attention_jax.cache.KVView` gives them).
      kv_valid: ``[B, S]`` which key slots exist (a cache's written slots).
      return_weights: also return the weights ``[B, N, T, S]`` float32.

    Returns:
      ``[B, T, N, Hv]`` in the value dtype, and the weights with ``return_weights``.
    """
    shape = _shape(value, logits)
    b, t, n, k, g = shape.batch, shape.q_len, shape.num_heads, shape.num_kv_heads, shape.group_size
    logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (b, n, t, shape.kv_len))
    allowed = dense_mask(_and_valid(mask, kv_valid), shape, q_offset, kv_offset)
    weights, _ = masked_softmax(logits, allowed)  # [B, N, T, S]
    probs = weights.reshape(b, k, g, t, shape.kv_len)
    out = jnp.einsum("BKGTS,BSKV->BTKGV", probs, value.astype(jnp.float32), precision=_HI)
    out = out.reshape(b, t, n, shape.value_head_dim).astype(value.dtype)
    return (out, weights) if return_weights else out


def gated_positional_attention(
    query: Array,
    key: Array,
    value: Array,
    logits: Array,
    gate: Array,
    *,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    kv_valid: Array | None = None,
    return_weights: bool = False,
):
    """Content attention and positional attention mixed per head: ``(1 - s) A_content V + s A_pos V``.

    Args:
      query: ``[B, T, N, H]``; key: ``[B, S, K, H]``; value: ``[B, S, K, Hv]``.
      logits: positional logits ``[N, T, S]`` (or ``[B, N, T, S]``).
      gate: ``[N]`` gate logits; ``s = sigmoid(gate)`` is the positional share of head n.
      mask, scale, implementation: as in ``dot_product_attention`` (the mask applies to both terms).
      q_offset, kv_offset, kv_valid: decoding, as in :func:`positional_attention`.
      return_weights: also return the mixed weights ``(1 - s) A_content + s A_pos`` ``[B, N, T, S]``
        (float32): the output is exactly these weights applied to ``value``.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the weights with ``return_weights``.
    """
    shape = _checks.check_qkv(query, key, value)
    _shape(value, logits, shape.num_heads)
    if jnp.shape(gate) != (shape.num_heads,):
        raise ValueError(f"gate must have shape [N]=[{shape.num_heads}], got gate.shape={jnp.shape(gate)}.")
    offsets = dict(q_offset=q_offset, kv_offset=kv_offset, kv_valid=kv_valid)
    content = multi_head_attention(
        query, key, value, mask=mask, scale=scale, implementation=implementation, return_weights=return_weights,
        **offsets,
    )  # fmt: skip
    positional = positional_attention(value, logits, mask=mask, return_weights=return_weights, **offsets)
    if return_weights:
        (content, content_weights), (positional, positional_weights) = content, positional
    share = jax.nn.sigmoid(jnp.asarray(gate, jnp.float32))[:, None]  # [N, 1]
    out = (1.0 - share) * content.astype(jnp.float32) + share * positional.astype(jnp.float32)
    out = out.astype(query.dtype)
    if not return_weights:
        return out
    share = share[:, :, None]  # [N, 1, 1]
    return out, (1.0 - share) * content_weights + share * positional_weights
