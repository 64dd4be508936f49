"""The combine kernels: merge the partial outputs of a split sequence by their LSE.

Piece i of a sequence holds o_i (softmax-normalised over its own tokens) and lse_i. The whole
sequence's output is sum_i w_i o_i with w_i = exp(lse_i - lse), lse = log sum_i exp(lse_i).
A piece that saw none of a row's visible tokens has lse_i = -inf and weight 0.

Two shapes of program, chosen by `combine` from the plan's most pieces per sequence:
- one row (many pieces: a batch of one long sequence, few rows; `_merge_row`): a program
  merges one row ((query position, head) pair) × BLOCK_D output columns of one sequence,
  reading BLOCK_P pieces per step as one tile so that the loads of all pieces are in flight
  together. `combine_kernel` launches one program per sequence, row and column block, its
  column blocks as wide as keep the grid full (`one_row_blocks`); `combine_strided_kernel`
  (HWATTN_COMBINE=strided, off) at most one wave of programs striding over the rows of the
  split sequences alone.
- `combine_rows_kernel` (a few pieces each: large batches, many heads): one program merges
  BLOCK_R rows × every output column of one sequence, one piece at a time with a running
  maximum. Each program holds 2048 outputs where a one-row program holds at most 128, so
  its grid is up to 16 times smaller, which is what matters there:
  run 9 on an H200 measured the one-row kernel at 13.8 µs a layer for MLA at h_q 16, B 64
  (4096 programs of two pieces each), and a graph captured for long contexts launches it
  every step even when no sequence is split.
Sequences with a single piece were written by the attention kernel and are left alone, so
no grid depends on the lengths (CUDA graph replay).
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl

from hwattn.ops.kernels.pdl import launch_options, wait_for_predecessor
from hwattn.ops.plan import device_sms
from hwattn.switches import env_choice


# A plan's splits are a view of its packed buffer, after the pieces: 16-byte aligned or not as
# the plan's capacity goes. They are read as scalars, so the kernels do not specialise on their
# alignment (which compiled the kernels again in serving steps, run 16;
# `DecodePlan.of_packed` in hwattn/ops/plan.py).
@triton.jit
def _merge_row(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, first, n_pieces, seq, row, pid_d,
               n_heads_q, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
               L_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_P: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Merge one row ((query position, head) pair) × BLOCK_D output columns of sequence `seq`
    from its `n_pieces` pieces starting at item `first`, BLOCK_P pieces a tile."""
    rows_per_piece = L_Q * n_heads_q
    offs_p = tl.arange(0, BLOCK_P)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D_V

    lse_max = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for p0 in range(0, n_pieces, BLOCK_P):
        piece = (first + p0 + offs_p).to(tl.int64)  # (P,)
        lse_p = tl.load(part_lse_ptr + piece * rows_per_piece + row, mask=p0 + offs_p < n_pieces,
                        other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_p)
    top = tl.max(lse_max, 0)
    top = tl.where(top == float("-inf"), 0.0, top)

    total = tl.zeros([BLOCK_P], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for p0 in range(0, n_pieces, BLOCK_P):
        mask_p = p0 + offs_p < n_pieces
        piece_rows = (first + p0 + offs_p).to(tl.int64) * rows_per_piece + row  # (P,)
        lse_p = tl.load(part_lse_ptr + piece_rows, mask=mask_p, other=float("-inf"))
        weight = tl.exp(lse_p - top)  # (P,)
        o_tile = tl.load(part_out_ptr + piece_rows[:, None] * D_V + offs_d[None, :],
                         mask=mask_p[:, None] & mask_d[None, :], other=0.0)  # (P, BLOCK_D)
        total += weight
        acc += tl.sum(weight[:, None] * o_tile, 0)

    total_sum = tl.sum(total, 0)
    seen = total_sum > 0.0
    out_row = acc / tl.where(seen, total_sum, 1.0)  # (BLOCK_D,)
    query = (row // n_heads_q).to(tl.int64)
    head = (row % n_heads_q).to(tl.int64)
    seq64 = seq.to(tl.int64)
    o_ptrs = out_ptr + seq64 * stride_ob + query * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptrs, out_row.to(out_ptr.dtype.element_ty), mask=mask_d)
    if pid_d == 0:
        lse = tl.where(seen, top + tl.log(tl.where(seen, total_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq64 * stride_lb + head * stride_lh + query, lse)


# A plan's splits are a view of its packed buffer, after the pieces: 16-byte aligned or not as
# the plan's capacity goes. They are read as scalars, so the kernels do not specialise on their
# alignment (which compiled the kernels again in serving steps, run 16;
# `DecodePlan.of_packed` in hwattn/ops/plan.py).
@triton.jit(do_not_specialize_on_alignment=["splits_ptr"])
def combine_kernel(
    part_out_ptr, part_lse_ptr, splits_ptr, out_ptr, lse_ptr,
    n_heads_q,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    L_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    seq = tl.program_id(0)
    row = tl.program_id(1)  # query * H_q + head
    pid_d = tl.program_id(2)
    first = tl.load(splits_ptr + seq * 2)
    n_pieces = tl.load(splits_ptr + seq * 2 + 1)
    if n_pieces <= 1:
        return
    _merge_row(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, first, n_pieces, seq, row, pid_d,
               n_heads_q, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
               L_Q, D_V, BLOCK_P, BLOCK_D)


@triton.jit(do_not_specialize_on_alignment=["splits_ptr"])
def combine_strided_kernel(
    part_out_ptr, part_lse_ptr, splits_ptr, out_ptr, lse_ptr,
    n_heads_q, batch,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    L_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    N_DBLOCKS: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr,
):
    """The one-row merge over the split sequences only: each program reads every sequence's
    piece count at once, ranks the split ones, and strides over their (row, column block)
    units, so the grid need not hold a program for every sequence's every row."""
    wait_for_predecessor(PDL)
    offs_b = tl.arange(0, BLOCK_B)
    counts = tl.load(splits_ptr + offs_b * 2 + 1, mask=offs_b < batch, other=0)
    is_split = (counts > 1).to(tl.int32)
    rank = tl.cumsum(is_split, 0) - is_split  # split sequences before each one
    per_seq = L_Q * n_heads_q * N_DBLOCKS
    for unit in range(tl.program_id(0), tl.sum(is_split, 0) * per_seq, tl.num_programs(0)):
        rest = unit % per_seq
        seq = tl.sum(tl.where((is_split == 1) & (rank == unit // per_seq), offs_b, 0), 0)
        first = tl.load(splits_ptr + seq * 2)
        n_pieces = tl.load(splits_ptr + seq * 2 + 1)
        _merge_row(part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, first, n_pieces, seq,
                   rest // N_DBLOCKS, rest % N_DBLOCKS, n_heads_q, stride_ob, stride_ot,
                   stride_oh, stride_lb, stride_lh, L_Q, D_V, BLOCK_P, BLOCK_D)


@triton.jit(do_not_specialize_on_alignment=["splits_ptr"])
def combine_rows_kernel(
    part_out_ptr, part_lse_ptr, splits_ptr, out_ptr, lse_ptr,
    n_heads_q, n_rows,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    D_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)
    seq = tl.program_id(0)
    first = tl.load(splits_ptr + seq * 2)
    n_pieces = tl.load(splits_ptr + seq * 2 + 1)
    if n_pieces <= 1:
        return
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)  # query * H_q + head
    mask_r = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (offs_d < D_V)[None, :]

    top = tl.full([BLOCK_R], float("-inf"), tl.float32)  # the running maximum of lse_i
    total = tl.zeros([BLOCK_R], tl.float32)  # sum of exp(lse_i - top)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)  # sum of exp(lse_i - top) o_i
    for p in range(0, n_pieces):
        piece_rows = (first + p).to(tl.int64) * n_rows + rows  # (R,)
        lse_p = tl.load(part_lse_ptr + piece_rows, mask=mask_r, other=float("-inf"))
        o_tile = tl.load(part_out_ptr + piece_rows[:, None] * D_V + offs_d[None, :], mask=mask,
                         other=0.0)  # (R, BLOCK_D)
        new_top = tl.maximum(top, lse_p)
        base = tl.where(new_top == float("-inf"), 0.0, new_top)  # no -inf - -inf
        rescale = tl.exp(top - base)
        weight = tl.exp(lse_p - base)
        acc = acc * rescale[:, None] + weight[:, None] * o_tile
        total = total * rescale + weight
        top = new_top

    seen = total > 0.0
    out_rows = acc / tl.where(seen, total, 1.0)[:, None]
    query = (rows // n_heads_q).to(tl.int64)
    head = (rows % n_heads_q).to(tl.int64)
    seq64 = seq.to(tl.int64)
    o_ptrs = (out_ptr + seq64 * stride_ob + query[:, None] * stride_ot
              + head[:, None] * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out_rows.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(seen, top + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + seq64 * stride_lb + head * stride_lh + query, lse, mask=mask_r)


# The largest `max_pieces` for which `combine` takes the rows kernel: its pieces are read one
# after another, so many pieces of one sequence favour the one-row kernel's tiles of pieces.
ROWS_MAX_PIECES = 8
# Elements of a rows program's (BLOCK_R, BLOCK_D) accumulator (fp32, 4 warps: 16 per thread).
ROWS_TILE = 2048
# Elements of a one-row program's (BLOCK_P, BLOCK_D) tile of pieces (fp32, 4 warps: 64 per
# thread), and its narrowest column block.
PIECES_TILE = 8192
MIN_BLOCK_D = 128
# Programs per SM the one-row kernel's grid keeps at least, where its column blocks widen.
PROGRAMS_PER_SM = 4
# How the one-row merge is launched (HWATTN_COMBINE): "grid" (the default), a program for
# every sequence's every row and column block (`one_row_blocks`), or "strided", at most one
# wave of programs striding over the split sequences' rows alone (`combine_strided_kernel`).
# On an H100 (2026-12-08, docs/hopper.md) the strided launch merged an uneven batch (one
# 128K-token sequence among 63 of 1K) 3-5 µs sooner, but MLA's B 4 x 32K 5 µs later (its
# 128-column units read every piece's LSE once per unit): which batch a captured step meets
# is not known at launch, so the grid stays the default.
COMBINE_SCHEDULES = ("grid", "strided")
COMBINE_SCHEDULE = env_choice("HWATTN_COMBINE", COMBINE_SCHEDULES, "grid")
# Programs per SM of the strided launch: one wave of 4-warp programs (64 warps an SM).
STRIDED_PROGRAMS_PER_SM = 16
_device_sms = functools.lru_cache(maxsize=None)(device_sms)  # (eager steps call it per layer)


def one_row_blocks(batch: int, rows: int, d_v: int, max_pieces: int,
                   num_sms: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_P) of the one-row kernel: the widest column block (a power of two,
    down to MIN_BLOCK_D) whose grid still holds PROGRAMS_PER_SM programs per SM, and as many
    pieces per tile as PIECES_TILE leaves (8 to 64, no more than the pieces).

    Its grid is B × rows × column blocks whatever the lengths (CUDA graph replay), and in a
    long-context step most sequences are one piece, whose programs only read their count and
    return: MLA at 1 × 128K + 63 × 1K tokens launched 32768 programs of 128 columns to merge
    one sequence, 26 µs on an H100 where its 11.5 MB of partials take 4 (2026-12-07,
    docs/hopper.md). Whole 512-wide rows cut that grid fourfold; a batch of one keeps the
    narrow blocks, whose many programs share its one long merge."""
    block_d = triton.next_power_of_2(d_v)
    while (block_d > MIN_BLOCK_D
           and batch * rows * triton.cdiv(d_v, block_d) < PROGRAMS_PER_SM * num_sms):
        block_d //= 2
    return block_d, pieces_per_tile(max_pieces, block_d)


def pieces_per_tile(max_pieces: int, block_d: int) -> int:
    """BLOCK_P of a one-row program of BLOCK_D columns: as many pieces as PIECES_TILE leaves,
    8 to 64, no more than the pieces."""
    return max(8, min(64, triton.next_power_of_2(max_pieces), PIECES_TILE // block_d))


def combine(part_out, part_lse, splits, out, lse, *, max_pieces: int,
            num_sms: int | None = None, schedule: str | None = None):
    """Merge the pieces of every split sequence of a decode step into `out` and `lse`.

    part_out (capacity, L_q, H_q, D_v) and part_lse (capacity, L_q, H_q) fp32: each piece's
    partial output and LSE (`DecodePlan.buffers`); splits (B, 2) int32: each sequence's first
    piece and piece count; out (B, L_q, H_q, D_v), lse (B, H_q, L_q) fp32. Sequences of one
    piece are left as the attention kernel wrote them. max_pieces: the plan's most pieces of
    one sequence when the launch was made (a CUDA graph keeps that choice; more pieces after
    a refresh are still merged, more slowly); num_sms: the SMs the one-row kernel's grid is
    sized for (`one_row_blocks`; None: the device's); schedule: the one-row kernel's launch,
    "grid" or "strided" (None: HWATTN_COMBINE, `COMBINE_SCHEDULE`).
    """
    _, query_len, n_heads, d_v = part_out.shape
    batch = splits.shape[0]
    rows = query_len * n_heads
    strides = (*out.stride()[:3], *lse.stride()[:2])
    pdl = launch_options(out.device)
    if max_pieces <= ROWS_MAX_PIECES:
        block_d = triton.next_power_of_2(d_v)
        block_r = max(1, min(triton.next_power_of_2(rows), ROWS_TILE // block_d))
        combine_rows_kernel[(batch, triton.cdiv(rows, block_r))](
            part_out, part_lse, splits, out, lse, n_heads, rows, *strides,
            D_V=d_v, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4, **pdl,
        )
        return
    schedule = COMBINE_SCHEDULE if schedule is None else schedule
    if schedule not in COMBINE_SCHEDULES:
        raise ValueError(f"schedule must be one of {COMBINE_SCHEDULES}, got {schedule!r}")
    if num_sms is None:
        num_sms = _device_sms(part_out.device)
    if schedule == "strided":  # narrow blocks: no program is spent on a one-piece sequence
        block_d = min(MIN_BLOCK_D, triton.next_power_of_2(d_v))
        n_dblocks = triton.cdiv(d_v, block_d)
        grid = min(STRIDED_PROGRAMS_PER_SM * num_sms, batch * rows * n_dblocks)
        combine_strided_kernel[(grid,)](
            part_out, part_lse, splits, out, lse, n_heads, batch, *strides,
            L_Q=query_len, D_V=d_v, BLOCK_D=block_d, N_DBLOCKS=n_dblocks,
            BLOCK_P=pieces_per_tile(max_pieces, block_d),
            BLOCK_B=triton.next_power_of_2(batch), num_warps=4, **pdl,
        )
        return
    block_d, block_p = one_row_blocks(batch, rows, d_v, max_pieces, num_sms)
    combine_kernel[(batch, rows, triton.cdiv(d_v, block_d))](
        part_out, part_lse, splits, out, lse, n_heads, *strides,
        L_Q=query_len, D_V=d_v, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=4, **pdl,
    )
