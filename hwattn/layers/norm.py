"""RMSNorm over the last dimension, optionally with one weight row per head."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)
