"""Selective state spaces (Mamba, Gu & Dao 2023; Mamba-2, Dao & Gu 2024): the input-dependent linear recurrence

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t b_t^T        (h [H, F] per head, float32)
    y_t = h_t c_t + D * x_t

per head ``n``, with ``x_t [H]`` the head's input, ``dt_t > 0`` its step size, ``b_t, c_t [F]`` the input and
output projections of the head's group and ``A`` a negative decay: one scalar per head (Mamba-2) or one per
head and state channel ``[N, F]`` (Mamba: its ``D_inner`` channels are ``N`` heads of size ``H = 1``). Read as
attention, ``c`` is a query, ``b`` a key and ``dt * x`` a value, with a causal mask that decays with distance
(the state-space duality of Mamba-2); ``b`` and ``c`` are shared by the ``G = N // K`` heads of a group as keys
are in grouped-query attention.

Three forms compute the same thing:

* ``"sequential"``: ``lax.scan`` one token at a time (the reference; decoding uses :func:`selective_scan_step`);
* ``"associative"``: ``lax.associative_scan`` over ``(decay, input)`` pairs, ``log T`` depth, ``[B, T, N, H, F]``
  memory;
* ``"chunked"``: Mamba-2's state-space-duality form, scalar ``A`` per head only: quadratic attention-like
  matmuls inside chunks of ``chunk_size`` tokens, the state carried between chunks. Linear in T, and the
  matmuls are what accelerators are fast at.

and ``"pallas"`` runs the chunked form as a Pallas kernel (``pallas_kernels.ssd_scan``, forward and backward;
Triton on GPUs, Mosaic on TPUs, interpreted on CPU where it is only for testing): each program carries a
head's state through the chunks itself. It takes what ``"chunked"`` takes, with ``chunk_size`` a power of
two >= 16; its matmuls run in the dtype of ``x``.

Packed documents (``segment_ids [B, T]``) reset the state where a run of equal ids starts, so a packed row
equals its documents run one by one; an initial ``state`` continues the first run. Right padding
(``lengths [B]``) sets ``dt`` to 0 on padded tokens: they neither decay nor feed the state, so the final state
is the state after each row's last real token.

Layouts: ``x [B, T, N, H]``, ``dt [B, T, N]``, ``a [N]`` or ``[N, F]``, ``b, c [B, T, K, F]``, ``d [N]``,
state ``[B, N, H, F]`` float32.

>>> import jax, jax.numpy as jnp
>>> x = jnp.ones((1, 6, 2, 3))                             # [B, T, N, H]
>>> dt = jnp.full((1, 6, 2), 0.5)                          # [B, T, N], after softplus
>>> b = c = jnp.ones((1, 6, 1, 4))                         # [B, T, K, F]
>>> a = -jnp.ones((2,))                                    # [N]: Mamba-2's scalar decay per head
>>> y, state = selective_scan(x, dt, a, b, c, implementation="sequential", return_state=True)
>>> y.shape, state.shape
((1, 6, 2, 3), (1, 2, 3, 4))
>>> chunked = selective_scan(x, dt, a, b, c, implementation="chunked", chunk_size=4)
>>> bool(jnp.allclose(chunked, y, atol=1e-5))
True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attention_jax.functional.linear import check_chunk_size, check_packing, chunk_runs, from_chunks, to_chunks
from pallas_kernels.ssd_scan import ssd_scan

Array = jax.Array
_HI = jax.lax.Precision.HIGHEST
IMPLEMENTATIONS = ("sequential", "associative", "chunked", "pallas")

__all__ = ["selective_scan", "selective_scan_step", "selective_scan_weights", "IMPLEMENTATIONS"]


def _check(x, dt, a, b, c, d, state) -> int:
    """Validates the shapes; returns the state size ``F``."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"x must be [B, T, N, H], got shape {jnp.shape(x)}.")
    batch, length, heads, head_dim = jnp.shape(x)
    if jnp.shape(dt) != (batch, length, heads):
        raise ValueError(f"dt must be [B, T, N]={[batch, length, heads]}, got shape {jnp.shape(dt)}.")
    if jnp.ndim(b) != 4 or jnp.shape(b)[:2] != (batch, length):
        raise ValueError(f"b must be [B, T, K, F] with [B, T]={[batch, length]}, got shape {jnp.shape(b)}.")
    if jnp.shape(c) != jnp.shape(b):
        raise ValueError(f"c must have the shape of b [B, T, K, F]={list(jnp.shape(b))}, got {jnp.shape(c)}.")
    groups, state_dim = jnp.shape(b)[2:]
    if heads % groups:
        raise ValueError(f"the N={heads} heads of x must divide into the K={groups} groups of b and c.")
    if jnp.shape(a) not in ((heads,), (heads, state_dim)):
        raise ValueError(f"a must be [N]={[heads]} or [N, F]={[heads, state_dim]}, got shape {jnp.shape(a)}.")
    if d is not None and jnp.shape(d) != (heads,):
        raise ValueError(f"d must be [N]={[heads]}, got shape {jnp.shape(d)}.")
    if state is not None and jnp.shape(state) != (batch, heads, head_dim, state_dim):
        raise ValueError(
            f"state must be [B, N, H, F]={[batch, heads, head_dim, state_dim]}, got shape {jnp.shape(state)}."
        )
    return state_dim


