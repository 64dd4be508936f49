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


class RegionallyCompiled:
    """model(tokens) for training, with each block wrapped by `torch.compile`.

    tokens (B, T) int64 -> logits (B, T, V). Shares every parameter with `model`.
    """

    def __init__(self, model: Transformer, **compile_kwargs):
        self.model = model
        self.blocks = [torch.compile(blk, **compile_kwargs) for blk in model.layers]

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.model(tokens, blocks=self.blocks)  # (B, T, V)
