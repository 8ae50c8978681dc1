"""The projections every multi-head variant of issue 6 shares: ``x [B, T, D]`` to heads and back."""

from __future__ import annotations

import jax
from flax import nnx

from attention_jax.nn._common import check_positive

Array = jax.Array


def positive_int(name: str, value) -> int:
    """``value`` once ``_common.check_positive`` accepts it (the checks of the other modules)."""
    check_positive(**{name: value})
    return value


class HeadProjections(nnx.Module):
    """Query/key/value projections to ``[B, T, N, H]`` / ``[B, S, K, H]`` / ``[B, S, K, Hv]`` and the output one.

    ``head_dim`` defaults to ``in_features // num_heads``; ``num_kv_heads`` to ``num_heads`` (K must divide N).
    With ``query_key=False`` only values and the output are projected (content-independent attention).
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        value_head_dim: int | None = None,
        out_features: int | None = None,
        query_key: bool = True,
        use_bias: bool = False,
        rngs: nnx.Rngs,
    ):
        positive_int("in_features", in_features)
        positive_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else positive_int("num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads, got {num_kv_heads=} and {num_heads=}.")
        if head_dim is None:
            if in_features % num_heads:
                raise ValueError(
                    f"num_heads must divide in_features (or give head_dim), got {num_heads=} and {in_features=}."
                )
            head_dim = in_features // num_heads
        head_dim = positive_int("head_dim", head_dim)
        value_head_dim = head_dim if value_head_dim is None else positive_int("value_head_dim", value_head_dim)
        out_features = in_features if out_features is None else positive_int("out_features", out_features)
        self.in_features = in_features
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        linear = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, rngs=rngs)
        self.query = nnx.data(linear(in_features, num_heads * head_dim) if query_key else None)
        self.key = nnx.data(linear(in_features, num_kv_heads * head_dim) if query_key else None)
        self.value = linear(in_features, num_kv_heads * value_head_dim)
        self.out = linear(num_heads * value_head_dim, out_features)

    def split(self, y: Array, heads: int) -> Array:
        """``[B, T, heads * dim] -> [B, T, heads, dim]``."""
        return y.reshape(*y.shape[:-1], heads, y.shape[-1] // heads)

    def queries(self, x: Array) -> Array:
        return self.split(self.query(x), self.num_heads)  # [B, T, N, H]

    def keys(self, x: Array) -> Array:
        return self.split(self.key(x), self.num_kv_heads)  # [B, S, K, H]

    def values(self, x: Array) -> Array:
        return self.split(self.value(x), self.num_kv_heads)  # [B, S, K, Hv]

    def __call__(self, x: Array) -> tuple[Array, Array, Array]:
        """``(q, k, v)`` of self-attention over ``x [B, T, D]``."""
        return self.queries(x), self.keys(x), self.values(x)

    def merge(self, y: Array) -> Array:
        """``[B, T, N, Hv] -> [B, T, out_features]``."""
        return self.out(y.reshape(*y.shape[:-2], -1))