def _per_head(y: Array, heads: int) -> Array:
    """``[..., K, F] -> [..., N, F]``: head ``n`` reads group ``n // G``."""
    return jnp.repeat(y, heads // y.shape[-2], axis=-2)


def _decay(dt: Array, a: Array) -> Array:
    """``exp(dt * A)`` broadcastable against the state: ``[..., N, 1, 1]`` or ``[..., N, 1, F]``."""
    if a.ndim == 1:
        return jnp.exp(dt * a)[..., None, None]
    return jnp.exp(dt[..., None] * a)[..., None, :]


def _inputs(x: Array, dt: Array, b: Array) -> Array:
    """``dt * x b^T`` ``[..., N, H, F]``: what each token adds to the state."""
    return (dt[..., None] * x)[..., None] * b[..., None, :]


def _starts(runs: Array) -> Array:
    """``[B, T]`` bool: the first token of every run but the first (where the state resets)."""
    return jnp.concatenate([jnp.zeros_like(runs[:, :1], bool), runs[:, 1:] != runs[:, :-1]], axis=1)


def _sequential(x, dt, a, b, c, runs, state):
    """One token at a time: ``(y [B, T, N, H], final state)``."""
    starts = _starts(runs)

    def step(h, inputs):
        x_t, dt_t, b_t, c_t, start = inputs  # [B, N, H], [B, N], [B, N, F], [B, N, F], [B]
        h = jnp.where(start[:, None, None, None], 0.0, h)
        h = _decay(dt_t, a) * h + _inputs(x_t, dt_t, b_t)
        return h, jnp.einsum("BNHF,BNF->BNH", h, c_t, precision=_HI)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (x, dt, b, c, starts))  # time-major
    state, y = jax.lax.scan(step, state, xs)
    return jnp.moveaxis(y, 0, 1), state


def _associative(x, dt, a, b, c, runs, state):
    """``h_t = decay_t h_{t-1} + u_t`` as a prefix scan of affine maps, ``(d1, u1) then (d2, u2)`` being
    ``(d1 d2, d2 u1 + u2)``."""
    decay = jnp.where(_starts(runs)[:, :, None, None, None], 0.0, _decay(dt, a))  # [B, T, N, 1, F|1]
    u = _inputs(x, dt, b)  # [B, T, N, H, F]
    u = u.at[:, 0].add(decay[:, 0] * state)  # the first token continues the carried state

    def combine(left, right):
        (d1, u1), (d2, u2) = left, right
        return d1 * d2, d2 * u1 + u2

    _, h = jax.lax.associative_scan(combine, (decay, u), axis=1)  # [B, T, N, H, F]
    return jnp.einsum("BTNHF,BTNF->BTNH", h, c, precision=_HI), h[:, -1]


