"""The Hopper (sm_90) tied-state decode kernel, in Triton's Gluon: one program attends one work
item (a piece of one sequence) for a block of query heads that share one tied state S (GTA's
KV head, MLA's latent, one of GLA's latent heads).

What makes it Hopper-native:
- Rows are (query head, query position) pairs, as in `attend.py`, packed into the M dimension
  of 64-row warpgroup MMAs (`wgmma`), so that g_q × L_q >= 64 fills them even at L_q = 1 (fewer
  rows are padded with zero queries).
- Tokens arrive 64 at a time (one 64-token slice of one page; page sizes are multiples of 64)
  by TMA bulk copies into a ring of NUM_STAGES shared-memory slots, each copy completing on the
  slot's mbarrier. The state tile S (64 × D_V) is read from global memory once and serves both
  matrix products: its first D_NOPE columns, transposed, are the key of scores = Q·Kᵀ, and all
  of it is the value of out = P·S.
- Two layouts of the consumer warps (WARPS_N):
    1: each warpgroup owns 64 rows and every value column (4 warps: 64 rows; 8 warps: 128 rows
       reading each S tile once for both warpgroups). P stays in registers (the accumulator
       layout of Q·Kᵀ is the operand layout of P·S).
    2: 8 warps over 64 rows, each warpgroup owning half the value columns (MLA's 512-wide
       latent: 64 × 512 fp32 accumulators do not fit one warpgroup's registers). Each warpgroup
       computes half the tokens' scores; the row max and sum are reduced across both, and the
       probabilities P are shared through shared memory, so the S tile is read once.
- SPECIALIZE: a producer warp (`gl.warp_specialize`) reads the page table and issues the copies
  while the consumer warps compute, the slots handed back through a second ring of mbarriers.
  Without it, the consumer warps issue the copy NUM_STAGES - 1 blocks ahead themselves.

- An fp8 (e4m3) cache (CACHE_STAGES > 0; specialised only): a producer partition of four
  warps keeps CACHE_STAGES blocks of the cache in flight as they are, in a ring of their own,
  and converts each copied block to fp16 into the consumers' ring (`_produce_widened`), so
  the consumers run unchanged on 16-bit tiles while half the bytes cross from memory. The
  products then run in fp16 whatever the query dtype (e4m3 widens to fp16 exactly, two
  values per instruction; bf16 queries are rounded to fp16, so |q| must stay below 65504).
  The cache's scale is folded into `qk_scale` and multiplies the output accumulator
  (`out_scale`) before the epilogue rounds it.

Rows past a sequence's last token inside its last 64-token slice are zeroed in shared memory
before use: their scores are masked, but a NaN there (unwritten cache) times a zero probability
would still poison P·S. Scores are fp32 in base 2 (log2(e) folded into `qk_scale`); outputs and
partials follow `attend.py` exactly, so `combine.py` merges split sequences.
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

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
# Columns of one TMA copy of the state: 64 bf16/fp16 = 128 bytes, the widest swizzle.
COL_BOX: gl.constexpr = gl.constexpr(64)


@gluon.constexpr_function
def mma_layout(warps_m, warps_n, width):
    """wgmma accumulator layout for `width` columns split over `warps_n` warpgroups."""
    per_group = width // warps_n
    n = 256
    while n > per_group or per_group % n or n % 8:
        n -= 8
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps_m, warps_n],
                                     instr_shape=[16, n, 16])


@gluon.constexpr_function
def row_layout(width, num_warps):
    """Blocked layout for loading a (rows, width) tile with 16-byte vectors along the width."""
    vec = min(8, width)
    lanes_n = min(32, max(1, width // vec))
    return gl.BlockedLayout([1, vec], [32 // lanes_n, lanes_n], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def byte_layout(rows, width, num_warps):
    """Blocked layout for loading a (rows, width) tile of one-byte elements (an fp8 cache) with
    vectors of up to 16 bytes along the width, one pass of the threads covering the tile (no
    thread loads what another does)."""
    vec = max(1, min(16, width, rows * width // (32 * num_warps)))
    lanes_n = min(32, max(1, width // vec))
    return gl.BlockedLayout([1, vec], [32 // lanes_n, lanes_n], [num_warps, 1], [1, 0])


@gluon.jit
def _slot_row(table_row, n0, end, PAGE: gl.constexpr):
    """Row of token n0 in the caches viewed as (pages × page_size, ...)."""
    tok = gl.minimum(n0, end - 1)  # never read a table entry past the sequence
    page = gl.load(table_row + tok // PAGE)
    return page * PAGE + tok % PAGE


@gluon.jit
def _load_rows(base, stride_t, stride_h, head0, head_end, row0, ROWS: gl.constexpr,
               L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr, WIDTH: gl.constexpr,
               num_warps: gl.constexpr):
    """Queries of rows row0..row0+ROWS-1 of one sequence (`base`: its first query; row r is head
    head0 + r // L_Q at position r % L_Q; padding rows and heads from head_end on are zero): a
    (ROWS, WIDTH) tile."""
    layout: gl.constexpr = row_layout(WIDTH, num_warps)
    offs_m = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    head = head0 + offs_m // L_Q
    mask = (offs_m < HEADS_PER_PROG * L_Q) & (head < head_end)
    rows = (offs_m % L_Q) * stride_t + head * stride_h  # inside one sequence: 32 bits
    return gl.load(base + rows[:, None] + offs_d[None, :],
                   mask=mask[:, None] & (offs_d[None, :] < WIDTH), other=0.0)


@gluon.jit
def _issue_block(kv_desc, rope_desc, kv_buf, rope_buf, bar, row, kv_col, D_V: gl.constexpr, pred):
    """Copy 64 tokens from `row` on: the state (columns kv_col.. + D_V) and the RoPE key."""
    nbytes: gl.constexpr = kv_desc.block_type.nbytes * (D_V // COL_BOX) + rope_desc.block_type.nbytes
    mbarrier.expect(bar, nbytes, pred=pred)
    for c in gl.static_range(D_V // COL_BOX):
        tma.async_copy_global_to_shared(kv_desc, [row, kv_col + c * COL_BOX], bar,
                                        kv_buf.slice(c * COL_BOX, COL_BOX, dim=1), pred=pred)
    tma.async_copy_global_to_shared(rope_desc, [row, 0], bar, rope_buf, pred=pred)


@gluon.jit
def _zero_tail(kv_buf, n_valid, BLOCK_N: gl.constexpr, D_V: gl.constexpr, num_warps: gl.constexpr):
    """Zero rows >= n_valid of a (BLOCK_N, D_V) slot, 4·num_warps rows of one 64-column box at a
    time (a whole box at once costs registers the consumers do not have to spare)."""
    layout: gl.constexpr = row_layout(COL_BOX, num_warps)
    ROWS: gl.constexpr = 4 * num_warps  # one pass of the layout: 8 elements per thread
    rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    cols = gl.arange(0, COL_BOX, layout=gl.SliceLayout(0, layout))
    for c in gl.static_range(D_V // COL_BOX):
        for h in gl.static_range(BLOCK_N // ROWS):
            part = kv_buf.slice(c * COL_BOX, COL_BOX, dim=1).slice(h * ROWS, ROWS, dim=0)
            keep = (h * ROWS + rows[:, None] < n_valid) & (cols[None, :] < COL_BOX)  # (ROWS, 64)
            tile = part.load(layout)
            part.store(gl.where(keep, tile, gl.zeros_like(tile)))
    fence_async_shared()  # the MMAs read the slot through the async proxy
    gl.thread_barrier()


@gluon.jit
def _attend_block(q_smem, qr_smem, kv_buf, rope_buf, p_smem, o, m_i, l_i, n0, end, row_limit,
                  qk_scale, L_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  D_NOPE: gl.constexpr, D_V: gl.constexpr, WARPS_N: gl.constexpr,
                  num_warps: gl.constexpr):
    """One 64-token block: scores, online softmax, o += P·S. Returns (o, m_i, l_i)."""
    warps_m: gl.constexpr = num_warps // WARPS_N
    s_layout: gl.constexpr = mma_layout(warps_m, WARPS_N, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(warps_m, WARPS_N, D_V)
    if n0 + BLOCK_N > end:
        _zero_tail(kv_buf, end - n0, BLOCK_N, D_V, num_warps)

    key = kv_buf.slice(0, D_NOPE, dim=1).permute((1, 0))  # (D_NOPE, N), K-major
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(qr_smem, rope_buf.permute((1, 0)), s, use_acc=False, is_async=True)
    s = warpgroup_mma(q_smem, key, s, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))  # (M, N) fp32
    s = s * qk_scale
    if n0 + BLOCK_N > end - L_Q + 1:  # the piece's end or the causal diagonal is in this block
        tok = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))  # (N,)
        visible = (tok[None, :] < end) & (tok[None, :] < row_limit[:, None])  # (M, N)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    # A row may see nothing of this block (causal tail of a piece): keep exp2 finite.
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = gl.exp2(m_i - m_use)  # (M,)
    p = gl.exp2(s - m_use[:, None])  # (M, N)
    l_i = l_i * alpha + gl.sum(p, 1)
    o = o * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p16 = p.to(q_smem.dtype)
    if WARPS_N == 1:
        p_op = gl.convert_layout(p16, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
        o = warpgroup_mma(p_op, kv_buf, o, is_async=True)
    else:
        # Each warpgroup holds half of P's columns; both need all of it for their half of S.
        p_smem.store(p16)
        fence_async_shared()
        gl.thread_barrier()
        o = warpgroup_mma(p_smem, kv_buf, o, is_async=True)
    o = warpgroup_mma_wait(num_outstanding=0, deps=(o, ))
    return o, m_new, l_i


@gluon.jit
def _init_state(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D_V: gl.constexpr,
                WARPS_N: gl.constexpr, num_warps: gl.constexpr):
    warps_m: gl.constexpr = num_warps // WARPS_N
    s_layout: gl.constexpr = mma_layout(warps_m, WARPS_N, BLOCK_N)
    o_layout: gl.constexpr = mma_layout(warps_m, WARPS_N, D_V)
    o = gl.zeros([BLOCK_M, D_V], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    return o, m_i, l_i


@gluon.jit
def _row_limit(seqlen, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, L_Q: gl.constexpr,
               WARPS_N: gl.constexpr, num_warps: gl.constexpr):
    """Bottom-right causal mask: row r (query r % L_Q) sees positions < its limit."""
    s_layout: gl.constexpr = mma_layout(num_warps // WARPS_N, WARPS_N, BLOCK_N)
    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    return seqlen - L_Q + offs_m % L_Q + 1  # (M,)


@gluon.jit
def _attend_slot(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, o, m_i, l_i, j, start, end,
                 row_limit, qk_scale, L_Q: gl.constexpr, BLOCK_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr,
                 NUM_STAGES: gl.constexpr, WARPS_N: gl.constexpr, num_warps: gl.constexpr):
    """Wait for block j in its slot of the ring (j % NUM_STAGES) and attend it: _attend_block's
    (o, m_i, l_i)."""
    slot = j % NUM_STAGES
    mbarrier.wait(ready.index(slot), (j // NUM_STAGES) & 1)
    return _attend_block(q_smem, qr_smem, kv_bufs.index(slot), rope_bufs.index(slot), p_smem, o,
                         m_i, l_i, start + j * BLOCK_N, end, row_limit, qk_scale, L_Q, BLOCK_M,
                         BLOCK_N, D_NOPE, D_V, WARPS_N, num_warps)


@gluon.jit
def _consume(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, empty, start, end, seqlen,
             qk_scale, L_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
             D_NOPE: gl.constexpr, D_V: gl.constexpr, NUM_STAGES: gl.constexpr,
             WARPS_N: gl.constexpr, num_warps: gl.constexpr):
    """Consumer warps of the specialised kernel: wait for a slot, attend it, hand it back."""
    o, m_i, l_i = _init_state(BLOCK_M, BLOCK_N, D_V, WARPS_N, num_warps)
    row_limit = _row_limit(seqlen, BLOCK_M, BLOCK_N, L_Q, WARPS_N, num_warps)
    for j in range(gl.cdiv(end - start, BLOCK_N)):
        o, m_i, l_i = _attend_slot(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, o, m_i,
                                   l_i, j, start, end, row_limit, qk_scale, L_Q, BLOCK_M, BLOCK_N,
                                   D_NOPE, D_V, NUM_STAGES, WARPS_N, num_warps)
        gl.thread_barrier()  # every consumer warpgroup's MMAs on this slot have completed
        mbarrier.arrive(empty.index(j % NUM_STAGES), count=1)
    return o, m_i, l_i


@gluon.jit
def _issue_scores(q_smem, qr_smem, kv_buf, rope_buf, n0, end, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr, D_V: gl.constexpr,
                  num_warps: gl.constexpr):
    """Zero a partial block's tail, then issue its two score products; returns their token
    (two commit groups)."""
    s_layout: gl.constexpr = mma_layout(num_warps, 1, BLOCK_N)
    if n0 + BLOCK_N > end:
        _zero_tail(kv_buf, end - n0, BLOCK_N, D_V, num_warps)
    key = kv_buf.slice(0, D_NOPE, dim=1).permute((1, 0))  # (D_NOPE, N), K-major
    s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(qr_smem, rope_buf.permute((1, 0)), s, use_acc=False, is_async=True)
    return warpgroup_mma(q_smem, key, s, is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, n0, end, seqlen, row0, qk_scale, L_Q: gl.constexpr,
             BLOCK_N: gl.constexpr, dtype: gl.constexpr):
    """Online softmax of one block's scores (rows row0.. of the program's): (P in dtype, the
    factor for the output so far, the new running max, the new row sums)."""
    s = s * qk_scale
    if n0 + BLOCK_N > end - L_Q + 1:  # the piece's end or the causal diagonal is in this block
        layout: gl.constexpr = s.type.layout
        tok = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))  # (N,)
        rows = row0 + gl.arange(0, s.shape[0], layout=gl.SliceLayout(1, layout))  # (M,)
        limit = seqlen - L_Q + rows % L_Q + 1  # bottom-right causal mask: row r is query r % L_Q
        visible = (tok[None, :] < end) & (tok[None, :] < limit[:, None])  # (M, N)
        s = gl.where(visible, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row that saw nothing yet
    alpha = gl.exp2(m_i - m_use)  # (M,)
    p = gl.exp2(s - m_use[:, None])  # (M, N)
    return p.to(dtype), alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _consume_overlap(q_smem, qr_smem, kv_bufs, rope_bufs, ready, empty, start, end, seqlen,
                     qk_scale, L_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     D_NOPE: gl.constexpr, D_V: gl.constexpr, NUM_STAGES: gl.constexpr,
                     num_warps: gl.constexpr):
    """Consumer warps of the overlapped schedule (one warpgroup per 64 rows, all columns).

    Block j + 1's scores are issued first, the output is rescaled while they run, block j's
    P·S is issued behind them, and block j + 1's softmax runs while P·S(j) is on the tensor
    cores. Nothing is in flight across iterations (a product pending at the loop's back edge
    makes ptxas wait for it there); the last block is peeled off the loop (as a branch, the
    rescale common to both sides would be hoisted above the scores' issue).
    """
    o_layout: gl.constexpr = mma_layout(num_warps, 1, D_V)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_smem.dtype
    o, m_i, l_i = _init_state(BLOCK_M, BLOCK_N, D_V, 1, num_warps)
    n_blocks = gl.cdiv(end - start, BLOCK_N)

    mbarrier.wait(ready.index(0), 0)
    s = _issue_scores(q_smem, qr_smem, kv_bufs.index(0), rope_bufs.index(0), start, end,
                      BLOCK_M, BLOCK_N, D_NOPE, D_V, num_warps)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
    p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start, end, seqlen, 0, qk_scale, L_Q, BLOCK_N,
                                  dtype)
    if n_blocks > 1:
        mbarrier.wait(ready.index(1 % NUM_STAGES), (1 // NUM_STAGES) & 1)
    for j in range(n_blocks - 1):
        slot = j % NUM_STAGES
        nxt = (j + 1) % NUM_STAGES
        s = _issue_scores(q_smem, qr_smem, kv_bufs.index(nxt), rope_bufs.index(nxt),
                          start + (j + 1) * BLOCK_N, end, BLOCK_M, BLOCK_N, D_NOPE, D_V, num_warps)
        # (A wait that returns at once: it orders the rescale after the scores' issue, so the
        # rescale runs while they compute.)
        alpha = warpgroup_mma_wait(num_outstanding=2, deps=(alpha, ))
        o = o * gl.convert_layout(alpha, row_o)[:, None]
        p_op = gl.convert_layout(p, p_layout)
        o = warpgroup_mma(p_op, kv_bufs.index(slot), o, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))  # QK(j + 1); P·S(j) runs on
        p, alpha, m_i, l_i = _softmax(s, m_i, l_i, start + (j + 1) * BLOCK_N, end, seqlen, 0,
                                      qk_scale, L_Q, BLOCK_N, dtype)
        # Waiting for block j + 2's copy here, ahead of the wait for P·S(j), puts a branch
        # between the softmax and that wait: ptxas would otherwise hoist the wait above the
        # softmax's exponentials, and they would no longer overlap the product.
        if j + 2 < n_blocks:
            mbarrier.wait(ready.index((j + 2) % NUM_STAGES), ((j + 2) // NUM_STAGES) & 1)
        o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_op))
        gl.thread_barrier()  # every consumer warpgroup's MMAs on this slot have completed
        mbarrier.arrive(empty.index(slot), count=1)
    last = (n_blocks - 1) % NUM_STAGES
    o = o * gl.convert_layout(alpha, row_o)[:, None]
    p_op = gl.convert_layout(p, p_layout)
    o = warpgroup_mma(p_op, kv_bufs.index(last), o, is_async=True)
    o, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o, p_op))
    gl.thread_barrier()
    mbarrier.arrive(empty.index(last), count=1)
    return o, m_i, l_i


@gluon.jit
def _consumers(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, empty, start, end, seqlen,
               qk_scale, L_Q: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               D_NOPE: gl.constexpr, D_V: gl.constexpr, NUM_STAGES: gl.constexpr,
               WARPS_N: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """The consumer partition of the specialised kernel: overlapped or plain."""
    if OVERLAP:
        return _consume_overlap(q_smem, qr_smem, kv_bufs, rope_bufs, ready, empty, start, end,
                                seqlen, qk_scale, L_Q, BLOCK_M, BLOCK_N, D_NOPE, D_V, NUM_STAGES,
                                num_warps)
    else:
        return _consume(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, empty, start, end,
                        seqlen, qk_scale, L_Q, BLOCK_M, BLOCK_N, D_NOPE, D_V, NUM_STAGES, WARPS_N,
                        num_warps)


@gluon.jit
def _store_tile(o, l_i, m_i, row0, col0, head0, head_end, n_heads_q, single, out_base, lse_base,
                part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q: gl.constexpr,
                HEADS_PER_PROG: gl.constexpr, D_V: gl.constexpr, WRITE_LSE: gl.constexpr):
    """Normalise and write an output tile: rows row0.. (row r is head head0 + r // L_Q at query
    position r % L_Q), columns col0.. of the output, or of the partial when the sequence has
    several pieces; and the LSE. The bases point at this sequence's output and LSE and at this
    item's partials. Stored in the accumulator's own layout (a layout change would need the
    tile's size in shared memory)."""
    o_layout: gl.constexpr = o.type.layout
    seen = l_i > 0.0
    lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * LN2, float("-inf"))  # (M,)
    inv_l = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), gl.SliceLayout(1, o_layout))
    out_tile = o * inv_l[:, None]  # (M, N)
    offs_om = row0 + gl.arange(0, o.shape[0], layout=gl.SliceLayout(1, o_layout))
    offs_od = col0 + gl.arange(0, o.shape[1], layout=gl.SliceLayout(0, o_layout))
    o_head = head0 + offs_om // L_Q
    o_query = offs_om % L_Q
    mask_o = (offs_om < HEADS_PER_PROG * L_Q) & (o_head < head_end)  # (M,)
    mask_od = mask_o[:, None] & (offs_od[None, :] < D_V)  # (M, N)
    lse = gl.convert_layout(lse, gl.SliceLayout(1, o_layout))
    if single:
        # Offsets inside one sequence's output fit 32 bits (the bases carry the 64-bit part).
        o_rows = o_query * stride_ot + o_head * stride_oh
        gl.store(out_base + o_rows[:, None] + offs_od[None, :],
                 out_tile.to(out_base.dtype.element_ty), mask=mask_od)
        if WRITE_LSE:
            gl.store(lse_base + o_head * stride_lh + o_query, lse, mask=mask_o)
    else:
        # Partials: (capacity, L_Q, H_q, D_V) and (capacity, L_Q, H_q), contiguous fp32.
        part_rows = o_query * n_heads_q + o_head  # (M,)
        gl.store(part_base + part_rows[:, None].to(gl.int64) * D_V + offs_od[None, :], out_tile,
                 mask=mask_od)
        if WRITE_LSE:
            gl.store(part_lse_base + part_rows, lse, mask=mask_o)


