"""The Hopper (sm_90) decode kernel's entry point: one Gluon kernel for every schedule.

A program takes one work item of the split-KV plan (`hwattn/ops/plan.py`: a piece of one
sequence) for one block of query heads that share a tied state head, reads where the item
lies, and runs it in the schedule its launch asks for (`SCHEDULE`, a constexpr, so each
compiled kernel holds one schedule):

- "ring": `hopper_tied.tied_schedule` (a producer warp or the consumers themselves filling a
  ring of TMA slots; one or two consumer warpgroups; the overlapped consumer order; an fp8
  cache widened by its producer warps, CACHE_STAGES > 0);
- "duo": `hopper_duo.duo_schedule` (two warpgroups taking alternate 64-token blocks of MLA's
  and GLA's latents);
- "pingpong": `hopper_pingpong.pingpong_schedule` (two 64-row warpgroups taking turns to
  issue their products).

Every schedule gets the same `args` (the kernel's runtime arguments but the plan's, in
signature order) and `item` (program's item index, the sequence as int64, the piece's token
range [start, end), the sequence's length, how many pieces it has, its state head and first
query head). Constexprs a schedule does not use are ignored. `out_scale` multiplies the
ring schedule's output of an fp8 cache (its quantisation scale, in fp32 before rounding).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

from hwattn.ops.kernels.hopper_duo import duo_schedule
from hwattn.ops.kernels.hopper_pingpong import pingpong_schedule
from hwattn.ops.kernels.hopper_tied import store_empty_item, tied_schedule
from hwattn.ops.kernels.pdl import gluon_wait_for_predecessor


@gluon.jit
def hopper_decode_kernel(
    q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, seqlens_ptr,
    items_ptr, splits_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, out_scale, n_heads_q, group,
    stride_qb, stride_qt, stride_qh,
    stride_qrb, stride_qrt, stride_qrh,
    stride_btb,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr, HEAD_BLOCKS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    D_NOPE: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr, PAGE: gl.constexpr,
    SCHEDULE: gl.constexpr, NUM_STAGES: gl.constexpr, WARPS_N: gl.constexpr,
    SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, CACHE_STAGES: gl.constexpr,
    PDL: gl.constexpr, num_warps: gl.constexpr,
):
    gluon_wait_for_predecessor(PDL)  # (HWATTN_PDL: hwattn/ops/kernels/pdl.py)
    # Head blocks vary fastest: programs reading the same state tiles run side by side, so the
    # second read of a tile (several head blocks per state head) comes from L2.
    pid_head = gl.program_id(0)
    pid_item = gl.program_id(1)
    seq = gl.load(items_ptr + pid_item * 3)
    if seq < 0:
        return
    start = gl.load(items_ptr + pid_item * 3 + 1)
    seqlen = gl.load(seqlens_ptr + seq)
    # A plan made for other lengths (a GPU call cannot check it) must not read past the
    # sequence's pages: the item ends at the length the call passes (a no-op for a plan of
    # these lengths, whose items end at them). An item left with no token writes what
    # attending nothing gives: its consumers would wait for a first block no producer sends.
    end = gl.minimum(gl.load(items_ptr + pid_item * 3 + 2), seqlen)
    n_pieces = gl.load(splits_ptr + seq * 2 + 1)
    seq64 = seq.to(gl.int64)
    kv_head = pid_head // HEAD_BLOCKS
    head0 = kv_head * group + (pid_head % HEAD_BLOCKS) * HEADS_PER_PROG
    args = (q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, out_ptr, lse_ptr,
            part_out_ptr, part_lse_ptr, qk_scale, n_heads_q, group, stride_qb, stride_qt,
            stride_qh, stride_qrb, stride_qrt, stride_qrh, stride_btb, stride_ob, stride_ot,
            stride_oh, stride_lb, stride_lh)
    item = (pid_item, seq64, start, end, seqlen, n_pieces, kv_head, head0)
    if start >= end:
        store_empty_item(args, item, L_Q, HEADS_PER_PROG, BLOCK_M, D_V, num_warps)
        return
    if SCHEDULE == "duo":
        duo_schedule(args, item, L_Q, HEADS_PER_PROG, BLOCK_M, BLOCK_N, D_NOPE, D_V, D_R, PAGE,
                     NUM_STAGES // 2, num_warps)
    elif SCHEDULE == "pingpong":
        pingpong_schedule(args, item, L_Q, HEADS_PER_PROG, BLOCK_M, BLOCK_N, D_NOPE, D_V, D_R,
                          PAGE, NUM_STAGES, num_warps)
    else:
        tied_schedule(args, item, out_scale, L_Q, HEADS_PER_PROG, BLOCK_M, BLOCK_N, D_NOPE, D_V,
                      D_R, PAGE, NUM_STAGES, WARPS_N, SPECIALIZE, OVERLAP, CACHE_STAGES, num_warps)