def _chunked(x, dt, a, b, c, runs, state, chunk_size):
    """Mamba-2's SSD form over ``C`` chunks of ``L`` tokens, ``cum`` being the running sum of ``dt * A`` in a chunk.

    Everything but a ``C``-step recurrence of states is batched over the chunks, as large matmuls:

    1. inside each chunk, ``y_t = sum_{s <= t} exp(cum_t - cum_s) (c_t . b_s) dt_s x_s`` (attention-like);
    2. each chunk's own contribution to the state at its end;
    3. the states at the chunk boundaries, by an associative scan over chunks;
    4. what each token reads of the state before its chunk, decayed by ``exp(cum_t)``.

    Packed runs: a pair ``(t, s)`` counts only within one run; the state before a chunk reaches the tokens
    of its run only (``previous``), and a chunk passes it on only if its last token is still in that run.
    """
    length = x.shape[1]
    # Zero padding: dt = 0 neither decays nor adds, so the padded tail leaves the state as it was.
    x_c, dt_c, b_c, c_c = (to_chunks(v, chunk_size) for v in (x, dt, b, c))  # [C, B, L, ...]
    r_c, previous = chunk_runs(runs, chunk_size)  # [C, B, L], [C, B]
    cum = jnp.cumsum(dt_c * a, axis=2)  # [C, B, L, N] log decay from the chunk start
    cum_n = jnp.moveaxis(cum, 2, 3)  # [C, B, N, L]
    tril = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    same_run = tril & (r_c[..., :, None] == r_c[..., None, :])  # [C, B, L, M]
    # 1. Decay from s to t, masked before exp so that pairs with s > t (positive gaps) never overflow.
    gap = jnp.where(same_run[:, :, None], cum_n[..., :, None] - cum_n[..., None, :], -jnp.inf)  # [C, B, N, L, M]
    scores = jnp.einsum("CBLNF,CBMNF->CBNLM", c_c, b_c, precision=_HI) * jnp.exp(gap)
    inputs = dt_c[..., None] * x_c  # [C, B, L, N, H]
    y = jnp.einsum("CBNLM,CBMNH->CBLNH", scores, inputs, precision=_HI)
    # 2. The chunk's last run, decayed to the chunk end.
    last = r_c[..., -1:]  # [C, B, 1]
    to_end = jnp.where((r_c == last)[..., None], jnp.exp(cum[:, :, -1:] - cum), 0.0)  # [C, B, L, N]
    own = jnp.einsum("CBLN,CBLNH,CBLNF->CBNHF", to_end, inputs, b_c, precision=_HI)
    # 3. h_end[i] = pass[i] * h_end[i - 1] + own[i], with h_end[-1] = state; pass[i] is 0 where a run ends.
    passes = jnp.where((last[..., 0] == previous)[..., None], jnp.exp(cum[:, :, -1]), 0.0)[..., None, None]
    own = own.at[0].add(passes[0] * state)

    def combine(left, right):
        (p1, h1), (p2, h2) = left, right
        return p1 * p2, p2 * h1 + h2

    _, ends = jax.lax.associative_scan(combine, (passes, own), axis=0)  # [C, B, N, H, F]
    starts = jnp.concatenate([state[None], ends[:-1]], axis=0)  # the state before each chunk
    # 4. Tokens of the run the carried state belongs to read it, decayed from the chunk start.
    carried = jnp.where((r_c == previous[..., None])[..., None], jnp.exp(cum), 0.0)  # [C, B, L, N]
    y = y + carried[..., None] * jnp.einsum("CBNHF,CBLNF->CBLNH", starts, c_c, precision=_HI)
    return from_chunks(y, length), ends[-1]