@gluon.jit
def _out_bases(out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, pid_item, seq64, n_pieces, n_heads_q,
               stride_ob, stride_lb, L_Q: gl.constexpr, D_V: gl.constexpr):
    """Where a work item's epilogue writes (`_store_tile`'s bases): this sequence's output and
    LSE, this item's partials, and whether the item is the whole sequence (single: it writes
    the output, else the partials)."""
    part_row0 = (pid_item * L_Q * n_heads_q).to(gl.int64)  # < 2**31: items × L_q × H_q
    return (out_ptr + seq64 * stride_ob, lse_ptr + seq64 * stride_lb,
            part_out_ptr + part_row0 * D_V, part_lse_ptr + part_row0, n_pieces == 1)


@gluon.jit
def store_empty_item(args, item, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr,
                     BLOCK_M: gl.constexpr, D_V: gl.constexpr, num_warps: gl.constexpr):
    """The epilogue of an item that holds no token (only a stale plan makes one: its piece
    starts at or past the sequence's length, see `hopper_decode_kernel`): what attending
    nothing gives, a zero output and an LSE of -inf (a partial the combine step weighs
    zero), written in 64-column tiles without touching the caches or the ring."""
    (q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, out_ptr, lse_ptr, part_out_ptr,
     part_lse_ptr, qk_scale, n_heads_q, group, stride_qb, stride_qt, stride_qh, stride_qrb,
     stride_qrt, stride_qrh, stride_btb, stride_ob, stride_ot, stride_oh, stride_lb,
     stride_lh) = args
    pid_item, seq64, start, end, seqlen, n_pieces, kv_head, head0 = item
    out_base, lse_base, part_base, part_lse_base, single = _out_bases(
        out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, pid_item, seq64, n_pieces, n_heads_q,
        stride_ob, stride_lb, L_Q, D_V)
    layout: gl.constexpr = row_layout(64, num_warps)
    o = gl.zeros([BLOCK_M, 64], gl.float32, layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, layout))
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, layout))
    for c in gl.static_range(0, D_V, 64):
        _store_tile(o, l_i, m_i, 0, c, head0, (kv_head + 1) * group, n_heads_q, single, out_base,
                    lse_base, part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q,
                    HEADS_PER_PROG, D_V, c == 0)


