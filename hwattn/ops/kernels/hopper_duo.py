"""The Hopper (sm_90) tied-state decode kernel for wide states (MLA's 512-wide latent), in Gluon:
two consumer warpgroups take turns on blocks of 64 tokens and each owns half of the value columns.

The state tile S (64 tokens × D_V) is the key of scores = Q·Kᵀ (its first D_NOPE columns plus the
RoPE key) and the value of out = P·S. A 64 × D_V fp32 accumulator does not fit one warpgroup's
registers at D_V = 512, so each warpgroup keeps the output of half the columns. The schedule:

- Warpgroup 0 computes the scores of the even blocks, warpgroup 1 those of the odd blocks, each a
  full 64 × 64 tile (wide wgmma N, the shared-memory read of the queries amortised over 64 tokens).
- Softmax state crosses over through shared memory: warpgroup 0 updates the running row max with
  its block and publishes the rescale factor; warpgroup 1 continues from that max with its block
  and publishes its factor. Each warpgroup then multiplies its own probabilities into its half of
  the values (P stays in registers), and the other's probabilities, read from shared memory, into
  the same half: every block's S tile is read once for both halves.
- While one warpgroup runs its softmax, the tensor cores run the other's products; no barrier
  spans the whole program inside the loop.
- Each block's tile arrives as 64-column boxes on their own mbarriers, in PAIRS × 2 slots. The
  warpgroup that reads a half of a slot last issues the copy of the next block into it the moment
  its products on it complete, and the next scores start on the boxes that arrive first.

Outputs and partials follow `attend.py` (rows are (query head, query position) pairs; scores in
base 2 with log2(e) folded into `qk_scale`), so `combine.py` merges split sequences.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from hwattn.ops.kernels.hopper_tied import (
    COL_BOX,
    _load_rows,
    _out_bases,
    _slot_row,
    _store_tile,
    mma_layout,
    row_layout,
)

# Warps of one consumer warpgroup; each partition is one.
WG: gl.constexpr = gl.constexpr(4)


@gluon.jit
def _issue_tiles(kv_desc, rope_desc, kv_buf, rope_buf, bars, base, row, kv_col,
                 T0: gl.constexpr, T1: gl.constexpr, N_STATE: gl.constexpr, pred):
    """Copy boxes [T0, T1) of one block into a slot: box t < N_STATE is state columns
    64t..64t+63, box N_STATE the RoPE key; box t completes on bars[base + t]."""
    for t in gl.static_range(T0, T1):
        bar = bars.index(base + t)
        if t < N_STATE:
            mbarrier.expect(bar, kv_desc.block_type.nbytes, pred=pred)
            tma.async_copy_global_to_shared(kv_desc, [row, kv_col + t * COL_BOX], bar,
                                            kv_buf.slice(t * COL_BOX, COL_BOX, dim=1), pred=pred)
        else:
            mbarrier.expect(bar, rope_desc.block_type.nbytes, pred=pred)
            tma.async_copy_global_to_shared(rope_desc, [row, 0], bar, rope_buf, pred=pred)


@gluon.jit
def _zero_box(box, n_valid, BLOCK_N: gl.constexpr):
    """Zero rows >= n_valid of one 64-column box of a slot: past a piece's end the cache holds
    whatever was there (NaN in unwritten slots), and a NaN times a zero probability would poison
    P·S. Runs only on a piece's last, partial block."""
    layout: gl.constexpr = row_layout(COL_BOX, WG)
    rows = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, COL_BOX, layout=gl.SliceLayout(0, layout))
    keep = (rows[:, None] < n_valid) & (cols[None, :] < COL_BOX)  # (N, 64)
    tile = box.load(layout)
    box.store(gl.where(keep, tile, gl.zeros_like(tile)))
    fence_async_shared()  # the products read the slot through the async proxy
    gl.thread_barrier()


@gluon.jit
def _qk_issue(q_smem, qr_op, kv_buf, rope_buf, bars, base, phase, n_valid, s, T0: gl.constexpr,
              T1: gl.constexpr, ROPE: gl.constexpr, FIRST: gl.constexpr, BLOCK_N: gl.constexpr,
              N_STATE: gl.constexpr):
    """Issue the score products of key boxes T0..T1-1 (and of the RoPE box if ROPE), each once
    its copy has landed; FIRST: the first product starts the accumulator. A block with fewer
    than BLOCK_N valid rows has the rest of each state box zeroed first, for both warpgroups'
    value products. Returns the accumulator token."""
    for t in gl.static_range(T0, T1):
        mbarrier.wait(bars.index(base + t), phase)
        box = kv_buf.slice(t * COL_BOX, COL_BOX, dim=1)
        if n_valid < BLOCK_N:
            _zero_box(box, n_valid, BLOCK_N)
        s = warpgroup_mma(q_smem.slice(t * COL_BOX, COL_BOX, dim=1), box.permute((1, 0)), s,
                          use_acc=not (FIRST and t == T0), is_async=True)
    if ROPE:
        mbarrier.wait(bars.index(base + N_STATE), phase)
        s = warpgroup_mma(qr_op, rope_buf.permute((1, 0)), s, use_acc=not (FIRST and T0 == T1),
                          is_async=True)
    return s


@gluon.jit
def _scores(s, n0, end, seqlen, qk_scale, L_Q: gl.constexpr, BLOCK_N: gl.constexpr):
    """Scaled scores of the block at token n0, -inf where a row may not look: past the piece's
    end (or a block past the end altogether) or past the causal diagonal, aligned bottom-right
    (row r, query r % L_Q, sees positions < seqlen - L_Q + r % L_Q + 1)."""
    s = s * qk_scale
    if n0 + BLOCK_N > end - L_Q + 1:
        layout: gl.constexpr = s.type.layout
        tok = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))  # (N,)
        rows = gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, layout))  # (M,)
        limit = seqlen - L_Q + rows % L_Q + 1
        visible = (tok[None, :] < end) & (tok[None, :] < limit[:, None])  # (M, N)
        s = gl.where(visible, s, float("-inf"))
    return s


@gluon.jit
def _finite(m):
    """A running max to subtract: 0 while a row has seen nothing (keeps exp2 finite)."""
    return gl.where(m == float("-inf"), 0.0, m)


