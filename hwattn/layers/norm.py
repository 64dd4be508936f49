"""RMSNorm over the last dimension, optionally with one weight row per head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hwattn.ops.reference import rms_norm_reference


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32.

    `shape` is the weight's shape: (dim,) for an ordinary norm, (heads, dim) to give each
    head of an input (..., heads, dim) its own weight (GLA's per-latent-head norms).
    """

    def __init__(self, *shape: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(*shape, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm_reference(x, self.weight, self.eps)
