"""Linear attention (Katharopoulos et al., 2020): ``softmax(q.k)`` replaced by a kernel ``phi(q).phi(k)``.

``out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps)`` with ``S_i = sum_j phi(k_j) v_j^T`` and ``z_i = sum_j phi(k_j)``,
the sums running over every key (non-causal) or over ``j <= i`` (causal). Three forms compute the same thing:

* ``"parallel"``: the ``T x S`` kernel matrix under its mask (``(phi(Q) phi(K)^T * tril) V``); non-causal
  without segments it is ``phi(Q) (phi(K)^T V)``, linear in T;
* ``"chunked"``: chunks of ``chunk_size`` positions, quadratic inside a chunk, the state carried between chunks
  (the training form);
* ``"recurrent"``: the state ``LinearAttentionState`` carried one token at a time (the decoding form; see
  :func:`linear_attention_step`).

Packed documents (``segment_ids [B, T]``): a segment is a run of equal ids, and the sums run over the keys of
the query's own run only, so a packed row equals its documents run one by one. The forms stay linear in T:
the state is carried only within a run (the chunked and recurrent forms reset it at a boundary), and the
non-causal forms add a causal pass over the reversed sequence to the causal pass (each run's total is its
prefix plus its suffix). A ``state`` passed in continues the first run. Right padding (``lengths [B]``) zeroes
the features of the padded keys, so they add nothing to any sum or state.

Layouts follow the library: ``q [B, T, N, H]``, ``k [B, S, K, H]``, ``v [B, S, K, Hv]``; query head ``n`` reads
key/value head ``n // (N // K)``. States live per key/value head in float32.

>>> import jax.numpy as jnp
>>> q = k = v = jnp.ones((1, 6, 2, 4))                  # [B, T, N, H]
>>> out, state = linear_attention(q, k, v, causal=True, return_state=True)
>>> out.shape, state.kv.shape                          # state: [B, K, F, Hv] after the last key
((1, 6, 2, 4), (1, 2, 4, 4))
>>> packed = linear_attention(q, k, v, segment_ids=jnp.array([[0, 0, 0, 1, 1, 1]]))  # two documents
>>> linear_attention_weights(q, k, segment_ids=jnp.array([[0, 0, 0, 1, 1, 1]])).shape  # [B, N, T, S]
(1, 2, 6, 6)
"""

from __future__ import annotations

import functools
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
    "linear_attention_weights",
    "segment_runs",
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


def check_implementation(implementation: str | None, sequential: bool) -> str:
    """The form to run; None picks ``"chunked"`` when the call is causal or packed (``sequential``)."""
    if implementation is None:
        return "chunked" if sequential else "parallel"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=!r}.")
    return implementation


def check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size=!r}.")
    return chunk_size


def segment_runs(segment_ids: Array) -> Array:
    """``[B, T]`` int32 index of each token's run of equal ids: 0 for the first run, +1 at each boundary.

    >>> segment_runs(jnp.array([[7, 7, 3, 3, 3, 7]])).tolist()
    [[0, 0, 1, 1, 1, 2]]
    """
    boundary = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
    return jnp.concatenate([jnp.zeros_like(boundary[:, :1]), jnp.cumsum(boundary, axis=1)], axis=1)


def check_packing(segment_ids, lengths, batch: int, q_len: int, kv_len: int) -> tuple[Array | None, Array | None]:
    """``(runs [B, T] | None, valid [B, S] bool | None)`` from ``segment_ids [B, T]`` and ``lengths [B]``."""
    runs = valid = None
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (batch, q_len) or not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
            raise ValueError(
                f"segment_ids must be integers of shape [B, T]={[batch, q_len]}, got {jnp.result_type(segment_ids)} "
                f"{jnp.shape(segment_ids)}."
            )
        if q_len != kv_len:
            raise ValueError(f"segment_ids packs self-attention (T == S), got T={q_len} and S={kv_len}.")
        runs = segment_runs(jnp.asarray(segment_ids))
    if lengths is not None:
        if jnp.shape(lengths) != (batch,) or not jnp.issubdtype(jnp.result_type(lengths), jnp.integer):
            raise ValueError(
                f"lengths must be integers of shape [B]=[{batch}], got {jnp.result_type(lengths)} {jnp.shape(lengths)}."
            )
        valid = jnp.arange(kv_len) < jnp.asarray(lengths)[:, None]  # [B, S]
    return runs, valid