@gluon.jit
def _finish(o, l_i, vec_even, vec_odd, vec_m, sync, MINE: gl.constexpr, head0, head_end,
            n_heads_q, single, out_base, lse_base, part_base, part_lse_base, stride_ot,
            stride_oh, stride_lh, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr,
            D_V: gl.constexpr):
    """The end of warpgroup MINE (0 even, 1 odd): its row sum and the other's are over different
    blocks at the same final max, so each publishes its own (sync 4 + MINE, in its factor
    vector), adds the other's, and stores its half of the columns (the even warpgroup the left
    half and the LSE)."""
    row_l: gl.constexpr = l_i.type.layout
    vec_mine = vec_odd if MINE == 1 else vec_even
    vec_other = vec_even if MINE == 1 else vec_odd
    vec_mine.index(0).store(l_i)
    gl.thread_barrier()
    mbarrier.arrive(sync.index(4 + MINE), count=1)
    mbarrier.wait(sync.index(5 - MINE), 0)
    l_i = l_i + vec_other.index(0).load(row_l)
    m_i = vec_m.index(0).load(row_l)
    _store_tile(o, l_i, m_i, 0, MINE * (D_V // 2), head0, head_end, n_heads_q, single, out_base,
                lse_base, part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q,
                HEADS_PER_PROG, D_V, MINE == 0)


@gluon.jit
def _half(q_smem, qr_smem, kv_desc, rope_desc, kv_bufs, rope_bufs, p_even, p_odd, vec_m, vec_even,
          vec_odd, tile_bars, sync, zero, table_row, start, end, seqlen, kv_col, qk_scale,
          head0, head_end, n_heads_q, single, out_base, lse_base, part_base, part_lse_base,
          stride_ot, stride_oh, stride_lh, MINE: gl.constexpr,
          L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr, BLOCK_M: gl.constexpr,
          BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr, PAGE: gl.constexpr,
          PAIRS: gl.constexpr):
    """Warpgroup MINE: scores and softmax of the even (MINE = 0) or odd (1) blocks, output
    columns [0, D_V / 2) or [D_V / 2, D_V). The two run a pair of blocks in different orders
    (the even one opens the pair's softmax, the odd one continues it): a branch on MINE each."""
    HALF: gl.constexpr = D_V // 2
    N_STATE: gl.constexpr = D_V // COL_BOX
    NT: gl.constexpr = N_STATE + 1  # boxes per block: the state's, then the RoPE key's
    N_LEFT: gl.constexpr = HALF // COL_BOX  # boxes of the left value half
    SLOTS: gl.constexpr = 2 * PAIRS
    s_layout: gl.constexpr = mma_layout(WG, 1, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(WG, 1, HALF)
    row_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    p_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    qr_op = qr_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))

    o = gl.zeros([BLOCK_M, HALF], gl.float32, o_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_l)
    n_blocks = gl.cdiv(end - start, BLOCK_N)
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    if MINE == 0:
        s = _qk_issue(q_smem.index(0), qr_op, kv_bufs.index(0), rope_bufs.index(0), tile_bars, 0,
                      0, end - start, s, 0, N_STATE, True, True, BLOCK_N, N_STATE)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    else:
        # Scores start on the right half's boxes and the RoPE box (their copies go out first).
        if n_blocks > 1:
            n_valid = end - start - BLOCK_N
            s = _qk_issue(q_smem.index(0), qr_op, kv_bufs.index(1), rope_bufs.index(1), tile_bars,
                          NT, 0, n_valid, s, N_LEFT, N_STATE, True, True, BLOCK_N, N_STATE)
            s = _qk_issue(q_smem.index(0), qr_op, kv_bufs.index(1), rope_bufs.index(1), tile_bars,
                          NT, 0, n_valid, s, 0, N_LEFT, False, False, BLOCK_N, N_STATE)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    for k in range(gl.cdiv(n_blocks, 2)):
        # This warpgroup's block j and the other's of the pair, j + 1 or j - 1 (the odd one's
        # block may lie past the end).
        j = 2 * k + MINE
        # `varying` is 0, but the compiler cannot tell: hoisting every box's matrix descriptors
        # and shared addresses out of the loop (nothing else changes with PAIRS = 1) would spill.
        varying = k * zero
        slot = (j - MINE) % SLOTS + varying  # the pair's even slot; the odd one is slot + 1
        q_view = q_smem.index(varying)
        refill = j + SLOTS  # the block that follows in our slot (in the other's: refill ± 1)
        if MINE == 0:
            row_even = _slot_row(table_row, start + refill * BLOCK_N, end, PAGE)
            row_odd = _slot_row(table_row, start + (refill + 1) * BLOCK_N, end, PAGE)
        else:
            row_odd = _slot_row(table_row, start + refill * BLOCK_N, end, PAGE)
            row_even = _slot_row(table_row, start + (refill - 1) * BLOCK_N, end, PAGE)
        n0 = start + j * BLOCK_N
        kv_even = kv_bufs.index(slot)
        kv_odd = kv_bufs.index(slot + 1)
        nxt = j + 2  # our next block
        slot_nxt = nxt % SLOTS + varying
        s = _scores(s, n0, end, seqlen, qk_scale, L_Q, BLOCK_N)

        if MINE == 0:
            # Softmax of block j from the running max the odd warpgroup left.
            m_prev = vec_m.index(varying).load(row_l)
            m_new = gl.maximum(m_prev, gl.max(s, 1))
            m_use = _finite(m_new)
            alpha = gl.exp2(m_prev - m_use)  # (M,)
            p = gl.exp2(s - m_use[:, None])  # (M, N)
            l_i = l_i * alpha + gl.sum(p, 1)
            vec_m.index(varying).store(m_new)
            vec_even.index(varying).store(alpha)
            gl.thread_barrier()
            mbarrier.arrive(sync.index(0), count=1)  # the odd warpgroup may continue from m_new

            o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
            p_op = gl.convert_layout(p.to(kv_bufs.dtype), p_op_layout)
            o = warpgroup_mma(p_op, kv_even.slice(0, HALF, dim=1), o, is_async=True)
            o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            # Block nxt may replace the left half of the even slot (the odd warpgroup never
            # reads it).
            _issue_tiles(kv_desc, rope_desc, kv_even, rope_bufs.index(slot), tile_bars,
                         slot * NT, row_even, kv_col, 0, N_LEFT, N_STATE, refill < n_blocks)

            # The odd warpgroup's factor takes this block's P and our output to its max.
            mbarrier.wait(sync.index(1), k & 1)
            beta = vec_odd.index(varying).load(row_l)
            p_even.index(varying).store((p * beta[:, None]).to(kv_bufs.dtype))
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(sync.index(2), count=1)  # P of block j is in shared memory
            l_i = l_i * beta
            o = o * gl.convert_layout(beta, gl.SliceLayout(1, o_layout))[:, None]
            mbarrier.wait(sync.index(3), k & 1)  # P of block j + 1 is in shared memory
            # (Each branch issues and waits for its own products: a branch may not turn the
            # accumulator token into a tensor.)
            if nxt < n_blocks:
                o = warpgroup_mma(p_odd.index(varying), kv_odd.slice(0, HALF, dim=1), o,
                                  is_async=True)
                # Scores of block nxt behind it, the left boxes first (their copies went out
                # first).
                kv_nxt = kv_bufs.index(slot_nxt)
                phase = (nxt // SLOTS) & 1
                n_valid = end - start - nxt * BLOCK_N
                s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
                s = _qk_issue(q_view, qr_op, kv_nxt, rope_bufs.index(slot_nxt), tile_bars,
                              slot_nxt * NT, phase, n_valid, s, 0, N_LEFT, False, True, BLOCK_N,
                              N_STATE)
                o = warpgroup_mma_wait(num_outstanding=N_LEFT, deps=(o, ))
                _issue_tiles(kv_desc, rope_desc, kv_odd, rope_bufs.index(slot + 1), tile_bars,
                             (slot + 1) * NT, row_odd, kv_col, 0, N_LEFT, N_STATE,
                             refill + 1 < n_blocks)
                s = _qk_issue(q_view, qr_op, kv_nxt, rope_bufs.index(slot_nxt), tile_bars,
                              slot_nxt * NT, phase, n_valid, s, N_LEFT, N_STATE, True, False,
                              BLOCK_N, N_STATE)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            elif n0 + BLOCK_N < end:  # the last block is the odd one
                o = warpgroup_mma(p_odd.index(varying), kv_odd.slice(0, HALF, dim=1), o,
                                  is_async=True)
                o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
        else:
            # Continue the running max from the even warpgroup's block j - 1; a block past the
            # end is all -inf and changes nothing.
            mbarrier.wait(sync.index(0), k & 1)
            m_prev = vec_m.index(varying).load(row_l)
            alpha = vec_even.index(varying).load(row_l)
            m_new = gl.maximum(m_prev, gl.max(s, 1))
            m_use = _finite(m_new)
            beta = gl.exp2(m_prev - m_use)  # (M,)
            vec_m.index(varying).store(m_new)
            vec_odd.index(varying).store(beta)
            gl.thread_barrier()
            mbarrier.arrive(sync.index(1), count=1)

            p = gl.exp2(s - m_use[:, None])  # (M, N)
            scale = alpha * beta
            l_i = l_i * scale + gl.sum(p, 1)
            o = o * gl.convert_layout(scale, gl.SliceLayout(1, o_layout))[:, None]
            p16 = p.to(kv_bufs.dtype)
            p_odd.index(varying).store(p16)
            fence_async_shared()
            gl.thread_barrier()
            mbarrier.arrive(sync.index(3), count=1)  # P of block j is in shared memory
            if n0 < end:
                o = warpgroup_mma(gl.convert_layout(p16, p_op_layout),
                                  kv_odd.slice(HALF, HALF, dim=1), o, is_async=True)
                mbarrier.wait(sync.index(2), k & 1)  # P of block j - 1 is in shared memory
                o = warpgroup_mma(p_even.index(varying), kv_even.slice(HALF, HALF, dim=1), o,
                                  is_async=True)
                # Each slot's right half (and RoPE box) is free once our product on it completes.
                o = warpgroup_mma_wait(num_outstanding=1, deps=(o, ))
                _issue_tiles(kv_desc, rope_desc, kv_odd, rope_bufs.index(slot + 1), tile_bars,
                             (slot + 1) * NT, row_odd, kv_col, N_LEFT, NT, N_STATE,
                             refill < n_blocks)
                o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
                _issue_tiles(kv_desc, rope_desc, kv_even, rope_bufs.index(slot), tile_bars,
                             slot * NT, row_even, kv_col, N_LEFT, NT, N_STATE,
                             refill - 1 < n_blocks)
            else:  # no block j (the slot may never have been filled): only the even one's product
                mbarrier.wait(sync.index(2), k & 1)
                o = warpgroup_mma(p_even.index(varying), kv_even.slice(HALF, HALF, dim=1), o,
                                  is_async=True)
                o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
            if nxt < n_blocks:
                kv_nxt = kv_bufs.index(slot_nxt)
                phase = (nxt // SLOTS) & 1
                n_valid = end - start - nxt * BLOCK_N
                s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
                s = _qk_issue(q_view, qr_op, kv_nxt, rope_bufs.index(slot_nxt), tile_bars,
                              slot_nxt * NT, phase, n_valid, s, N_LEFT, N_STATE, True, True,
                              BLOCK_N, N_STATE)
                s = _qk_issue(q_view, qr_op, kv_nxt, rope_bufs.index(slot_nxt), tile_bars,
                              slot_nxt * NT, phase, n_valid, s, 0, N_LEFT, False, False, BLOCK_N,
                              N_STATE)
                s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))

    # (The factor vectors are free for the row sums: the odd warpgroup read its last one before
    # storing the P the even one waits for, and stores its sum after waiting for the even one's
    # last P, which the even one stored after reading the odd one's last factor.)
    _finish(o, l_i, vec_even, vec_odd, vec_m, sync, MINE, head0, head_end, n_heads_q, single,
            out_base, lse_base, part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q,
            HEADS_PER_PROG, D_V)


