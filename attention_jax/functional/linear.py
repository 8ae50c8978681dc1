"""Linear attention (Katharopoulos et al., 2020): ``softmax(q.k)`` replaced by a kernel ``phi(q).phi(k)``.

``out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i)`` with ``S_i = sum_j phi(k_j) v_j^T`` and ``z_i = sum_j phi(k_j)``,
the sums running over every key (non-causal) or over ``j <= i`` (causal). Three forms compute the same thing:

* ``"parallel"``: causal as a masked ``T x S`` kernel matrix (``(phi(Q) phi(K)^T * tril) V``), non-causal as
  ``phi(Q) (phi(K)^T V)``;
* ``"chunked"``: chunks of ``chunk_size`` positions, quadratic inside a chunk, the state carried between chunks
  (the training form);
* ``"recurrent"``: the state ``LinearAttentionState`` carried one token at a time (the decoding form; see
  :func:`linear_attention_step`).

Layouts follow the library: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``; query head ``n`` reads
key/value head ``n // (N // K)``. States live per key/value head in float32.

>>> import jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 6, 2, 4))                  # [B, T, N, H]
>>> out, state = linear_attention(q, k, v, causal=True, return_state=True)
>>> out.shape, state.kv.shape                          # state: [B, K, F, Hv] after the last key
((1, 6, 2, 4), (1, 2, 4, 4))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from attention_jax.functional import _checks

Array = jax.Array
FeatureMap = Callable[[Array], Array]
_HI = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("parallel", "chunked", "recurrent")

__all__ = [
    "elu_feature_map",
    "LinearAttentionState",
    "linear_attention",
    "linear_attention_step",
    "IMPLEMENTATIONS",
]


def elu_feature_map(x: Array) -> Array:
    """``phi(x) = elu(x) + 1``: positive, the feature map of Katharopoulos et al."""
    return jax.nn.elu(x) + 1.0


class LinearAttentionState(NamedTuple):
    """The recurrent state of causal linear attention, per key/value head (float32).

    ``kv [B, K, F, Hv]`` is ``sum_j phi(k_j) v_j^T`` and ``normalizer [B, K, F]`` is ``sum_j phi(k_j)``,
    F being the feature dimension (H for ``elu + 1``).
    """

    kv: Array
    normalizer: Array

    @classmethod
    def zeros(cls, batch: int, num_kv_heads: int, feature_dim: int, value_head_dim: int) -> LinearAttentionState:
        """The empty state: nothing has been read yet."""
        return cls(
            jnp.zeros((batch, num_kv_heads, feature_dim, value_head_dim), jnp.float32),
            jnp.zeros((batch, num_kv_heads, feature_dim), jnp.float32),
        )


def check_implementation(implementation: str | None, causal: bool) -> str:
    if implementation is None:
        return "chunked" if causal else "parallel"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=!r}.")
    return implementation


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size=!r}.")
    return chunk_size


def features(x: Array, feature_map: FeatureMap | None) -> Array:
    """``feature_map(x)`` in float32 (``None`` is the identity: ``x`` already holds features)."""
    x = x.astype(jnp.float32)
    return x if feature_map is None else feature_map(x).astype(jnp.float32)


def group_queries(q: Array, num_kv_heads: int) -> Array:
    """``[B, T, N, F] -> [B, T, K, G, F]``: query head ``n = k * G + g`` reads key/value head ``k``."""
    b, t, n, f = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, f)


def to_chunks(x: Array, chunk_size: int) -> Array:
    """``[B, T, ...] -> [C, B, L, ...]``, zero-padding T up to a multiple of ``L = chunk_size``."""
    b, t = x.shape[:2]
    pad = -t % chunk_size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(b, (t + pad) // chunk_size, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_chunks(x: Array, length: int) -> Array:
    """Inverse of :func:`to_chunks`: ``[C, B, L, ...] -> [B, T, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _normalise(num: Array, den: Array, eps: float) -> Array:
    """``num / (den + eps)``; a zero denominator (all features underflowed, ``eps = 0``) gives 0, not NaN."""
    den = den[..., None] + eps
    return num / jnp.where(den == 0, 1.0, den)


def _readout(phi_q: Array, kv: Array, normalizer: Array, eps: float) -> Array:
    """``phi(q)^T S / (phi(q)^T z + eps)`` for ``phi_q [B, T, K, G, F]``, one state for every query."""
    num = jnp.einsum("BTKGF,BKFV->BTKGV", phi_q, kv, precision=_HI)
    den = jnp.einsum("BTKGF,BKF->BTKG", phi_q, normalizer, precision=_HI)
    return _normalise(num, den, eps)


def _step(state: LinearAttentionState, phi_q: Array, phi_k: Array, v: Array, eps: float):
    """One token: ``phi_q [B, K, G, F]``, ``phi_k [B, K, F]``, ``v [B, K, Hv]`` -> ``(state, out [B, K, G, Hv])``."""
    kv = state.kv + jnp.einsum("BKF,BKV->BKFV", phi_k, v, precision=_HI)
    normalizer = state.normalizer + phi_k
    out = _readout(phi_q[:, None], kv, normalizer, eps)[:, 0]
    return LinearAttentionState(kv, normalizer), out


def _accumulate(state, phi_k, v, implementation, chunk_size):
    """Add every key of ``phi_k [B, S, K, F]``, ``v [B, S, K, Hv]`` to the state, in the given form."""
    if implementation == "parallel":
        return LinearAttentionState(
            state.kv + jnp.einsum("BSKF,BSKV->BKFV", phi_k, v, precision=_HI), state.normalizer + phi_k.sum(1)
        )
    size = 1 if implementation == "recurrent" else chunk_size

    def add(carry, chunk):
        k_c, v_c = chunk  # [B, L, K, F], [B, L, K, Hv]
        kv = carry.kv + jnp.einsum("BLKF,BLKV->BKFV", k_c, v_c, precision=_HI)
        return LinearAttentionState(kv, carry.normalizer + k_c.sum(1)), None

    state, _ = jax.lax.scan(add, state, (to_chunks(phi_k, size), to_chunks(v, size)))
    return state


def _causal_parallel(state, phi_q, phi_k, v, eps):
    t = phi_q.shape[1]
    tril = jnp.tril(jnp.ones((t, t), bool))
    a = jnp.where(tril, jnp.einsum("BTKGF,BSKF->BKGTS", phi_q, phi_k, precision=_HI), 0.0)  # [B, K, G, T, S]
    num = jnp.einsum("BKGTS,BSKV->BTKGV", a, v, precision=_HI)
    num = num + jnp.einsum("BTKGF,BKFV->BTKGV", phi_q, state.kv, precision=_HI)
    den = jnp.einsum("BKGTS->BTKG", a) + jnp.einsum("BTKGF,BKF->BTKG", phi_q, state.normalizer, precision=_HI)
    return _normalise(num, den, eps), _accumulate(state, phi_k, v, "parallel", 1)


def _causal_chunked(state, phi_q, phi_k, v, eps, chunk_size):
    t = phi_q.shape[1]
    tril = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))

    def chunk_step(carry, chunk):
        q_c, k_c, v_c = chunk  # [B, L, K, G, F], [B, L, K, F], [B, L, K, Hv]
        a = jnp.where(tril, jnp.einsum("BLKGF,BMKF->BKGLM", q_c, k_c, precision=_HI), 0.0)  # inside the chunk
        num = jnp.einsum("BKGLM,BMKV->BLKGV", a, v_c, precision=_HI)
        num = num + jnp.einsum("BLKGF,BKFV->BLKGV", q_c, carry.kv, precision=_HI)  # earlier chunks
        den = jnp.einsum("BKGLM->BLKG", a) + jnp.einsum("BLKGF,BKF->BLKG", q_c, carry.normalizer, precision=_HI)
        carry = LinearAttentionState(
            carry.kv + jnp.einsum("BMKF,BMKV->BKFV", k_c, v_c, precision=_HI), carry.normalizer + k_c.sum(1)
        )
        return carry, _normalise(num, den, eps)

    chunks = tuple(to_chunks(x, chunk_size) for x in (phi_q, phi_k, v))  # padding: zero features add nothing
    state, out = jax.lax.scan(chunk_step, state, chunks)
    return from_chunks(out, t), state


