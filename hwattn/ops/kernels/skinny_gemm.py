"""The skinny GEMM kernel: Y[M, N] = X[M, K] @ W[N, K]^T for a few rows (M <= 128).

At decode batch sizes the weight is the whole cost: every byte of W is read once, X is small
and stays in L2. What limits cuBLAS there is parallelism: with 64 rows, N = 2048 gives too few
output tiles to keep 132 SMs' loads in flight. So the grid is (N blocks, K splits): program
(pid_n, pid_k) streams the W tile rows [pid_n * BLOCK_N, +BLOCK_N) over its slice of K, rows of
W contiguous along K so every load is coalesced, and multiplies them by the matching X tile.

The dot is written W-tile first, acc (BLOCK_N, BLOCK_M) = W_tile @ X_tile^T ("swap AB"): the
weight's rows fill the M side of the tensor-core instruction, which needs 64 of them for
Hopper's wgmma, while the few rows of X sit on its N side, which takes as few as 8.

Split K (SPLIT_K > 1) without fp32 atomics on the output: every program writes its fp32
partial tile to a workspace, then counts itself in on its N block's counter (an int atomic);
the program that arrives last sums the block's partials in split order 0, 1, ... and writes Y,
then puts the counter back to zero for the next launch. The sum's order does not depend on
which program arrives last, so the result is the same bits on every run.

Row offsets are int64; K and the row strides arrive divided by ALIGN (a power of two dividing
all three) and are multiplied back here, so the compiler can prove 16-byte alignment of every
row even when K is not a multiple of 16 (the MLP's down projection has K = 6488 = 8 * 811).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def skinny_gemm_kernel(
    x_ptr, w_ptr, y_ptr, part_ptr, count_ptr,
    M, N, k_div, stride_xm_div, stride_wn_div, stride_ym, k_per_split, split_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ALIGN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    K = k_div * ALIGN
    stride_xm = stride_xm_div * ALIGN
    stride_wn = stride_wn_div * ALIGN

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,) output columns = rows of W
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) rows of X and Y
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_m = offs_m < M
    # Rows past the end re-read the last ones (wrapped, never out of bounds), so the tile loads
    # need no mask along N or M; the stores drop those rows.
    w_rows = (offs_n % N).to(tl.int64) * stride_wn  # (BLOCK_N,)
    x_rows = (offs_m % M).to(tl.int64) * stride_xm  # (BLOCK_M,)

    k_start = pid_k * k_per_split  # the launcher leaves no split empty
    k_stop = tl.minimum(k_start + k_per_split, K)
    n_whole = (k_stop - k_start) // BLOCK_K
    w_ptrs = w_ptr + w_rows[:, None] + (k_start + offs_k)[None, :]  # (BLOCK_N, BLOCK_K)
    x_ptrs = x_ptr + x_rows[:, None] + (k_start + offs_k)[None, :]  # (BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for _ in range(n_whole):
        w_tile = tl.load(w_ptrs)  # (BLOCK_N, BLOCK_K)
        x_tile = tl.load(x_ptrs)  # (BLOCK_M, BLOCK_K)
        acc = tl.dot(w_tile, tl.trans(x_tile), acc, input_precision=DOT_PRECISION)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    k_tail = k_start + n_whole * BLOCK_K
    if k_tail < k_stop:  # K not a multiple of BLOCK_K: only the last split has a tail
        mask_k = (k_tail + offs_k) < k_stop
        w_tile = tl.load(w_ptrs, mask=mask_k[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        x_tile = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        acc = tl.dot(w_tile, tl.trans(x_tile), acc, input_precision=DOT_PRECISION)

    # acc holds Y^T: element (n, m) goes to y[m, n].
    y_ptrs = (y_ptr + offs_m[None, :].to(tl.int64) * stride_ym
              + offs_n[:, None])  # (BLOCK_N, BLOCK_M)
    mask_y = mask_n[:, None] & mask_m[None, :]
    if split_k == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tile_elems = BLOCK_N * BLOCK_M
        block_base = part_ptr + pid_n.to(tl.int64) * split_k * tile_elems
        # Whole tiles, unmasked (so the accesses vectorise): rows past M or N hold products
        # of the wrapped rows and never reach Y.
        offs_tile = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + offs_m[None, :]  # (BLOCK_N, BLOCK_M)
        tl.store(block_base + pid_k * tile_elems + offs_tile, acc)
        # Every thread's partial is written before the one thread issuing the atomic releases
        # them; the last program's acquire makes all the block's partials visible to it.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == split_k - 1:
            total = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            # Unrolled so several partials are in flight at once (a plain loop waits for each
            # load before the next); the sum's order stays 0, 1, 2, ...
            for s in tl.range(split_k, loop_unroll_factor=4):
                # .cg: from L2, never a stale L1 line (other SMs wrote these).
                total += tl.load(block_base + s * tile_elems + offs_tile,
                                 cache_modifier=".cg")  # (BLOCK_N, BLOCK_M)
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask_y)
            tl.store(count_ptr + pid_n, 0)
