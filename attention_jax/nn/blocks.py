"""``TransformerBlock``: pre-norm attention (+ cross-attention) + feed-forward, any attention plugged in."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from attention_jax import masks as masks_lib
from attention_jax.nn.multi_head import MultiHeadAttention

Array = jax.Array

# An attention factory builds one attention module: ``factory(features, rngs=rngs)``, plus
# ``depth=`` (the 1-based layer index) when it accepts that keyword, as DifferentialAttention does.
# ``functools.partial(aj.nn.MultiHeadAttention, num_heads=8, rope=aj.positional.RoPE())`` is one.
AttentionFactory = Callable[..., nnx.Module]

class OffsetRMSNorm(nnx.Module):
    """RMSNorm with the scale stored as an offset from one, ``x / rms(x) * (1 + w)`` (Gemma's layout).

    ``w`` starts at zero, so a fresh layer is the identity scale; checkpoints that store ``w`` load as is.
    """

    def __init__(self, num_features: int, *, epsilon: float = 1e-6, dtype=None, param_dtype=jnp.float32, rngs=None):
        self.scale = nnx.Param(jnp.zeros((num_features,), param_dtype))
        self.epsilon, self.dtype = epsilon, dtype

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + self.scale[...].astype(jnp.float32))).astype(self.dtype or x.dtype)


NORMS = {"rms": nnx.RMSNorm, "layer": nnx.LayerNorm, "rms_offset": OffsetRMSNorm}
NORM_POSITIONS = ("pre", "post", "sandwich")
# "gelu"/"geglu" use the tanh approximation (GPT-2, Gemma); "gelu_exact"/"geglu_exact" the erf form (BERT, ViT).
ACTIVATIONS = {
    "swiglu": jax.nn.silu,
    "geglu": jax.nn.gelu,
    "geglu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "gelu": jax.nn.gelu,
    "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """The options of a pre-norm block, written once and shared by :class:`TransformerBlock` and the stacks.

    Attributes:
      num_heads: heads of the default attention (``MultiHeadAttention``).
      mlp: ``"swiglu"`` (default), ``"geglu"``, ``"gelu"`` or ``"relu"``; ``"gelu"`` and ``"geglu"``
        use the tanh approximation, ``"gelu_exact"`` and ``"geglu_exact"`` the erf form.
      mlp_features: hidden width, default ``4 * features`` (``8/3`` of it, rounded up, for gated kinds).
      mlp_bias: biases in the feed-forward projections (GPT-2, BERT, ViT).
      feed_forward: a factory ``factory(features, rngs=rngs)`` building the feed-forward module
        ``[B, T, D] -> [B, T, D]`` in place of :class:`FeedForward` (e.g. gpt-oss's mixture of
        experts); ``mlp``, ``mlp_features`` and ``mlp_bias`` then go unused. None: ``FeedForward``.
      norm: ``"rms"``, ``"layer"`` or ``"rms_offset"`` (``(1 + w)`` scale, Gemma); ``norm_epsilon``
        its epsilon.
      norm_position: ``"pre"`` (``x + f(norm(x))``, default), ``"post"`` (``norm(x + f(x))``, BERT)
        or ``"sandwich"`` (``x + norm(f(norm(x)))``, Gemma 2/3), for attention and feed-forward alike.
      dropout_rate: dropout on each residual branch when not ``deterministic``.
      deterministic: the default of the call (``model.eval()`` / ``model.train()`` set it).
      remat: rematerialise each block in the backward pass (``nnx.remat``; stacks only).
      dtype, param_dtype: computation and parameter dtypes.

    The stacks take ``config=`` and/or the same names as keywords, which override it:

    >>> from flax import nnx
    >>> import attention_jax as aj
    >>> small = aj.nn.BlockConfig(num_heads=2, mlp="gelu")
    >>> lm = aj.nn.TransformerLM(32, 16, 2, config=small, norm="layer", rngs=nnx.Rngs(0))
    >>> lm.config.mlp, lm.config.norm
    ('gelu', 'layer')
    """

    num_heads: int = 4
    mlp: str = "swiglu"
    mlp_features: int | None = None
    mlp_bias: bool = False
    feed_forward: Callable[..., nnx.Module] | None = None
    norm: str = "rms"
    norm_epsilon: float = 1e-6
    norm_position: str = "pre"
    dropout_rate: float = 0.0
    deterministic: bool = False
    remat: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        if self.mlp not in ACTIVATIONS:
            raise ValueError(f"mlp must be one of {tuple(ACTIVATIONS)}, got mlp={self.mlp!r}.")
        if self.feed_forward is not None and not callable(self.feed_forward):
            raise TypeError(f"feed_forward must be a factory called as factory(features, rngs=rngs), "
                            f"got feed_forward={self.feed_forward!r}.")  # fmt: skip
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {tuple(NORMS)}, got norm={self.norm!r}.")
        if self.norm_position not in NORM_POSITIONS:
            raise ValueError(
                f"norm_position must be one of {NORM_POSITIONS}, got norm_position={self.norm_position!r}."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must lie in [0, 1), got dropout_rate={self.dropout_rate!r}.")

    def hidden_features(self, features: int) -> int:
        if self.mlp_features is not None:
            return self.mlp_features
        return 4 * features if "glu" not in self.mlp else -(-8 * features // 3)

    def default_attention(self, **options) -> AttentionFactory:
        return functools.partial(
            MultiHeadAttention, num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype, **options
        )


def block_config(config: BlockConfig | None, options: dict[str, Any]) -> BlockConfig:
    """``config`` (default ``BlockConfig()``) with ``options`` (keyword overrides) applied; unknown names raise."""
    config = BlockConfig() if config is None else config
    if not isinstance(config, BlockConfig):
        raise TypeError(f"config must be an attention_jax.nn.BlockConfig, got {type(config).__name__}.")
    known = {f.name for f in dataclasses.fields(BlockConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {unknown}; the block options are {sorted(known)}.")
    return dataclasses.replace(config, **options) if options else config



def build_attention(factory: AttentionFactory, features: int, depth: int, rngs: nnx.Rngs) -> nnx.Module:
    """Call ``factory(features, rngs=rngs)``, adding ``depth=`` if the factory takes it."""
    if not callable(factory):
        raise TypeError(f"attention must be a factory called as factory(features, rngs=rngs), got {factory!r}.")
    return factory(features, rngs=rngs, **({"depth": depth} if _accepts_depth(factory) else {}))


def _accepts_depth(factory) -> bool:
    fixed = {}
    while isinstance(factory, functools.partial):
        fixed.update(factory.keywords)
        factory = factory.func
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return False
    return "depth" in parameters and "depth" not in fixed


def make_norm(kind: str, features: int, *, epsilon: float, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Module:
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got norm={kind!r}.")
    return NORMS[kind](features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class FeedForward(nnx.Module):
    """``down(act(gate(x)) * up(x))`` for gated kinds (``"swiglu"``, ``"geglu"``), else ``down(act(up(x)))``.

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> FeedForward(8, 32, kind="swiglu", rngs=nnx.Rngs(0))(jnp.ones((1, 2, 8))).shape
    (1, 2, 8)
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        kind: str = "swiglu",
        use_bias: bool = False,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if kind not in ACTIVATIONS:
            raise ValueError(f"kind must be one of {tuple(ACTIVATIONS)}, got {kind=!r}.")
        self.kind = kind
        dense = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = nnx.Linear(features, hidden_features, **dense)
        self.gate = nnx.Linear(features, hidden_features, **dense) if "glu" in kind else nnx.data(None)
        self.down = nnx.Linear(hidden_features, features, **dense)

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.kind]
        if self.gate is None:
            return self.down(act(self.up(x)))
        return self.down(act(self.gate(x)) * self.up(x))