def _causal_recurrent(state, phi_q, phi_k, v, eps):
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (phi_q, phi_k, v))  # time-major
    state, out = jax.lax.scan(lambda c, x: _step(c, *x, eps), state, xs)
    return jnp.moveaxis(out, 0, 1), state


def linear_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    feature_map: FeatureMap | None = elu_feature_map,
    causal: bool = False,
    implementation: str | None = None,
    chunk_size: int = 64,
    eps: float = 1e-6,
    state: LinearAttentionState | None = None,
    return_state: bool = False,
):
    """Linear attention ``phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)``.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` (``N % K == 0``).
      value: ``[B, S, K, Hv]``.
      feature_map: ``phi``, applied to queries and keys in float32; ``None`` means the inputs are
        already features (Performer passes its random features this way).
      causal: query ``i`` reads keys ``j <= i`` (needs ``T == S``), after whatever ``state`` holds.
      implementation: ``"parallel"``, ``"chunked"`` or ``"recurrent"``; None picks ``"chunked"`` when
        causal, else ``"parallel"``. All three agree to float32 rounding.
      chunk_size: positions per chunk of the chunked form (T is zero-padded; it need not divide T).
      eps: added to the denominator (``0`` keeps the output invariant to the scale of the features).
      state: a ``LinearAttentionState`` to continue from (earlier keys); default empty.
      return_state: also return the state after the last key.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the final ``LinearAttentionState`` when ``return_state``.
    """
    shape = _checks.check_qkv(query, key, value)
    implementation = check_implementation(implementation, causal)
    chunk_size = check_chunk_size(chunk_size)
    if causal and shape.q_len != shape.kv_len:
        raise ValueError(f"causal linear attention needs T == S, got T={shape.q_len} and S={shape.kv_len}.")
    phi_q = group_queries(features(query, feature_map), shape.num_kv_heads)  # [B, T, K, G, F]
    phi_k = features(key, feature_map)  # [B, S, K, F]
    v = value.astype(jnp.float32)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"feature_map gave queries {phi_q.shape[-1]} and keys {phi_k.shape[-1]} features.")
    if state is None:
        state = LinearAttentionState.zeros(shape.batch, shape.num_kv_heads, phi_k.shape[-1], shape.value_head_dim)
    if not causal:
        state = _accumulate(state, phi_k, v, implementation, chunk_size)
        out = _readout(phi_q, state.kv, state.normalizer, eps)
    elif implementation == "parallel":
        out, state = _causal_parallel(state, phi_q, phi_k, v, eps)
    elif implementation == "chunked":
        out, state = _causal_chunked(state, phi_q, phi_k, v, eps, chunk_size)
    else:
        out, state = _causal_recurrent(state, phi_q, phi_k, v, eps)
    b, t, n = shape.batch, shape.q_len, shape.num_heads
    out = out.reshape(b, t, n, shape.value_head_dim).astype(query.dtype)
    return (out, state) if return_state else out


