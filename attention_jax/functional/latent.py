"""Multi-head latent attention (DeepSeek-V2): keys and values decompressed from a shared latent.

Each token stores a latent ``c [L]`` (``L = kv_lora_rank``) and one RoPE key ``k_rope [R]`` shared
by all heads. Head ``n`` reads ``k_n = [c W_UK_n, k_rope]`` and ``v_n = c W_UV_n``. Because
``q_nope . (c W_UK_n) = (W_UK_n q_nope) . c`` and ``sum_s p_s c_s W_UV_n = (sum_s p_s c_s) W_UV_n``,
the up-projections can be absorbed into the query and the output: attention then runs directly on
the latent as multi-query attention (one key/value head of width ``L + R`` / ``L``), which is what
makes decoding from a latent-only cache cheap.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from attention_jax import masks as masks_lib
from attention_jax.functional.multi_head import multi_head_attention

Array = jax.Array


def latent_attention(
    q_nope: Array,
    q_rope: Array,
    latent: Array,
    k_rope: Array,
    w_uk: Array,
    w_uv: Array,
    *,
    absorb: bool = False,
    mask: masks_lib.Mask | Array | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    score_mod: Any = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    q_offset: int | Array = 0,
    kv_offset: int | Array = 0,
    kv_valid: Array | None = None,
    implementation: str | None = None,
    precision=jax.lax.Precision.HIGHEST,
    return_weights: bool = False,
):
    """MLA attention from the latent; ``absorb`` picks the absorbed (decode) or the naive path.

    Args:
      q_nope: ``[B, T, N, Hn]`` the query channels without position.
      q_rope: ``[B, T, N, R]`` the query channels, RoPE applied.
      latent: ``[B, S, L]`` the normalised compressed keys/values.
      k_rope: ``[B, S, R]`` the shared key channels, RoPE applied.
      w_uk: ``[L, N, Hn]`` key up-projection; ``w_uv``: ``[L, N, Hv]`` value up-projection.
      absorb: fold ``w_uk`` into the query and ``w_uv`` into the output and attend over the latent
        (MQA with head dim ``L + R``); otherwise decompress ``k, v [B, S, N, .]`` (MHA).
      scale: defaults to ``1 / sqrt(Hn + R)``, the head dim of the naive path, in both paths.
      mask, softcap, score_mod, dropout_rate, dropout_rng, q_offset, kv_offset, kv_valid, implementation,
        return_weights: as in
        :func:`attention_jax.functional.multi_head.multi_head_attention`.
      precision: of the up-projection einsums.

    Returns:
      ``[B, T, N, Hv]`` (and the weights ``[B, N, T, S]`` with ``return_weights``).

    >>> import numpy as np, jax.numpy as jnp
    >>> r = np.random.default_rng(0)
    >>> qn, qr = jnp.asarray(r.normal(size=(1, 3, 2, 4))), jnp.asarray(r.normal(size=(1, 3, 2, 2)))
    >>> c, kr = jnp.asarray(r.normal(size=(1, 5, 8))), jnp.asarray(r.normal(size=(1, 5, 2)))
    >>> wk, wv = jnp.asarray(r.normal(size=(8, 2, 4))), jnp.asarray(r.normal(size=(8, 2, 4)))
    >>> naive = latent_attention(qn, qr, c, kr, wk, wv)
    >>> absorbed = latent_attention(qn, qr, c, kr, wk, wv, absorb=True)
    >>> bool(jnp.allclose(naive, absorbed, atol=1e-4)), naive.shape
    (True, (1, 3, 2, 4))
    """
    _check_shapes(q_nope, q_rope, latent, k_rope, w_uk, w_uv)
    if scale is None:
        scale = 1.0 / float(q_nope.shape[-1] + q_rope.shape[-1]) ** 0.5
    options = dict(
        mask=mask, scale=scale, softcap=softcap, score_mod=score_mod, dropout_rate=dropout_rate,
        dropout_rng=dropout_rng, q_offset=q_offset, kv_offset=kv_offset, kv_valid=kv_valid,
        implementation=implementation, return_weights=return_weights,
    )  # fmt: skip
    dtype = q_nope.dtype
    if absorb:
        q_latent = jnp.einsum("BTNH,LNH->BTNL", q_nope, w_uk.astype(dtype), precision=precision)
        query = jnp.concatenate([q_latent, q_rope], axis=-1)  # [B, T, N, L + R]
        key = jnp.concatenate([latent, k_rope], axis=-1)[:, :, None, :]  # [B, S, 1, L + R]
        out = multi_head_attention(query, key, latent[:, :, None, :], **options)  # [B, T, N, L]
        out, weights = out if return_weights else (out, None)
        out = jnp.einsum("BTNL,LNV->BTNV", out, w_uv.astype(dtype), precision=precision)
    else:
        k_nope = jnp.einsum("BSL,LNH->BSNH", latent, w_uk.astype(dtype), precision=precision)
        value = latent_values(latent, w_uv, precision)
        k_shared = jnp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], k_rope.shape[-1]))
        query = jnp.concatenate([q_nope, q_rope], axis=-1)  # [B, T, N, Hn + R]
        key = jnp.concatenate([k_nope, k_shared], axis=-1)  # [B, S, N, Hn + R]
        out = multi_head_attention(query, key, value, **options)
        out, weights = out if return_weights else (out, None)
    return (out, weights) if return_weights else out


def latent_values(latent: Array, w_uv: Array, precision=jax.lax.Precision.HIGHEST) -> Array:
    """The decompressed values ``[B, S, N, Hv] = latent [B, S, L] @ w_uv [L, N, Hv]``."""
    return jnp.einsum("BSL,LNV->BSNV", latent, w_uv.astype(latent.dtype), precision=precision)


def _check_shapes(q_nope, q_rope, latent, k_rope, w_uk, w_uv) -> None:
    for name, x, rank, letters in (
        ("q_nope", q_nope, 4, "[B, T, N, Hn]"),
        ("q_rope", q_rope, 4, "[B, T, N, R]"),
        ("latent", latent, 3, "[B, S, L]"),
        ("k_rope", k_rope, 3, "[B, S, R]"),
        ("w_uk", w_uk, 3, "[L, N, Hn]"),
        ("w_uv", w_uv, 3, "[L, N, Hv]"),
    ):
        if jnp.ndim(x) != rank:
            raise ValueError(f"{name} must have shape {letters}, got {name}.shape={jnp.shape(x)}.")
    b, t, n, hn = q_nope.shape
    s, lr = latent.shape[1:]
    r = k_rope.shape[-1]
    checks = (
        ("q_rope", q_rope.shape, (b, t, n, r)),
        ("k_rope", k_rope.shape, (b, s, r)),
        ("w_uk", w_uk.shape, (lr, n, hn)),
        ("w_uv", w_uv.shape[:2], (lr, n)),
        ("latent", latent.shape[:1], (b,)),
    )
    for name, got, want in checks:
        if tuple(got) != want:
            raise ValueError(f"{name} does not match the other inputs: expected {list(want)}, got {list(got)}.")
