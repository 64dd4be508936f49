"""Cross-entropy of the output projection without the (N, V) logits in memory.

The language-model head is the largest matmul of a small model, and its fp32 logits the
largest activation: 131,072 tokens of a 32,768-id vocabulary are 17 GB, read and written
several times by `F.cross_entropy` and its backward. `linear_cross_entropy` instead walks
the rows in chunks: each chunk's logits are made, reduced to its loss, turned into the
gradient (softmax − one-hot) and multiplied back into the gradients of the hidden states and
of the weight right away, then dropped. Because the loss is the last operation of the step,
its backward only has to scale those gradients by the incoming scalar, so no logits are
recomputed and the FLOPs are exactly those of the plain head (2·V·D per token forward,
4·V·D backward). On a GPU the softmax, the one-hot and the casts of a chunk run as one
compiled kernel pair (`softmax_xent_grad`).

This is the fused linear cross-entropy of Liger-Kernel and of Apple's Cut Cross-Entropy,
written here as a plain autograd function over PyTorch matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so that a chunk's fp32 logits hold about this many elements.
CHUNK_ELEMENTS = 1 << 28


def softmax_xent_grad(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of the rows' cross-entropies, softmax − one-hot in the logits' dtype).

    logits (c, V) in the matmul dtype; targets (c,) int64. In fp32 inside. Compiled on GPUs
    (`_pointwise`), this is one reduction and one elementwise pass over the chunk instead of
    the six full passes of the same ops run one by one: at a 32K vocabulary the chunk's
    memory traffic, not the head's matmul, would otherwise set the step time.
    """
    lf = logits.float()  # (c, V)
    lse = torch.logsumexp(lf, dim=-1)  # (c,)
    picked = lf.gather(1, targets[:, None]).squeeze(1)  # (c,)
    cols = torch.arange(lf.shape[1], device=lf.device)
    grad = torch.exp(lf - lse[:, None]) - (cols[None, :] == targets[:, None]).float()  # (c, V)
    return (lse - picked).sum(), grad.to(logits.dtype)


_COMPILED: dict = {}


def _pointwise(device: torch.device):
    """`softmax_xent_grad`, compiled with torch.compile on CUDA (eager elsewhere, and after
    a compiler failure, which is reported once)."""
    if device.type != "cuda" or _COMPILED.get("failed"):
        return softmax_xent_grad
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(softmax_xent_grad, dynamic=False)

    def run(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return _COMPILED["fn"](logits, targets)
        except Exception as err:  # a compiler problem must not stop training
            import warnings

            warnings.warn(f"compiling the cross-entropy pass failed ({type(err).__name__}: "
                          f"{err}); running it eagerly")
            _COMPILED["failed"] = True
            return softmax_xent_grad(logits, targets)

    return run


def _compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype the surrounding autocast would run the head's matmul in."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int,
                compute_dtype: torch.dtype, want_grad: bool) -> Tensor:
        n = hidden.shape[0]
        w = weight.to(compute_dtype)  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if want_grad else None
        xent = _pointwise(hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk_rows):
                h = hidden[start:start + chunk_rows].to(compute_dtype)  # (c, D)
                t = targets[start:start + chunk_rows]  # (c,)
                logits = h @ w.t()  # (c, V)
                if not want_grad:
                    lf = logits.float()
                    total += (torch.logsumexp(lf, dim=-1)
                              - lf.gather(1, t[:, None]).squeeze(1)).sum()
                    continue
                loss_sum, g = xent(logits, t)  # g (c, V): d(sum of losses) / d(logits)
                total += loss_sum
                grad_h[start:start + chunk_rows] = (g @ w).to(hidden.dtype)  # (c, D)
                grad_w += (g.t() @ h).float()  # (V, D)
        ctx.n = n
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("linear_cross_entropy ran without gradients (no_grad or inputs "
                               "without requires_grad); it cannot be differentiated afterwards")
        scale = grad_loss / ctx.n
        return (grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.weight_dtype),
                None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                         chunk_rows: int | None = None) -> Tensor:
    """Mean cross-entropy (nats) of `hidden @ weight.T` against `targets`, chunk by chunk.

    hidden (..., D) float; weight (V, D); targets (...) int64 in [0, V). Returns a scalar
    fp32 tensor equal to `F.cross_entropy((hidden @ weight.T).float().flatten(0, -2),
    targets.flatten())`, computed with the matmul in the autocast dtype when autocast is on.
    `chunk_rows` (default: about 2^28 logits a chunk) bounds the extra memory. The gradients
    are formed during the forward pass, so the result must be the end of the graph (it may be
    scaled, as for gradient accumulation, but not fed into further operations that need its
    own second use).
    """
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    h = hidden.reshape(-1, hidden.shape[-1])  # (N, D)
    t = targets.reshape(-1)  # (N,)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    want_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    dtype = _compute_dtype(hidden.device, hidden.dtype)
    return _LinearCrossEntropy.apply(h, weight, t, chunk_rows, dtype, want_grad)