def linear_attention_step(
    state: LinearAttentionState,
    query: Array,
    key: Array,
    value: Array,
    *,
    feature_map: FeatureMap | None = elu_feature_map,
    eps: float = 1e-6,
) -> tuple[Array, LinearAttentionState]:
    """One decoding step of causal linear attention: add ``(key, value)`` to the state, read it with ``query``.

    Args:
      state: the ``LinearAttentionState`` after the previous tokens.
      query: ``[B, N, H]``; key: ``[B, K, H]``; value: ``[B, K, Hv]``.

    Returns:
      ``(out [B, N, Hv] in the query dtype, new state)``.

    >>> import jax.numpy as jnp
    >>> state = LinearAttentionState.zeros(1, 1, 4, 4)
    >>> out, state = linear_attention_step(state, jnp.ones((1, 2, 4)), jnp.ones((1, 1, 4)), jnp.ones((1, 1, 4)))
    >>> out.shape, state.kv.shape
    ((1, 2, 4), (1, 1, 4, 4))
    """
    for name, x in (("query", query), ("key", key), ("value", value)):
        if jnp.ndim(x) != 3:
            raise ValueError(f"{name} must have rank 3 (one token, [B, heads, dim]), got {name}.shape={jnp.shape(x)}.")
    num_kv_heads = key.shape[1]
    phi_q = group_queries(features(query, feature_map)[:, None], num_kv_heads)[:, 0]  # [B, K, G, F]
    state, out = _step(state, phi_q, features(key, feature_map), value.astype(jnp.float32), eps)
    return out.reshape(query.shape[0], query.shape[1], value.shape[-1]).astype(query.dtype), state
