"""The combine kernel: merge the partial outputs of a split sequence by their LSE.

Piece i of a sequence holds o_i (softmax-normalised over its own tokens) and lse_i. The whole
sequence's output is sum_i w_i o_i with w_i = exp(lse_i - lse), lse = log sum_i exp(lse_i).
A piece that saw none of a row's visible tokens has lse_i = -inf and weight 0.

One program merges BLOCK_ROWS rows ((query position, head) pairs) × BLOCK_D output columns of
one sequence; sequences with a single piece were written by the attention kernel and are left
alone, so the grid never depends on the lengths (CUDA graph replay).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def combine_kernel(
    part_out_ptr, part_lse_ptr, splits_ptr, out_ptr, lse_ptr,
    n_heads_q,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    L_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    pid_rows = tl.program_id(1)
    pid_d = tl.program_id(2)
    first = tl.load(splits_ptr + seq * 2)
    n_pieces = tl.load(splits_ptr + seq * 2 + 1)
    if n_pieces <= 1:
        return
    offs_row = pid_rows * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # row = query * H_q + head
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_row = offs_row < L_Q * n_heads_q
    mask_d = offs_d < D_V
    rows_per_piece = L_Q * n_heads_q

    lse_max = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    for i in range(n_pieces):
        piece = (first + i).to(tl.int64)
        lse_i = tl.load(part_lse_ptr + piece * rows_per_piece + offs_row, mask=mask_row,
                        other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_i)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)

    total = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], tl.float32)
    for i in range(n_pieces):
        piece = (first + i).to(tl.int64)
        part_rows = piece * rows_per_piece + offs_row  # (R,)
        lse_i = tl.load(part_lse_ptr + part_rows, mask=mask_row, other=float("-inf"))
        weight = tl.exp(lse_i - lse_max)  # (R,)
        o_tile = tl.load(part_out_ptr + part_rows[:, None] * D_V + offs_d[None, :],
                         mask=mask_row[:, None] & mask_d[None, :], other=0.0)  # (R, BLOCK_D)
        total += weight
        acc += weight[:, None] * o_tile

    seen = total > 0.0
    out_tile = acc / tl.where(seen, total, 1.0)[:, None]
    query = offs_row // n_heads_q
    head = offs_row % n_heads_q
    seq64 = seq.to(tl.int64)
    o_ptrs = (out_ptr + seq64 * stride_ob + query[:, None].to(tl.int64) * stride_ot
              + head[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
    tl.store(o_ptrs, out_tile.to(out_ptr.dtype.element_ty), mask=mask_row[:, None] & mask_d[None, :])
    if pid_d == 0:
        lse = tl.where(seen, lse_max + tl.log(tl.where(seen, total, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq64 * stride_lb + head.to(tl.int64) * stride_lh + query, lse,
                 mask=mask_row)
