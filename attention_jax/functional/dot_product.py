"""``dot_product_attention``: validate, resolve the mask, dispatch to one implementation."""

from __future__ import annotations

import importlib
from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional import _checks, reference

Array = jax.Array


def dense_mask(mask: masks_lib.Mask | Array | None, shape: _checks.AttentionShape, q_offset=0, kv_offset=0):
    """Boolean mask broadcastable to ``[B, N, T, S]`` (None when everything is visible)."""
    if mask is None:
        return None
    if isinstance(mask, masks_lib.Mask):
        dense = mask.dense(shape.q_len, shape.kv_len, q_offset, kv_offset)  # [T, S] or [Bm, T, S]
        if dense.ndim == 3:
            if dense.shape[0] not in (1, shape.batch):
                raise ValueError(f"the mask's arrays have batch size {dense.shape[0]}, expected B={shape.batch}.")
            dense = dense[:, None]  # [B, 1, T, S]
        return dense
    if jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"mask must be a Mask or a boolean array, got dtype {jnp.result_type(mask)}.")
    _checks.check_broadcastable("mask", mask, shape)
    return mask


def _check_offsets(q_offset, kv_offset):
    for name, value in (("q_offset", q_offset), ("kv_offset", kv_offset)):
        if jnp.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
        if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
            raise ValueError(f"{name} must be an integer, got dtype {jnp.result_type(value)}.")


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
    q_offset: int = 0,
    kv_offset: int = 0,
    implementation: str | None = None,
    return_lse: bool = False,
):
    """Scaled dot-product attention, ``softmax(mask(softcap(mod(scale * q.k + bias)))) v``.

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
      score_mod: an ``attention_jax.score_mods.ScoreMod`` applied after the bias.
      q_offset, kv_offset: absolute position of the first query / key (decoding, shards).
      implementation: None or ``"auto"`` (choose by backend and shape), ``"reference"``,
        ``"blockwise"``, ``"pallas"`` or ``"cudnn"``.
      return_lse: also return the logsumexp of the scores, ``[B, N, T]`` float32.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype, and the logsumexp when ``return_lse``. A query that
      sees no key outputs zeros (and its logsumexp is ``-inf``).

    >>> import jax, jax.numpy as jnp
    >>> import attention_jax as aj
    >>> q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8))      # [B, T, N, H]
    >>> kv = jax.random.normal(jax.random.key(1), (2, 5, 2, 8))     # [B, S, K, H]: GQA, G = 2
    >>> out, lse = aj.dot_product_attention(q, kv, kv, mask=aj.masks.causal(), return_lse=True)
    >>> out.shape, lse.shape
    ((2, 5, 4, 8), (2, 4, 5))
    """
    shape = _checks.check_qkv(query, key, value)
    implementation = _checks.check_implementation(implementation)
    scale = _checks.check_scale(scale, shape.head_dim)
    softcap = _checks.check_softcap(softcap)
    if bias is not None:
        _checks.check_broadcastable("bias", bias, shape)
    _check_offsets(q_offset, kv_offset)

    if implementation is None:
        implementation = choose_implementation(shape, mask=mask, bias=bias, score_mod=score_mod, softcap=softcap)
    run = _implementation(implementation)
    if implementation == "reference":
        mask = dense_mask(mask, shape, q_offset, kv_offset)
    out, lse = run(
        query,
        key,
        value,
        shape=shape,
        scale=scale,
        mask=mask,
        bias=bias,
        score_mod=score_mod,
        softcap=softcap,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
    if return_lse and lse is None:
        raise ValueError(f"implementation={implementation!r} cannot return the logsumexp; use return_lse=False.")
    return (out, lse) if return_lse else out


# Each implementation module exposes ``attention(query, key, value, *, shape, scale, mask, bias,
# score_mod, softcap, q_offset, kv_offset) -> (out, lse)`` and raises ValueError, naming why, for
# a call it cannot serve. ``mask`` reaches it as given (a Mask, a boolean array or None), except
# for the reference, which receives the dense form.
_MODULES = {
    "blockwise": "attention_jax.functional.blockwise",
    "pallas": "attention_jax.functional.pallas",
    "cudnn": "attention_jax.functional.cudnn",
}


def _implementation(name: str):
    if name == "reference":
        return reference.attention
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as e:
        if e.name != _MODULES[name]:
            raise
        raise ValueError(f"implementation={name!r} is not available in this build; use 'reference' or None.") from None
    return module.attention


def choose_implementation(shape: _checks.AttentionShape, *, mask=None, bias=None, score_mod=None, softcap=None) -> str:
    """What ``implementation=None`` runs for a call of this shape on the default backend.

    GPU/TPU: the Pallas kernels, unless the call needs what they lack (a score mod, or a boolean
    array mask together with softcap), then the blockwise path. CPU: the reference for tiny
    problems, where one fused dense computation beats any loop, else the blockwise path.
    """
    if jax.default_backend() in ("gpu", "tpu"):
        array_mask = mask is not None and not isinstance(mask, masks_lib.Mask)
        if score_mod is None and not (array_mask and softcap is not None):
            return "pallas"
        return "blockwise"
    return "reference" if shape.q_len * shape.kv_len <= _REFERENCE_MAX_SCORES else "blockwise"


# Below this many scores per (batch, head) the dense reference compiles faster and runs about as
# fast; from T = S = 256 the blockwise path is already 2x faster on CPU (benchmarks/RESULTS.md).
_REFERENCE_MAX_SCORES = 128 * 128


def attention_weights(
    query: Array,
    key: Array,
    *,
    bias: Array | None = None,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    q_offset: int = 0,
    kv_offset: int = 0,
) -> Array:
    """The attention probabilities ``[B, N, T, S]`` (float32) that ``dot_product_attention`` uses.

    Materialises ``T x S`` per head: meant for inspection, not for the fast path.
    """
    value = key[..., :1]
    shape = _checks.check_qkv(query, key, value)
    scale = _checks.check_scale(scale, shape.head_dim)
    softcap = _checks.check_softcap(softcap)
    if bias is not None:
        _checks.check_broadcastable("bias", bias, shape)
    _check_offsets(q_offset, kv_offset)
    return reference.attention_weights(
        query,
        key,
        shape=shape,
        scale=scale,
        mask=dense_mask(mask, shape, q_offset, kv_offset),
        bias=bias,
        score_mod=score_mod,
        softcap=softcap,
        q_offset=q_offset,
        kv_offset=kv_offset,
    )
