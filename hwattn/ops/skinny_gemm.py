"""Linear layers at decode batch sizes: Y = X W^T with at most 128 rows, on the Triton kernel of
kernels/skinny_gemm.py (grid over N blocks × K splits, deterministic split-K).

    y = skinny_linear(x, weight)                      # x (..., K), weight (N, K) -> (..., N)
    y = skinny_linear(x, weight, config=SkinnyConfig(block_n=32, split_k=4), out=y)
    y = skinny_linear_reference(x, weight)            # hwattn/ops/reference.py

The tile shape is a `SkinnyConfig`, chosen per call by `choose_config` or forced (the `skinny`
part of benchmarks/engine_diagnostics.py sweeps it on the GPU). On CPU tensors the kernel runs
under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).

Split-K programs meet on a per-device buffer of tile counters that every launch leaves at zero,
so launches on one device must not overlap on two streams. Nothing is read back to the host:
a call may be captured in a CUDA graph once the device has run one split-K call outside a
capture (the first one allocates the counters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from hwattn.ops.kernels.skinny_gemm import skinny_gemm_kernel
from hwattn.ops.plan import device_sms
from hwattn.ops.reference import skinny_linear_reference
# Importing triton_decode also applies kernels/interpreter.py's fixes under TRITON_INTERPRET=1.
from hwattn.ops.triton_decode import KERNEL_DTYPES, check_tile, pad_width

__all__ = ["MAX_ROWS", "SkinnyConfig", "block_rows", "choose_config", "skinny_linear",
           "skinny_linear_reference", "split_layout"]

MAX_ROWS = 128  # rows of X one program holds (BLOCK_M); more rows are a regular GEMM
PROGRAMS_PER_SM = 2  # resident programs per SM the heuristic plans for (SMEM_PER_PROGRAM each)
MIN_K_BLOCKS = 2  # a split streams at least this many K blocks, so its loads can overlap
SMEM_PER_PROGRAM = 100 * 1024  # bytes of pipeline buffers that still let 2 programs share an SM
L2_WEIGHT = 0.5  # cost of a byte of split-K partials (L2-resident) against a byte of W (HBM)
_COUNTERS: dict[torch.device, Tensor] = {}
_MIN_COUNTERS = 1 << 14


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile shape and K split of one launch.

    block_n: output columns (rows of W) per program, a power of two >= 16.
    block_k: K per loop step, a power of two >= 16.
    split_k: programs sharing each N block's K range (fewer if K has fewer blocks of block_k).
    BLOCK_M is not chosen: it is the row count padded to a power of two >= 16.
    """

    block_n: int = 64
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_tile(self, ("block_n", "block_k"))
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")

    def label(self) -> str:
        """Short name for tables, e.g. "n64 k128 s4 w4 p3"."""
        return (f"n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} "
                f"p{self.num_stages}")


def block_rows(m: int) -> int:
    """BLOCK_M for m rows: the next power of two, at least 16 (the tensor-core minimum)."""
    return pad_width(m)


