"""Pure attention functions: no parameters, the math of every variant.

``dot_product_attention`` validates once, resolves the mask once into a ``MaskSpec`` and runs
one of ``backends`` (reference, blockwise XLA path, Pallas kernels, cuDNN); the other ops are
the variants that the modules in ``attention_jax.nn`` wrap.
"""

from attention_jax.functional import backends
from attention_jax.functional.additive import additive_attention, additive_scores, luong_attention, luong_scores
from attention_jax.functional.cached import cached_attention
from attention_jax.functional.cascade import cascade_attention
from attention_jax.functional.delta_rule import FastWeightState, delta_rule_attention, delta_rule_step
from attention_jax.functional.differential import differential_attention, lambda_init
from attention_jax.functional.dot_product import attention_weights, choose_implementation, dot_product_attention
from attention_jax.functional.latent import latent_attention
from attention_jax.functional.linear import (
    LinearAttentionState,
    elu_feature_map,
    linear_attention,
    linear_attention_step,
)
from attention_jax.functional.lowrank import linformer_attention, nystrom_attention
from attention_jax.functional.multi_head import multi_head_attention
from attention_jax.functional.nsa import native_sparse_attention
from attention_jax.functional.performer import PerformerState, favor_features, performer_attention
from attention_jax.functional.positional_attention import gated_positional_attention, positional_attention
from attention_jax.functional.sparse import bigbird_attention, longformer_attention, sparse_transformer_attention
from attention_jax.functional.ssm import selective_scan, selective_scan_step
from attention_jax.functional.vision import cbam, efficient_channel_attention, spatial_attention, squeeze_excitation

__all__ = [
    "FastWeightState",
    "LinearAttentionState",
    "PerformerState",
    "additive_attention",
    "backends",
    "additive_scores",
    "attention_weights",
    "bigbird_attention",
    "cached_attention",
    "cascade_attention",
    "cbam",
    "choose_implementation",
    "delta_rule_attention",
    "delta_rule_step",
    "differential_attention",
    "dot_product_attention",
    "efficient_channel_attention",
    "elu_feature_map",
    "favor_features",
    "gated_positional_attention",
    "lambda_init",
    "latent_attention",
    "linear_attention",
    "linear_attention_step",
    "linformer_attention",
    "longformer_attention",
    "luong_attention",
    "luong_scores",
    "multi_head_attention",
    "native_sparse_attention",
    "nystrom_attention",
    "performer_attention",
    "positional_attention",
    "sparse_transformer_attention",
    "selective_scan",
    "selective_scan_step",
    "spatial_attention",
    "squeeze_excitation",
]
