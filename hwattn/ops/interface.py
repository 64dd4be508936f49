"""Public entry points of `hwattn.ops`: argument checks, then dispatch to a backend.

Every check runs before any kernel launches and raises `ValueError` naming the argument.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hwattn.ops import reference
from hwattn.ops.plan import DecodePlan, plan_decode

BACKENDS = ("auto", "triton", "torch")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    return backend


def _triton_available() -> bool:
    try:
        from hwattn.ops import triton_decode  # noqa: F401
    except ImportError:
        return False
    return True


def _check_paged(name_cache: str, cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                 batch: int, query_len: int, device: torch.device, plan: DecodePlan | None) -> None:
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (B={batch}, max_pages), got {tuple(block_table.shape)}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be (B={batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens), (name_cache, cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cache.shape[1] <= 0:
        raise ValueError(f"{name_cache} page size must be positive, got {cache.shape[1]}")
    capacity = block_table.shape[1] * cache.shape[1]
    if plan is not None:
        # plan_decode read the lengths on the host already: no device read here (CUDA graphs).
        if not isinstance(plan, DecodePlan) or plan.batch != batch:
            raise ValueError(f"plan must be a DecodePlan from plan_decode for B={batch}")
        if plan.max_seqlen > capacity:
            raise ValueError(f"block_table has {block_table.shape[1]} pages of {cache.shape[1]} "
                             f"tokens = {capacity} slots, too short for the plan's longest "
                             f"sequence {plan.max_seqlen}")
        return
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return  # reading the lengths would sync; pass a plan to have them checked
    lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
    if lo < query_len:
        raise ValueError(f"cache_seqlens must be >= the query length {query_len} (the new "
                         f"tokens are counted), got min {lo}")
    if hi > capacity:
        raise ValueError(f"block_table has {block_table.shape[1]} pages of {cache.shape[1]} "
                         f"tokens = {capacity} slots, too short for cache_seqlens max {hi}")


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")


def _check_cache_dtype(name: str, cache: Tensor, q: Tensor, scale) -> None:
    fp8 = cache.dtype in (torch.float8_e4m3fn,)
    if fp8 and scale is None:
        raise ValueError(f"{name} is fp8: pass its dequantisation scale")
    if not fp8 and cache.dtype != q.dtype:
        raise ValueError(f"{name} dtype {cache.dtype} must match the query dtype {q.dtype} "
                         "(or be float8_e4m3fn with a scale)")


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
           cache_seqlens: Tensor, *, softmax_scale: float | None = None, return_lse: bool = False,
           plan=None, backend: str = "auto", k_scale: float | None = None,
           v_scale: float | None = None):
    """Paged attention with separate K and V caches (MHA / MQA / GQA).

    Args:
        q: (B, L_q, H_q, D) fp16/bf16 (fp32/fp64 on the reference).
        k_cache, v_cache: (P, page_size, H_kv, D); H_q % H_kv == 0, head i reads KV head
            i // (H_q // H_kv). fp8 (e4m3) with `k_scale` / `v_scale` is accepted.
        block_table: (B, max_pages) int32. cache_seqlens: (B,) int32, counting the L_q new tokens.
        softmax_scale: default 1/sqrt(D).
        plan: a schedule from `plan_decode`, reused by every layer of a step (optional).
    Returns:
        out (B, L_q, H_q, D) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be (B, L_q, H_q, D), got shape {tuple(q.shape)}")
    _check_float("q", q)
    batch, query_len, n_heads, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be (P, page_size, H_kv, D), got {tuple(cache.shape)}")
        if cache.shape[3] != head_dim:
            raise ValueError(f"{name} head dim {cache.shape[3]} must equal q's {head_dim}")
    _check_cache_dtype("k_cache", k_cache, q, k_scale)
    _check_cache_dtype("v_cache", v_cache, q, v_scale)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    n_kv = k_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"k_cache has {n_kv} heads, which must divide q's {n_heads} heads")
    _check_paged("k_cache", k_cache, block_table, cache_seqlens, batch, query_len, q.device, plan)
    if v_cache.device != q.device:
        raise ValueError(f"v_cache is on {v_cache.device} but q is on {q.device}")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    if _pick_backend(backend, q.device) == "torch":
        out, lse = reference.decode_reference(q, k_cache, v_cache, block_table, cache_seqlens,
                                              scale, k_scale, v_scale)
    else:
        from hwattn.ops import triton_decode
        out, lse = triton_decode.decode(q, k_cache, v_cache, block_table, cache_seqlens,
                                        softmax_scale=scale, plan=plan, k_scale=k_scale,
                                        v_scale=v_scale)
    return (out, lse) if return_lse else out