def split_layout(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per split, splits launched) for `split_k` requested splits: whole blocks of block_k
    per split, and only as many splits as that leaves non-empty."""
    k_blocks = triton.cdiv(k, block_k)
    per_split = triton.cdiv(k_blocks, min(split_k, k_blocks))
    return per_split * block_k, triton.cdiv(k_blocks, per_split)


def choose_config(m: int, n: int, k: int, sms: int, *, elem_size: int = 2,
                  block_n: int | None = None, block_k: int | None = None) -> SkinnyConfig:
    """Tile shape for Y (m, n) = X (m, k) W^T on a GPU with `sms` SMs, elements of
    `elem_size` bytes; `block_n` / `block_k` fix those and derive the rest (benchmark sweeps).

    64 weight rows per program (one wgmma's M side); K steps of 256 bytes per row, half that
    when 128 rows of X share the buffers. The K split is the one that finishes soonest if
    PROGRAMS_PER_SM programs run on each SM at a time, costed in W-block loads:
    (waves of programs) × (K blocks per program + 1 + the partial tile's write and read back,
    at L2_WEIGHT of a load's cost per byte, when split), each program streaming at least
    MIN_K_BLOCKS blocks; ties go to fewer splits. Pipeline stages: as many as fit
    SMEM_PER_PROGRAM, 2 to 4. Warps: 4, or 8 for tiles big enough to crowd 4 warps' registers.
    """
    bm = block_rows(m)
    bn = block_n or 64
    bk = block_k or (256 if bm <= 64 else 128) // elem_size
    n_blocks, k_blocks = triton.cdiv(n, bn), triton.cdiv(k, bk)
    slots = PROGRAMS_PER_SM * sms
    # fp32 partial (bn, bm) written and read back, over one W block (bn, bk) read.
    partial_cost = L2_WEIGHT * (2 * bm * 4) / (bk * elem_size)
    best, best_cost = 1, math.inf
    for split in range(1, max(1, k_blocks // MIN_K_BLOCKS) + 1):
        per_split, launched = split_layout(k, bk, split)
        per_program = per_split // bk + 1 + (partial_cost if launched > 1 else 0.0)
        cost = triton.cdiv(n_blocks * launched, slots) * per_program
        if cost < best_cost:
            best, best_cost = launched, cost
    stage_bytes = (bn + bm) * bk * elem_size
    stages = max(2, min(4, SMEM_PER_PROGRAM // stage_bytes))
    # sm_90 compile reports: 4 warps need 196-255 registers (some spilled) from bn·bm·bk = 2^20
    # on (the accumulator and the split-K sum both live in registers); 8 warps stay near 130.
    warps = 8 if bn * bm * bk >= 1 << 20 else 4
    return SkinnyConfig(block_n=bn, block_k=bk, split_k=best, num_warps=warps, num_stages=stages)


def _tile_counters(device: torch.device, needed: int) -> Tensor:
    """The device's zeroed split-K counters, at least `needed` of them (kernel docstring)."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_linear: run one split-K call on this device before "
                               "capturing a CUDA graph (it allocates the tile counters)")
        counters = torch.zeros(max(needed, _MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def _rows_view(t: Tensor, rows: int, cols: int, name: str) -> Tensor:
    """t (..., cols) as (rows, cols) without a copy, or a ValueError naming `name`."""
    if cols > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (strides {t.stride()})")
    try:
        return t.view(rows, cols)
    except RuntimeError:
        raise ValueError(f"{name}: its leading dimensions must flatten to rows without a copy "
                         f"(shape {tuple(t.shape)}, strides {t.stride()}); pass "
                         f"{name}.contiguous()") from None


def _check(x: Tensor, weight: Tensor, out: Tensor | None) -> tuple[int, int, int]:
    """(M, N, K) of a valid call; ValueError naming the bad argument otherwise."""
    if not isinstance(x, Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor (..., K) with at least one dimension")
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D tensor (N, K), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight)}")
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"x is {x.dtype}; skinny_linear takes "
                         f"{', '.join(str(d) for d in KERNEL_DTYPES)}")
    if weight.dtype != x.dtype:
        raise ValueError(f"weight is {weight.dtype}, x is {x.dtype}: they must match")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device}, x on {x.device}: they must match")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"weight (N, K) = {tuple(weight.shape)} does not take x of width "
                         f"{x.shape[-1]}")
    m = math.prod(x.shape[:-1])
    if m > MAX_ROWS:
        raise ValueError(f"x has {m} rows (product of its leading dimensions "
                         f"{tuple(x.shape[:-1])}); skinny_linear takes at most {MAX_ROWS}")
    if k > 1 and weight.stride(1) != 1:
        raise ValueError(f"weight must be contiguous in its last dimension "
                         f"(strides {weight.stride()})")
    if out is not None:
        want = (*x.shape[:-1], n)
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out must be {x.dtype} on {x.device} of shape {want}, got "
                             f"{out.dtype} on {out.device} of shape {tuple(out.shape)}")
    return m, n, k


def _align(elem_size: int, *values: int) -> int:
    """The largest power of two dividing every value and at most 16 bytes of elements."""
    g = math.gcd(16 // elem_size, *values)
    return g & -g


def skinny_linear(x: Tensor, weight: Tensor, config: SkinnyConfig | None = None,
                  out: Tensor | None = None) -> Tensor:
    """y = x @ weight^T, as `torch.nn.functional.linear(x, weight)` without a bias.

    x: (..., K) whose leading dimensions hold M <= 128 rows and flatten without a copy, last
        dimension contiguous; bf16, fp16 or fp32.
    weight: (N, K), x's dtype and device, last dimension contiguous (rows may be strided).
    config: tile shape and K split; `choose_config` for this shape and device when None.
    out: (..., N) in x's dtype to write into; a new tensor when None.

    Returns y (..., N) in x's dtype: fp32 accumulation (fp32 inputs multiply in full fp32,
    not TF32, as `torch.nn.functional.linear` does by default), rounded once. Deterministic.
    """
    m, n, k = _check(x, weight, out)
    if out is None:
        out = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    x2, y = _rows_view(x, m, k, "x"), _rows_view(out, m, n, "out")
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    elem = x.element_size()
    config = config or choose_config(m, n, k, device_sms(x.device), elem_size=elem)
    bm = block_rows(m)
    k_per_split, split = split_layout(k, config.block_k, config.split_k)
    n_blocks = triton.cdiv(n, config.block_n)
    stride_xm = x2.stride(0) if m > 1 else 0  # one row: never stepped over
    align = _align(elem, k, stride_xm, weight.stride(0))
    if split > 1:
        partials = torch.empty(n_blocks * split * config.block_n * bm, dtype=torch.float32,
                               device=x.device)
        counters = _tile_counters(x.device, n_blocks)
    else:
        partials = counters = y  # not touched
    skinny_gemm_kernel[(n_blocks, split)](
        x2, weight, y, partials, counters,
        M=m, N=n, k_div=k // align, stride_xm_div=stride_xm // align,
        stride_wn_div=weight.stride(0) // align, stride_ym=y.stride(0),
        k_per_split=k_per_split, split_k=split,
        BLOCK_M=bm, BLOCK_N=config.block_n, BLOCK_K=config.block_k, ALIGN=align,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
