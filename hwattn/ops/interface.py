"""Public entry points of `hwattn.ops`: each picks a backend from the registry and calls it.

`backend` is a registered name ("torch", "triton", ...), "auto" (chosen for the tensors'
device, see `hwattn.ops.backends`), or an `AttentionBackend` object. The backend checks every
argument before any kernel launches and raises `ValueError` naming it. The index tensors
(block_table, cache_seqlens, cu_seqlens_q, slot_mapping) must be contiguous in their last
dimension (rows sliced from a wider table are fine); dequantisation scales, where given, are
positive finite numbers.

What stays unchecked: the page ids of a block table on the GPU. Checking them would read the
table back (a synchronisation on every layer of every step), so the Triton and Hopper kernels
trust them, and an id outside [0, P) reads memory outside the cache. The engine's tables come
from its `BlockManager`, which hands out pages [1, P) only; a caller building its own must
keep its ids in range (the "torch" backend, or a table in host memory, refuses them).

Nor is a plan checked against the lengths of a GPU call: it was made on the host from the
step's lengths, and comparing would read the device copy back. A decode kernel reads the
tokens of the plan's lengths, so a plan made for shorter ones skips tokens; the Triton and
Hopper kernels end each work item at `cache_seqlens`, so one made for longer ones reads no
table entry past a sequence's pages (the Hopper kernel's copies still take the whole 64-token
block the length ends in, and zero its slots past the length in shared memory). A prefill kernel sizes its grid by the
plan's longest query run and reads `cu_seqlens_q` / `cache_seqlens` from the device, so a
stale plan leaves output rows unwritten or reads pages the host never checked; the Triton
kernel writes no row outside `out` and reads no key past its block-table row whatever the
device's offsets and lengths say. Make the plan from the very lengths the step passes (the
engine does); with the lengths in host memory, a plan for others is refused (in the first
layer of a step: a plan remembers the tensors it was found to match).
"""

from __future__ import annotations

from torch import Tensor

from hwattn.ops.backends import AttentionBackend, get_backend


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
           cache_seqlens: Tensor, *, softmax_scale: float | None = None, return_lse: bool = False,
           plan=None, backend: str | AttentionBackend = "auto", k_scale: float | None = None,
           v_scale: float | None = None):
    """Paged attention with separate K and V caches (MHA / MQA / GQA).

    Args:
        q: (B, L_q, H_q, D) fp16/bf16 (fp32/fp64 on the reference).
        k_cache, v_cache: (P, page_size, H_kv, D); H_q % H_kv == 0, head i reads KV head
            i // (H_q // H_kv). fp8 (e4m3) with `k_scale` / `v_scale` is accepted.
        block_table: (B, max_pages) int32. cache_seqlens: (B,) int32, counting the L_q new tokens.
            Row b's first ceil(cache_seqlens[b] / page_size) entries are read: page ids in
            [0, P). Others raise ValueError on the "torch" backend (any device) and on any
            backend for a table in host memory. A GPU table is NOT checked by the kernels
            (that would need a device read): an id out of range reads outside the cache.
        softmax_scale: any finite number, default 1/sqrt(D).
        plan: the backend's plan for the step (`plan_decode` for Triton), reused by every layer;
            made from these very lengths (a GPU call cannot check that: see the module
            docstring).
    Returns:
        out (B, L_q, H_q, D) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
    """
    return get_backend(backend, q.device).decode(
        q, k_cache, v_cache, block_table, cache_seqlens, softmax_scale=softmax_scale,
        return_lse=return_lse, plan=plan, k_scale=k_scale, v_scale=v_scale)


def decode_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                block_table: Tensor, cache_seqlens: Tensor, *, softmax_scale: float | None = None,
                return_lse: bool = False, plan=None, backend: str | AttentionBackend = "auto",
                kv_scale: float | None = None):
    """Paged attention over one tied state per head plus one shared RoPE key (GTA, MLA, GLA).

    scores = (q_nope · S[..., :D_nope] + q_rope · R) · scale, out = P · S.

    Args:
        q_nope: (B, L_q, H_q, D_nope); q_rope: (B, L_q, H_q, D_R).
        kv_cache: (P, page_size, H_kv, D_v) with D_nope <= D_v; rope_cache: (P, page_size, D_R).
        block_table, cache_seqlens, plan: as for `decode`.
        softmax_scale: any finite number, default 1/sqrt(D_nope + D_R).
    Returns:
        out (B, L_q, H_q, D_v) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
    """
    return get_backend(backend, q_nope.device).decode_tied(
        q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
        softmax_scale=softmax_scale, return_lse=return_lse, plan=plan, kv_scale=kv_scale)


def prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
            cu_seqlens_q: Tensor, cache_seqlens: Tensor, *, softmax_scale: float | None = None,
            return_lse: bool = False, plan=None, backend: str | AttentionBackend = "auto",
            k_scale: float | None = None, v_scale: float | None = None):
    """Variable-length causal paged attention with separate K and V caches (prefill of MHA /
    MQA / GQA; keys may be wider than values).

    Args:
        q: (N, H_q, D_qk): the queries of B sequences packed as rows, sequence b's being rows
            cu_seqlens_q[b]:cu_seqlens_q[b + 1], its last tokens (already in the cache).
        k_cache: (P, page_size, H_kv, D_qk); v_cache: (P, page_size, H_kv, D_v).
        block_table: (B, max_pages) int32, page ids checked as for `decode` (a sequence without
            queries reads none). cu_seqlens_q: (B + 1,) int32 from 0, ending at N.
        cache_seqlens: (B,) int32, counting each sequence's queries; causal bottom-right: query
            j of n sees cache positions < cache_seqlens[b] - n + j + 1.
        softmax_scale: any finite number, default 1/sqrt(D_qk).
        plan: the step's `plan_prefill(cu_seqlens_q, cache_seqlens)` on host lengths, reused by
            every layer; without it the lengths are read back from the device. It must be
            made from these very lengths (a GPU call cannot check that: see the module
            docstring).
    Returns:
        out (N, H_q, D_v) in q's dtype, and lse (H_q, N) fp32 if `return_lse`.
    """
    return get_backend(backend, q.device).prefill(
        q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens,
        softmax_scale=softmax_scale, return_lse=return_lse, plan=plan, k_scale=k_scale,
        v_scale=v_scale)


def prefill_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                 block_table: Tensor, cu_seqlens_q: Tensor, cache_seqlens: Tensor, *,
                 softmax_scale: float | None = None, return_lse: bool = False, plan=None,
                 backend: str | AttentionBackend = "auto", kv_scale: float | None = None,
                 v_cache: Tensor | None = None):
    """Variable-length causal paged attention over tied states plus one shared RoPE key
    (prefill of GTA; MLA / GLA absorbed), or over per-head keys beside that RoPE key with
    values of their own (`v_cache`: MLA / GLA expanded).

    Args:
        q_nope: (N, H_q, D_nope); q_rope: (N, H_q, D_R), packed as for `prefill`.
        kv_cache: (P, page_size, H_kv, D_v) with D_nope <= D_v (with `v_cache`: any width
            >= D_nope); rope_cache: (P, page_size, D_R).
        block_table, cu_seqlens_q, cache_seqlens, plan: as for `prefill`.
        softmax_scale: any finite number, default 1/sqrt(D_nope + D_R).
        kv_scale: dequantisation scale of an fp8 cache (every cache shares it).
        v_cache: (P, page_size, H_kv, D_v) values, of kv_cache's dtype; None: the state's.
    Returns:
        out (N, H_q, D_v) in q's dtype, and lse (H_q, N) fp32 if `return_lse`.
    """
    return get_backend(backend, q_nope.device).prefill_tied(
        q_nope, q_rope, kv_cache, rope_cache, block_table, cu_seqlens_q, cache_seqlens,
        softmax_scale=softmax_scale, return_lse=return_lse, plan=plan, kv_scale=kv_scale,
        v_cache=v_cache)


def store_kv(cache: Tensor, new: Tensor, slot_mapping: Tensor, *, scale: float | None = None,
             backend: str | AttentionBackend = "auto") -> None:
    """Write new tokens into a paged cache in place.

    Args:
        cache: (P, page_size, *feat). new: (N, *feat). slot_mapping: (N,) int, flat slot
            page * page_size + offset per token; negative entries are skipped (padding). A
            slot past the cache is refused by the reference; the Triton kernel, which cannot
            raise without a device read, skips it (it never writes past the cache).
        scale: quantisation scale for an fp8 cache (stored = value / scale), positive.
    """
    get_backend(backend, cache.device).store_kv(cache, new, slot_mapping, scale=scale)
