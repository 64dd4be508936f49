"""Plain PyTorch references for the paged decode and prefill ops, and for the skinny GEMM.

Written for obviousness, not speed: one sequence at a time, scores in fp32 (fp64 when the
inputs are fp64). They never import a kernel. They are also the CPU path of `hwattn.ops`.

Paged layout (docs/design.md §4): `cache[num_pages, page_size, heads, dim]`; sequence b's token t
lives in page `block_table[b, t // page_size]` at offset `t % page_size`. `cache_seqlens[b]`
counts every cached token, the L_q new ones included. Query row j of L_q sees cache
positions < L - L_q + j + 1 (causal mask aligned bottom-right).

Prefill is decode with a query length per sequence: the queries of all sequences are packed as
rows of one (N, H_q, D) tensor, sequence b's being rows cu_seqlens_q[b]:cu_seqlens_q[b + 1].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_block_table(block_table: Tensor, lengths, num_pages: int, page_size: int) -> None:
    """ValueError naming the first bad entry unless every page a sequence reads is a page of
    the cache: the first ceil(lengths[b] / page_size) entries of row b of `block_table`
    (B, max_pages) must lie in [0, num_pages). Entries past them are never read and are not
    checked (tables are padded with anything). lengths: (B,) tokens each sequence reads, a
    tensor or a list of ints.

    Reads the table: free on the host, a device synchronisation for a GPU table. The
    references read their lengths on the host anyway; the kernels' backends call it only for
    a table in host memory (`hwattn/ops/backends/base.py`)."""
    if not block_table.numel():
        return
    lo, hi = torch.aminmax(block_table)
    if 0 <= int(lo) and int(hi) < num_pages:  # the common case (the engine's tables): one op
        return
    device = block_table.device
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    pages = (lengths + page_size - 1) // page_size  # (B,) pages each sequence reads
    read = torch.arange(block_table.shape[1], device=device) < pages[:, None]
    bad = read & ((block_table < 0) | (block_table >= num_pages))
    if bool(bad.any()):
        b, i = bad.nonzero()[0].tolist()
        raise ValueError(f"block_table[{b}, {i}] is page {int(block_table[b, i])}, outside the "
                         f"cache's {num_pages} pages [0, {num_pages}) (sequence {b} reads the "
                         f"first {int(pages[b])} pages of its row)")


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
    `k_scale` / `v_scale` dequantise an fp8 cache (stored = real / scale). A page id the
    sequences read outside [0, P) raises ValueError (`check_block_table`).
    """
    check_block_table(block_table, cache_seqlens, *k_cache.shape[:2])
    return _decode_rows(q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale, k_scale,
                        v_scale)


def _decode_rows(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                 cache_seqlens: Tensor, softmax_scale: float | None, k_scale: float | None,
                 v_scale: float | None):
    """`decode_reference` on a block table already checked."""
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
    lse (B, H_q, L_q) fp32. `kv_scale` dequantises an fp8 cache (both caches share it). A
    page id the sequences read outside [0, P) raises ValueError (`check_block_table`).
    """
    check_block_table(block_table, cache_seqlens, *kv_cache.shape[:2])
    return _decode_tied_rows(q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
                             softmax_scale, kv_scale)


def _decode_tied_rows(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                      block_table: Tensor, cache_seqlens: Tensor, softmax_scale: float,
                      kv_scale: float | None, v_cache: Tensor | None = None):
    """`decode_tied_reference` on a block table already checked; with `v_cache` (P, page_size,
    H_kv, D_v) its values in place of the state's."""
    batch, _, n_heads, d_nope = q_nope.shape
    cdt = _compute_dtype(q_nope)
    outs, lses = [], []
    for b in range(batch):
        length = int(cache_seqlens[b])
        state = _expand_heads(gather_cache(kv_cache, block_table[b], length).to(cdt), n_heads)
        rope = gather_cache(rope_cache, block_table[b], length).to(cdt)  # (L, D_R)
        values = state if v_cache is None else \
            _expand_heads(gather_cache(v_cache, block_table[b], length).to(cdt), n_heads)
        if kv_scale is not None:
            state, rope, values = state * kv_scale, rope * kv_scale, values * kv_scale
        scores = (torch.einsum("qhd,lhd->qhl", q_nope[b].to(cdt), state[..., :d_nope])
                  + torch.einsum("qhr,lr->qhl", q_rope[b].to(cdt), rope)) * softmax_scale
        out, lse = _attend_one(scores, values, length, q_nope.dtype)
        outs.append(out)
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _per_sequence(decode, cu_seqlens_q: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                  queries: tuple[Tensor, ...], n_heads: int, d_v: int, out_dtype: torch.dtype,
                  cache: Tensor):
    """Run `decode(queries of one sequence (1, n, ...), table row, seqlen)` for every sequence
    and pack the results: out (N, H_q, D_v), lse (H_q, N) fp32. The pages of the sequences
    with queries are checked first (`check_block_table`; `cache` is the one they index)."""
    n_tokens = queries[0].shape[0]
    out = torch.empty(n_tokens, n_heads, d_v, dtype=out_dtype, device=queries[0].device)
    lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=queries[0].device)
    cu = cu_seqlens_q.tolist()
    read = [n if hi > lo else 0 for n, lo, hi in zip(cache_seqlens.tolist(), cu, cu[1:])]
    check_block_table(block_table, read, *cache.shape[:2])
    for b in range(len(cu) - 1):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo:  # a sequence with no queries this step
            continue
        o, l = decode(tuple(x[lo:hi][None] for x in queries), block_table[b:b + 1],
                      cache_seqlens[b:b + 1])  # (1, n, H_q, D_v), (1, H_q, n)
        out[lo:hi] = o[0]
        lse[:, lo:hi] = l[0]
    return out, lse


