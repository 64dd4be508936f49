"""The linear layers' matrix product, with decode's few rows on the skinny kernel.

`linear(x, weight, bias)` computes `F.linear(x, weight, bias)`. When the product has few rows
(a decode step: one row per sequence, at most `SKINNY_MAX_ROWS`), runs on a GPU, in bf16 or
fp16, and needs no gradient, it goes through the split-N/split-K Triton kernel of
`hwattn/ops/skinny_gemm.py` instead of cuBLAS: at 64 rows cuBLAS's tiles leave most SMs idle
on the small weight matrices of a decoder block and read them at a third to a half of the copy
rate (docs/results/engine.md).

The kernel is registered as the custom op `hwattn::skinny_linear` (`torch.library`), so a
`torch.compile`d decoder block keeps it inside its graph, as one opaque call, instead of
breaking the graph around it, and a captured CUDA graph records it like any kernel.

`HWATTN_SKINNY_GEMM=0` in the environment (or `SKINNY_ENABLED = False` before a model is
compiled) keeps every product on `F.linear`, for comparisons.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

SKINNY_MAX_ROWS = 128
SKINNY_ENABLED = os.environ.get("HWATTN_SKINNY_GEMM", "1") != "0"
# Device types whose products may take the kernel; the tests add "cpu" under the interpreter.
SKINNY_DEVICES = ("cuda",)
_DTYPES = (torch.bfloat16, torch.float16)


@torch.library.custom_op("hwattn::skinny_linear", mutates_args=())
def skinny_linear_op(x: Tensor, weight: Tensor) -> Tensor:
    """x (M, K) @ weight (N, K)^T -> (M, N) through the skinny Triton kernel."""
    from hwattn.ops.skinny_gemm import skinny_linear

    return skinny_linear(x, weight)


@skinny_linear_op.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


def takes_skinny_kernel(x: Tensor, weight: Tensor) -> bool:
    """Whether `linear(x, weight)` runs the skinny kernel (see the module docstring)."""
    if not SKINNY_ENABLED or x.device.type not in SKINNY_DEVICES:
        return False
    if x.dtype not in _DTYPES or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return 0 < rows <= SKINNY_MAX_ROWS


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., K), weight (N, K), bias (N,) or None ->
    (..., N); products of at most `SKINNY_MAX_ROWS` rows on a GPU take the skinny kernel."""
    if not takes_skinny_kernel(x, weight):
        return F.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.hwattn.skinny_linear(rows.contiguous(), weight.contiguous())
    y = y.view(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias
