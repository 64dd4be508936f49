"""Models built from the attention layers."""

from hwattn.models.generate import greedy_generate
from hwattn.models.transformer import Block, FeedForward, Transformer

__all__ = ["Block", "FeedForward", "Transformer", "greedy_generate"]
