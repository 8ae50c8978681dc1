"""Attention rollout and attention flow (Abnar & Zuidema, 2020): how much each input token reaches each output.

Both treat a stack of ``L`` self-attention layers as a graph over ``T`` tokens per layer. The residual
connection is modelled by mixing each layer's head-fused attention with the identity,
``A_hat = normalise_rows(A + I)`` (the paper's ``0.5 A + 0.5 I``, renormalised), so a token keeps
what it had. Rollout multiplies the layers, ``R = A_hat_L ... A_hat_1``; flow solves a max-flow problem
on the same graph, which is less sensitive to a single dominant path but costs far more.

Inputs are the per-layer weights in order from the first layer to the last: a sequence (or the values
of the mapping :func:`attention_jax.explain.capture` returns) of ``[B, N, T, T]`` arrays, or one
``[L, B, N, T, T]`` array.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

HEAD_FUSIONS = ("mean", "max", "min")

__all__ = ["HEAD_FUSIONS", "fuse_heads", "with_residual", "attention_rollout", "attention_flow"]


def layer_list(weights, name: str = "weights") -> list[Array]:
    """Per-layer ``[B, N, T, S]`` arrays from a sequence, a mapping (its values, in order) or an ``[L, ...]`` array."""
    if isinstance(weights, Mapping):
        weights = list(weights.values())
    elif hasattr(weights, "ndim"):
        if weights.ndim != 5:
            raise ValueError(f"{name} as one array must be [L, B, N, T, S], got {name}.shape={weights.shape}.")
        weights = list(weights)
    elif isinstance(weights, Sequence):
        weights = list(weights)
    else:
        raise TypeError(f"{name} must be a sequence, a mapping or an [L, B, N, T, S] array, got {type(weights)}.")
    if not weights:
        raise ValueError(f"{name} is empty: need at least one layer.")
    first = jnp.shape(weights[0])
    for i, w in enumerate(weights):
        if jnp.ndim(w) != 4 or jnp.shape(w) != first:
            raise ValueError(f"every layer of {name} must be [B, N, T, S] of one shape, got {first} and layer {i}: "
                             f"{jnp.shape(w)}.")
    return [jnp.asarray(w, jnp.float32) for w in weights]


def _check_square(w: Array, name: str) -> None:
    if w.shape[-1] != w.shape[-2]:
        raise ValueError(f"{name} must be self-attention weights with T == S, got [B, N, T, S]={w.shape}.")


def fuse_heads(weights: Array, head_fusion: str = "mean") -> Array:
    """``[B, N, T, S] -> [B, T, S]`` by the mean, max or min over heads."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion=!r}.")
    if jnp.ndim(weights) != 4:
        raise ValueError(f"weights must be [B, N, T, S], got weights.shape={jnp.shape(weights)}.")
    return getattr(jnp, head_fusion)(jnp.asarray(weights, jnp.float32), axis=1)


def _discard_lowest(a: Array, discard_ratio: float) -> Array:
    """Zero the ``floor(discard_ratio * T * S)`` smallest entries of each ``[T, S]`` map of ``a [B, T, S]``."""
    b, t, s = a.shape
    count = int(discard_ratio * t * s)
    if count == 0:
        return a
    flat = a.reshape(b, t * s)
    rank = jnp.argsort(jnp.argsort(flat, axis=-1, stable=True), axis=-1)  # 0 = smallest
    return jnp.where(rank < count, 0.0, flat).reshape(b, t, s)


