"""Regionally compiled training (`hwattn.models.compile`): one block graph (forward and
backward) reused by every layer, so compile time is that of one layer, which matters when six
variants are each trained for half a minute. The embedding, final norm and output matmul
stay eager. The returned callable runs `Transformer.forward`'s training path (no cache) with
the compiled blocks in place of the model's own; the model itself is untouched, so evaluation
and decoding keep running eagerly.
"""

from __future__ import annotations

from torch import Tensor

from hwattn.models.compile import compile_blocks
from hwattn.models.transformer import Transformer


class RegionallyCompiled:
    """model(tokens) for training, with each block wrapped by `torch.compile`.

    tokens (B, T) int64 -> logits (B, T, V), or the final-norm hidden states (B, T, D) with
    `hidden_only`. Shares every parameter with `model`.
    """

    def __init__(self, model: Transformer, **compile_kwargs):
        self.model = model
        self.blocks = compile_blocks(model, **compile_kwargs)

    def __call__(self, tokens: Tensor, hidden_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, V), or the final-norm hidden states (B, T, D)."""
        return self.model(tokens, blocks=self.blocks, hidden_only=hidden_only)