def selective_scan(
    x: Array,
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    d: Array | None = None,
    *,
    implementation: str | None = None,
    chunk_size: int = 64,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
    state: Array | None = None,
    return_state: bool = False,
):
    """The selective scan ``h_t = exp(dt_t A) h_{t-1} + dt_t x_t b_t^T``, ``y_t = h_t c_t + D x_t``.

    Args:
      x: ``[B, T, N, H]`` the heads' inputs.
      dt: ``[B, T, N]`` step sizes, already positive (the caller applies ``softplus(. + bias)``).
      a: ``[N]`` (Mamba-2) or ``[N, F]`` (Mamba) decay rates, normally negative (``-exp(A_log)``).
      b: ``[B, T, K, F]`` input projections; head ``n`` reads group ``n // (N // K)``.
      c: ``[B, T, K, F]`` output projections.
      d: ``[N]`` skip connection ``D * x``; None for none.
      implementation: ``"sequential"``, ``"associative"``, ``"chunked"`` or ``"pallas"`` (the last two need
        ``a`` of shape ``[N]``); None picks ``"chunked"`` for ``a [N]`` and ``"associative"`` for ``a [N, F]``.
        All agree to float32 rounding.
      chunk_size: tokens per chunk of the chunked forms (T is zero-padded; it need not divide T); a power of
        two >= 16 for ``"pallas"``.
      segment_ids: int ``[B, T]`` packed documents: the state resets where a run of equal ids starts.
      lengths: int ``[B]`` real tokens per row (right padding): later tokens leave the state unchanged.
      state: ``[B, N, H, F]`` the state to continue from (the first run continues it); default zeros.
      return_state: also return the state after the last token (float32).

    Returns:
      ``y [B, T, N, H]`` in the dtype of ``x``, and the final state ``[B, N, H, F]`` when ``return_state``.
    """
    state_dim = _check(x, dt, a, b, c, d, state)
    if implementation is None:
        implementation = "chunked" if jnp.ndim(a) == 1 else "associative"
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation=!r}.")
    if implementation in ("chunked", "pallas") and jnp.ndim(a) != 1:
        raise ValueError(
            f"implementation={implementation!r} (Mamba-2's SSD form) needs one decay per head, a [N]; got a of "
            f"shape {jnp.shape(a)}: use 'associative' or 'sequential' for a per-channel decay [N, F]."
        )
    chunk_size = check_chunk_size(chunk_size)
    batch, length, heads, head_dim = x.shape
    runs, valid = check_packing(segment_ids, lengths, batch, length, length)
    if runs is None:
        runs = jnp.zeros((batch, length), jnp.int32)
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    xf, dtf, af = f32(x), f32(dt), f32(a)
    if valid is not None:
        dtf = jnp.where(valid[..., None], dtf, 0.0)  # padding: no decay, no input
    if implementation == "pallas":  # the kernel takes b, c per group and x in its own dtype
        y, state = ssd_scan(x, dtf, af, b, c, runs=runs, state=state, chunk_size=chunk_size)
        y = y.astype(jnp.float32)
    else:
        bf, cf = _per_head(f32(b), heads), _per_head(f32(c), heads)  # [B, T, N, F]
        if state is None:
            state = jnp.zeros((batch, heads, head_dim, state_dim), jnp.float32)
        state = f32(state)
    if implementation == "sequential":
        y, state = _sequential(xf, dtf, af, bf, cf, runs, state)
    elif implementation == "associative":
        y, state = _associative(xf, dtf, af, bf, cf, runs, state)
    elif implementation == "chunked":
        y, state = _chunked(xf, dtf, af, bf, cf, runs, state, chunk_size)
    if d is not None:
        y = y + f32(d)[:, None] * xf
    y = y.astype(x.dtype)
    return (y, state) if return_state else y


