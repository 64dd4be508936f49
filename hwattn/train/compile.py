"""Regional compilation: `torch.compile` each decoder block instead of the whole model.

Every block of a model runs the same code, so dynamo compiles one block graph (forward and
backward) and reuses it for all layers: compile time is that of one layer, which matters when
six variants are each trained for half a minute. The embedding, final norm and output matmul
stay eager. The returned callable runs `Transformer.forward`'s training path (no cache) with
the compiled blocks in place of the model's own; the model itself is untouched, so evaluation
and decoding keep running eagerly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hwattn.models.transformer import Transformer


# One process may train every variant, several times (the quality study runs 16 models in
# one worker): many block graphs for the one code object of `Block.forward`, where dynamo's
# default limit (8) would soon fall back to eager without a word.
RECOMPILE_LIMIT = 256


def _allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    import torch._dynamo.config as dc

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across versions
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dc, name):
            setattr(dc, name, max(getattr(dc, name), 4 * limit))


class RegionallyCompiled:
    """model(tokens) for training, with each block wrapped by `torch.compile`.

    tokens (B, T) int64 -> logits (B, T, V), or the final-norm hidden states (B, T, D) with
    `hidden_only`. Shares every parameter with `model`.
    """

    def __init__(self, model: Transformer, **compile_kwargs):
        self.model = model
        _allow_recompiles()
        self.blocks = [torch.compile(blk, **compile_kwargs) for blk in model.layers]

    def __call__(self, tokens: Tensor, hidden_only: bool = False) -> Tensor:
        """tokens (B, T) -> logits (B, T, V), or the final-norm hidden states (B, T, D)."""
        return self.model(tokens, blocks=self.blocks, hidden_only=hidden_only)
