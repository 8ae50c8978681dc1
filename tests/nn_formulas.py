"""The attention modules written out as formulas, for tests.

Each function takes the array module ``xp``: ``numpy`` gives float64 oracle values, ``jax.numpy``
a differentiable twin for gradient checks. Nothing here calls attention_jax, so the modules are
checked against independent math. Parameters are read from a module with :func:`params`.
"""

from __future__ import annotations

import numpy as np
from flax import nnx


def params(module, xp=np):
    """The module's parameters as a nested dict of float64 numpy (or jnp) arrays."""
    pure = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    to = (lambda a: np.asarray(a, np.float64)) if xp is np else (lambda a: a)
    return _map(pure, to)


def _map(tree, fn):
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def linear(x, p, xp=np):
    """``x @ kernel + bias`` over the leading kernel axes matching x's last axes (LinearGeneral)."""
    kernel = p["kernel"]
    n_in = 1 if kernel.ndim == 2 or x.ndim == 3 else 2
    if n_in == 1:
        y = xp.tensordot(x, kernel, axes=([x.ndim - 1], [0]))
    else:
        y = xp.tensordot(x, kernel, axes=([x.ndim - 2, x.ndim - 1], [0, 1]))
    return y + p["bias"] if "bias" in p else y


def rms_norm(x, p, eps, xp=np):
    return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps) * p["scale"]


