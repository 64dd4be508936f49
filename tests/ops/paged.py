"""Hostile paged-cache test data and an fp64 truth computed without `hwattn.ops`.

Hostile means: pages handed out in shuffled order from a pool with spare pages, NaN in every
cache slot that no sequence owns below its length (the rest of a sequence's last page, spare
pages), and block-table entries past a sequence's last page pointing far out of range.
"""

from __future__ import annotations

import os

import torch

# Where the kernels run: the CPU under Triton's interpreter (CI), or "cuda" to run the same
# tests compiled on a GPU (HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 pytest tests/ops).
DEVICE = torch.device(os.environ.get("HWATTN_TEST_DEVICE", "cpu"))

OUT_OF_RANGE = (2**30, -7)  # garbage page ids the kernels must never follow


def paged_table(lengths: list[int], page_size: int, spare_pages: int = 3):
    """Shuffled block table (B, max_pages) int32 for `lengths`, and the pool's page count."""
    pages = [-(-n // page_size) for n in lengths]
    max_pages = max(pages) + 1  # one more column: unused entries exist in every row
    n_pool = sum(pages) + spare_pages
    order = torch.randperm(n_pool)
    table = torch.empty(len(lengths), max_pages, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[used:used + n].to(torch.int32)
        table[b, n:] = torch.tensor(OUT_OF_RANGE * max_pages)[: max_pages - n]
        used += n
    return table, n_pool


def fill_cache(shape_per_token: tuple[int, ...], lengths: list[int], table: torch.Tensor,
               n_pool: int, page_size: int, dtype: torch.dtype, scale: float | None = None):
    """A cache (n_pool, page_size, *shape) holding random tokens below each length, NaN elsewhere.

    Returns (cache, real) where `real` is the fp64 value of every slot (stored * scale for fp8).
    """
    real = torch.full((n_pool, page_size, *shape_per_token), float("nan"), dtype=torch.float64)
    for b, n in enumerate(lengths):
        for t in range(n):
            real[table[b, t // page_size], t % page_size] = torch.randn(shape_per_token,
                                                                          dtype=torch.float64)
    if dtype == torch.float8_e4m3fn:
        stored = (real / scale).to(dtype)  # NaN stays NaN in e4m3fn
        return stored, stored.double() * scale
    stored = real.to(dtype)
    return stored, stored.double()


def gather_truth(real: torch.Tensor, table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Tokens 0..length-1 of sequence b: (length, *shape), through explicit slot arithmetic."""
    page_size = real.shape[1]
    pos = torch.arange(length)
    pages = table[b].long()[pos // page_size]
    return real.flatten(0, 1)[pages * page_size + pos % page_size]


def attention_truth(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    scale: float):
    """fp64 attention per sequence. q (B, L_q, H_q, E); keys[b] (L, H_kv, E); values[b]
    (L, H_kv, E_v). Query head h reads KV head h * H_kv // H_q. Returns out, lse (B, H_q, L_q)."""
    batch, l_q, n_heads, _ = q.shape
    outs, lses = [], []
    for b in range(batch):
        k, v = keys[b], values[b]
        length, n_kv = k.shape[0], k.shape[1]
        kv_of_head = torch.arange(n_heads) * n_kv // n_heads
        scores = torch.einsum("jhe,lhe->hjl", q[b].double(), k[:, kv_of_head]) * scale  # (H_q, L_q, L)
        last_visible = length - l_q + torch.arange(l_q)  # (L_q,)
        hidden = torch.arange(length)[None, :] > last_visible[:, None]
        scores = scores.masked_fill(hidden, float("-inf"))
        lse = torch.logsumexp(scores, -1)  # (H_q, L_q)
        probs = torch.exp(scores - lse[..., None])
        outs.append(torch.einsum("hjl,lhe->jhe", probs, v[:, kv_of_head]))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)