class TransformerBlock(nnx.Module):
    """Transformer block: self-attention [+ cross-attention to a ``context``] + feed-forward, with residuals.

    Pre-norm by default: ``x + attn(norm(x))`` [``+ cross(norm(.), context)``] ``+ ffn(norm(.))``;
    ``config.norm_position`` selects post-norm (``norm(x + f(x))``) or sandwich norms
    (``x + norm(f(norm(x)))``) instead.

    Args:
      features: D.
      attention: an attention factory (see ``AttentionFactory``) building any module that follows
        :class:`attention_jax.nn.AttentionLayer`; default ``MultiHeadAttention`` with
        ``config.num_heads`` heads.
      cross_attention: a factory for cross-attention to a ``context`` (decoder blocks), or None.
      config: a :class:`BlockConfig`; keyword ``options`` (its field names) override it.
      depth: 1-based index of the block, given to attention factories that take it.
      rngs: as usual.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> block = TransformerBlock(16, num_heads=2, rngs=nnx.Rngs(0))
    >>> block(jnp.ones((1, 3, 16))).shape
    (1, 3, 16)
    """

    def __init__(
        self,
        features: int,
        *,
        attention: AttentionFactory | None = None,
        cross_attention: AttentionFactory | None = None,
        config: BlockConfig | None = None,
        depth: int = 1,
        rngs: nnx.Rngs,
        **options: Any,
    ):
        config = block_config(config, options)
        attention = config.default_attention() if attention is None else attention
        norm_args = dict(epsilon=config.norm_epsilon, dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
        self.features, self.depth, self.config = features, depth, config
        self.attention_norm = make_norm(config.norm, features, **norm_args)
        self.attention = build_attention(attention, features, depth, rngs)
        if cross_attention is not None:
            self.cross_norm = make_norm(config.norm, features, **norm_args)
            self.cross_attention = build_attention(cross_attention, features, depth, rngs)
        else:
            self.cross_norm, self.cross_attention = nnx.data(None), nnx.data(None)
        self.mlp_norm = make_norm(config.norm, features, **norm_args)
        if config.feed_forward is not None:
            self.mlp = config.feed_forward(features, rngs=rngs)
        else:
            self.mlp = FeedForward(
                features, config.hidden_features(features), kind=config.mlp, use_bias=config.mlp_bias,
                dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
            )  # fmt: skip
        sandwich = config.norm_position == "sandwich"  # the outputs of each branch are normalised too
        self.post_attention_norm = make_norm(config.norm, features, **norm_args) if sandwich else nnx.data(None)
        cross_sandwich = sandwich and cross_attention is not None
        self.post_cross_norm = make_norm(config.norm, features, **norm_args) if cross_sandwich else nnx.data(None)
        self.post_mlp_norm = make_norm(config.norm, features, **norm_args) if sandwich else nnx.data(None)
        self.dropout = nnx.Dropout(config.dropout_rate, deterministic=config.deterministic, rngs=rngs)
        self.deterministic = config.deterministic

    def __call__(
        self,
        x: Array,
        *,
        context: Array | None = None,
        mask: masks_lib.Mask | Array | None = None,
        context_mask: masks_lib.Mask | Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        lengths: Array | None = None,
        cache=None,
        deterministic: bool | None = None,
    ):
        """``x [B, T, D]`` (and ``context [B, S, D]`` for cross-attention) to ``[B, T, D]``.

        ``mask`` (None: the attention's own), ``positions``, ``segment_ids``, ``lengths``, ``cache``
        and ``deterministic`` go to self-attention as the protocol defines them; ``context_mask`` to
        cross-attention. Returns ``(y, cache)`` when a cache is given.
        """
        if (context is None) != (self.cross_attention is None):
            raise ValueError(
                "a block with cross-attention needs a context and one without takes none, got "
                f"context={'None' if context is None else context.shape} and "
                f"cross_attention={'None' if self.cross_attention is None else type(self.cross_attention).__name__}."
            )
        out = self.attention(
            self._branch_input(x, self.attention_norm), mask=mask, positions=positions, segment_ids=segment_ids,
            lengths=lengths, cache=cache, deterministic=deterministic,
        )  # fmt: skip
        h, cache = out if cache is not None else (out, None)
        x = self._add(x, h, self.attention_norm, self.post_attention_norm, deterministic)
        if self.cross_attention is not None:
            h = self.cross_attention(
                self._branch_input(x, self.cross_norm), context, mask=context_mask, deterministic=deterministic
            )
            x = self._add(x, h, self.cross_norm, self.post_cross_norm, deterministic)
        h = self.mlp(self._branch_input(x, self.mlp_norm))
        x = self._add(x, h, self.mlp_norm, self.post_mlp_norm, deterministic)
        return x if cache is None else (x, cache)

    # Norm placement: "pre" normalises the branch input, "sandwich" its input and output, "post" the sum.
    def _branch_input(self, x: Array, norm) -> Array:
        return x if self.config.norm_position == "post" else norm(x)

    def _add(self, x: Array, h: Array, norm, post_norm, deterministic) -> Array:
        if self.config.norm_position == "post":
            return norm(x + self.dropout(h, deterministic=deterministic))
        if post_norm is not None:
            h = post_norm(h)
        return x + self.dropout(h, deterministic=deterministic)

    def init_cache(self, batch_size: int, max_length: int, *, kind: str = "dense", **options):
        """The self-attention's cache; ``kind="rolling"`` falls back to dense for a layer without a window."""
        if kind == "rolling" and getattr(self.attention, "sliding_window", None) is None:
            kind = "dense"
        return self.attention.init_cache(batch_size, max_length, kind=kind, **options)
