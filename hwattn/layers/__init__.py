"""Attention layers, one file per family: MHA/MQA/GQA (`gqa`), GTA, MLA, GLA.

Each family's module registers its `VariantSpec`s (`hwattn.variants`) when imported; the
imports below run in the paper's order, which is the order `variant_names()` lists them in.
"""

from __future__ import annotations

from hwattn.config import ModelConfig
from hwattn.layers.base import (SDPA_CHOICES, Attention, FusedLinear, Linear, TiedStateAttention,
                                causal_attention, fuse_linears, sdpa_choice, select_heads,
                                set_weight)
from hwattn.layers.metadata import AttentionMetadata, MixedParts, PrefillForm
from hwattn.layers.gqa import GroupedQueryAttention  # isort: skip
from hwattn.layers.gta import GroupedTiedAttention  # isort: skip
from hwattn.layers.mla import LatentAttention, MultiHeadLatentAttention  # isort: skip
from hwattn.layers.gla import GroupedLatentAttention  # isort: skip
from hwattn.layers.norm import RMSNorm
from hwattn.layers.rope import apply_rope, rope_table
from hwattn.variants import get_variant


def build_attention(config: ModelConfig, device=None, dtype=None) -> Attention:
    """The attention layer of `config.attention`'s registered variant."""
    return get_variant(config.attention).layer(config, device=device, dtype=dtype)


def attention_param_count(config: ModelConfig) -> int:
    """Parameters of one attention layer, counted on a meta-device instance."""
    return get_variant(config.attention).param_count(config)


__all__ = [
    "SDPA_CHOICES", "Attention", "AttentionMetadata", "FusedLinear", "Linear", "GroupedLatentAttention", "GroupedQueryAttention",
    "GroupedTiedAttention", "LatentAttention", "MixedParts", "MultiHeadLatentAttention", "PrefillForm",
    "RMSNorm", "TiedStateAttention", "apply_rope", "attention_param_count", "build_attention",
    "causal_attention", "fuse_linears", "rope_table", "sdpa_choice", "select_heads", "set_weight",
]