def features(x: Array, feature_map: FeatureMap | None) -> Array:
    """``feature_map(x)`` in float32 (``None`` is the identity: ``x`` already holds features)."""
    x = x.astype(jnp.float32)
    return x if feature_map is None else feature_map(x).astype(jnp.float32)


def group_queries(q: Array, num_kv_heads: int) -> Array:
    """``[B, T, N, F] -> [B, T, K, G, F]``: query head ``n = k * G + g`` reads key/value head ``k``."""
    b, t, n, f = q.shape
    return q.reshape(b, t, num_kv_heads, n // num_kv_heads, f)


def to_chunks(x: Array, chunk_size: int, *, mode: str = "constant") -> Array:
    """``[B, T, ...] -> [C, B, L, ...]``, padding T up to a multiple of ``L = chunk_size`` (zeros, or
    ``mode="edge"``: the last value, which keeps run ids constant over the padding)."""
    b, t = x.shape[:2]
    pad = -t % chunk_size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), mode=mode)
    x = x.reshape(b, (t + pad) // chunk_size, chunk_size, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def from_chunks(x: Array, length: int) -> Array:
    """Inverse of :func:`to_chunks`: ``[C, B, L, ...] -> [B, T, ...]``."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def chunk_runs(runs: Array, chunk_size: int) -> tuple[Array, Array]:
    """``(runs [C, B, L], previous [C, B])``: each chunk's run ids and the run of the token before it
    (0 for the first chunk: a state passed in continues the first run)."""
    runs_c = to_chunks(runs, chunk_size, mode="edge")
    previous = jnp.concatenate([jnp.zeros_like(runs_c[:1, :, 0]), runs_c[:-1, :, -1]], axis=0)
    return runs_c, previous


def _normalise(num: Array, den: Array, eps: float) -> Array:
    """``num / (den + eps)``; a zero denominator (all features underflowed, ``eps = 0``) gives 0, not NaN."""
    den = den[..., None] + eps
    return num / jnp.where(den == 0, 1.0, den)


def _read(phi_q: Array, state: LinearAttentionState) -> tuple[Array, Array]:
    """``(phi(q)^T S [B, T, K, G, Hv], phi(q)^T z [B, T, K, G])`` for ``phi_q [B, T, K, G, F]``."""
    num = jnp.einsum("BTKGF,BKFV->BTKGV", phi_q, state.kv, precision=_HI)
    den = jnp.einsum("BTKGF,BKF->BTKG", phi_q, state.normalizer, precision=_HI)
    return num, den


def _masked_scores(phi_q: Array, phi_k: Array, allowed: Array) -> Array:
    """``phi(q_i).phi(k_j)`` ``[B, K, G, T, S]`` where ``allowed [B, T, S]``, else 0."""
    a = jnp.einsum("BTKGF,BSKF->BKGTS", phi_q, phi_k, precision=_HI)
    return jnp.where(allowed[:, None, None], a, 0.0)


def _absorb(state: LinearAttentionState, phi_k: Array, v: Array, runs: Array, previous: Array):
    """The state after the keys ``phi_k [B, L, K, F]`` (runs ``[B, L]``), entered in run ``previous [B]``.

    The result is the state of the last run: its keys, plus the old state if that run continues it.
    """
    last = runs[:, -1]  # [B]
    keys = jnp.where((runs == last[:, None])[..., None, None], phi_k, 0.0)  # [B, L, K, F]
    continues = (last == previous)[:, None, None]  # [B, 1, 1]
    kv = jnp.where(continues[..., None], state.kv, 0.0) + jnp.einsum("BLKF,BLKV->BKFV", keys, v, precision=_HI)
    return LinearAttentionState(kv, jnp.where(continues, state.normalizer, 0.0) + keys.sum(1))


def _sees_state(phi_q: Array, runs: Array, previous: Array) -> Array:
    """``phi_q [B, L, K, G, F]`` zeroed where the query's run is not the carried state's (``previous [B]``)."""
    return jnp.where((runs == previous[:, None])[..., None, None, None], phi_q, 0.0)


def _parallel(state, phi_q, phi_k, v, runs, causal):
    """The ``T x S`` kernel matrix under the causal and same-run masks: ``(num, den, state)``."""
    t = phi_q.shape[1]
    allowed = runs[:, :, None] == runs[:, None, :]  # [B, T, S]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, t), bool))
    a = _masked_scores(phi_q, phi_k, allowed)  # [B, K, G, T, S]
    num, den = _read(_sees_state(phi_q, runs, jnp.zeros_like(runs[:, 0])), state)
    num = num + jnp.einsum("BKGTS,BSKV->BTKGV", a, v, precision=_HI)
    den = den + jnp.einsum("BKGTS->BTKG", a)
    return num, den, _absorb(state, phi_k, v, runs, jnp.zeros_like(runs[:, 0]))


def _chunked(state, phi_q, phi_k, v, runs, chunk_size):
    """Causal, chunk by chunk: quadratic inside a chunk, the state of the current run carried across."""
    t = phi_q.shape[1]
    tril = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))

    def chunk_step(carry, chunk):
        q_c, k_c, v_c, r_c, previous = chunk  # [B, L, K, G, F], [B, L, K, F], [B, L, K, Hv], [B, L], [B]
        a = _masked_scores(q_c, k_c, tril & (r_c[:, :, None] == r_c[:, None, :]))  # inside the chunk
        num, den = _read(_sees_state(q_c, r_c, previous), carry)  # earlier chunks of the same run
        num = num + jnp.einsum("BKGLM,BMKV->BLKGV", a, v_c, precision=_HI)
        den = den + jnp.einsum("BKGLM->BLKG", a)
        return _absorb(carry, k_c, v_c, r_c, previous), (num, den)

    chunks = tuple(to_chunks(x, chunk_size) for x in (phi_q, phi_k, v))  # padding: zero features add nothing
    state, (num, den) = jax.lax.scan(chunk_step, state, chunks + chunk_runs(runs, chunk_size))
    return from_chunks(num, t), from_chunks(den, t), state


def _step(state: LinearAttentionState, phi_q: Array, phi_k: Array, v: Array):
    """One token: ``phi_q [B, K, G, F]``, ``phi_k [B, K, F]``, ``v [B, K, Hv]`` -> ``(state, (num, den))``."""
    kv = state.kv + jnp.einsum("BKF,BKV->BKFV", phi_k, v, precision=_HI)
    state = LinearAttentionState(kv, state.normalizer + phi_k)
    num, den = _read(phi_q[:, None], state)
    return state, (num[:, 0], den[:, 0])


def _recurrent(state, phi_q, phi_k, v, runs):
    """Causal, one token at a time; the state is reset where a new run starts."""
    starts = jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)  # [B, T]

    def step(state, x):
        q_t, k_t, v_t, start = x
        keep = ~start[:, None, None]  # [B, 1, 1]
        state = LinearAttentionState(jnp.where(keep[..., None], state.kv, 0.0), jnp.where(keep, state.normalizer, 0.0))
        return _step(state, q_t, k_t, v_t)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (phi_q, phi_k, v, starts))  # time-major
    state, (num, den) = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(num, 0, 1), jnp.moveaxis(den, 0, 1), state


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


def _bidirectional(causal_form, state, phi_q, phi_k, v, runs):
    """Non-causal within runs from two causal passes: each query's run total is its prefix (a causal pass)
    plus its suffix (a causal pass over the reversed sequence) minus its own key, counted twice."""
    f_num, f_den, final = causal_form(state, phi_q, phi_k, v, runs)
    flip = functools.partial(jnp.flip, axis=1)
    empty = LinearAttentionState(jnp.zeros_like(state.kv), jnp.zeros_like(state.normalizer))
    b_num, b_den, _ = causal_form(empty, flip(phi_q), flip(phi_k), flip(v), runs[:, -1:] - flip(runs))
    own = jnp.einsum("BTKGF,BTKF->BTKG", phi_q, phi_k, precision=_HI)  # [B, T, K, G]
    num = f_num + flip(b_num) - own[..., None] * v[:, :, :, None, :]
    return num, f_den + flip(b_den) - own, final


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
    segment_ids: Array | None = None,
    lengths: Array | None = None,
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
        causal or packed, else ``"parallel"``. All three agree to float32 rounding.
      chunk_size: positions per chunk of the chunked form (T is zero-padded; it need not divide T).
      eps: added to the denominator (``0`` keeps the output invariant to the scale of the features).
      segment_ids: int ``[B, T]`` packed documents (needs ``T == S``): a query reads only the keys of its
        run of equal ids; the state resets at each boundary.
      lengths: int ``[B]`` real keys per row (right padding); later keys add nothing, to outputs or state.
      state: a ``LinearAttentionState`` to continue from (earlier keys of the first run); default empty.
      return_state: also return the state after the last key (of the last run).

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the final ``LinearAttentionState`` when ``return_state``.
    """
    shape = _checks.check_qkv(query, key, value)
    implementation = check_implementation(implementation, causal or segment_ids is not None)
    chunk_size = check_chunk_size(chunk_size)
    if causal and shape.q_len != shape.kv_len:
        raise ValueError(f"causal linear attention needs T == S, got T={shape.q_len} and S={shape.kv_len}.")
    runs, valid = check_packing(segment_ids, lengths, shape.batch, shape.q_len, shape.kv_len)
    phi_q = group_queries(features(query, feature_map), shape.num_kv_heads)  # [B, T, K, G, F]
    phi_k = features(key, feature_map)  # [B, S, K, F]
    v = value.astype(jnp.float32)
    if phi_q.shape[-1] != phi_k.shape[-1]:
        raise ValueError(f"feature_map gave queries {phi_q.shape[-1]} and keys {phi_k.shape[-1]} features.")
    if valid is not None:
        phi_k = jnp.where(valid[..., None, None], phi_k, 0.0)  # padded keys: zero features, no contribution
    if state is None:
        state = LinearAttentionState.zeros(shape.batch, shape.num_kv_heads, phi_k.shape[-1], shape.value_head_dim)
    if causal and runs is None:
        runs = jnp.zeros((shape.batch, shape.q_len), jnp.int32)  # one run: the state is never reset
    forms = {
        "parallel": functools.partial(_parallel, causal=True),
        "chunked": functools.partial(_chunked, chunk_size=chunk_size),
        "recurrent": _recurrent,
    }
    if not causal and runs is None:  # one state for every query
        state = _accumulate(state, phi_k, v, implementation, chunk_size)
        num, den = _read(phi_q, state)
    elif not causal and implementation == "parallel":
        num, den, state = _parallel(state, phi_q, phi_k, v, runs, causal=False)
    elif not causal:
        num, den, state = _bidirectional(forms[implementation], state, phi_q, phi_k, v, runs)
    else:
        num, den, state = forms[implementation](state, phi_q, phi_k, v, runs)
    b, t, n = shape.batch, shape.q_len, shape.num_heads
    out = _normalise(num, den, eps).reshape(b, t, n, shape.value_head_dim).astype(query.dtype)
    return (out, state) if return_state else out


def kernel_weights(phi_q: Array, phi_k: Array, *, causal: bool, runs, valid, eps: float) -> Array:
    """The normalised kernel matrix ``[B, N, T, S]`` float32 of ``phi_q [B, T, K, G, F]``, ``phi_k [B, S, K, F]``
    under the causal, same-run (``runs [B, T]``) and valid-key (``valid [B, S]``) masks."""
    b, t, k, g, _ = phi_q.shape
    s = phi_k.shape[1]
    allowed = jnp.ones((b, t, s), bool)
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((t, s), bool))
    if runs is not None:
        allowed = allowed & (runs[:, :, None] == runs[:, None, :])
    if valid is not None:
        allowed = allowed & valid[:, None, :]
    a = _masked_scores(phi_q, phi_k, allowed)  # [B, K, G, T, S]
    den = a.sum(-1, keepdims=True) + eps
    return (a / jnp.where(den == 0, 1.0, den)).reshape(b, k * g, t, s)


