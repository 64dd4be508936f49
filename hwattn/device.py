"""Where and in what precision a model runs: device names and dtype names, resolved the same
way by training, evaluation, comparison and serving."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float64": torch.float64,
          "fp64": torch.float64, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float": torch.float32}  # the last two as vLLM names them


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """`device` as a torch device; "auto" / None: CUDA when available, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


def check_device(device: str | torch.device | None, flag: str = "device") -> None:
    """ValueError unless `device` names a device this machine has ("auto" always does): a
    CUDA device needs a CUDA build of PyTorch and a GPU of that index; another accelerator
    (mps, xpu, ...) needs its backend available, and "meta" (tensors without data) runs
    nothing. flag: how the error names the setting (the command line's "--device")."""
    if device in (None, "auto"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "meta":  # torch takes the name; every model or kernel fails on it later
        raise ValueError(f"{flag} meta holds no data and runs nothing; use {flag} cpu or cuda")
    if dev.type not in ("cpu", "cuda"):
        backend = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
        if not getattr(backend, "is_available", lambda: False)():
            raise ValueError(f"{flag} {device}: this PyTorch has no {dev.type} device on this "
                             f"machine; use {flag} cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {device}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); use {flag} cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {device}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")


def check_from_first_gpu(device: torch.device, setting: str, placement: str) -> None:
    """ValueError unless `device` is the CPU, "cuda" or "cuda:0": worker processes (ranks,
    replicas) take the visible GPUs from the first, so an index would be ignored.
    setting: the size that starts them ("tensor_parallel_size 2"); placement: where worker i
    runs ("rank r runs on cuda:r of the visible GPUs")."""
    if device.type == "cuda" and device.index:
        raise ValueError(f"device {str(device)!r} with {setting}: {placement}, from the first; "
                         f"give device='cuda' and choose the GPUs with CUDA_VISIBLE_DEVICES")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """`dtype` as a torch dtype; "auto" / None: bf16 on CUDA, fp32 elsewhere."""
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:  # weights and caches: torch fails later, less clearly
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]
