"""Plain PyTorch references for the paged decode ops.

Written for obviousness, not speed: one sequence at a time, scores in fp32 (fp64 when the
inputs are fp64). They never import a kernel. They are also the CPU path of `hwattn.ops`.

Paged layout (docs/design.md §4): `cache[num_pages, page_size, heads, dim]`; sequence b's token t
lives in page `block_table[b, t // page_size]` at offset `t % page_size`. `cache_seqlens[b]`
counts every cached token, the L_q new ones included. Query row j of L_q sees cache
positions < L - L_q + j + 1 (causal mask aligned bottom-right).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def gather_cache(cache: Tensor, block_table_row: Tensor, length: int) -> Tensor:
    """The first `length` tokens of one sequence, contiguous: (length, *cache.shape[2:])."""
    page_size = cache.shape[1]
    n_pages = -(-length // page_size)
    pages = block_table_row[:n_pages].long()
    return cache[pages].flatten(0, 1)[:length]


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _attend_one(scores: Tensor, values: Tensor, length: int, out_dtype: torch.dtype):
    """scores (L_q, H_q, L), values (L, H_q, D_v) -> out (L_q, H_q, D_v), lse (H_q, L_q)."""
    l_q = scores.shape[0]
    row = torch.arange(l_q, device=scores.device)[:, None]
    col = torch.arange(length, device=scores.device)[None, :]
    visible = col <= (length - l_q + row)  # (L_q, L)
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (L_q, H_q)
    probs = torch.exp(scores - lse[..., None])
    out = torch.einsum("qhl,lhd->qhd", probs, values)
    return out.to(out_dtype), lse.transpose(0, 1).float()


def _expand_heads(x: Tensor, n_heads: int) -> Tensor:
    """(L, H_kv, D) -> (L, H_q, D): query head i reads KV head i // (H_q / H_kv)."""
    return x.repeat_interleave(n_heads // x.shape[1], dim=1)


def decode_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                     cache_seqlens: Tensor, softmax_scale: float | None = None,
                     k_scale: float | None = None, v_scale: float | None = None):
    """Separate K/V paged attention (MHA/MQA/GQA).

    q (B, L_q, H_q, D); k_cache, v_cache (P, page_size, H_kv, D); block_table (B, max_pages);
    cache_seqlens (B,). Returns out (B, L_q, H_q, D) in q's dtype and lse (B, H_q, L_q) fp32.
    `k_scale` / `v_scale` dequantise an fp8 cache (stored = real / scale).
    """
    batch, _, n_heads, head_dim = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    cdt = _compute_dtype(q)
    outs, lses = [], []
    for b in range(batch):
        length = int(cache_seqlens[b])
        k = _expand_heads(gather_cache(k_cache, block_table[b], length).to(cdt), n_heads)
        v = _expand_heads(gather_cache(v_cache, block_table[b], length).to(cdt), n_heads)
        if k_scale is not None:
            k = k * k_scale
        if v_scale is not None:
            v = v * v_scale
        scores = torch.einsum("qhd,lhd->qhl", q[b].to(cdt), k) * scale
        out, lse = _attend_one(scores, v, length, q.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def decode_tied_reference(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                          block_table: Tensor, cache_seqlens: Tensor, softmax_scale: float,
                          kv_scale: float | None = None):
    """Shared K/V paged attention (GTA; MLA/GLA absorbed).

    q_nope (B, L_q, H_q, D_nope); q_rope (B, L_q, H_q, D_R); kv_cache (P, page_size, H_kv, D_v)
    whose first D_nope dims are the un-rotated key and all D_v dims the value; rope_cache
    (P, page_size, D_R), one RoPE key shared by every head. Returns out (B, L_q, H_q, D_v) and
    lse (B, H_q, L_q) fp32. `kv_scale` dequantises an fp8 cache (both caches share it).
    """
    batch, _, n_heads, d_nope = q_nope.shape
    cdt = _compute_dtype(q_nope)
    outs, lses = [], []
    for b in range(batch):
        length = int(cache_seqlens[b])
        state = _expand_heads(gather_cache(kv_cache, block_table[b], length).to(cdt), n_heads)
        rope = gather_cache(rope_cache, block_table[b], length).to(cdt)  # (L, D_R)
        if kv_scale is not None:
            state, rope = state * kv_scale, rope * kv_scale
        scores = (torch.einsum("qhd,lhd->qhl", q_nope[b].to(cdt), state[..., :d_nope])
                  + torch.einsum("qhr,lr->qhl", q_rope[b].to(cdt), rope)) * softmax_scale
        out, lse = _attend_one(scores, state, length, q_nope.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def store_kv_reference(cache: Tensor, new: Tensor, slot_mapping: Tensor,
                       scale: float | None = None) -> None:
    """Write `new` (N, *feat) into `cache` (P, page_size, *feat) at flat slots
    `slot_mapping` (N,) = page * page_size + offset; negative slots are skipped (padding).
    An fp8 cache stores value / scale, saturated to the format's range."""
    keep = slot_mapping >= 0
    flat = cache.view(-1, *cache.shape[2:])
    values = new[keep]
    if scale is not None:
        values = values.float() / scale
    if cache.dtype == torch.float8_e4m3fn:  # saturate explicitly, as the Triton store does
        limit = torch.finfo(cache.dtype).max
        values = values.float().clamp(-limit, limit)
    flat[slot_mapping[keep].long()] = values.to(cache.dtype)
