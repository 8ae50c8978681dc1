"""``multi_head_attention``: ``dot_product_attention`` plus what an attention layer needs.

On top of the core op it adds learned attention sinks, cache validity (decoding with a cache),
and the attention weights for inspection, recomputed with :func:`attention_jax.attention_weights`.
Dropout and per-sequence offsets go straight to the core op, so every call is exactly one
``dot_product_attention`` call and keeps the fast paths (block skipping included).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
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
    sequence_parallel: Any = None,
    return_weights: bool = False,
):
    """Attention with sinks, dropout, per-sequence offsets and cache validity.

    Args:
      query, key, value, mask, bias, scale, softcap, score_mod, implementation: as in
        :func:`attention_jax.dot_product_attention`.
      sinks: ``[N]`` learned logits of a virtual key every query sees, with a zero value (gpt-oss,
        StreamingLLM): ``out * sigmoid(lse - sink)``, exactly the softmax with that extra key.
      dropout_rate, dropout_rng: dropout on the attention weights (training), inside the fast
        paths (see :func:`attention_jax.dot_product_attention`); no dropout without a key.
      q_offset, kv_offset: absolute position of the first query / key, an int or ``[B]`` (one per
        sequence, as a cache's :class:`~attention_jax.cache.KVView` gives them).
      kv_valid: ``[B, S]`` which key slots exist (a cache's written slots).
      sequence_parallel: an :class:`attention_jax.distributed.SequenceParallel`: shard the
        sequence over a mesh axis (ring, all-to-all or both); None: one device. Takes a ``Mask``
        (causal, windows, segments, padding...), ``scale``, ``softcap`` and ``sinks``, and raises a
        ``ValueError`` naming ``kv_valid``, ``bias``, ``score_mod``, ``dropout_rate``, an offset, a
        boolean-array mask or ``return_weights``, which it cannot shard. ``implementation``
        overrides the config's.
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
    # The core op validates query, key and value (once); only the extras are checked here.
    n = jnp.shape(query)[2] if jnp.ndim(query) == 4 else None
    if sinks is not None and jnp.shape(sinks) != (n,):
        raise ValueError(f"sinks must have shape [N]=[{n}], got sinks.shape={jnp.shape(sinks)}.")
    if kv_valid is not None:
        expected = tuple(jnp.shape(key)[:2]) if jnp.ndim(key) == 4 else "[B, S]"
        if jnp.shape(kv_valid) != expected:
            raise ValueError(f"kv_valid must have shape [B, S]={expected}, got kv_valid.shape={jnp.shape(kv_valid)}.")
        mask = _and_valid(mask, kv_valid)
    if not dropout_rate or dropout_rng is None:  # deterministic: no dropout
        dropout_rate, dropout_rng = 0.0, None
    common = dict(bias=bias, mask=mask, scale=scale, softcap=softcap, score_mod=score_mod, q_offset=q_offset,
                  kv_offset=kv_offset)  # fmt: skip
    if sequence_parallel is not None:
        _check_shardable(
            sequence_parallel, mask=mask, return_weights=return_weights, kv_valid=kv_valid, bias=bias,
            score_mod=score_mod, dropout_rate=dropout_rate, q_offset=q_offset, kv_offset=kv_offset,
        )  # fmt: skip
        out = sequence_parallel(
            query, key, value, mask=mask, scale=scale, softcap=softcap, implementation=implementation,
            return_lse=sinks is not None,
        )  # fmt: skip
    else:
        out = dot_product_attention(
            query, key, value, **common, implementation=implementation, return_lse=sinks is not None,
            dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        )  # fmt: skip
    factor = None
    if sinks is not None:
        out, lse = out
        # The sink is one more key with a zero value: it scales every weight of the row by
        # sigmoid(lse - sink), dropped or not.
        factor = jax.nn.sigmoid(lse - sinks.astype(jnp.float32)[None, :, None])  # [B, N, T]
        out = (out.astype(jnp.float32) * jnp.swapaxes(factor, 1, 2)[..., None]).astype(out.dtype)
    if not return_weights:
        return out
    weights = attention_weights(query, key, **common)  # [B, N, T, S] float32
    if factor is not None:
        weights = weights * factor[..., None]
    return out, weights


def _check_shardable(sequence_parallel, *, mask, return_weights: bool, **unshardable) -> None:
    """A ``ValueError`` naming the first argument that sequence parallelism cannot shard."""
    from attention_jax.distributed import SequenceParallel  # distributed imports functional

    if not isinstance(sequence_parallel, SequenceParallel):
        raise TypeError(
            "sequence_parallel must be an attention_jax.distributed.SequenceParallel, got "
            f"{type(sequence_parallel).__name__}."
        )
    why = {
        "kv_valid": "a cache decodes on one device",
        "bias": "an additive [B, N, T, S] bias is not sharded with the sequence",
        "score_mod": "score mods (ALiBi, relative position biases) do not run in the ring's steps",
        "dropout_rate": "dropout is not sharded; call it deterministic",
        "q_offset": "the sharded sequence starts at position 0",
        "kv_offset": "the sharded sequence starts at position 0",
        "return_weights": "the [B, N, T, S] weights are what sharding avoids; record them on one device",
    }
    unshardable["return_weights"] = return_weights or None
    for name, value in unshardable.items():
        if value is not None and not (isinstance(value, (int, float)) and value == 0):
            raise ValueError(f"multi_head_attention cannot shard {name} with sequence_parallel: {why[name]}.")
    if mask is not None and not isinstance(mask, masks_lib.Mask):
        raise ValueError(
            "multi_head_attention with sequence_parallel takes an attention_jax.masks.Mask (its positions follow "
            f"the shards), not a boolean array of shape {jnp.shape(mask)}."
        )


def _and_valid(mask, kv_valid: Array):
    """``mask`` restricted to the existing key slots ``kv_valid [B, S]``, in the mask's own kind."""
    if mask is None or isinstance(mask, masks_lib.Mask):
        valid = masks_lib.valid_keys(kv_valid)
        return valid if mask is None else mask & valid
    return jnp.asarray(mask, bool) & kv_valid[:, None, None, :]


def weighted_values(weights: Array, value: Array) -> Array:
    """``weights [B, N, T, S]`` times ``value [B, S, K, Hv]`` with query head n reading K/V head n // G."""
    b, n, t, s = weights.shape
    k = value.shape[2]
    weights = weights.reshape(b, k, n // k, t, s)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", weights, value.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.reshape(b, t, n, value.shape[-1])
