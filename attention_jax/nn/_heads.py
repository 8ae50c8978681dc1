"""Projections shared by the attention variants: ``x [B, T, D]`` to heads and back, in MHA's layout.

Every variant that projects queries, keys and values holds them as ``query``, ``key``, ``value``
and ``out`` with :class:`~attention_jax.nn.MultiHeadAttention`'s kernel shapes (``[D, N, H]``,
``[D, K, H]``, ``[D, K, Hv]`` and ``[N, Hv, D_out]``), so a checkpoint's projections load into any
of them and a layer can be swapped without converting parameters.
"""

from __future__ import annotations

import jax
from flax import nnx

from attention_jax.nn._common import check_positive, default_bias_init, default_kernel_init

Array = jax.Array


def positive_int(name: str, value) -> int:
    """``value`` once ``_common.check_positive`` accepts it (the checks of the other modules)."""
    check_positive(**{name: value})
    return value


class ProjectedHeads(nnx.Module):
    """Base of the attention variants: builds ``query``/``key``/``value``/``out`` and splits into heads.

    Subclasses call :meth:`init_projections` in ``__init__``. ``head_dim`` defaults to
    ``in_features // num_heads``; ``num_kv_heads`` to ``num_heads`` (K must divide N). With
    ``query_key=False`` only values and the output are projected (content-independent attention).
    """

    def init_projections(
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
        dtype=None,
        param_dtype=None,
        rngs: nnx.Rngs,
    ) -> None:
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
        self.in_features, self.out_features = in_features, out_features
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        dense = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype or "float32", kernel_init=default_kernel_init,
            bias_init=default_bias_init, rngs=rngs,
        )  # fmt: skip
        self.query = nnx.data(nnx.LinearGeneral(in_features, (num_heads, head_dim), **dense) if query_key else None)
        self.key = nnx.data(nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **dense) if query_key else None)
        self.value = nnx.LinearGeneral(in_features, (num_kv_heads, value_head_dim), **dense)
        self.out = nnx.LinearGeneral((num_heads, value_head_dim), out_features, axis=(-2, -1), **dense)

    def queries(self, x: Array) -> Array:
        return self.query(x)  # [B, T, N, H]

    def keys(self, x: Array) -> Array:
        return self.key(x)  # [B, S, K, H]

    def values(self, x: Array) -> Array:
        return self.value(x)  # [B, S, K, Hv]

    def project(self, x: Array) -> tuple[Array, Array, Array]:
        """``(q, k, v)`` of self-attention over ``x [B, T, D]``."""
        return self.queries(x), self.keys(x), self.values(x)

    def merge(self, y: Array) -> Array:
        """``[B, T, N, Hv] -> [B, T, out_features]``."""
        return self.out(y)

