"""Cascade attention: many continuations of one shared prefix, the prefix read once.

Continuations ``b = 0 .. B-1`` (samples, beams, forks of one prompt) share a prefix of ``P`` tokens
and each has its own suffix. Attention over ``prefix + suffix`` splits into two softmaxes over
disjoint keys, merged exactly by their logsumexps:

* the prefix part stacks the ``B * T`` query rows of every continuation into ONE batch row and
  attends to the prefix keys ``[1, P, K, H]`` once (no copy of the prefix per continuation, one
  pass over its bytes for all of them);
* the suffix part is ordinary batched attention over each continuation's own keys, under the
  call's mask (e.g. causal) and ragged suffix lengths;
* ``out = (e^{l_p} o_p + e^{l_s} o_s) / (e^{l_p} + e^{l_s})`` with ``l = logsumexp`` per query row
  and head, in float32.

Both parts go through :func:`~attention_jax.functional.dot_product_attention` with
``return_lse=True``, so backends, masks and score options are the library's.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional.dot_product import dot_product_attention

Array = jax.Array

__all__ = ["cascade_attention", "merge_attention"]


def merge_attention(out_a: Array, lse_a: Array, out_b: Array, lse_b: Array) -> tuple[Array, Array]:
    """Merge two attentions of the same queries over disjoint keys: ``(out [B, T, N, Hv], lse [B, N, T])``.

    ``out_*`` are ``[B, T, N, Hv]`` and ``lse_*`` their logsumexps ``[B, N, T]``. A row that sees no key in
    either part (both ``-inf``) gives zeros and ``-inf``. Output in ``out_a``'s dtype, lse float32.

    >>> import jax.numpy as jnp
    >>> o, l = merge_attention(jnp.ones((1, 1, 1, 2)), jnp.zeros((1, 1, 1)),
    ...                        jnp.zeros((1, 1, 1, 2)), jnp.full((1, 1, 1), -jnp.inf))
    >>> o.tolist(), l.tolist()
    ([[[[1.0, 1.0]]]], [[[0.0]]])
    """
    lse_a, lse_b = lse_a.astype(jnp.float32), lse_b.astype(jnp.float32)
    top = jnp.maximum(lse_a, lse_b)  # [B, N, T]
    safe = jnp.where(jnp.isfinite(top), top, 0.0)
    w_a, w_b = jnp.exp(lse_a - safe), jnp.exp(lse_b - safe)  # 0 where a part sees nothing
    total = w_a + w_b
    seen = total > 0
    denom = jnp.where(seen, total, 1.0)
    to_rows = lambda w: jnp.swapaxes(w / denom, 1, 2)[..., None]  # [B, N, T] -> [B, T, N, 1]
    out = to_rows(w_a) * out_a.astype(jnp.float32) + to_rows(w_b) * out_b.astype(jnp.float32)
    lse = jnp.where(seen, safe + jnp.log(denom), -jnp.inf)
    return out.astype(out_a.dtype), lse


def cascade_attention(
    query: Array,
    prefix_key: Array,
    prefix_value: Array,
    suffix_key: Array,
    suffix_value: Array,
    *,
    mask: masks_lib.Mask | Array | None = None,
    suffix_lengths: Array | None = None,
    q_offset: int | Array = 0,
    scale: float | None = None,
    softcap: float | None = None,
    implementation: Any = None,
    return_lse: bool = False,
):
    """Attention of ``B`` continuations over one shared prefix and their own suffixes.

    Equals :func:`~attention_jax.functional.dot_product_attention` of ``query`` over each row's
    ``concat(prefix, suffix)`` keys, where every query sees the whole prefix and, in the suffix, what
    ``mask`` and ``suffix_lengths`` allow.

    Args:
      query: ``[B, T, N, H]``, the continuations' queries (all after the prefix).
      prefix_key: ``[1, P, K, H]``, the shared prefix, stored once.
      prefix_value: ``[1, P, K, Hv]``.
      suffix_key: ``[B, S, K, H]``, each continuation's own keys.
      suffix_value: ``[B, S, K, Hv]``.
      mask: the suffix part's mask (a ``Mask`` or boolean array), in positions counted from the start
        of the suffix: ``masks.causal()`` for continuations attending causally to themselves.
      suffix_lengths: ``[B]`` real suffix keys per row (right padding); default all ``S``.
      q_offset: suffix position of the first query (int or ``[B]``): ``S - T`` when the last ``T``
        suffix tokens are the queries (decoding).
      scale, softcap, implementation: as in ``dot_product_attention``, for both parts.
      return_lse: also return the merged logsumexp ``[B, N, T]`` float32.

    Returns:
      ``[B, T, N, Hv]`` in the query dtype (and the logsumexp when ``return_lse``). A row that sees no
      key outputs zeros.

    >>> import jax, jax.numpy as jnp
    >>> import attention_jax as aj
    >>> q = jax.random.normal(jax.random.key(0), (3, 2, 4, 8))       # 3 continuations, T = 2
    >>> prefix = jax.random.normal(jax.random.key(1), (1, 6, 2, 8))  # one shared prefix, P = 6
    >>> suffix = jax.random.normal(jax.random.key(2), (3, 2, 2, 8))
    >>> out = aj.functional.cascade_attention(q, prefix, prefix, suffix, suffix, mask=aj.masks.causal())
    >>> full = jnp.concatenate([jnp.broadcast_to(prefix, (3, 6, 2, 8)), suffix], axis=1)
    >>> expected = aj.dot_product_attention(q, full, full, mask=aj.masks.causal(), q_offset=6)
    >>> out.shape, bool(jnp.allclose(out, expected, atol=1e-5))
    ((3, 2, 4, 8), True)
    """
    for name, x in dict(query=query, prefix_key=prefix_key, prefix_value=prefix_value, suffix_key=suffix_key,
                        suffix_value=suffix_value).items():  # fmt: skip
        if jnp.ndim(x) != 4:
            raise ValueError(f"{name} must have 4 dimensions, got {name}.shape={jnp.shape(x)}.")
    b, t, n, h = query.shape
    if prefix_key.shape[0] != 1 or prefix_value.shape[0] != 1:
        raise ValueError(
            f"prefix_key and prefix_value must have shape [1, P, K, H] (one shared prefix), got "
            f"prefix_key.shape={prefix_key.shape}, prefix_value.shape={prefix_value.shape}."
        )
    if suffix_key.shape[0] != b or suffix_value.shape[0] != b:
        raise ValueError(
            f"suffix_key and suffix_value must have B={b} rows like query, got suffix_key.shape={suffix_key.shape}, "
            f"suffix_value.shape={suffix_value.shape}."
        )
    if prefix_key.shape[2:] != suffix_key.shape[2:] or prefix_value.shape[2:] != suffix_value.shape[2:]:
        raise ValueError(
            f"the prefix and suffix must share [K, H] and [K, Hv], got prefix_key.shape={prefix_key.shape}, "
            f"suffix_key.shape={suffix_key.shape}, prefix_value.shape={prefix_value.shape}, "
            f"suffix_value.shape={suffix_value.shape}."
        )
    if suffix_lengths is not None:
        if jnp.shape(suffix_lengths) != (b,):
            raise ValueError(f"suffix_lengths must have shape [B]=[{b}], got {jnp.shape(suffix_lengths)}.")
        padding = masks_lib.padding(kv_lengths=jnp.asarray(suffix_lengths, jnp.int32))
        mask = padding if mask is None else masks_lib.as_mask(mask) & padding
    options = dict(scale=scale, softcap=softcap, implementation=implementation, return_lse=True)

    # The prefix once for everyone: the B * T query rows as one batch row against [1, P, K, H].
    rows = query.reshape(1, b * t, n, h)  # [1, B*T, N, H]
    out_p, lse_p = dot_product_attention(rows, prefix_key, prefix_value, **options)  # [1, B*T, N, Hv], [1, N, B*T]
    out_p = out_p.reshape(b, t, n, out_p.shape[-1])  # [B, T, N, Hv]
    lse_p = jnp.swapaxes(lse_p.reshape(n, b, t), 0, 1)  # [B, N, T]

    out_s, lse_s = dot_product_attention(query, suffix_key, suffix_value, mask=mask, q_offset=q_offset, **options)
    out, lse = merge_attention(out_p, lse_p, out_s, lse_s)
    out = out.astype(query.dtype)
    return (out, lse) if return_lse else out