def decode_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                block_table: Tensor, cache_seqlens: Tensor, *, softmax_scale: float | None = None,
                return_lse: bool = False, plan=None, backend: str = "auto",
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
    if q_nope.dim() != 4:
        raise ValueError(f"q_nope must be (B, L_q, H_q, D_nope), got {tuple(q_nope.shape)}")
    _check_float("q_nope", q_nope)
    batch, query_len, n_heads, d_nope = q_nope.shape
    if q_rope.dim() != 4 or q_rope.shape[:3] != q_nope.shape[:3]:
        raise ValueError(f"q_rope must be (B, L_q, H_q, D_R) matching q_nope {tuple(q_nope.shape[:3])}, "
                         f"got {tuple(q_rope.shape)}")
    if q_rope.dtype != q_nope.dtype:
        raise ValueError(f"q_rope dtype {q_rope.dtype} must match q_nope's {q_nope.dtype}")
    d_rope = q_rope.shape[3]
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be (P, page_size, H_kv, D_v), got {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] < d_nope:
        raise ValueError(f"kv_cache width {kv_cache.shape[3]} must be >= q_nope's D_nope {d_nope}")
    if rope_cache.dim() != 3 or rope_cache.shape[:2] != kv_cache.shape[:2] or rope_cache.shape[2] != d_rope:
        raise ValueError(f"rope_cache must be (P, page_size, D_R) = {(*kv_cache.shape[:2], d_rope)}, "
                         f"got {tuple(rope_cache.shape)}")
    _check_cache_dtype("kv_cache", kv_cache, q_nope, kv_scale)
    _check_cache_dtype("rope_cache", rope_cache, q_nope, kv_scale)
    n_kv = kv_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"kv_cache has {n_kv} heads, which must divide q_nope's {n_heads} heads")
    _check_paged("kv_cache", kv_cache, block_table, cache_seqlens, batch, query_len, q_nope.device,
                 plan)
    if q_rope.device != q_nope.device or rope_cache.device != q_nope.device:
        raise ValueError("q_rope and rope_cache must be on q_nope's device")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d_nope + d_rope)
    if _pick_backend(backend, q_nope.device) == "torch":
        out, lse = reference.decode_tied_reference(q_nope, q_rope, kv_cache, rope_cache,
                                                   block_table, cache_seqlens, scale, kv_scale)
    else:
        from hwattn.ops import triton_decode
        out, lse = triton_decode.decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                             cache_seqlens, softmax_scale=scale, plan=plan,
                                             kv_scale=kv_scale)
    return (out, lse) if return_lse else out


def store_kv(cache: Tensor, new: Tensor, slot_mapping: Tensor, *, scale: float | None = None,
             backend: str = "auto") -> None:
    """Write new tokens into a paged cache in place.

    Args:
        cache: (P, page_size, *feat). new: (N, *feat). slot_mapping: (N,) int, flat slot
            page * page_size + offset per token; negative entries are skipped (padding).
        scale: quantisation scale for an fp8 cache (stored = value / scale).
    """
    if new.shape[1:] != cache.shape[2:]:
        raise ValueError(f"new tokens {tuple(new.shape)} do not fit cache {tuple(cache.shape)}: "
                         f"expected (N, {', '.join(map(str, cache.shape[2:]))})")
    if slot_mapping.shape != (new.shape[0],):
        raise ValueError(f"slot_mapping must be (N={new.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    for name, t in (("new", new), ("slot_mapping", slot_mapping)):
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but cache is on {cache.device}")
    kernel_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if (_pick_backend(backend, cache.device) == "triton" and cache.is_contiguous()
            and new.dtype in kernel_dtypes
            and cache.dtype in (*kernel_dtypes, torch.float8_e4m3fn)):
        from hwattn.ops import triton_decode
        triton_decode.store_kv(cache, new, slot_mapping, scale)
    else:
        reference.store_kv_reference(cache, new, slot_mapping, scale)
