"""The paged decode kernel: one program attends one work item (a piece of one sequence) for
one block of query heads that share a KV (or latent) head.

Rows of the tiles are (query head, query position) pairs: the g_q heads of a KV head times L_q
share every K/V tile, so packing them into M is what turns decode into matrix work (docs/design.md §4).
Row r is head `r // L_Q` of the block at query position `r % L_Q`.

Two cache shapes, chosen by the constexpr TIED:
- separate (MHA/MQA/GQA): K tile for the scores, V tile for the output.
- tied (GTA, MLA/GLA absorbed): one state tile S is the value and, through the query's
  zero-extended first D_QK columns, the un-rotated key; a second small tile R holds the shared
  RoPE key. S is loaded once per block of tokens and used by both matrix products.

Scores are fp32; the softmax runs in base 2 with log2(e) folded into `qk_scale`. A piece that is
a whole sequence writes the final output and LSE; a piece of a split sequence writes an fp32
partial that `combine.py` merges. fp8 caches are widened to the query dtype in registers
(exact for e4m3), their scales folded into `qk_scale` and `v_scale`.
"""

from __future__ import annotations

import triton
import triton.language as tl

from hwattn.ops.kernels.paging import block_pages
from hwattn.ops.kernels.pdl import wait_for_predecessor

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def attend_kernel(
    q_ptr, q_rope_ptr, k_ptr, v_ptr, rope_ptr, block_table_ptr, seqlens_ptr,
    items_ptr, splits_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale, n_heads_q, group,
    stride_qb, stride_qt, stride_qh,
    stride_qrb, stride_qrt, stride_qrh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_rp, stride_rt,
    stride_btb,
    stride_ob, stride_ot, stride_oh,
    stride_lb, stride_lh,
    L_Q: tl.constexpr, HEADS_PER_PROG: tl.constexpr, HEAD_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_QK: tl.constexpr, D_V: tl.constexpr, D_PAD: tl.constexpr,
    D_R: tl.constexpr, DR_PAD: tl.constexpr,
    PAGE: tl.constexpr, TIED: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
):
    wait_for_predecessor(PDL)  # (HWATTN_PDL: hwattn/ops/kernels/pdl.py)
    # Head blocks vary fastest, so programs reading the same KV tiles run side by side and
    # the second read of a tile (MLA's two head blocks) comes from L2.
    pid_head = tl.program_id(0)
    pid_item = tl.program_id(1)
    seq = tl.load(items_ptr + pid_item * 3)
    if seq < 0:
        return
    start = tl.load(items_ptr + pid_item * 3 + 1)
    seqlen = tl.load(seqlens_ptr + seq)
    # A plan made for other lengths (a GPU call cannot check it) must not read past the
    # sequence's pages: the item's end is clamped to the length the call passes. A no-op for
    # a plan of these lengths (its items end at them); the length is loaded anyway.
    end = tl.minimum(tl.load(items_ptr + pid_item * 3 + 2), seqlen)
    n_pieces = tl.load(splits_ptr + seq * 2 + 1)
    seq64 = seq.to(tl.int64)
    kv_head = pid_head // HEAD_BLOCKS
    head0 = kv_head * group + (pid_head % HEAD_BLOCKS) * HEADS_PER_PROG

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_head = head0 + offs_m // L_Q  # (M,) query head of each row
    m_query = offs_m % L_Q  # (M,) query position of each row
    mask_m = (offs_m < HEADS_PER_PROG * L_Q) & (m_head < (kv_head + 1) * group)
    # Bottom-right causal mask: row j sees positions < seqlen - L_Q + j + 1.
    m_limit = seqlen - L_Q + m_query + 1  # (M,)

    q_ptrs = (q_ptr + seq64 * stride_qb + m_query[:, None].to(tl.int64) * stride_qt
              + m_head[:, None].to(tl.int64) * stride_qh + offs_d[None, :])
    q_tile = tl.load(q_ptrs, mask=mask_m[:, None] & (offs_d[None, :] < D_QK), other=0.0)  # (M, D_PAD)
    if TIED:
        offs_r = tl.arange(0, DR_PAD)
        qr_ptrs = (q_rope_ptr + seq64 * stride_qrb + m_query[:, None].to(tl.int64) * stride_qrt
                   + m_head[:, None].to(tl.int64) * stride_qrh + offs_r[None, :])
        qr_tile = tl.load(qr_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < D_R), other=0.0)  # (M, DR_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table_row = block_table_ptr + seq64 * stride_btb
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    mask_d = offs_d < D_V
    # Page ids are read one block ahead (kernels/paging.py says why): the first block's here.
    if PAGE % BLOCK_N == 0:
        # Pieces start on multiples of 64 >= BLOCK_N, so a block lies in one page. (An item
        # that starts past the sequence's length, from a stale plan, reads no entry.)
        page_next = tl.load(table_row + start // PAGE, mask=start < end, other=0).to(tl.int64)
    else:
        tok_next = start + offs_n
        page_next = tl.load(table_row + tok_next // PAGE, mask=tok_next < end, other=0).to(tl.int64)
    for n0 in range(start, end, BLOCK_N):
        tok = n0 + offs_n  # (N,) token positions
        mask_n = tok < end
        tok_page, tok_slot, page_next = block_pages(table_row, n0, offs_n, end, page_next, PAGE,
                                                    BLOCK_N)
        k_rows = tok_page * stride_kp + tok_slot.to(tl.int64) * stride_kt  # (N,)
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k_tile = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)  # (N, D_PAD)
        k_tile = k_tile.to(q_tile.dtype)
        scores = tl.dot(q_tile, tl.trans(k_tile), input_precision=DOT_PRECISION)  # (M, N)
        if TIED:
            r_rows = tok_page * stride_rp + tok_slot.to(tl.int64) * stride_rt
            r_tile = tl.load(rope_ptr + r_rows[:, None] + offs_r[None, :],
                             mask=mask_n[:, None] & (offs_r[None, :] < D_R), other=0.0)  # (N, DR_PAD)
            scores += tl.dot(qr_tile, tl.trans(r_tile.to(qr_tile.dtype)),
                             input_precision=DOT_PRECISION)
        visible = mask_n[None, :] & (tok[None, :] < m_limit[:, None])
        scores = tl.where(visible, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row may see nothing of this block (causal tail of a piece): keep exp2 finite.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(scores - m_use[:, None])  # (M, N)
        l_i = l_i * alpha + tl.sum(p, 1)
        if TIED:
            v_tile = k_tile
        else:
            v_rows = tok_page * stride_vp + tok_slot.to(tl.int64) * stride_vt
            v_tile = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=mask_nd, other=0.0)
            v_tile = v_tile.to(q_tile.dtype)  # (N, D_PAD)
        acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out_tile = acc * (v_scale / tl.where(seen, l_i, 1.0))[:, None]  # (M, D_PAD)
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))  # (M,)
    mask_out = mask_m[:, None] & mask_d[None, :]
    if n_pieces == 1:
        o_ptrs = (out_ptr + seq64 * stride_ob + m_query[:, None].to(tl.int64) * stride_ot
                  + m_head[:, None].to(tl.int64) * stride_oh + offs_d[None, :])
        tl.store(o_ptrs, out_tile.to(out_ptr.dtype.element_ty), mask=mask_out)
        tl.store(lse_ptr + seq64 * stride_lb + m_head.to(tl.int64) * stride_lh + m_query, lse,
                 mask=mask_m)
    else:
        # Partials: (capacity, L_Q, H_q, D_V) and (capacity, L_Q, H_q), contiguous fp32.
        part_rows = (pid_item.to(tl.int64) * L_Q + m_query) * n_heads_q + m_head  # (M,)
        tl.store(part_out_ptr + part_rows[:, None] * D_V + offs_d[None, :], out_tile, mask=mask_out)
        tl.store(part_lse_ptr + part_rows, lse, mask=mask_m)
