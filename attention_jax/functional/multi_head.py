"""``multi_head_attention``: ``dot_product_attention`` plus what an attention layer needs.

On top of the core op it adds learned attention sinks, dropout on the attention weights,
per-sequence absolute offsets and cache validity (decoding with a cache), and the attention
weights for inspection, recomputed with :func:`attention_jax.attention_weights`. Without those
extras it is exactly one ``dot_product_attention`` call, so the fast paths are kept.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks
from attention_jax.functional.dot_product import attention_weights, dot_product_attention

Array = jax.Array


def multi_head_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    mask: masks_lib.Mask | Array | None = None,
    bias: Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    sinks: Array | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    kv_valid: Array | None = None,
    implementation: str | None = None,
    return_weights: bool = False,
):
    """Attention with sinks, dropout, per-sequence offsets and cache validity.

    Args:
      query, key, value, mask, bias, scale, softcap, score_mod, implementation: as in
        :func:`attention_jax.dot_product_attention`.
      sinks: ``[N]`` learned logits of a virtual key every query sees, with a zero value (gpt-oss,
        StreamingLLM): ``out * sigmoid(lse - sink)``, exactly the softmax with that extra key.
      dropout_rate, dropout_rng: dropout on the attention weights (training); materialises
        ``[B, N, T, S]``, so it runs on the reference path.
      q_offset, kv_offset: absolute position of the first query / key, an int or ``[B]`` (one per
        sequence, as a cache's :class:`~attention_jax.cache.KVView` gives them).
      kv_valid: ``[B, S]`` which key slots exist (a cache's written slots).
      return_weights: also return the attention weights ``[B, N, T, S]`` float32, recomputed with
        ``attention_weights`` (sinks included, dropout not).

    Returns:
      ``out [B, T, N, Hv]`` and, with ``return_weights``, the weights.

    >>> import jax, jax.numpy as jnp
    >>> q = jnp.zeros((1, 1, 2, 4)); kv = jnp.ones((1, 3, 1, 4))           # [B, T, N, H], [B, S, K, H]
    >>> out, w = multi_head_attention(q, kv, kv, sinks=jnp.zeros(2), return_weights=True)
    >>> w[0, :, 0].round(3).tolist()                # each of 3 keys gets 1/4: the sink takes the rest
    [[0.25, 0.25, 0.25], [0.25, 0.25, 0.25]]
    """
    shape = _checks.check_qkv(query, key, value)
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    if dropout and _checks.check_implementation(implementation) not in (None, "reference"):
        raise ValueError(
            f"attention dropout materialises the weights and runs on the reference path; {implementation=!r} "
            "cannot serve it. Use implementation=None or dropout_rate=0 (deterministic=True)."
        )
    if sinks is not None and jnp.shape(sinks) != (shape.num_heads,):
        raise ValueError(f"sinks must have shape [N]=[{shape.num_heads}], got sinks.shape={jnp.shape(sinks)}.")
    options = dict(scale=scale, softcap=softcap, score_mod=score_mod, implementation=implementation)
    rng = dropout_rng if dropout else None
    rate = dropout_rate if dropout else 0.0

    per_sequence = kv_valid is not None or jnp.ndim(q_offset) == 1 or jnp.ndim(kv_offset) == 1
    if not per_sequence and isinstance(mask, masks_lib.Mask):
        traced = isinstance(q_offset, jax.core.Tracer) or isinstance(kv_offset, jax.core.Tracer)
        per_sequence = traced  # masks materialise from static offsets; traced ones go per sequence
    if not per_sequence:
        return _attend(query, key, value, mask, bias, q_offset, kv_offset, sinks, rate, rng, return_weights, options)

    # Decoding: every sequence has its own offsets, so materialise the mask at its absolute
    # positions (a [T, S] slab per sequence) and map the core op over the batch.
    static = dict(rate=rate, return_weights=return_weights, implementation=implementation, softcap=softcap)
    arrays = (query, key, value, mask, bias, q_offset, kv_offset, kv_valid, sinks, rng, score_mod)
    if scale is None or isinstance(scale, int | float):
        return _per_sequence_jit(*arrays, scale=scale, **static)
    return _per_sequence(*arrays, scale=scale, **static)  # a traced scale cannot be static


def _per_sequence(
    query, key, value, mask, bias, q_offset, kv_offset, kv_valid, sinks, rng, score_mod, *, scale, softcap, rate,
    implementation, return_weights,
):  # fmt: skip
    """The decoding branch of :func:`multi_head_attention`: offsets ``[B]`` (or scalars) and ``kv_valid``."""
    shape = _checks.check_qkv(query, key, value)
    b, t, s = shape.batch, shape.q_len, shape.kv_len
    if kv_valid is not None and jnp.shape(kv_valid) != (b, s):
        raise ValueError(f"kv_valid must have shape [B, S]=[{b}, {s}], got kv_valid.shape={jnp.shape(kv_valid)}.")
    if bias is not None:
        _checks.check_broadcastable("bias", bias, shape)
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    kv_offset = jnp.broadcast_to(jnp.asarray(kv_offset, jnp.int32), (b,))
    q_pos = q_offset[:, None] + jnp.arange(t, dtype=jnp.int32)  # [B, T]
    kv_pos = kv_offset[:, None] + jnp.arange(s, dtype=jnp.int32)  # [B, S]
    dense = mask_at_positions(mask, q_pos, kv_pos, shape)  # [B, 1 or N, T, S]
    if kv_valid is not None:
        dense = dense & kv_valid[:, None, None, :]
    if bias is not None:
        bias = jnp.reshape(bias, (1,) * (4 - jnp.ndim(bias)) + jnp.shape(bias))
        bias = jnp.broadcast_to(bias, (b, *bias.shape[1:]))  # [B, N or 1, T or 1, S or 1]
    rngs = jax.random.split(rng, b) if rng is not None else None
    options = dict(scale=scale, softcap=softcap, score_mod=score_mod, implementation=implementation)

    def one(q, k, v, m, bi, qo, ko, r):  # a single sequence, batch of 1
        add = lambda x: None if x is None else x[None]
        out = _attend(q[None], k[None], v[None], m[None], add(bi), qo, ko, sinks, rate, r, return_weights, options)
        return jax.tree.map(lambda x: x[0], out)

    return jax.vmap(one)(query, key, value, dense, bias, q_offset, kv_offset, rngs)


# Eager decoding would dispatch (and compile) dozens of small ops one by one: compile the branch once.
_per_sequence_jit = jax.jit(
    _per_sequence, static_argnames=("scale", "softcap", "rate", "implementation", "return_weights")
)


def mask_at_positions(mask, q_pos: Array, kv_pos: Array, shape: _checks.AttentionShape) -> Array:
    """A mask as booleans ``[B, 1 or N, T, S]`` at per-sequence positions ``q_pos [B, T]``, ``kv_pos [B, S]``."""
    b, t, s = shape.batch, shape.q_len, shape.kv_len
    if mask is None:
        return jnp.ones((b, 1, t, s), bool)
    if isinstance(mask, masks_lib.Mask):
        q_vals, kv_vals = mask.arrays(t, s)
        fn = mask.fn(s)
        q_vals = tuple(v[:, :, None] for v in q_vals)  # [B, T, 1]
        kv_vals = tuple(v[:, None, :] for v in kv_vals)  # [B, 1, S]
        dense = fn(q_pos[:, :, None], kv_pos[:, None, :], q_vals, kv_vals)
        return jnp.broadcast_to(dense, (b, t, s))[:, None]
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {jnp.result_type(mask)}.")
    _checks.check_broadcastable("mask", mask, shape)
    mask = jnp.reshape(mask, (1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
    return jnp.broadcast_to(mask, (b, mask.shape[1], t, s))


def _attend(query, key, value, mask, bias, q_offset, kv_offset, sinks, rate, rng, return_weights, options):
    """One call of the core op (or the dropout path), then the sink factor, then the weights."""
    common = dict(bias=bias, mask=mask, q_offset=q_offset, kv_offset=kv_offset)
    weight_options = {k: v for k, v in options.items() if k != "implementation"}
    lse = None
    if rng is None:
        out = dot_product_attention(query, key, value, **common, **options, return_lse=sinks is not None)
        if sinks is not None:
            out, lse = out
    elif sinks is not None:  # only the logsumexp is needed: a 1-wide value keeps it cheap
        lse = dot_product_attention(query, key, key[..., :1], **common, **options, return_lse=True)[1]
    factor = None if sinks is None else jax.nn.sigmoid(lse - sinks.astype(jnp.float32)[None, :, None])  # [B, N, T]
    weights = None
    if rng is not None or return_weights:
        weights = attention_weights(query, key, **common, **weight_options)  # [B, N, T, S] float32
        if factor is not None:
            weights = weights * factor[..., None]
    if rng is not None:
        out = weighted_values(_dropout(weights, rate, rng), value).astype(query.dtype)
    elif factor is not None:
        out = (out.astype(jnp.float32) * jnp.swapaxes(factor, 1, 2)[..., None]).astype(out.dtype)
    return (out, weights) if return_weights else out


def _dropout(weights: Array, rate: float, rng: Array) -> Array:
    keep = jax.random.bernoulli(rng, 1.0 - rate, weights.shape)
    return jnp.where(keep, weights / (1.0 - rate), 0.0)


def weighted_values(weights: Array, value: Array) -> Array:
    """``weights [B, N, T, S]`` times ``value [B, S, K, Hv]`` with query head n reading K/V head n // G."""
    b, n, t, s = weights.shape
    k = value.shape[2]
    weights = weights.reshape(b, k, n // k, t, s)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights, value.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, value.shape[-1])
