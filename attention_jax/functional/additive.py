"""Recurrent-era attention: additive (Bahdanau) and multiplicative (Luong) scores over ``[B, S, D]`` memories.

No heads here: queries are decoder states ``[B, T, Dq]`` (or one step ``[B, Dq]``), keys and values
are encoder states ``[B, S, Dk]`` / ``[B, S, Dv]``. Each op returns ``(context, alignment)``: the
context ``[B, T, Dv]`` and the alignment (attention weights) ``[B, T, S]`` in float32.

* Bahdanau et al. (2015): ``e_tj = v^T tanh(W_s s_{t-1} + W_h h_j)``; ``additive_attention`` takes the
  projected ``W_s s`` and ``W_h h`` and the vector ``v``.
* Luong et al. (2015): ``dot`` ``s^T h``; ``general`` ``s^T W h``; ``concat`` ``v^T tanh(W [s; h])``;
  and the scaled dot ``s^T h / sqrt(D)`` of Vaswani et al.

>>> import jax.numpy as jnp
>>> s, h = jnp.ones((1, 2, 4)), jnp.ones((1, 3, 4))          # [B, T, D], [B, S, D]
>>> context, alignment = luong_attention(s, h, h, score="dot")
>>> context.shape, alignment.shape
((1, 2, 4), (1, 2, 3))
>>> alignment[0, 0].tolist()                                   # equal scores: uniform weights
[0.3333333432674408, 0.3333333432674408, 0.3333333432674408]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional.reference import masked_softmax

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST

LUONG_SCORES = ("dot", "scaled_dot", "general", "concat")

__all__ = ["additive_scores", "additive_attention", "luong_scores", "luong_attention", "LUONG_SCORES"]


def _as_steps(name: str, x: Array) -> tuple[Array, bool]:
    """Accept ``[B, D]`` (one decoder step) or ``[B, T, D]``; return ``[B, T, D]`` and whether to squeeze."""
    if jnp.ndim(x) == 2:
        return x[:, None, :], True
    if jnp.ndim(x) != 3:
        raise ValueError(f"{name} must have shape [B, T, D] or [B, D], got {name}.shape={jnp.shape(x)}.")
    return x, False


def _check_memory(key: Array, value: Array, batch: int) -> None:
    for name, x in (("key", key), ("value", value)):
        if jnp.ndim(x) != 3:
            raise ValueError(f"{name} must have shape [B, S, D], got {name}.shape={jnp.shape(x)}.")
    if key.shape[:2] != value.shape[:2] or key.shape[0] != batch:
        raise ValueError(
            f"query, key and value must share B (and key, value S), got key.shape={key.shape}, "
            f"value.shape={value.shape} and B={batch}."
        )


def _dense_mask(mask, batch: int, q_len: int, kv_len: int) -> Array | None:
    """A ``Mask`` or a boolean array broadcastable to ``[B, T, S]`` (``[B, S]`` is read as key padding)."""
    if mask is None:
        return None
    if isinstance(mask, masks_lib.Mask):
        return mask.dense(q_len, kv_len)  # [T, S] or [B, T, S]
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {mask.dtype}.")
    if mask.ndim == 2 and mask.shape == (batch, kv_len):
        mask = mask[:, None, :]  # key padding [B, 1, S]
    target = (batch, q_len, kv_len)
    if mask.ndim > 3 or any(d not in (1, t) for d, t in zip(reversed(mask.shape), reversed(target))):
        raise ValueError(f"mask must be broadcastable to [B, T, S]={list(target)} or be [B, S], got {mask.shape}.")
    return mask


def _attend(scores: Array, value: Array, mask, squeeze: bool, dtype) -> tuple[Array, Array]:
    """Masked softmax of float32 ``scores [B, T, S]`` and the weighted sum of ``value [B, S, Dv]``."""
    b, t, s = scores.shape
    weights, _ = masked_softmax(scores, _dense_mask(mask, b, t, s))  # [B, T, S]
    context = jnp.einsum("BTS,BSV->BTV", weights, value.astype(jnp.float32), precision=_HI).astype(dtype)
    if squeeze:
        return context[:, 0], weights[:, 0]
    return context, weights


def additive_scores(query: Array, key: Array, v: Array) -> Array:
    """Bahdanau scores ``e[b, t, s] = v . tanh(query[b, t] + key[b, s])`` in float32, ``[B, T, S]``.

    ``query [B, T, A]`` is ``W_s s`` and ``key [B, S, A]`` is ``W_h h`` (the projections are the caller's).
    """
    if query.shape[-1] != key.shape[-1] or jnp.shape(v) != (key.shape[-1],):
        raise ValueError(
            f"additive attention needs query [.., A], key [.., A] and v [A] with one A, got "
            f"query.shape={query.shape}, key.shape={key.shape} and v.shape={jnp.shape(v)}."
        )
    f32 = jnp.float32
    hidden = jnp.tanh(query.astype(f32)[:, :, None, :] + key.astype(f32)[:, None, :, :])  # [B, T, S, A]
    return jnp.einsum("BTSA,A->BTS", hidden, jnp.asarray(v, f32), precision=_HI)


def additive_attention(query: Array, key: Array, value: Array, *, v: Array, mask=None) -> tuple[Array, Array]:
    """Bahdanau attention: ``alpha = softmax_j(v^T tanh(query_t + key_j))``, ``context_t = sum_j alpha_tj value_j``.

    Args:
      query: projected decoder states ``W_s s``, ``[B, T, A]`` or one step ``[B, A]``.
      key: projected encoder states ``W_h h``, ``[B, S, A]``.
      value: encoder states ``h``, ``[B, S, Dv]``.
      v: the score vector ``[A]``.
      mask: a ``Mask``, a boolean array broadcastable to ``[B, T, S]``, or key padding ``[B, S]``.

    Returns:
      ``(context [B, T, Dv] in value's dtype, alignment [B, T, S] float32)`` (without T for a ``[B, A]`` query).

    >>> import jax.numpy as jnp
    >>> ctx, a = additive_attention(jnp.zeros((2, 3)), jnp.zeros((2, 5, 3)), jnp.ones((2, 5, 4)), v=jnp.ones(3))
    >>> ctx.shape, a.shape
    ((2, 4), (2, 5))
    """
    query, squeeze = _as_steps("query", query)
    _check_memory(key, value, query.shape[0])
    return _attend(additive_scores(query, key, v), value, mask, squeeze, value.dtype)


def luong_scores(query: Array, key: Array, *, score: str = "dot", weight: Array | None = None, v=None) -> Array:
    """Luong scores ``[B, T, S]`` in float32 for ``query [B, T, Dq]`` and ``key [B, S, Dk]``.

    ``dot``: ``s.h`` (Dq == Dk); ``scaled_dot``: ``s.h / sqrt(Dk)``; ``general``: ``s^T W h`` with
    ``weight [Dq, Dk]``; ``concat``: ``v^T tanh(W [s; h])`` with ``weight [Dq + Dk, A]`` and ``v [A]``.
    """
    if score not in LUONG_SCORES:
        raise ValueError(f"score must be one of {LUONG_SCORES}, got {score=!r}.")
    f32 = jnp.float32
    dq, dk = query.shape[-1], key.shape[-1]
    if score in ("dot", "scaled_dot"):
        if dq != dk:
            raise ValueError(f"score={score!r} needs query and key of one width, got Dq={dq} and Dk={dk}.")
        scores = jnp.einsum("BTD,BSD->BTS", query.astype(f32), key.astype(f32), precision=_HI)
        return scores / jnp.sqrt(jnp.float32(dk)) if score == "scaled_dot" else scores
    if weight is None:
        raise ValueError(f"score={score!r} needs weight, got weight=None.")
    if score == "general":
        if jnp.shape(weight) != (dq, dk):
            raise ValueError(f"score='general' needs weight [Dq, Dk]={[dq, dk]}, got weight.shape={jnp.shape(weight)}.")
        return jnp.einsum(
            "BTD,DE,BSE->BTS", query.astype(f32), jnp.asarray(weight, f32), key.astype(f32), precision=_HI
        )
    if jnp.ndim(weight) != 2 or weight.shape[0] != dq + dk or v is None:
        raise ValueError(
            f"score='concat' needs weight [Dq + Dk, A] with Dq + Dk={dq + dk} and v [A], got "
            f"weight.shape={jnp.shape(weight)} and v={'None' if v is None else jnp.shape(v)}."
        )
    weight = jnp.asarray(weight, f32)
    # W [s; h] = W_s s + W_h h: project each side once instead of every (t, s) pair.
    projected_q = jnp.einsum("BTD,DA->BTA", query.astype(f32), weight[:dq], precision=_HI)
    projected_k = jnp.einsum("BSD,DA->BSA", key.astype(f32), weight[dq:], precision=_HI)
    return additive_scores(projected_q, projected_k, v)


def luong_attention(
    query: Array, key: Array, value: Array, *, score: str = "dot", weight: Array | None = None, v=None, mask=None
) -> tuple[Array, Array]:
    """Luong (multiplicative) attention: ``alpha = softmax_j(score(s_t, h_j))``, ``context_t = sum_j alpha_tj v_j``.

    Args:
      query: decoder states ``[B, T, Dq]`` or one step ``[B, Dq]``.
      key: encoder states ``[B, S, Dk]``.
      value: ``[B, S, Dv]`` (usually ``key`` itself).
      score: ``"dot"``, ``"scaled_dot"``, ``"general"`` or ``"concat"`` (see :func:`luong_scores`).
      weight, v: the parameters ``general`` and ``concat`` need.
      mask: as in :func:`additive_attention`.

    Returns:
      ``(context [B, T, Dv], alignment [B, T, S] float32)``.
    """
    query, squeeze = _as_steps("query", query)
    _check_memory(key, value, query.shape[0])
    scores = luong_scores(query, key, score=score, weight=weight, v=v)
    return _attend(scores, value, mask, squeeze, value.dtype)