@gluon.jit
def duo_schedule(args, item, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                 PAGE: gl.constexpr, PAIRS: gl.constexpr, num_warps: gl.constexpr):
    """One work item of `hwattn.ops.kernels.hopper.hopper_decode_kernel` in the duo
    schedule; `args` and `item` as it passes them."""
    gl.static_assert(num_warps == WG, "the parent region is the even warpgroup")
    gl.static_assert(BLOCK_M == 64 and BLOCK_N == 64, "one wgmma row block, 64-token blocks")
    gl.static_assert(D_NOPE == D_V, "every state box is a key box (MLA's and GLA's latents)")
    (q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, out_ptr, lse_ptr, part_out_ptr,
     part_lse_ptr, qk_scale, n_heads_q, group, stride_qb, stride_qt, stride_qh, stride_qrb,
     stride_qrt, stride_qrh, stride_btb, stride_ob, stride_ot, stride_oh, stride_lb,
     stride_lh) = args
    pid_item, seq64, start, end, seqlen, n_pieces, kv_head, head0 = item
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    N_STATE: gl.constexpr = D_V // COL_BOX
    NT: gl.constexpr = N_STATE + 1
    SLOTS: gl.constexpr = 2 * PAIRS

    tile_bars = gl.allocate_shared_memory(gl.int64, [SLOTS * NT, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS * NT):
        mbarrier.init(tile_bars.index(i), count=1)
    # 0: even max published, 1: odd max published, 2: even P stored, 3: odd P stored,
    # 4 / 5: even / odd row sums stored.
    sync = gl.allocate_shared_memory(gl.int64, [6, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(6):
        mbarrier.init(sync.index(i), count=1)
    kv_bufs = gl.allocate_shared_memory(
        dtype, [SLOTS, BLOCK_N, D_V], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_V], dtype))
    rope_bufs = gl.allocate_shared_memory(dtype, [SLOTS, BLOCK_N, D_R], rope_desc.layout)
    fence_async_shared()  # barrier inits, before the copies arrive on them
    gl.thread_barrier()

    # The first blocks' copies go out before the queries are read.
    table_row = block_table_ptr + seq64 * stride_btb
    kv_col = kv_head * D_V
    n_blocks = gl.cdiv(end - start, BLOCK_N)
    for j in gl.static_range(SLOTS):
        _issue_tiles(kv_desc, rope_desc, kv_bufs.index(j), rope_bufs.index(j), tile_bars, j * NT,
                     _slot_row(table_row, start + j * BLOCK_N, end, PAGE), kv_col, 0, NT, N_STATE,
                     j < n_blocks)

    # Queries: row r is head head0 + r // L_Q at query position r % L_Q; padding rows are zero.
    # Loaded 64 columns at a time (a whole 64 × 512 tile would take 128 registers per thread).
    q_smem = gl.allocate_shared_memory(dtype, [1, BLOCK_M, D_NOPE],
                                       gl.NVMMASharedLayout.get_default_for([BLOCK_M, D_NOPE], dtype))
    head_end = (kv_head + 1) * group
    q_base = q_ptr + seq64 * stride_qb
    for c in gl.static_range(D_NOPE // COL_BOX):
        q_tile = _load_rows(q_base + c * COL_BOX, stride_qt, stride_qh, head0, head_end, 0,
                            BLOCK_M, L_Q, HEADS_PER_PROG, COL_BOX, num_warps)  # (M, 64)
        q_smem.index(0).slice(c * COL_BOX, COL_BOX, dim=1).store(q_tile)
    qr_tile = _load_rows(q_rope_ptr + seq64 * stride_qrb, stride_qrt, stride_qrh, head0, head_end,
                         0, BLOCK_M, L_Q, HEADS_PER_PROG, D_R, num_warps)  # (M, D_R)
    # The RoPE queries wait in the odd P buffer until both warpgroups hold them in registers
    # (the odd warpgroup first writes P after the even one's first softmax).
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    p_even = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], p_layout)
    p_odd = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], p_layout)
    qr_smem = p_odd.index(0).slice(0, D_R, dim=1)
    qr_smem.store(qr_tile)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    vec_m = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M], vec_layout)
    vec_m.index(0).store(gl.full([BLOCK_M], float("-inf"), gl.float32,
                                 gl.SliceLayout(1, row_layout(COL_BOX, num_warps))))
    vec_even = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M], vec_layout)
    vec_odd = gl.allocate_shared_memory(gl.float32, [1, BLOCK_M], vec_layout)
    fence_async_shared()  # the queries, before the products read them
    gl.thread_barrier()

    out_base, lse_base, part_base, part_lse_base, single = _out_bases(
        out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, pid_item, seq64, n_pieces, n_heads_q,
        stride_ob, stride_lb, L_Q, D_V)
    # (The argument tuples are written out: a tuple bound to a name turns constexprs to tensors.)
    gl.warp_specialize([
        (_half, (q_smem, qr_smem, kv_desc, rope_desc, kv_bufs, rope_bufs, p_even, p_odd, vec_m,
                 vec_even, vec_odd, tile_bars, sync, gl.program_id(2), table_row, start, end,
                 seqlen, kv_col, qk_scale, head0, head_end, n_heads_q, single, out_base, lse_base,
                 part_base, part_lse_base, stride_ot, stride_oh, stride_lh, 0,
                 L_Q, HEADS_PER_PROG, BLOCK_M, BLOCK_N, D_NOPE, D_V, PAGE, PAIRS)),
        (_half, (q_smem, qr_smem, kv_desc, rope_desc, kv_bufs, rope_bufs, p_even, p_odd, vec_m,
                 vec_even, vec_odd, tile_bars, sync, gl.program_id(2), table_row, start, end,
                 seqlen, kv_col, qk_scale, head0, head_end, n_heads_q, single, out_base, lse_base,
                 part_base, part_lse_base, stride_ot, stride_oh, stride_lh, 1,
                 L_Q, HEADS_PER_PROG, BLOCK_M, BLOCK_N, D_NOPE, D_V, PAGE, PAIRS)),
    ], [WG], [256])
