"""Public entry points of `hwattn.ops`: each picks a backend from the registry and calls it.

`backend` is a registered name ("torch", "triton", ...), "auto" (chosen for the tensors'
device, see `hwattn.ops.backends`), or an `AttentionBackend` object. The backend checks every
argument before any kernel launches and raises `ValueError` naming it.
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
        softmax_scale: default 1/sqrt(D).
        plan: the backend's plan for the step (`plan_decode` for Triton), reused by every layer.
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
        softmax_scale: default 1/sqrt(D_nope + D_R).
    Returns:
        out (B, L_q, H_q, D_v) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
    """
    return get_backend(backend, q_nope.device).decode_tied(
        q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
        softmax_scale=softmax_scale, return_lse=return_lse, plan=plan, kv_scale=kv_scale)


def store_kv(cache: Tensor, new: Tensor, slot_mapping: Tensor, *, scale: float | None = None,
             backend: str | AttentionBackend = "auto") -> None:
    """Write new tokens into a paged cache in place.

    Args:
        cache: (P, page_size, *feat). new: (N, *feat). slot_mapping: (N,) int, flat slot
            page * page_size + offset per token; negative entries are skipped (padding).
        scale: quantisation scale for an fp8 cache (stored = value / scale).
    """
    get_backend(backend, cache.device).store_kv(cache, new, slot_mapping, scale=scale)