def selective_scan_step(
    state: Array, x: Array, dt: Array, a: Array, b: Array, c: Array, d: Array | None = None
) -> tuple[Array, Array]:
    """One decoding step of :func:`selective_scan`: ``(y [B, N, H], state [B, N, H, F])``.

    ``x [B, N, H]``, ``dt [B, N]``, ``b, c [B, K, F]``, ``state [B, N, H, F]``; ``a`` and ``d`` as in
    :func:`selective_scan`.

    >>> import jax.numpy as jnp
    >>> state = jnp.zeros((1, 2, 3, 4))
    >>> y, state = selective_scan_step(state, jnp.ones((1, 2, 3)), jnp.ones((1, 2)), -jnp.ones((2,)),
    ...                                jnp.ones((1, 1, 4)), jnp.ones((1, 1, 4)))
    >>> y.shape, state.shape
    ((1, 2, 3), (1, 2, 3, 4))
    """
    _check(x[:, None], dt[:, None], a, b[:, None], c[:, None], d, state)
    heads = x.shape[1]
    xf, dtf = jnp.asarray(x, jnp.float32), jnp.asarray(dt, jnp.float32)
    bf, cf = _per_head(jnp.asarray(b, jnp.float32), heads), _per_head(jnp.asarray(c, jnp.float32), heads)
    state = _decay(dtf, jnp.asarray(a, jnp.float32)) * jnp.asarray(state, jnp.float32) + _inputs(xf, dtf, bf)
    y = jnp.einsum("BNHF,BNF->BNH", state, cf, precision=_HI)
    if d is not None:
        y = y + jnp.asarray(d, jnp.float32)[:, None] * xf
    return y.astype(x.dtype), state


def selective_scan_weights(
    dt: Array,
    a: Array,
    b: Array,
    c: Array,
    d: Array | None = None,
    *,
    segment_ids: Array | None = None,
    lengths: Array | None = None,
) -> Array:
    """The scan as attention: ``W [B, N, T, S]`` float32 with ``y_t = sum_s W[t, s] x_s`` (zero initial state).

    ``W[t, s] = sum_f c_t[f] b_s[f] exp(sum_{s < r <= t} dt_r A[f]) dt_s`` for ``s <= t`` in the same packed
    document (``+ D`` on the diagonal); Mamba-2's "matrix" form, quadratic in T (for inspection and recording,
    not for running). Shapes as in :func:`selective_scan`.

    >>> import jax.numpy as jnp
    >>> ones = jnp.ones((1, 3, 1, 1))                               # b = c = 1: [B, T, K, F]
    >>> w = selective_scan_weights(jnp.ones((1, 3, 1)), -jnp.ones((1,)), ones, ones)
    >>> w[0, 0].round(3).tolist()   # decays by exp(-1) per step, causal
    [[1.0, 0.0, 0.0], [0.368, 1.0, 0.0], [0.135, 0.368, 1.0]]
    """
    batch, length, heads = jnp.shape(dt)
    probe = jax.ShapeDtypeStruct((batch, length, heads, 1), jnp.float32)
    _check(probe, dt, a, b, c, d, None)
    runs, valid = check_packing(segment_ids, lengths, batch, length, length)
    dtf, af = jnp.asarray(dt, jnp.float32), jnp.asarray(a, jnp.float32)
    if valid is not None:
        dtf = jnp.where(valid[..., None], dtf, 0.0)
    bf, cf = _per_head(jnp.asarray(b, jnp.float32), heads), _per_head(jnp.asarray(c, jnp.float32), heads)
    log_decay = dtf[..., None] * (af[:, None] if af.ndim == 1 else af)  # [B, T, N, 1|F]
    cum = jnp.moveaxis(jnp.cumsum(log_decay, axis=1), 1, 2)  # [B, N, T, 1|F]
    allowed = jnp.tril(jnp.ones((length, length), bool))
    if runs is not None:
        allowed = allowed & (runs[:, :, None] == runs[:, None, :])
    allowed = jnp.broadcast_to(allowed, (batch, length, length))[:, None, :, :, None]  # [B, 1, T, S, 1]
    decay = jnp.exp(jnp.where(allowed, cum[:, :, :, None] - cum[:, :, None, :], -jnp.inf))  # [B, N, T, S, 1|F]
    decay = jnp.broadcast_to(decay, decay.shape[:4] + cf.shape[-1:])  # [B, N, T, S, F]
    weights = jnp.einsum("BTNF,BSNF,BNTSF->BNTS", cf, bf, decay, precision=_HI)
    weights = weights * jnp.moveaxis(dtf, 1, 2)[:, :, None, :]  # dt_s
    if d is not None:
        weights = weights + jnp.asarray(d, jnp.float32)[None, :, None, None] * jnp.eye(length)
    return weights
