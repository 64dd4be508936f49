"""The Hopper (sm_90) tied-state decode kernel for 128 rows of states at most 256 wide (GLA's
latent heads at L_q >= 2), in Gluon: two consumer warpgroups, 64 rows each, take turns on the
tensor cores.

The blocks stream through the same ring of slots as in `hopper_tied.py` (a producer warp issues
the TMA copies; both warpgroups hand a slot back). Each warpgroup runs the overlapped schedule
of `hopper_tied._consume_overlap` on its own rows, but issues its products only in its turn:
block j + 1's scores and block j's P·S go out together, then the other warpgroup's turn begins.
So one warpgroup's softmax, output rescale and bookkeeping run while the other's products keep
the tensor cores busy, without relying on how one thread's instructions are scheduled.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from hwattn.ops.kernels.hopper_tied import (
    _issue_scores,
    _load_rows,
    _out_bases,
    _produce,
    _softmax,
    _store_tile,
    mma_layout,
)

WG: gl.constexpr = gl.constexpr(4)  # warps of one consumer warpgroup


@gluon.jit
def _turn(turns, mine: gl.constexpr, i, FIRST: gl.constexpr):
    """Wait for this warpgroup's i-th turn (the first warpgroup's first turn is free: a fresh
    mbarrier counts as having completed the phase before 0)."""
    if FIRST:
        mbarrier.wait(turns.index(mine), (i & 1) ^ 1)
    else:
        mbarrier.wait(turns.index(mine), i & 1)


@gluon.jit
def _pass_turn(turns, other: gl.constexpr):
    """Hand the tensor cores to the other warpgroup once all four warps issued their products."""
    gl.thread_barrier()
    mbarrier.arrive(turns.index(other), count=1)


@gluon.jit
def _rows(q_base, q_rope_base, stride_qt, stride_qh, stride_qrt, stride_qrh, q_smem, qr_smem,
          kv_bufs, rope_bufs, ready, empty, turns, start, end, seqlen, qk_scale, head0, head_end,
          n_heads_q, single, out_base, lse_base, part_base, part_lse_base, stride_ot, stride_oh,
          stride_lh, WG_ID: gl.constexpr, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr,
          BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr,
          NUM_STAGES: gl.constexpr):
    """One consumer warpgroup: rows 64·WG_ID.. of the program's 128, every column."""
    ROWS: gl.constexpr = 64
    FIRST: gl.constexpr = WG_ID == 0
    s_layout: gl.constexpr = mma_layout(WG, 1, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(WG, 1, D_V)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype
    q_rows = q_smem.index(WG_ID)
    qr_rows = qr_smem.index(WG_ID)
    q_rows.store(_load_rows(q_base, stride_qt, stride_qh, head0, head_end, WG_ID * ROWS, ROWS,
                            L_Q, HEADS_PER_PROG, D_NOPE, WG))
    qr_rows.store(_load_rows(q_rope_base, stride_qrt, stride_qrh, head0, head_end, WG_ID * ROWS,
                             ROWS, L_Q, HEADS_PER_PROG, qr_smem.shape[2], WG))
    fence_async_shared()  # our queries, before our products read them
    gl.thread_barrier()
    o = gl.zeros([ROWS, D_V], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    n_blocks = gl.cdiv(end - start, BLOCK_N)

    mbarrier.wait(ready.index(0), 0)
    s = _issue_scores(q_rows, qr_rows, kv_bufs.index(0), rope_bufs.index(0), start, end, ROWS,
                      BLOCK_N, D_NOPE, D_V, WG)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start, end, seqlen, WG_ID * ROWS, qk_scale, L_Q,
                                  BLOCK_N, dtype)
    if n_blocks > 1:
        mbarrier.wait(ready.index(1 % NUM_STAGES), (1 // NUM_STAGES) & 1)
    for j in range(n_blocks - 1):
        slot = j % NUM_STAGES
        nxt = (j + 1) % NUM_STAGES
        _turn(turns, WG_ID, j, FIRST)
        s = _issue_scores(q_rows, qr_rows, kv_bufs.index(nxt), rope_bufs.index(nxt),
                          start + (j + 1) * BLOCK_N, end, ROWS, BLOCK_N, D_NOPE, D_V, WG)
        alpha = warpgroup_mma_wait(num_outstanding=2, deps=(alpha, ))  # at once (see ovl)
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p, p_layout)
        o = warpgroup_mma(p_op, kv_bufs.index(slot), o, is_async=True)
        _pass_turn(turns, 1 - WG_ID)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # QK(j + 1); P·S(j) runs on
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start + (j + 1) * BLOCK_N, end, seqlen,
                                      WG_ID * ROWS, qk_scale, L_Q, BLOCK_N, dtype)
        # (A branch between the softmax and the product's wait keeps ptxas from hoisting the
        # wait above the softmax; block j + 2's copy has to be waited for anyway.)
        if j + 2 < n_blocks:
            mbarrier.wait(ready.index((j + 2) % NUM_STAGES), ((j + 2) // NUM_STAGES) & 1)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_op))
        gl.thread_barrier()  # all four warps' products on this slot have completed
        mbarrier.arrive(empty.index(slot), count=1)
    last = (n_blocks - 1) % NUM_STAGES
    _turn(turns, WG_ID, n_blocks - 1, FIRST)
    o = o * gl.convert_layout(alpha, row_o)[:, None]
    p_op = gl.convert_layout(p, p_layout)
    o = warpgroup_mma(p_op, kv_bufs.index(last), o, is_async=True)
    _pass_turn(turns, 1 - WG_ID)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_op))
    gl.thread_barrier()
    mbarrier.arrive(empty.index(last), count=1)
    _store_tile(o, l_i, m_i, WG_ID * ROWS, 0, head0, head_end, n_heads_q, single, out_base,
                lse_base, part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q,
                HEADS_PER_PROG, D_V, True)


@gluon.jit
def pingpong_schedule(args, item, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                      PAGE: gl.constexpr, NUM_STAGES: gl.constexpr, num_warps: gl.constexpr):
    """One work item of `hwattn.ops.kernels.hopper.hopper_decode_kernel` in the pingpong
    schedule; `args` and `item` as it passes them."""
    gl.static_assert(num_warps == WG, "the parent region is the first warpgroup")
    gl.static_assert(BLOCK_M == 128 and BLOCK_N == 64, "two 64-row warpgroups, 64-token blocks")
    (q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, out_ptr, lse_ptr, part_out_ptr,
     part_lse_ptr, qk_scale, n_heads_q, group, stride_qb, stride_qt, stride_qh, stride_qrb,
     stride_qrt, stride_qrh, stride_btb, stride_ob, stride_ot, stride_oh, stride_lb,
     stride_lh) = args
    pid_item, seq64, start, end, seqlen, n_pieces, kv_head, head0 = item
    head_end = (kv_head + 1) * group
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    # Each warpgroup loads its own 64 rows of queries.
    q_smem = gl.allocate_shared_memory(dtype, [2, 64, D_NOPE],
                                       gl.NVMMASharedLayout.get_default_for([64, D_NOPE], dtype))
    qr_smem = gl.allocate_shared_memory(dtype, [2, 64, D_R],
                                        gl.NVMMASharedLayout.get_default_for([64, D_R], dtype))
    kv_bufs = gl.allocate_shared_memory(
        dtype, [NUM_STAGES, BLOCK_N, D_V], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_V], dtype))
    rope_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D_R], rope_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both warpgroups hand a slot back
    turns = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(turns.index(i), count=1)
    fence_async_shared()  # the barrier inits, before the copies arrive on them
    gl.thread_barrier()

    q_base = q_ptr + seq64 * stride_qb
    q_rope_base = q_rope_ptr + seq64 * stride_qrb
    table_row = block_table_ptr + seq64 * stride_btb
    out_base, lse_base, part_base, part_lse_base, single = _out_bases(
        out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, pid_item, seq64, n_pieces, n_heads_q,
        stride_ob, stride_lb, L_Q, D_V)
    # (The argument tuples are written out: a tuple bound to a name turns constexprs to tensors.)
    gl.warp_specialize([
        (_rows, (q_base, q_rope_base, stride_qt, stride_qh, stride_qrt, stride_qrh, q_smem, qr_smem,
                 kv_bufs, rope_bufs, ready, empty, turns, start, end, seqlen, qk_scale, head0,
                 head_end, n_heads_q, single, out_base, lse_base, part_base, part_lse_base,
                 stride_ot, stride_oh, stride_lh, 0, L_Q, HEADS_PER_PROG, BLOCK_N, D_NOPE, D_V,
                 NUM_STAGES)),
        (_rows, (q_base, q_rope_base, stride_qt, stride_qh, stride_qrt, stride_qrh, q_smem, qr_smem,
                 kv_bufs, rope_bufs, ready, empty, turns, start, end, seqlen, qk_scale, head0,
                 head_end, n_heads_q, single, out_base, lse_base, part_base, part_lse_base,
                 stride_ot, stride_oh, stride_lh, 1, L_Q, HEADS_PER_PROG, BLOCK_N, D_NOPE, D_V,
                 NUM_STAGES)),
        (_produce, (kv_desc, rope_desc, kv_bufs, rope_bufs, ready, empty, table_row, start, end,
                    kv_head * D_V, PAGE, BLOCK_N, D_V, NUM_STAGES)),
    ], [WG, 1], [240, 24])