@gluon.jit
def _produce(kv_desc, rope_desc, kv_bufs, rope_bufs, ready, empty, table_row, start, end, kv_col,
             PAGE: gl.constexpr, BLOCK_N: gl.constexpr, D_V: gl.constexpr,
             NUM_STAGES: gl.constexpr):
    """Producer warp: fill the ring NUM_STAGES blocks ahead of the consumers."""
    for j in range(gl.cdiv(end - start, BLOCK_N)):
        slot = j % NUM_STAGES
        row = _slot_row(table_row, start + j * BLOCK_N, end, PAGE)  # in flight during the wait
        # A fresh mbarrier counts as having completed the phase before 0: the first pass is free.
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)
        _issue_block(kv_desc, rope_desc, kv_bufs.index(slot), rope_bufs.index(slot),
                     ready.index(slot), row, kv_col, D_V, True)


WIDEN_WARPS: gl.constexpr = gl.constexpr(4)


@gluon.jit
def _produce_widened(kv_desc, rope_desc, cache_bufs, cache_rope_bufs, copied_bars, kv_bufs,
                     rope_bufs, ready, empty, table_row, start, end, kv_col, PAGE: gl.constexpr,
                     BLOCK_N: gl.constexpr, D_V: gl.constexpr, D_R: gl.constexpr,
                     NUM_STAGES: gl.constexpr, CACHE_STAGES: gl.constexpr):
    """Producer warps of an fp8 cache: keep CACHE_STAGES blocks of the cache in flight as they
    are, and widen each copied block, one 64-column box at a time, to the consumers' dtype
    into their ring; the copied slot is refilled as soon as it has been read."""
    box_layout: gl.constexpr = byte_layout(BLOCK_N, COL_BOX, WIDEN_WARPS)
    rope_layout: gl.constexpr = byte_layout(BLOCK_N, D_R, WIDEN_WARPS)
    dtype: gl.constexpr = kv_bufs.dtype
    n_blocks = gl.cdiv(end - start, BLOCK_N)
    for i in gl.static_range(CACHE_STAGES):
        _issue_block(kv_desc, rope_desc, cache_bufs.index(i), cache_rope_bufs.index(i),
                     copied_bars.index(i), _slot_row(table_row, start + i * BLOCK_N, end, PAGE),
                     kv_col, D_V, i < n_blocks)
    for j in range(n_blocks):
        copied = j % CACHE_STAGES
        slot = j % NUM_STAGES
        ahead = j + CACHE_STAGES  # the block this copied slot takes next
        row = _slot_row(table_row, start + ahead * BLOCK_N, end, PAGE)  # loads during the waits
        mbarrier.wait(copied_bars.index(copied), (j // CACHE_STAGES) & 1)
        # A fresh mbarrier counts as having completed the phase before 0: the first pass is free.
        mbarrier.wait(empty.index(slot), ((j // NUM_STAGES) & 1) ^ 1)
        src = cache_bufs.index(copied)
        dst = kv_bufs.index(slot)
        for c in gl.static_range(D_V // COL_BOX):
            box = src.slice(c * COL_BOX, COL_BOX, dim=1).load(box_layout)
            dst.slice(c * COL_BOX, COL_BOX, dim=1).store(box.to(dtype))
        rope_bufs.index(slot).store(cache_rope_bufs.index(copied).load(rope_layout).to(dtype))
        # The fence orders this partition's generic accesses before the async proxy's: the
        # consumers' MMAs read the widened slot, and the refill below overwrites the copied one.
        fence_async_shared()
        gl.thread_barrier()  # every producer warp has read its part of the copy and stored it
        mbarrier.arrive(ready.index(slot), count=1)
        _issue_block(kv_desc, rope_desc, src, cache_rope_bufs.index(copied),
                     copied_bars.index(copied), row, kv_col, D_V, ahead < n_blocks)


@gluon.jit
def tied_schedule(args, item, out_scale, L_Q: gl.constexpr, HEADS_PER_PROG: gl.constexpr,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D_NOPE: gl.constexpr,
                  D_V: gl.constexpr, D_R: gl.constexpr,
                  PAGE: gl.constexpr, NUM_STAGES: gl.constexpr, WARPS_N: gl.constexpr,
                  SPECIALIZE: gl.constexpr, OVERLAP: gl.constexpr, CACHE_STAGES: gl.constexpr,
                  num_warps: gl.constexpr):
    """One work item of `hwattn.ops.kernels.hopper.hopper_decode_kernel` in the tied
    schedules (specialised, pipelined, overlapped); `args` and `item` as it passes them.
    CACHE_STAGES > 0: the cache is fp8, copied into that many slots and widened
    (`_produce_widened`); `out_scale`, its quantisation scale, multiplies the output before
    it is rounded."""
    (q_ptr, q_rope_ptr, kv_desc, rope_desc, block_table_ptr, out_ptr, lse_ptr, part_out_ptr,
     part_lse_ptr, qk_scale, n_heads_q, group, stride_qb, stride_qt, stride_qh, stride_qrb,
     stride_qrt, stride_qrh, stride_btb, stride_ob, stride_ot, stride_oh, stride_lb,
     stride_lh) = args
    pid_item, seq64, start, end, seqlen, n_pieces, kv_head, head0 = item
    # The products' dtype: the queries', or fp16 for an fp8 cache (e4m3 widens to fp16 exactly,
    # two values per instruction; to bf16 it would take a second conversion of each value).
    if CACHE_STAGES > 0:
        dtype: gl.constexpr = gl.float16
    else:
        dtype: gl.constexpr = q_ptr.dtype.element_ty

    # Queries: row r is head head0 + r // L_Q at query position r % L_Q; padding rows are zero.
    head_end = (kv_head + 1) * group
    q_tile = _load_rows(q_ptr + seq64 * stride_qb, stride_qt, stride_qh, head0, head_end, 0,
                        BLOCK_M, L_Q, HEADS_PER_PROG, D_NOPE, num_warps).to(dtype)  # (M, D_NOPE)
    qr_tile = _load_rows(q_rope_ptr + seq64 * stride_qrb, stride_qrt, stride_qrh, head0, head_end,
                         0, BLOCK_M, L_Q, HEADS_PER_PROG, D_R, num_warps).to(dtype)  # (M, D_R)

    q_smem = gl.allocate_shared_memory(
        dtype, [BLOCK_M, D_NOPE], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D_NOPE], dtype), q_tile)
    qr_smem = gl.allocate_shared_memory(
        dtype, [BLOCK_M, D_R], gl.NVMMASharedLayout.get_default_for([BLOCK_M, D_R], dtype), qr_tile)
    kv_bufs = gl.allocate_shared_memory(
        dtype, [NUM_STAGES, BLOCK_N, D_V], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_V], dtype))
    if CACHE_STAGES > 0:  # the descriptors' layouts are the fp8 cache's
        rope_bufs = gl.allocate_shared_memory(
            dtype, [NUM_STAGES, BLOCK_N, D_R], gl.NVMMASharedLayout.get_default_for([BLOCK_N, D_R], dtype))
    else:
        rope_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, D_R], rope_desc.layout)
    if WARPS_N == 1:
        p_smem = q_smem  # unused: P stays in registers
    else:
        p_smem = gl.allocate_shared_memory(
            dtype, [BLOCK_M, BLOCK_N], gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype))
    ready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # the queries and barrier inits, before the async proxy uses them
    gl.thread_barrier()

    table_row = block_table_ptr + seq64 * stride_btb
    kv_col = kv_head * D_V
    if SPECIALIZE:
        empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(empty.index(i), count=1)
        fence_async_shared()
        gl.thread_barrier()
        if CACHE_STAGES > 0:
            cache_bufs = gl.allocate_shared_memory(kv_desc.dtype, [CACHE_STAGES, BLOCK_N, D_V],
                                                   kv_desc.layout)
            cache_rope_bufs = gl.allocate_shared_memory(rope_desc.dtype, [CACHE_STAGES, BLOCK_N, D_R],
                                                        rope_desc.layout)
            copied = gl.allocate_shared_memory(gl.int64, [CACHE_STAGES, 1], mbarrier.MBarrierLayout())
            for i in gl.static_range(CACHE_STAGES):
                mbarrier.init(copied.index(i), count=1)
            fence_async_shared()
            gl.thread_barrier()
            o, m_i, l_i = gl.warp_specialize([
                (_consumers, (q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, empty, start,
                              end, seqlen, qk_scale, L_Q, BLOCK_M, BLOCK_N, D_NOPE, D_V,
                              NUM_STAGES, WARPS_N, OVERLAP, num_warps)),
                (_produce_widened, (kv_desc, rope_desc, cache_bufs, cache_rope_bufs, copied,
                                    kv_bufs, rope_bufs, ready, empty, table_row, start, end,
                                    kv_col, PAGE, BLOCK_N, D_V, D_R, NUM_STAGES, CACHE_STAGES)),
            ], [WIDEN_WARPS], [80])
        else:
            o, m_i, l_i = gl.warp_specialize([
                (_consumers, (q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, empty, start,
                              end, seqlen, qk_scale, L_Q, BLOCK_M, BLOCK_N, D_NOPE, D_V,
                              NUM_STAGES, WARPS_N, OVERLAP, num_warps)),
                (_produce, (kv_desc, rope_desc, kv_bufs, rope_bufs, ready, empty, table_row, start,
                            end, kv_col, PAGE, BLOCK_N, D_V, NUM_STAGES)),
            ], [1], [40])
    else:
        n_blocks = gl.cdiv(end - start, BLOCK_N)
        for i in gl.static_range(NUM_STAGES - 1):
            _issue_block(kv_desc, rope_desc, kv_bufs.index(i), rope_bufs.index(i), ready.index(i),
                         _slot_row(table_row, start + i * BLOCK_N, end, PAGE), kv_col, D_V,
                         i < n_blocks)
        o, m_i, l_i = _init_state(BLOCK_M, BLOCK_N, D_V, WARPS_N, num_warps)
        row_limit = _row_limit(seqlen, BLOCK_M, BLOCK_N, L_Q, WARPS_N, num_warps)
        for j in range(n_blocks):
            # Refill the slot block j - 1 used: every warpgroup has waited for its MMAs on it.
            ahead = j + NUM_STAGES - 1
            row = _slot_row(table_row, start + ahead * BLOCK_N, end, PAGE)
            gl.thread_barrier()
            _issue_block(kv_desc, rope_desc, kv_bufs.index(ahead % NUM_STAGES),
                         rope_bufs.index(ahead % NUM_STAGES), ready.index(ahead % NUM_STAGES),
                         row, kv_col, D_V, ahead < n_blocks)
            o, m_i, l_i = _attend_slot(q_smem, qr_smem, kv_bufs, rope_bufs, p_smem, ready, o,
                                       m_i, l_i, j, start, end, row_limit, qk_scale, L_Q, BLOCK_M,
                                       BLOCK_N, D_NOPE, D_V, NUM_STAGES, WARPS_N, num_warps)

    if CACHE_STAGES > 0:  # the values' scale, in fp32 (the softmax weights sum to one)
        o = o * out_scale
    out_base, lse_base, part_base, part_lse_base, single = _out_bases(
        out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, pid_item, seq64, n_pieces, n_heads_q,
        stride_ob, stride_lb, L_Q, D_V)
    _store_tile(o, l_i, m_i, 0, 0, head0, head_end, n_heads_q, single, out_base, lse_base,
                part_base, part_lse_base, stride_ot, stride_oh, stride_lh, L_Q, HEADS_PER_PROG,
                D_V, True)
