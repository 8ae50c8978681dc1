"""``implementation="cudnn"``: forward to ``jax.nn.dot_product_attention(implementation="cudnn")``.

cuDNN's fused attention serves a subset of our calls: no mask, a causal mask, a sliding window
(alone or with causal), right padding by lengths, and an additive bias, on a CUDA GPU. Anything
else raises a ValueError that says which part of the call cuDNN cannot serve.
"""

from __future__ import annotations

import jax

from attention_jax import masks as masks_lib
from attention_jax.functional._checks import AttentionShape

Array = jax.Array


def _leaves_of_and(mask):
    if isinstance(mask, masks_lib._And):
        return _leaves_of_and(mask.a) + _leaves_of_and(mask.b)
    return [mask]


def _translate_mask(mask) -> dict:
    """Keyword arguments of ``jax.nn.dot_product_attention`` equivalent to ``mask``."""
    kwargs: dict = {}
    if mask is None:
        return kwargs
    if not isinstance(mask, masks_lib.Mask):
        return {"mask": mask}
    for leaf in _leaves_of_and(mask):
        if isinstance(leaf, masks_lib._Causal) and leaf.offset == 0:
            kwargs["is_causal"] = True
        elif isinstance(leaf, masks_lib._SlidingWindow) and "local_window_size" not in kwargs:
            kwargs["local_window_size"] = (leaf.left, leaf.right)
        elif isinstance(leaf, masks_lib._Padding) and "query_seq_lengths" not in kwargs:
            if leaf.q_lengths is not None:
                kwargs["query_seq_lengths"] = leaf.q_lengths
            if leaf.kv_lengths is not None:
                kwargs["key_value_seq_lengths"] = leaf.kv_lengths
        else:
            raise ValueError(
                f"implementation='cudnn' serves causal, sliding_window and padding masks (combined with &), "
                f"got {leaf!r}; use implementation=None, 'blockwise' or 'pallas'."
            )
    return kwargs


def attention(
    query,
    key,
    value,
    *,
    shape: AttentionShape,
    scale,
    mask=None,
    bias=None,
    score_mod=None,
    softcap=None,
    q_offset=0,
    kv_offset=0,
):
    """cuDNN flash attention. Returns ``(out, None)``: cuDNN does not expose the logsumexp."""
    if jax.default_backend() != "gpu":
        raise ValueError(
            f"implementation='cudnn' needs a CUDA GPU, but the default backend is {jax.default_backend()!r}."
        )
    if softcap is not None or score_mod is not None:
        raise ValueError("implementation='cudnn' supports neither softcap nor score_mod.")
    if isinstance(q_offset, int) and isinstance(kv_offset, int) and (q_offset, kv_offset) != (0, 0):
        raise ValueError(f"implementation='cudnn' needs q_offset == kv_offset == 0, got {q_offset=} and {kv_offset=}.")
    if shape.value_head_dim != shape.head_dim:
        raise ValueError(
            f"implementation='cudnn' needs equal query/key and value head dims, got H={shape.head_dim} "
            f"and Hv={shape.value_head_dim}."
        )
    kwargs = _translate_mask(mask)
    out = jax.nn.dot_product_attention(query, key, value, bias=bias, scale=scale, implementation="cudnn", **kwargs)
    return out, None
