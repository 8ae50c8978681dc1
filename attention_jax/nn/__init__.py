"""Flax NNX attention modules: thin shells (parameters) over the functional ops.

Every transformer attention module follows one protocol, :class:`AttentionLayer` (its docstring is
the contract): ``layer(inputs_q, inputs_kv=None, *, mask, positions, segment_ids, lengths, cache,
deterministic)`` returns ``y``, or ``(y, cache)`` when given a cache from
``layer.init_cache(batch, max_length)``. The transformer stacks accept any module following it
(see ``blocks.AttentionFactory``).
Attention weights can be recorded without changing model code: see ``record_attention_weights``.
"""

from attention_jax.nn.blocks import AttentionFactory, BlockConfig, FeedForward, TransformerBlock
from attention_jax.nn.differential import DifferentialAttention
from attention_jax.nn.latent import MultiHeadLatentAttention
from attention_jax.nn.linear import FastWeightProgrammer, LinearAttention, Performer, RecurrentCache
from attention_jax.nn.lowrank import Linformer, Nystromformer
from attention_jax.nn.mamba import Mamba, Mamba2, SSMState
from attention_jax.nn.multi_head import MultiHeadAttention
from attention_jax.nn.nsa import NativeSparseAttention, NSACache
from attention_jax.nn.positional_attention import PositionalAttention
from attention_jax.nn.protocol import AttentionLayer
from attention_jax.nn.recording import record_attention_weights
from attention_jax.nn.recurrent import AdditiveAttention, LuongAttention, Seq2SeqWithAttention
from attention_jax.nn.sparse import BigBirdAttention, LongformerAttention, SparseTransformerAttention
from attention_jax.nn.transformer import TransformerDecoder, TransformerEncoder, TransformerLM
from attention_jax.nn.vision import (
    CBAM,
    EfficientChannelAttention,
    PatchEmbedding,
    SpatialAttention,
    SqueezeExcitation,
    VisionTransformer,
)

__all__ = [
    "AdditiveAttention",
    "AttentionLayer",
    "AttentionFactory",
    "BigBirdAttention",
    "BlockConfig",
    "CBAM",
    "DifferentialAttention",
    "EfficientChannelAttention",
    "FastWeightProgrammer",
    "FeedForward",
    "LinearAttention",
    "Linformer",
    "LongformerAttention",
    "LuongAttention",
    "Mamba",
    "Mamba2",
    "MultiHeadAttention",
    "MultiHeadLatentAttention",
    "NSACache",
    "NativeSparseAttention",
    "Nystromformer",
    "PatchEmbedding",
    "Performer",
    "PositionalAttention",
    "RecurrentCache",
    "SSMState",
    "Seq2SeqWithAttention",
    "SparseTransformerAttention",
    "SpatialAttention",
    "SqueezeExcitation",
    "TransformerBlock",
    "TransformerDecoder",
    "TransformerEncoder",
    "TransformerLM",
    "VisionTransformer",
    "record_attention_weights",
]