def rope(x, positions, theta=10_000.0, xp=np):
    """Rotate-half RoPE of all channels of ``x [B, T, N, H]`` (or ``[B, T, H]``) at ``positions [T]`` or ``[B, T]``."""
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2) / h)
    positions = xp.asarray(positions)
    angles = positions[..., None] * inv  # [T, H/2] or [B, T, H/2]
    if positions.ndim == 1:
        angles = angles[None]
    if x.ndim == 4:
        angles = angles[:, :, None, :]
    cos, sin = xp.cos(angles), xp.sin(angles)
    x1, x2 = x[..., : h // 2], x[..., h // 2 :]
    return xp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def attention(q, k, v, *, mask=None, scale=None, softcap=None, score_fn=None, sinks=None, xp=np):
    """Dense softmax attention with GQA; ``mask [T, S]`` or ``[B, T, S]`` (True: visible).

    ``score_fn(scores [B, N, T, S], i [T, 1], j [1, S]) -> scores``; ``sinks [N]`` adds one extra
    logit per head with a zero value. Returns ``(out [B, T, N, Hv], weights [B, N, T, S])``;
    rows that see nothing give zeros.
    """
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    scale = 1.0 / np.sqrt(h) if scale is None else scale
    k_rep = xp.repeat(k, g, axis=2)  # head n reads kv head n // g
    v_rep = xp.repeat(v, g, axis=2)
    scores = xp.einsum("btnh,bsnh->bnts", q, k_rep) * scale
    i, j = np.arange(t)[:, None], np.arange(s)[None, :]
    if score_fn is not None:
        scores = score_fn(scores, i, j)
    if softcap is not None:
        scores = softcap * xp.tanh(scores / softcap)
    visible = np.ones((1, 1, t, s), bool) if mask is None else np.asarray(mask)
    visible = visible[:, None] if visible.ndim == 3 else visible[None, None] if visible.ndim == 2 else visible
    logits = xp.where(visible, scores, -np.inf)
    if sinks is not None:
        extra = xp.broadcast_to(xp.reshape(sinks, (1, n, 1, 1)), (b, n, t, 1))
        logits = xp.concatenate([logits, extra], axis=-1)
    row_max = xp.max(logits, axis=-1, keepdims=True)
    row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
    e = xp.exp(logits - row_max)
    denom = xp.sum(e, axis=-1, keepdims=True)
    weights = e / xp.where(denom > 0, denom, 1.0)
    weights = weights[..., :s]
    out = xp.einsum("bnts,bsnh->btnh", weights, v_rep)
    return out, weights


def causal(t, s=None, offset=0):
    s = t if s is None else s
    return np.arange(s)[None, :] <= np.arange(t)[:, None] + offset


def window(t, left):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return (j <= i) & (j >= i - left)


def multi_head(p, x, *, num_heads, num_kv_heads, mask=None, rope_theta=None, qk_norm_eps=None, context=None,
               score_fn=None, softcap=None, sinks=None, xp=np):  # fmt: skip
    """``MultiHeadAttention`` as a formula."""
    ctx = x if context is None else context
    q, k, v = linear(x, p["query"], xp), linear(ctx, p["key"], xp), linear(ctx, p["value"], xp)
    if qk_norm_eps is not None:
        q, k = rms_norm(q, p["query_norm"], qk_norm_eps, xp), rms_norm(k, p["key_norm"], qk_norm_eps, xp)
    if rope_theta is not None:
        q, k = rope(q, np.arange(x.shape[1]), rope_theta, xp), rope(k, np.arange(ctx.shape[1]), rope_theta, xp)
    out, weights = attention(q, k, v, mask=mask, score_fn=score_fn, softcap=softcap, sinks=sinks, xp=xp)
    return linear(out, p["out"], xp), weights


def latent(p, x, *, num_heads, kv_lora_rank, nope, rope_dim, mask=None, q_lora=False, eps=1e-6, xp=np):
    """``MultiHeadLatentAttention`` as a formula: decompress keys and values, then attend."""
    t = x.shape[1]
    q_in = rms_norm(linear(x, p["q_down"], xp), p["q_norm"], eps, xp) if q_lora else x
    q = linear(q_in, p["q_up"], xp)  # [B, T, N, nope + rope]
    compressed = linear(x, p["kv_down"], xp)
    c = rms_norm(compressed[..., :kv_lora_rank], p["kv_norm"], eps, xp)  # [B, T, L]
    k_rope = rope(compressed[..., kv_lora_rank:], np.arange(t), xp=xp)  # [B, T, R]
    q = xp.concatenate([q[..., :nope], rope(q[..., nope:], np.arange(t), xp=xp)], axis=-1)
    k_nope = xp.einsum("btl,lnh->btnh", c, p["w_uk"])
    v = xp.einsum("btl,lnh->btnh", c, p["w_uv"])
    k = xp.concatenate([k_nope, xp.broadcast_to(k_rope[:, :, None, :], (*k_nope.shape[:3], rope_dim))], axis=-1)
    out, weights = attention(q, k, v, mask=mask, xp=xp)
    return linear(out, p["out"], xp), weights


def differential(p, x, *, lambda_init, mask=None, rope_theta=None, eps=1e-5, xp=np):
    """``DifferentialAttention`` as a formula, following the paper's Algorithm 1."""
    q, k, v = linear(x, p["query"], xp), linear(x, p["key"], xp), linear(x, p["value"], xp)  # [B,T,N,2,H]
    parts = [q[..., 0, :], q[..., 1, :], k[..., 0, :], k[..., 1, :]]
    if rope_theta is not None:
        parts = [rope(a, np.arange(x.shape[1]), rope_theta, xp) for a in parts]
    q1, q2, k1, k2 = parts
    lam = (
        xp.exp(xp.sum(p["lambda_q1"] * p["lambda_k1"])) - xp.exp(xp.sum(p["lambda_q2"] * p["lambda_k2"])) + lambda_init
    )
    h = q1.shape[-1]
    _, w1 = attention(q1, k1, v, mask=mask, scale=1 / np.sqrt(h), xp=xp)
    _, w2 = attention(q2, k2, v, mask=mask, scale=1 / np.sqrt(h), xp=xp)
    weights = w1 - lam * w2
    g = q1.shape[2] // v.shape[2]
    out = xp.einsum("bnts,bsnh->btnh", weights, xp.repeat(v, g, axis=2))
    out = rms_norm(out, p["head_norm"], eps, xp) * (1 - lambda_init)
    return linear(out, p["out"], xp), weights
