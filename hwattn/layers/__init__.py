"""Attention layers, one file per family: MHA/MQA/GQA (`gqa`), GTA, MLA, GLA."""

from __future__ import annotations

import torch

from hwattn.config import ModelConfig
from hwattn.layers.base import Attention, AttentionMetadata, causal_attention
from hwattn.layers.gla import GroupedLatentAttention
from hwattn.layers.gqa import GroupedQueryAttention
from hwattn.layers.gta import GroupedTiedAttention
from hwattn.layers.mla import LatentAttention, MultiHeadLatentAttention
from hwattn.layers.norm import RMSNorm
from hwattn.layers.rope import apply_rope, rope_table

ATTENTION_CLASSES: dict[str, type[Attention]] = {
    "mha": GroupedQueryAttention,
    "mqa": GroupedQueryAttention,
    "gqa": GroupedQueryAttention,
    "gta": GroupedTiedAttention,
    "mla": MultiHeadLatentAttention,
    "gla": GroupedLatentAttention,
}


def build_attention(config: ModelConfig, device=None, dtype=None) -> Attention:
    """The attention layer `config.attention` names."""
    return ATTENTION_CLASSES[config.attention](config, device=device, dtype=dtype)


def attention_param_count(config: ModelConfig) -> int:
    """Parameters of one attention layer, counted on a meta-device instance."""
    layer = build_attention(config, device=torch.device("meta"))
    return sum(p.numel() for p in layer.parameters())


__all__ = [
    "ATTENTION_CLASSES", "Attention", "AttentionMetadata", "GroupedLatentAttention",
    "GroupedQueryAttention", "GroupedTiedAttention", "LatentAttention", "MultiHeadLatentAttention",
    "RMSNorm", "apply_rope", "attention_param_count", "build_attention", "causal_attention",
    "rope_table",
]
