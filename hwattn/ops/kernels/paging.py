"""Walking a sequence's pages in blocks of BLOCK_N tokens: the page-table reads the decode
(`attend.py`) and prefill (`prefill.py`) kernels share.

Page ids are read one block ahead: a page-table load inside the iteration that uses it would
make the tile loads wait on it, and Triton's pipeliner then keeps only one tile in flight;
carried over from the previous iteration, they let it keep num_stages - 1.

When PAGE is a multiple of BLOCK_N and blocks start on multiples of BLOCK_N, a block lies in one
page and one table entry (a scalar) serves it; otherwise every token looks its page up (a
(BLOCK_N,) vector).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def block_pages(table_row, n0, offs_n, end, page_next, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """The pages (int64, (BLOCK_N,)) and in-page slots of tokens n0 + offs_n, whose page ids
    `page_next` the previous call (or the caller, for the first block) read, and the page ids of
    the next block: (tok_page, tok_slot, page_next). Tokens from `end` on read no table entry
    past the sequence."""
    if PAGE % BLOCK_N == 0:
        tok_page = tl.zeros([BLOCK_N], tl.int64) + page_next
        page_next = tl.load(table_row + tl.minimum(n0 + BLOCK_N, end - 1) // PAGE).to(tl.int64)
        tok_slot = n0 % PAGE + offs_n
    else:
        tok = n0 + offs_n
        tok_page = page_next
        tok_next = tok + BLOCK_N
        page_next = tl.load(table_row + tok_next // PAGE, mask=tok_next < end, other=0).to(tl.int64)
        tok_slot = tok % PAGE
    return tok_page, tok_slot, page_next
