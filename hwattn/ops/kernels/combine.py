"""The combine kernel: merge the partial outputs of a split sequence by their LSE.

Piece i of a sequence holds o_i (softmax-normalised over its own tokens) and lse_i. The whole
sequence's output is sum_i w_i o_i with w_i = exp(lse_i - lse), lse = log sum_i exp(lse_i).
A piece that saw none of a row's visible tokens has lse_i = -inf and weight 0.

One program merges one row ((query position, head) pair) × BLOCK_D output columns of one
sequence, reading BLOCK_P pieces per step as one tile so that the loads of all pieces are in
flight together (a batch of one long sequence has many pieces and few rows). Sequences with a
single piece were written by the attention kernel and are left alone, so the grid never
depends on the lengths (CUDA graph replay).
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
    L_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    row = tl.program_id(1)  # query * H_q + head
    pid_d = tl.program_id(2)
    first = tl.load(splits_ptr + seq * 2)
    n_pieces = tl.load(splits_ptr + seq * 2 + 1)
    if n_pieces <= 1:
        return
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
