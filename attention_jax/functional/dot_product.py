"""``dot_product_attention``: validate once, resolve the mask once, run one backend.

The flow of every call: :func:`validate` checks the arguments and builds a
:class:`~attention_jax.functional.backends.Call`; :func:`select_backend` asks the backends
(``backends.auto_order``) which can serve it; :func:`~attention_jax.functional.resolve.resolve_spec`
turns the mask, offsets and score mod into one ``MaskSpec`` at that backend's tiles; the backend
runs on the call and the spec.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks, backends, reference, resolve
from attention_jax.functional.backends import Backend, Call
from pallas_kernels import dropout as dropout_lib

Array = jax.Array


def validate(
    query, key, value, *, bias=None, mask=None, scale=None, softcap=None, score_mod=None, q_offset=0, kv_offset=0,
    dropout_rate=0.0, dropout_rng=None, return_lse=False,
) -> Call:  # fmt: skip
    """Check every argument of :func:`dot_product_attention` once; raise ``ValueError`` naming the bad one."""
    shape = _checks.check_qkv(query, key, value)
    scale = _checks.check_scale(scale, shape.head_dim)
    softcap = _checks.check_softcap(softcap)
    if bias is not None:
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise ValueError(f"bias must be a floating-point array, got dtype {jnp.result_type(bias)}.")
        _checks.check_broadcastable("bias", bias, shape)
    _checks.check_offsets(q_offset, kv_offset, shape.batch)
    resolve.check_mask(mask, shape)
    resolve.check_score_mod(score_mod, shape)
    rate = _checks.check_dropout(dropout_rate, dropout_rng)
    return Call(
        query=query, key=key, value=value, shape=shape, mask=mask, bias=bias, scale=scale, softcap=softcap,
        score_mod=score_mod, q_offset=q_offset, kv_offset=kv_offset, dropout_rate=rate,
        dropout_seed=dropout_lib.seed_from_key(dropout_rng) if rate > 0 else None, return_lse=bool(return_lse),
    )  # fmt: skip


def select_backend(call: Call, implementation: str | Backend | None = None) -> Backend:
    """The backend that runs ``call``: the requested one (raising its reason if it cannot), or the first that can."""
    if implementation is None or implementation == "auto":
        reasons = []
        for backend in backends.auto_order():
            try:
                backend.check(call)
                return backend
            except NotImplementedError as e:
                reasons.append(f"{backend!r}: {e}")
        raise ValueError("no attention backend can serve this call: " + "; ".join(reasons) + ".")
    backend = backends.get(implementation)
    try:
        backend.check(call)
    except NotImplementedError as e:
        raise ValueError(f"implementation={implementation!r} cannot serve this call: {e}.") from None
    return backend


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    bias: Array | None = None,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    implementation: str | Backend | None = None,
    return_lse: bool = False,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
):
    """Scaled dot-product attention, ``dropout(softmax(mask(softcap(mod(scale * q.k + bias))))) v``.

    Args:
      query: ``[B, T, N, H]``.
      key: ``[B, S, K, H]`` with ``N % K == 0`` (K == N: MHA, K == 1: MQA, else GQA; query head
        ``n`` reads key/value head ``n // (N // K)``; K/V are never repeated).
      value: ``[B, S, K, Hv]``; ``Hv`` may differ from ``H``.
      bias: additive, broadcastable to ``[B, N, T, S]``.
      mask: an ``attention_jax.masks.Mask`` or a boolean array broadcastable to ``[B, N, T, S]``;
        True means "may attend".
      scale: multiplies ``q.k``; defaults to ``1 / sqrt(H)``.
      softcap: if set, scores become ``softcap * tanh(scores / softcap)`` before masking.
      score_mod: an ``attention_jax.score_mods.ScoreMod`` applied after the bias; it runs inside
        every backend's tiles, and its parameters (ALiBi slopes, a T5 table) get gradients.
      q_offset, kv_offset: absolute position of the first query / key (decoding, shards): an int,
        a traced int, or ``[B]`` (one per sequence, as a KV cache gives them). Masks stay exact and
        the fast paths keep skipping blocks in every case.
      implementation: None or ``"auto"`` (the first backend of ``backends.auto_order()`` that can
        serve the call), ``"reference"``, ``"blockwise"``, ``"pallas"``, ``"cudnn"``, or a
        ``backends.Backend`` instance such as ``Blockwise(block_q=64, block_k=64)``.
      return_lse: also return the logsumexp of the scores, ``[B, N, T]`` float32.
      dropout_rate: drop each attention weight with this probability (training) and scale the
        rest by ``1 / (1 - rate)``; runs inside the fast paths (no ``T x S`` buffer).
      dropout_rng: a ``jax.random`` key, required when ``dropout_rate > 0``. The dropped weights
        are a function of ``(key, batch, head, query position, key position)``, identical on every
        backend.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the logsumexp when ``return_lse``. A query that
      sees no key outputs zeros (and its logsumexp is ``-inf``); so do all queries when ``S == 0``.

    >>> import jax, jax.numpy as jnp
    >>> import attention_jax as aj
    >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))      # [B, T, N, H]
    >>> kv = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))     # [B, S, K, H]: GQA, G = 2
    >>> out, lse = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), return_lse=True)
    >>> out.shape, lse.shape
    ((2, 5, 4, 8), (2, 4, 5))
    """
    call = validate(
        query, key, value, bias=bias, mask=mask, scale=scale, softcap=softcap, score_mod=score_mod,
        q_offset=q_offset, kv_offset=kv_offset, dropout_rate=dropout_rate, dropout_rng=dropout_rng,
        return_lse=return_lse,
    )  # fmt: skip
    if call.shape.q_len == 0 or call.shape.kv_len == 0:
        out, lse = _empty(call)
    else:
        backend = select_backend(call, implementation)
        spec = resolve.resolve_spec(call, *backend.block_shape(call))
        out, lse = backend(call, spec)
    return (out, lse) if return_lse else out


def _empty(call: Call):
    """T == 0: nothing to compute; S == 0: every query sees nothing (zeros, lse -inf)."""
    s = call.shape
    out = jnp.zeros((s.batch, s.q_len, s.num_heads, s.value_head_dim), call.query.dtype)
    return out, jnp.full((s.batch, s.num_heads, s.q_len), -jnp.inf, jnp.float32)


def choose_implementation(query: Array, key: Array, value: Array, **kwargs) -> str:
    """The name of the backend ``implementation=None`` runs for this call (arguments as in dot_product_attention).

    >>> import jax.numpy as jnp
    >>> q = jnp.zeros((1, 1024, 2, 16))
    >>> choose_implementation(q, q, q)  # on CPU
    'blockwise'
    """
    return select_backend(validate(query, key, value, **kwargs)).name


def attention_weights(
    query: Array,
    key: Array,
    *,
    bias: Array | None = None,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
) -> Array:
    """The attention probabilities ``[B, N, T, S]`` (float32) that ``dot_product_attention`` uses.

    Materialises ``T x S`` per head: meant for inspection, not for the fast path.
    """
    call = validate(
        query, key, key[..., :1], bias=bias, mask=mask, scale=scale, softcap=softcap, score_mod=score_mod,
        q_offset=q_offset, kv_offset=kv_offset,
    )  # fmt: skip
    spec = resolve.resolve_spec(call, max(call.shape.q_len, 1), max(call.shape.kv_len, 1))
    return reference.attention_weights(query, key, spec, scale=call.scale, softcap=call.softcap, bias=bias)


def dense_mask(mask, shape: _checks.AttentionShape, q_offset=0, kv_offset=0) -> Array | None:
    """A mask as booleans broadcastable to ``[B, N, T, S]`` (None: all visible), resolved like every call."""
    dummy = jnp.zeros((shape.batch, shape.q_len, shape.num_heads, 1))
    keys = jnp.zeros((shape.batch, shape.kv_len, shape.num_kv_heads, 1))
    call = Call(dummy, keys, keys, shape, mask=mask, q_offset=q_offset, kv_offset=kv_offset)
    resolve.check_mask(mask, shape)
    return resolve.resolve_spec(call, max(shape.q_len, 1), max(shape.kv_len, 1)).dense(shape.batch)