def linear_attention_weights(
    query: Array,
    key: Array,
    *,
    feature_map: FeatureMap | None = elu_feature_map,
    causal: bool = False,
    eps: float = 1e-6,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
) -> Array:
    """The implicit attention weights ``[B, N, T, S]`` (float32) of :func:`linear_attention`.

    ``w_ij = phi(q_i).phi(k_j) / (sum_j' phi(q_i).phi(k_j') + eps)`` over the keys query ``i`` reads, so
    ``linear_attention(q, k, v, ...)`` equals ``w`` applied to ``v``. Quadratic in T: for inspection.
    """
    b, t, n, _ = jnp.shape(query)
    shape = _checks.check_qkv(query, key, key)
    runs, valid = check_packing(segment_ids, lengths, b, t, shape.kv_len)
    if causal and t != shape.kv_len:
        raise ValueError(f"causal linear attention needs T == S, got T={t} and S={shape.kv_len}.")
    phi_q = group_queries(features(query, feature_map), shape.num_kv_heads)
    return kernel_weights(phi_q, features(key, feature_map), causal=causal, runs=runs, valid=valid, eps=eps)


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
    state, (num, den) = _step(state, phi_q, features(key, feature_map), value.astype(jnp.float32))
    out = _normalise(num, den, eps)
    return out.reshape(query.shape[0], query.shape[1], value.shape[-1]).astype(query.dtype), state
