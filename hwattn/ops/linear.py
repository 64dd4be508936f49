"""The linear layers' matrix product, with decode's few rows on the skinny kernel.

`linear(x, weight, bias)` computes `F.linear(x, weight, bias)`. With `HWATTN_SKINNY_GEMM=1` in
the environment (or `SKINNY_ENABLED = True` before a model is compiled), a product with few
rows (a decode step: one row per sequence, at most `SKINNY_MAX_ROWS`) on a GPU, in bf16 or
fp16, needing no gradient, goes through the split-N/split-K Triton kernel of
`hwattn/ops/skinny_gemm.py` instead of cuBLAS.

It is off by default because it lost to cuBLAS on an H200 (docs/results/engine.md, run 6):
at 64 rows its best tiles were 1.2-1.3x slower than cuBLAS on the block's small matrices (QKV,
O, down, GLA-2's input projections; 1.4-1.6x with the tiles its heuristic picks), and 3-5%
faster only on gate+up and the LM head; the compiled `xl` decode step at L = 8K was 4%
(GQA-4) and 7% (GLA-2) slower with it. The hook stays so that a better kernel for these shapes can be
measured in the step with one switch (`bash benchmarks/engine_check.sh skinny`).

The kernel is registered as the custom op `hwattn::skinny_linear` (`torch.library`), so a
`torch.compile`d decoder block keeps it inside its graph, as one opaque call, instead of
breaking the graph around it, and a captured CUDA graph records it like any kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hwattn.switches import env_flag

SKINNY_MAX_ROWS = 128
SKINNY_ENABLED = env_flag("HWATTN_SKINNY_GEMM")
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
