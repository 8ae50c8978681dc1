"""Fast weight programmers with the delta rule (Schlag, Irie and Schmidhuber, 2021).

Linear attention as a fast weight memory ``W [F, Hv]`` that a slow net programs one token at a time. Instead of
adding ``phi(k_t) v_t^T`` (which piles up), the delta rule first reads what the memory holds under the key and
replaces it:

    v_bar_t = W_{t-1}^T phi(k_t)                       (the value currently stored under k_t)
    W_t     = W_{t-1} + beta_t phi(k_t) (v_t - v_bar_t)^T
    y_t     = W_t^T phi(q_t)

with a learning rate ``beta_t`` in [0, 1] per token and key/value head. Two forms agree:

* ``"recurrent"``: the update above, one token at a time (:func:`delta_rule_step` is one step);
* ``"chunked"``: chunks of L tokens in parallel (Yang et al., 2024). Inside a chunk the updates are
  ``u_r = beta_r (v_r - W_0^T k_r - sum_{i<r} u_i k_i^T k_r)``, a unit lower-triangular system
  ``(I + diag(beta) tril(K K^T, -1)) U = diag(beta) (V - K W_0)`` solved at once; then
  ``Y = Q W_0 + tril(Q K^T) U`` and ``W_L = W_0 + K^T U``.

Packed documents (``segment_ids``) empty the memory where a run of equal ids starts: the recurrent form resets
``W``, the chunked form masks the in-chunk terms to the same run and reads (and carries) ``W_0`` only within
it. Padded tokens (``lengths``) get ``beta = 0`` and write nothing. Since ``U`` is linear in ``V``, the layer
has an exact implicit weight matrix (:func:`delta_rule_weights`).

>>> import jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 5, 2, 4))                  # [B, T, N, H]
>>> beta = jnp.full((1, 5, 2), 0.5)
>>> delta_rule_attention(q, k, v, beta, chunk_size=2).shape
(1, 5, 2, 4)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from attention_jax.functional import _checks
from attention_jax.functional.linear import (
    FeatureMap,
    check_chunk_size,
    check_packing,
    chunk_runs,
    elu_feature_map,
    features,
    from_chunks,
    group_queries,
    to_chunks,
)

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("recurrent", "chunked")

__all__ = [
    "normalized_elu_feature_map",
    "FastWeightState",
    "delta_rule_attention",
    "delta_rule_step",
    "delta_rule_weights",
]


def normalized_elu_feature_map(x: Array) -> Array:
    """``phi(x) = (elu(x) + 1) / sum(elu(x) + 1)``: positive features summing to one (Schlag et al., 2021).

    With ``beta`` in [0, 1], ``||phi(k)|| <= 1`` keeps the update ``I - beta phi phi^T`` a contraction.
    """
    phi = elu_feature_map(x)
    return phi / jnp.sum(phi, axis=-1, keepdims=True)


class FastWeightState(NamedTuple):
    """The fast weights ``W [B, K, F, Hv]`` (float32), one memory per key/value head."""

    weights: Array

    @classmethod
    def zeros(cls, batch: int, num_kv_heads: int, feature_dim: int, value_head_dim: int) -> FastWeightState:
        return cls(jnp.zeros((batch, num_kv_heads, feature_dim, value_head_dim), jnp.float32))


def _step(weights: Array, phi_q: Array, phi_k: Array, v: Array, beta: Array):
    """``phi_q [B, K, G, F]``, ``phi_k [B, K, F]``, ``v [B, K, Hv]``, ``beta [B, K]`` -> ``(W, y [B, K, G, Hv])``."""
    stored = jnp.einsum("BKF,BKFV->BKV", phi_k, weights, precision=_HI)  # v_bar
    update = beta[..., None] * (v - stored)  # [B, K, Hv]
    weights = weights + jnp.einsum("BKF,BKV->BKFV", phi_k, update, precision=_HI)
    return weights, jnp.einsum("BKGF,BKFV->BKGV", phi_q, weights, precision=_HI)


def _recurrent(weights, phi_q, phi_k, v, beta, runs):
    starts = jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)  # [B, T]

    def step(w, x):
        q_t, k_t, v_t, b_t, start = x
        return _step(jnp.where(start[:, None, None, None], 0.0, w), q_t, k_t, v_t, b_t)  # a new run: empty memory

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (phi_q, phi_k, v, beta, starts))  # time-major
    weights, y = jax.lax.scan(step, weights, xs)
    return jnp.moveaxis(y, 0, 1), weights


def _chunked(weights, phi_q, phi_k, v, beta, runs, chunk_size):
    """Chunks in parallel; a token reads ``W_0`` (the carried memory) only if its run continues the carried one
    (``c_r``), and the in-chunk terms only from tokens of its own run:
    ``(I + diag(beta) (tril(K K^T, -1) * same)) U = diag(beta) (V - diag(c) K W_0)``."""
    t, size = phi_q.shape[1], chunk_size
    # Zero padding is a no-op: a zero key with beta = 0 writes nothing.
    q_c, k_c, v_c, b_c = (to_chunks(x, size) for x in (phi_q, phi_k, v, beta))  # [C, B, L, ...]
    r_c, previous = chunk_runs(runs, size)  # [C, B, L], [C, B]
    same = r_c[..., :, None] == r_c[..., None, :]  # [C, B, L, M]
    reads_w0 = (r_c == previous[..., None])[:, :, None, :, None]  # [C, B, 1, L, 1]: c_r
    strict = jnp.tril(jnp.ones((size, size), bool), -1) & same[:, :, None]  # [C, B, 1, L, M]
    incl = jnp.tril(jnp.ones((size, size), bool)) & same[:, :, None, None]  # [C, B, 1, 1, L, M]
    # Everything that does not depend on W_0, for all chunks at once.
    b_kl = jnp.moveaxis(b_c, 2, 3)[..., None]  # [C, B, K, L, 1]
    kk = jnp.einsum("CBLKF,CBMKF->CBKLM", k_c, k_c, precision=_HI)
    system = jnp.eye(size) + jnp.where(strict, b_kl * kk, 0.0)  # I + diag(beta) (tril(K K^T, -1) * same)
    solve = lambda rhs: jax.lax.linalg.triangular_solve(system, rhs, left_side=True, lower=True, unit_diagonal=True)
    w_c = solve(jnp.where(reads_w0, b_kl, 0.0) * jnp.einsum("CBLKF->CBKLF", k_c))  # [C, B, K, L, F]: T diag(c) K
    u_c = solve(b_kl * jnp.einsum("CBLKV->CBKLV", v_c))  # [C, B, K, L, Hv]: T V
    qk = jnp.where(incl, jnp.einsum("CBLKGF,CBMKF->CBKGLM", q_c, k_c, precision=_HI), 0.0)
    q_c = jnp.where(reads_w0[:, :, 0, :, :, None, None], q_c, 0.0)  # queries of another run skip W_0
    last = r_c[..., -1:] == r_c  # [C, B, L]: tokens of the chunk's last run (the carried memory's)
    continues = r_c[..., -1] == previous  # [C, B]

    def chunk_step(w0, chunk):
        q, k, w, u, a, keep, cont = chunk  # [B, L, K, G, F], [B, L, K, F], [B, K, L, F], [B, K, L, Hv],
        # [B, K, G, L, M], [B, L], [B]
        u = u - jnp.einsum("BKLF,BKFV->BKLV", w, w0, precision=_HI)  # the updates u_r
        y = jnp.einsum("BLKGF,BKFV->BLKGV", q, w0, precision=_HI)
        y = y + jnp.einsum("BKGLM,BKMV->BLKGV", a, u, precision=_HI)
        k = jnp.where(keep[..., None, None], k, 0.0)
        w0 = jnp.where(cont[:, None, None, None], w0, 0.0)
        return w0 + jnp.einsum("BLKF,BKLV->BKFV", k, u, precision=_HI), y

    weights, y = jax.lax.scan(chunk_step, weights, (q_c, k_c, w_c, u_c, qk, last, continues))
    return from_chunks(y, t), weights


def _prepare(query, key, value, beta, feature_map, segment_ids, lengths):
    """Validated inputs: ``(shape, phi_q [B, T, K, G, F], phi_k [B, T, K, F], v, beta [B, T, K], runs [B, T])``."""
    shape = _checks.check_qkv(query, key, value)
    if shape.q_len != shape.kv_len:
        raise ValueError(
            f"delta-rule attention is causal self-attention: T == S, got T={shape.q_len}, S={shape.kv_len}."
        )
    expected = (shape.batch, shape.kv_len, shape.num_kv_heads)
    if jnp.shape(beta) != expected:
        raise ValueError(f"beta must have shape [B, T, K]={list(expected)}, got beta.shape={jnp.shape(beta)}.")
    runs, valid = check_packing(segment_ids, lengths, shape.batch, shape.q_len, shape.kv_len)
    if runs is None:
        runs = jnp.zeros((shape.batch, shape.q_len), jnp.int32)
    beta = jnp.asarray(beta, jnp.float32)
    if valid is not None:
        beta = jnp.where(valid[..., None], beta, 0.0)  # a padded token writes nothing
    phi_q = group_queries(features(query, feature_map), shape.num_kv_heads)  # [B, T, K, G, F]
    phi_k = features(key, feature_map)  # [B, T, K, F]
    return shape, phi_q, phi_k, value.astype(jnp.float32), beta, runs


def delta_rule_attention(
    query: Array,
    key: Array,
    value: Array,
    beta: Array,
    *,
    feature_map: FeatureMap | None = normalized_elu_feature_map,
    implementation: str = "chunked",
    chunk_size: int = 64,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
    state: FastWeightState | None = None,
    return_state: bool = False,
):
    """Causal fast-weight (delta rule) attention over a sequence.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, T, K, H]`` (``N % K == 0``; query heads of a group read one memory).
      value: ``[B, T, K, Hv]``.
      beta: learning rates ``[B, T, K]`` (usually a sigmoid, in [0, 1]).
      feature_map: ``phi`` for queries and keys; ``None`` uses them as given (e.g. L2-normalised keys).
      implementation: ``"chunked"`` or ``"recurrent"``; they agree to float32 rounding.
      chunk_size: tokens per chunk (T is zero-padded; it need not divide T).
      segment_ids: int ``[B, T]`` packed documents: the memory is emptied where a run of equal ids starts.
      lengths: int ``[B]`` real tokens per row (right padding): later tokens write nothing (``beta = 0``).
      state: a ``FastWeightState`` to continue from (the memory of the first run); default zeros.
      return_state: also return the state after the last token (the last run's memory).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the final ``FastWeightState`` when ``return_state``.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation=!r}.")
    chunk_size = check_chunk_size(chunk_size)
    shape, phi_q, phi_k, v, beta, runs = _prepare(query, key, value, beta, feature_map, segment_ids, lengths)
    weights = state or FastWeightState.zeros(shape.batch, shape.num_kv_heads, phi_k.shape[-1], shape.value_head_dim)
    weights = weights.weights
    if implementation == "recurrent":
        y, weights = _recurrent(weights, phi_q, phi_k, v, beta, runs)
    else:
        y, weights = _chunked(weights, phi_q, phi_k, v, beta, runs, chunk_size)
    out = y.reshape(shape.batch, shape.q_len, shape.num_heads, shape.value_head_dim).astype(query.dtype)
    return (out, FastWeightState(weights)) if return_state else out


def delta_rule_weights(
    query: Array,
    key: Array,
    beta: Array,
    *,
    feature_map: FeatureMap | None = normalized_elu_feature_map,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
) -> Array:
    """The implicit attention weights ``A [B, N, T, S]`` (float32) of :func:`delta_rule_attention` from an empty
    memory: ``y = A v`` exactly, per query head.

    The updates are linear in the values, ``U = (I + diag(beta) tril(K K^T, -1))^-1 diag(beta) V``, and
    ``Y = tril(Q K^T) U``, so ``A = tril(Q K^T) (I + diag(beta) tril(K K^T, -1))^-1 diag(beta)`` (both masked to
    the same run). Unlike softmax weights, rows need not be positive or sum to one: the delta rule overwrites.
    Quadratic in T: for inspection.
    """
    value = jnp.zeros(jnp.shape(key)[:3] + (1,), jnp.result_type(key))
    shape, phi_q, phi_k, _, beta, runs = _prepare(query, key, value, beta, feature_map, segment_ids, lengths)
    t = shape.q_len
    same = (runs[:, :, None] == runs[:, None, :])[:, None]  # [B, 1, T, S]
    b_ks = jnp.moveaxis(beta, 1, 2)  # [B, K, T]
    kk = jnp.einsum("BLKF,BMKF->BKLM", phi_k, phi_k, precision=_HI)
    system = jnp.eye(t) + jnp.where(jnp.tril(jnp.ones((t, t), bool), -1) & same, b_ks[..., None] * kk, 0.0)
    updates = jax.lax.linalg.triangular_solve(
        system, b_ks[..., None] * jnp.eye(t), left_side=True, lower=True, unit_diagonal=True
    )  # [B, K, T, S]: U = updates V
    qk = jnp.einsum("BLKGF,BMKF->BKGLM", phi_q, phi_k, precision=_HI)
    qk = jnp.where(jnp.tril(jnp.ones((t, t), bool)) & same[:, :, None], qk, 0.0)
    weights = jnp.einsum("BKGLM,BKMS->BKGLS", qk, updates, precision=_HI)
    return weights.reshape(shape.batch, shape.num_heads, t, t)


def delta_rule_step(
    state: FastWeightState,
    query: Array,
    key: Array,
    value: Array,
    beta: Array,
    *,
    feature_map: FeatureMap | None = normalized_elu_feature_map,
) -> tuple[Array, FastWeightState]:
    """One token of the delta rule: ``query [B, N, H]``, ``key [B, K, H]``, ``value [B, K, Hv]``, ``beta [B, K]``.

    Returns ``(y [B, N, Hv] in the query dtype, new state)``.
    """
    for name, x, rank in (("query", query, 3), ("key", key, 3), ("value", value, 3), ("beta", beta, 2)):
        if jnp.ndim(x) != rank:
            raise ValueError(f"{name} must have rank {rank} (one token), got {name}.shape={jnp.shape(x)}.")
    phi_q = group_queries(features(query, feature_map)[:, None], key.shape[1])[:, 0]  # [B, K, G, F]
    weights, y = _step(
        state.weights, phi_q, features(key, feature_map), value.astype(jnp.float32), jnp.asarray(beta, jnp.float32)
    )
    return y.reshape(query.shape[0], query.shape[1], value.shape[-1]).astype(query.dtype), FastWeightState(weights)