def prefill_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                      cu_seqlens_q: Tensor, cache_seqlens: Tensor,
                      softmax_scale: float | None = None, k_scale: float | None = None,
                      v_scale: float | None = None):
    """Variable-length separate K/V paged attention: `decode_reference` per sequence.

    q (N, H_q, D_qk); k_cache (P, page_size, H_kv, D_qk); v_cache (P, page_size, H_kv, D_v);
    block_table (B, max_pages); cu_seqlens_q (B + 1,); cache_seqlens (B,). Returns
    out (N, H_q, D_v) in q's dtype and lse (H_q, N) fp32. A page id read outside [0, P)
    raises ValueError (`check_block_table`; a sequence without queries reads none).
    """
    def one(queries, table, seqlens):
        return _decode_rows(queries[0], k_cache, v_cache, table, seqlens, softmax_scale,
                            k_scale, v_scale)

    return _per_sequence(one, cu_seqlens_q, block_table, cache_seqlens, (q,), q.shape[1],
                         v_cache.shape[3], q.dtype, k_cache)


def prefill_tied_reference(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                           block_table: Tensor, cu_seqlens_q: Tensor, cache_seqlens: Tensor,
                           softmax_scale: float, kv_scale: float | None = None,
                           v_cache: Tensor | None = None):
    """Variable-length tied-state paged attention: `decode_tied_reference` per sequence.

    q_nope (N, H_q, D_nope); q_rope (N, H_q, D_R); kv_cache (P, page_size, H_kv, D_v);
    rope_cache (P, page_size, D_R); v_cache (P, page_size, H_kv, D_v) or None: values in place
    of the state's. Returns out (N, H_q, D_v) and lse (H_q, N) fp32. A page id read outside
    [0, P) raises ValueError, as for `prefill_reference`.
    """
    def one(queries, table, seqlens):
        return _decode_tied_rows(*queries, kv_cache, rope_cache, table, seqlens, softmax_scale,
                                 kv_scale, v_cache)

    d_v = (kv_cache if v_cache is None else v_cache).shape[3]
    return _per_sequence(one, cu_seqlens_q, block_table, cache_seqlens, (q_nope, q_rope),
                         q_nope.shape[1], d_v, q_nope.dtype, kv_cache)


def store_kv_reference(cache: Tensor, new: Tensor, slot_mapping: Tensor,
                       scale: float | None = None) -> None:
    """Write `new` (N, *feat) into `cache` (P, page_size, *feat) at flat slots
    `slot_mapping` (N,) = page * page_size + offset; negative slots are skipped (padding).
    An fp8 cache stores value / scale, saturated to the format's range. A slot past the cache
    raises ValueError before anything is written."""
    n_slots = cache.shape[0] * cache.shape[1]
    if slot_mapping.numel() and int(slot_mapping.max()) >= n_slots:
        raise ValueError(f"slot_mapping holds slot {int(slot_mapping.max())}, past the cache's "
                         f"{n_slots} slots ({cache.shape[0]} pages of {cache.shape[1]})")
    keep = slot_mapping >= 0
    values = new[keep]
    if scale is not None:
        values = values.float() / scale
    if cache.dtype == torch.float8_e4m3fn:  # saturate explicitly, as the Triton store does
        limit = torch.finfo(cache.dtype).max
        values = values.float().clamp(-limit, limit)
    # Indexed by (page, offset), not through a flat view: any layout of the cache takes it
    # (a view fails when the page and token dimensions do not merge, e.g. token-major pools).
    slots = slot_mapping[keep].long()
    page_size = cache.shape[1]
    cache[slots // page_size, slots % page_size] = values.to(cache.dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x / rms(x) * weight over the last dimension, in fp32 (or wider), returned in x's dtype;
    `weight` (..., d) broadcasts against x (one row per head: (heads, d) for x (..., heads, d))."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE of x (..., d) by cos, sin (..., d / 2), which broadcast against x's
    leading dimensions: halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), in fp32,
    returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def finish_states_reference(news: tuple[Tensor, Tensor], norm: tuple[Tensor, float] | None,
                            rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """What a layer does to its two cached states between its input projection and the cache
    (the contract of `AttentionBackend.store_states`): news[0] (N, heads, d) through RMSNorm
    with one weight row per head, `norm` = (weight (heads, d), eps), and news[1] (N, d_R)
    rotated, `rope` = (cos, sin), each (N, d_R / 2); either left as it is where None."""
    first, second = news
    if norm is not None:
        first = rms_norm_reference(first, *norm)
    if rope is not None:
        second = rope_reference(second, *rope)
    return first, second


def skinny_linear_reference(x: Tensor, weight: Tensor) -> Tensor:
    """x (..., K) @ weight (N, K)^T -> (..., N) in x's dtype, computed in fp32 and rounded once
    (the contract of `hwattn.ops.skinny_gemm.skinny_linear`)."""
    return torch.nn.functional.linear(x.float(), weight.float()).to(x.dtype)
