"""What acps knows about each layer type: one :class:`LayerAdapter` per type, holding its geometry, where its
channels sit in its parameters, and how it is sliced, masked, re-fitted and ranked.

The built-in types are registered here: ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.Linear``,
``nn.Embedding``, ``nn.BatchNorm1d/2d/3d`` and ``nn.InstanceNorm1d/2d/3d``, ``nn.GroupNorm``, ``nn.LayerNorm``,
``nn.PReLU`` and ``nn.MultiheadAttention``; and, recognised by their parts, self-attention with a fused ``qkv``
projection, with separate ``q`` and ``kv`` projections, or with separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``
(grouped-query attention included), and
norms whose statistic is a mean over the channels (a Global Response Norm, an RMS norm), and Linears stored
transposed (GPT-2's ``Conv1D``).
:func:`register_layer` registers a user's own type.
"""

from torch import nn

from acps_core.layers.attention import AttentionAdapter, MultiheadAttentionAdapter
from acps_core.layers.base import (
    LayerAdapter,
    adapter_for,
    register_layer,
    register_pattern,
    take,
    take_buffer,
    unregister_layer,
    whole_layer,
)
from acps_core.layers.conv import CONV_TYPES, TRANSPOSED_CONV_TYPES, ConvAdapter, ConvTransposeAdapter
from acps_core.layers.embedding import EmbeddingAdapter
from acps_core.layers.fused_attention import FusedAttentionAdapter, fused_qkv_attention
from acps_core.layers.kv_attention import KVAttentionAdapter, q_kv_attention
from acps_core.layers.linear import LinearAdapter
from acps_core.layers.mean_norm import MeanNormAdapter, mean_norm
from acps_core.layers.norm import (
    NORM_TYPES,
    BatchNormAdapter,
    FollowerAdapter,
    GroupNormAdapter,
    LayerNormAdapter,
    PReLUAdapter,
    approximate_norms,
)
from acps_core.layers.split_attention import (
    SplitAttentionAdapter,
    prune_grouped_query_attention,
    split_projection_attention,
)
from acps_core.layers.transposed_linear import TransposedLinearAdapter, transposed_linear

for _types, _adapter in ((CONV_TYPES, ConvAdapter()), (TRANSPOSED_CONV_TYPES, ConvTransposeAdapter()),
                         ((nn.Linear,), LinearAdapter()), ((nn.Embedding,), EmbeddingAdapter()),
                         (NORM_TYPES, BatchNormAdapter()),
                         ((nn.GroupNorm,), GroupNormAdapter()), ((nn.LayerNorm,), LayerNormAdapter()),
                         ((nn.PReLU,), PReLUAdapter()), ((nn.MultiheadAttention,), MultiheadAttentionAdapter())):
    for _type in _types:
        register_layer(_type, _adapter)
register_pattern(fused_qkv_attention, FusedAttentionAdapter())
register_pattern(q_kv_attention, KVAttentionAdapter())
register_pattern(split_projection_attention, SplitAttentionAdapter())
register_pattern(mean_norm, MeanNormAdapter())
register_pattern(transposed_linear, TransposedLinearAdapter())

__all__ = [
    "AttentionAdapter",
    "BatchNormAdapter",
    "ConvAdapter",
    "ConvTransposeAdapter",
    "EmbeddingAdapter",
    "FollowerAdapter",
    "FusedAttentionAdapter",
    "GroupNormAdapter",
    "KVAttentionAdapter",
    "LayerAdapter",
    "LayerNormAdapter",
    "LinearAdapter",
    "MeanNormAdapter",
    "MultiheadAttentionAdapter",
    "PReLUAdapter",
    "SplitAttentionAdapter",
    "TransposedLinearAdapter",
    "adapter_for",
    "approximate_norms",
    "prune_grouped_query_attention",
    "register_layer",
    "register_pattern",
    "take",
    "take_buffer",
    "unregister_layer",
    "whole_layer",
]
