"""Where a training step's GPU time goes: the kernels of profiled steps, sorted into parts.

`benchmarks/study_throughput.py --profile-steps N` profiles the last N steps of each variant's
run (`hwattn.train.trainer.train`'s `on_step` hook starts and stops the profiler) and reports
`train_breakdown` of their kernels beside the measured step time, so a variant's lost MFU can
be put on a part: the matrix products, attention, Inductor's fused kernels, the optimizer, copies.
"""

from __future__ import annotations

from hwattn.bench.timing import GEMM_MARKERS, summarize_kernels

TRAIN_PARTS = ("gemm", "attention", "fused", "optimizer", "copy", "other")

# Substrings of kernel names, lower-cased, checked in this order (FlashAttention's template
# names can hold matrix-product words, so attention is tried before the GEMMs).
ATTENTION_MARKERS = ("flash", "fmha", "sdpa", "attention", "attn")
OPTIMIZER_MARKERS = ("adam", "multi_tensor", "foreach")
COPY_MARKERS = ("memcpy", "memset", "copy", "catarray")


def classify_training_kernel(name: str) -> str:
    """The part of a training step a GPU kernel belongs to (one of `TRAIN_PARTS`):
    "attention" (SDPA's FlashAttention / cuDNN / memory-efficient kernels, forward and
    backward), "gemm" (cuBLAS / CUTLASS products), "fused" (Inductor's generated Triton
    kernels: norms, RoPE, activations, the loss's chunks), "optimizer" (fused AdamW and the
    gradient norm's multi-tensor kernels), "copy" (memory copies, sets, concatenations) or
    "other" (eager elementwise and reduction kernels: embedding, casts, ...)."""
    low = name.lower()
    if any(m in low for m in ATTENTION_MARKERS):
        return "attention"
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    if low.startswith("triton_") or " triton_" in low:
        return "fused"
    if any(m in low for m in OPTIMIZER_MARKERS):
        return "optimizer"
    if any(m in low for m in COPY_MARKERS):
        return "copy"
    return "other"


def train_breakdown(kernels: list[tuple[str, float]], steps: int, top: int = 15) -> dict:
    """`summarize_kernels` of `steps` profiled training steps' kernels (from
    `hwattn.bench.timing.trace_kernels`), per step, by `classify_training_kernel`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return summarize_kernels(kernels, steps, classify_training_kernel, TRAIN_PARTS, top)
