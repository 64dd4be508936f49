"""Rotary position embedding, rotate-half convention (as in Hugging Face Llama).

A vector of width d is split in halves (x1, x2); position p rotates pair i by angle
p * theta^(-2i/d): (x1 cos - x2 sin, x2 cos + x1 sin).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hwattn.ops.reference import rope_reference


def rope_table(dim: int, max_len: int, theta: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin tables of shape (max_len, dim // 2), fp32."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    angles = torch.arange(max_len, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, [H,] d) by cos, sin (B, T, d/2); returns x's dtype."""
    while cos.dim() < x.dim():
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return rope_reference(x, cos, sin)
