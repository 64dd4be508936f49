"""The prefill kernel: variable-length causal attention over a paged cache, both kernel shapes.

A flash-attention forward. One program owns a tile of query rows of one sequence and one block
of the query heads of one KV head: rows are (head, token) pairs, head-major, TOKENS query tokens
of each of the block's heads, so short chunks (a few tokens, or one) still fill the M dimension
of the tensor-core dot with the query heads that share a KV head (as kernels/attend.py packs
heads × L_q). It streams the sequence's keys BLOCK_N at a time,
gathered page by page through the block table, with an online softmax in fp32 (exp2, scores
pre-scaled by log2 e).

Causality is per sequence, aligned bottom-right: query token j of a sequence with n queries and
L cached tokens sees positions < L - n + j + 1. Key blocks that every row of the tile sees in
full are attended without a mask (the first loop); the blocks crossing the tile's diagonal band
are attended with it (the second); blocks above the tile's last row are never visited.

The grid is (query tiles of the longest sequence, B, KV heads × head blocks): no host reads,
a program past its sequence's queries returns at once. Query tiles run last-first, so the
heaviest tiles of a sequence (the ones furthest down the diagonal) start first.

The grid comes from the step's plan, the rows and key positions from the device's
`cu_seqlens_q` and `cache_seqlens`, which a GPU call does not hold to the plan (that would read
them back). So that offsets or lengths of another step cannot make a program write or read out
of bounds, rows outside [0, N) are masked (a sequence whose offset is negative writes none)
and key positions clamped to [0, the block table's capacity): bounds known on the host from
the tensors' shapes, no-ops for consistent inputs.

TIED selects the tied-state shape: keys are [S[..., :D_QK], R] with R the shared RoPE cache,
values S; when D_QK pads to the same width as D_V the one loaded tile serves as key and value
(SHARED_TILE: the query is zero past D_QK), else the narrower key tile is loaded on its own
(fewer FLOPs, the second read comes from L1/L2). A tied call may also read its values from a
cache of their own (v_ptr; the latent families' expanded form), never with SHARED_TILE.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hwattn.ops.kernels.paging import block_pages

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q_tile, qr_tile, start, end, m_limit, table_row, k_head, v_head, rope_ptr,
    stride_kp, stride_kt, stride_vp, stride_vt, stride_rp, stride_rt, qk_scale,
    BLOCK_N: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr, DR_PAD: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, D_R: tl.constexpr, PAGE: tl.constexpr,
    TIED: tl.constexpr, SHARED_TILE: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Attend key positions [start, end) (start a multiple of BLOCK_N) into the running
    (acc (M, DV_PAD), l_i (M,), m_i (M,)). MASKED: apply the causal mask (each row sees
    positions < m_limit) and the end of the range; else every block is whole and visible."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)
    mask_dk = offs_dk < (D_V if SHARED_TILE else D_QK)
    mask_dv = offs_dv < D_V
    # Page ids are read one block ahead (kernels/paging.py says why): the first block's here.
    if PAGE % BLOCK_N == 0:  # a block lies in one page (start is a multiple of BLOCK_N)
        # Clamped into [0, end): an empty range must not read past the sequence's pages.
        first = tl.maximum(tl.minimum(start, end - 1), 0)
        page_next = tl.load(table_row + first // PAGE).to(tl.int64)
    else:
        tok_next = start + offs_n
        page_next = tl.load(table_row + tok_next // PAGE, mask=tok_next < end, other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n  # (N,) key positions
        tok_page, tok_slot, page_next = block_pages(table_row, n0, offs_n, end, page_next, PAGE,
                                                    BLOCK_N)
        if MASKED:
            mask_n = tok < end
        else:
            mask_n = tok >= 0  # whole block: a mask the compiler folds away
        k_rows = tok_page * stride_kp + tok_slot.to(tl.int64) * stride_kt  # (N,)
        k_tile = tl.load(k_head + k_rows[:, None] + offs_dk[None, :],
                         mask=mask_n[:, None] & mask_dk[None, :], other=0.0)  # (N, DK_PAD)
        k_tile = k_tile.to(q_tile.dtype)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)  # (M, N)
        if TIED:
            r_rows = tok_page * stride_rp + tok_slot.to(tl.int64) * stride_rt
            r_tile = tl.load(rope_ptr + r_rows[:, None] + tl.arange(0, DR_PAD)[None, :],
                             mask=mask_n[:, None] & (tl.arange(0, DR_PAD) < D_R)[None, :],
                             other=0.0)  # (N, DR_PAD)
            scores += tl.dot(qr_tile, tl.trans(r_tile.to(qr_tile.dtype)),
                             input_precision=DOT_PRECISION)
        scores = scores * qk_scale
        if MASKED:
            visible = mask_n[None, :] & (tok[None, :] < m_limit[:, None])
            scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        if MASKED:  # a row may see nothing of this block yet: keep exp2 finite
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])  # (M, N)
        l_i = l_i * alpha + tl.sum(p, 1)
        if SHARED_TILE:
            v_tile = k_tile
        else:
            v_rows = tok_page * stride_vp + tok_slot.to(tl.int64) * stride_vt
            v_tile = tl.load(v_head + v_rows[:, None] + offs_dv[None, :],
                             mask=mask_n[:, None] & mask_dv[None, :], other=0.0)  # (N, DV_PAD)
            v_tile = v_tile.to(q_tile.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile,
                                            input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# The bounds change from step to step, and so do two strides: the block table's (its width,
# the step's longest sequence in pages) and lse's (the step's token count). Triton would
# compile again for each of them that turned divisible by 16 or not (a second or so in a
# serving step, found in mixed steps of 2048 - n_decode prompt rows): one kernel for all.
@triton.jit(do_not_specialize=["n_rows", "kv_capacity", "stride_btb", "stride_lh"])
def prefill_kernel(
    q_ptr, q_rope_ptr, k_ptr, v_ptr, rope_ptr, block_table_ptr, cu_seqlens_ptr, seqlens_ptr,
    out_ptr, lse_ptr,
    qk_scale, v_scale, group, n_rows, kv_capacity,
    stride_qt, stride_qh, stride_qrt, stride_qrh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_rp, stride_rt,
    stride_btb, stride_ot, stride_oh, stride_lh,
    TOKENS: tl.constexpr, HEADS_PER_PROG: tl.constexpr, HEAD_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, DK_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    D_R: tl.constexpr, DR_PAD: tl.constexpr, PAGE: tl.constexpr, TIED: tl.constexpr,
    SHARED_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_tile = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles first
    seq = tl.program_id(1)
    pid_head = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + seq)
    n_q = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    # The rows this program may write: the sequence's, cut to [0, n_rows) here on scalars.
    # (Testing each row's index against [0, n_rows) instead took an untied launch of 192-wide
    # keys, 128 rows and 8 warps from 123 to 144 registers a thread at sm_90: one program per
    # SM instead of two, the paged prefill of MLA / GLA-2 4.7-5.6% slower on an H100 while their
    # expanded form took that launch; tests/ops/test_prefill_occupancy.py.)
    n_rows_here = tl.where(q_start >= 0, tl.minimum(n_q, n_rows - q_start), 0)
    tok0 = pid_tile * TOKENS
    if tok0 >= n_rows_here:
        return
    seqlen = tl.load(seqlens_ptr + seq)
    prefix = seqlen - n_q  # cached positions before this step's queries
    kv_head = pid_head // HEAD_BLOCKS
    head0 = kv_head * group + (pid_head % HEAD_BLOCKS) * HEADS_PER_PROG

    offs_m = tl.arange(0, BLOCK_M)
    m_slot = offs_m // TOKENS  # (M,) head of each row within the program's block
    m_tok = tok0 + offs_m % TOKENS  # (M,) query token of each row within its sequence
    m_head = head0 + m_slot  # (M,) query head of each row
    m_row = (q_start + m_tok).to(tl.int64)  # (M,) packed query row
    mask_m = (m_slot < HEADS_PER_PROG) & (m_head < (kv_head + 1) * group) & (m_tok < n_rows_here)
    m_limit = prefix + m_tok + 1  # (M,) row sees key positions < m_limit
    offs_dk = tl.arange(0, DK_PAD)
    offs_dv = tl.arange(0, DV_PAD)

    q_ptrs = q_ptr + m_row[:, None] * stride_qt + m_head[:, None].to(tl.int64) * stride_qh + offs_dk[None, :]
    q_tile = tl.load(q_ptrs, mask=mask_m[:, None] & (offs_dk[None, :] < D_QK), other=0.0)  # (M, DK_PAD)
    if TIED:
        offs_r = tl.arange(0, DR_PAD)
        qr_ptrs = (q_rope_ptr + m_row[:, None] * stride_qrt
                   + m_head[:, None].to(tl.int64) * stride_qrh + offs_r[None, :])
        qr_tile = tl.load(qr_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < D_R), other=0.0)  # (M, DR_PAD)
    else:
        qr_tile = q_tile  # unused

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    table_row = block_table_ptr + seq.to(tl.int64) * stride_btb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    # Every row of the tile sees positions < prefix + tok0 + 1; the last row < kv_end. Both
    # kept within [0, kv_capacity), whole blocks before full_end (see the module docstring).
    kv_end = tl.minimum(prefix + tl.minimum(n_q, tok0 + TOKENS), kv_capacity)
    full_end = tl.minimum((prefix + tok0 + 1) // BLOCK_N, kv_end // BLOCK_N) * BLOCK_N
    full_end = tl.maximum(full_end, 0)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q_tile, qr_tile, 0, full_end, m_limit, table_row, k_head, v_head,
        rope_ptr, stride_kp, stride_kt, stride_vp, stride_vt, stride_rp, stride_rt, qk_scale,
        BLOCK_N=BLOCK_N, DK_PAD=DK_PAD, DV_PAD=DV_PAD, DR_PAD=DR_PAD, D_QK=D_QK, D_V=D_V,
        D_R=D_R, PAGE=PAGE, TIED=TIED, SHARED_TILE=SHARED_TILE, MASKED=False,
        DOT_PRECISION=DOT_PRECISION)
    acc, l_i, m_i = _attend_blocks(
        acc, l_i, m_i, q_tile, qr_tile, full_end, kv_end, m_limit, table_row, k_head, v_head,
        rope_ptr, stride_kp, stride_kt, stride_vp, stride_vt, stride_rp, stride_rt, qk_scale,
        BLOCK_N=BLOCK_N, DK_PAD=DK_PAD, DV_PAD=DV_PAD, DR_PAD=DR_PAD, D_QK=D_QK, D_V=D_V,
        D_R=D_R, PAGE=PAGE, TIED=TIED, SHARED_TILE=SHARED_TILE, MASKED=True,
        DOT_PRECISION=DOT_PRECISION)

    seen = l_i > 0.0
    out_tile = acc * (v_scale / tl.where(seen, l_i, 1.0))[:, None]  # (M, DV_PAD)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))  # (M,)
    o_ptrs = out_ptr + m_row[:, None] * stride_ot + m_head[:, None].to(tl.int64) * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, out_tile.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & (offs_dv[None, :] < D_V))
    tl.store(lse_ptr + m_head.to(tl.int64) * stride_lh + m_row, lse, mask=mask_m)