def with_residual(fused: Array, discard_ratio: float = 0.0) -> Array:
    """``A_hat = normalise_rows(A' + I)`` for fused ``A [B, T, T]``; ``A'`` has its lowest entries discarded."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio must lie in [0, 1), got {discard_ratio=!r}.")
    a = _discard_lowest(fused, discard_ratio) + jnp.eye(fused.shape[-1], dtype=fused.dtype)
    return a / jnp.sum(a, axis=-1, keepdims=True)


def attention_rollout(weights, *, head_fusion: str = "mean", discard_ratio: float = 0.0) -> Array:
    """Attention rollout ``R = A_hat_L ... A_hat_1``, ``[B, T, T]`` float32.

    Row ``t`` of ``R`` says how much output token ``t`` (after the last layer) draws from each input
    token; each row sums to one. For a ViT, ``R[:, 0, 1:]`` is the class token's map over the patches.

    Args:
      weights: per-layer self-attention weights ``[B, N, T, T]``, first layer first (see module doc).
      head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"`` over heads.
      discard_ratio: fraction of each fused map's entries (the smallest) set to zero before the
        residual is added, which sharpens the map (0 keeps everything).

    >>> import jax.numpy as jnp
    >>> uniform = jnp.full((1, 2, 2, 2), 0.5)       # [B, N, T, T]: every token attends equally
    >>> attention_rollout([uniform]).tolist()       # (A + I) / 2 per row
    [[[0.75, 0.25], [0.25, 0.75]]]
    """
    layers = layer_list(weights)
    _check_square(layers[0], "weights")
    rollout = None
    for w in layers:
        a = with_residual(fuse_heads(w, head_fusion), discard_ratio)  # [B, T, T]
        rollout = a if rollout is None else jnp.einsum("BTU,BUS->BTS", a, rollout, precision="highest")
    return rollout


def attention_flow(
    weights,
    *,
    query_index: int | None = 0,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    resolution: float = 1e-6,
) -> np.ndarray:
    """Attention flow: the max flow from each input token to an output token, float64 numpy.

    The graph has ``L + 1`` layers of ``T`` nodes; node ``s`` of layer ``l`` feeds node ``t`` of layer
    ``l + 1`` with capacity ``A_hat_l[t, s]`` (as in :func:`attention_rollout`). The flow from input
    ``s`` to output ``query_index`` is the value of a maximum flow between them.

    Cost: one max-flow problem (scipy's Dinic, on the host, not jit-able) per input token and per
    example, each on a graph of ``L * T * T`` edges; with ``query_index=None`` (every output token)
    ``T`` times that. Measured for one query token and one image on a busy 2-core CPU: ``T = 17``,
    ``L = 4`` (the ViT on 8x8 digits) about 20 ms; ``T = 197``, ``L = 12`` (ViT-B/16 at 224
    pixels) about 15 seconds. Use rollout beyond that.

    Args:
      weights: per-layer self-attention weights ``[B, N, T, T]``, first layer first.
      query_index: the output token whose sources are traced (0: a class token); None for all.
      head_fusion, discard_ratio: as for :func:`attention_rollout`.
      resolution: capacities are rounded to multiples of this (the solver works on integers).

    Returns:
      ``[B, T]`` flows into ``query_index`` from every input token, or ``[B, T, T]`` (output, input)
      when ``query_index`` is None.

    >>> import jax.numpy as jnp
    >>> uniform = jnp.full((1, 1, 2, 2), 0.5)
    >>> attention_flow([uniform], query_index=0).round(6).tolist()   # one layer: flow = A_hat[0]
    [[0.75, 0.25]]
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    layers = layer_list(weights)
    _check_square(layers[0], "weights")
    if not resolution > 0:
        raise ValueError(f"resolution must be positive, got {resolution=!r}.")
    num_layers = len(layers)
    b, _, t, _ = layers[0].shape
    if query_index is not None and not -t <= query_index < t:
        raise ValueError(f"query_index must index one of T={t} tokens, got {query_index=}.")
    a_hat = np.stack([np.asarray(with_residual(fuse_heads(w, head_fusion), discard_ratio)) for w in layers], 1)
    capacities = np.rint(a_hat / resolution).astype(np.int64)  # [B, L, T, T]
    if capacities.max(initial=0) * t > np.iinfo(np.int32).max:
        raise ValueError(f"{resolution=} is too fine for int32 capacities with T={t}; use a coarser one.")
    targets = range(t) if query_index is None else [query_index % t]
    # Edge (layer l, token s) -> (layer l + 1, token t): node ids l * T + s and (l + 1) * T + t.
    layer_idx, t_idx, s_idx = np.meshgrid(np.arange(num_layers), np.arange(t), np.arange(t), indexing="ij")
    rows, cols = (layer_idx * t + s_idx).ravel(), ((layer_idx + 1) * t + t_idx).ravel()
    flows = np.zeros((b, len(targets), t))
    for batch in range(b):
        data = capacities[batch].ravel().astype(np.int32)
        keep = data > 0
        nodes = (num_layers + 1) * t
        graph = csr_matrix((data[keep], (rows[keep], cols[keep])), shape=(nodes, nodes))
        for j, target in enumerate(targets):
            sink = num_layers * t + target
            for source in range(t):
                flows[batch, j, source] = maximum_flow(graph, source, sink, method="dinic").flow_value
    flows *= resolution
    return flows[:, 0] if query_index is not None else flows
