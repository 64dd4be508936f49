"""The argument checks of `AttentionBackend`'s entry points (hwattn/ops/backends/base.py):
each raises `ValueError` naming the bad argument before any kernel launches. Used by the
backends of this package only; `takes_keyword` also tells which hooks a backend registered
from outside takes.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers

import torch
from torch import Tensor

from hwattn.ops.plan import PrefillPlan

FP8_DTYPES = (torch.float8_e4m3fn,)


def _check_index(name: str, t: Tensor) -> None:
    """The kernels read an index tensor (block table row, lengths, offsets, slots) as a dense
    run of its last dimension (of a table only the row stride is passed): ValueError unless
    that dimension has unit stride. Host metadata only, no device read; called with tensors of
    at least one dimension."""
    if not t.is_contiguous() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}")


def _check_scale(name: str, scale) -> float | None:
    """ValueError unless a dequantisation scale is None or a positive finite number (the
    kernels fold it into the softmax scale and the output; zero, NaN or inf cannot be);
    returned as a Python float (a NumPy float32 is no scalar a Triton launch takes)."""
    if scale is None:
        return None
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_softmax_scale(scale) -> float | None:
    """ValueError unless `softmax_scale` is None or a finite real number (zero and negative
    scales are well defined and allowed); returned as a Python float (a NumPy float32 is no
    scalar a Triton launch takes). A NaN or inf scale made every output NaN; a tensor reached
    the Triton kernels as a pointer (an opaque compile error there) and would need a device
    read on the GPU."""
    if scale is None:
        return None
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"softmax_scale must be a finite number (or None for 1/sqrt(D)), "
                         f"got {scale!r}")
    return float(scale)


def _check_nonempty(name: str, t: Tensor, dims: tuple[str, ...], may_be_empty: str = "") -> None:
    """ValueError naming the dimension unless each leading dimension of `t` named in `dims`,
    but `may_be_empty`, holds at least one element."""
    empty = [d for d, size in zip(dims, t.shape) if size == 0 and d != may_be_empty]
    if empty:
        raise ValueError(f"{name} must not be empty: its {', '.join(empty)} dimension is 0 "
                         f"(shape {tuple(t.shape)})")


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")


def _check_cache_dtype(name: str, cache: Tensor, q: Tensor, scale) -> None:
    fp8 = cache.dtype in FP8_DTYPES
    if fp8 and scale is None:
        raise ValueError(f"{name} is fp8: pass its dequantisation scale")
    if not fp8 and cache.dtype != q.dtype:
        raise ValueError(f"{name} dtype {cache.dtype} must match the query dtype {q.dtype} "
                         "(or be float8_e4m3fn with a scale)")


def _check_table(name_cache: str, cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                 batch: int, device: torch.device) -> int:
    """The block table and lengths checks of every paged op; returns the table's capacity in
    tokens (pages per row x page size)."""
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (B={batch}, max_pages), got {tuple(block_table.shape)}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be (B={batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _check_index("block_table", block_table)
    _check_index("cache_seqlens", cache_seqlens)
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens), (name_cache, cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cache.shape[1] <= 0:
        raise ValueError(f"{name_cache} page size must be positive, got {cache.shape[1]}")
    return block_table.shape[1] * cache.shape[1]


def _check_kv(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale, v_scale,
              lead: tuple[str, ...], value_width: int | None) -> None:
    """The operand checks `decode` and `prefill` share; `lead` names the query dimensions
    before the head width. value_width: the value width the op needs (decode: the key's),
    None where any width goes (prefill, whose keys may be wider than its values)."""
    if q.dim() != len(lead) + 1:
        raise ValueError(f"q must be ({', '.join(lead)}, D), got shape {tuple(q.shape)}")
    _check_float("q", q)
    if 0 in q.shape:  # a prefill step may have no queries (N = 0)
        _check_nonempty("q", q, (*lead, "D"), may_be_empty="N")
    n_heads, head_dim = q.shape[-2:]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be (P, page_size, H_kv, D), got {tuple(cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's {head_dim}")
    if value_width is not None and v_cache.shape[3] != value_width:
        raise ValueError(f"v_cache head dim {v_cache.shape[3]} must equal q's {value_width}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache "
                         f"{tuple(k_cache.shape)} in pages, page size and heads")
    _check_cache_dtype("k_cache", k_cache, q, k_scale)
    _check_cache_dtype("v_cache", v_cache, q, v_scale)
    _check_scale("k_scale", k_scale)
    _check_scale("v_scale", v_scale)
    n_kv = k_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"k_cache has {n_kv} heads, which must divide q's {n_heads} heads")
    if v_cache.device != q.device:
        raise ValueError(f"v_cache is on {v_cache.device} but q is on {q.device}")


def _check_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                kv_scale, lead: tuple[str, ...]) -> None:
    """The operand checks `decode_tied` and `prefill_tied` share; `lead` names the query
    dimensions before the head width (("B", "L_q", "H_q") for decode, ("N", "H_q") for prefill)."""
    dims, names, lead = len(lead) + 1, lead, ", ".join(lead)
    if q_nope.dim() != dims:
        raise ValueError(f"q_nope must be ({lead}, D_nope), got {tuple(q_nope.shape)}")
    _check_float("q_nope", q_nope)
    if 0 in q_nope.shape:
        _check_nonempty("q_nope", q_nope, names, may_be_empty="N")
    d_nope, n_heads = q_nope.shape[-1], q_nope.shape[-2]
    if q_rope.dim() != dims or q_rope.shape[:-1] != q_nope.shape[:-1]:
        raise ValueError(f"q_rope must be ({lead}, D_R) matching q_nope {tuple(q_nope.shape[:-1])}, "
                         f"got {tuple(q_rope.shape)}")
    if q_rope.dtype != q_nope.dtype:
        raise ValueError(f"q_rope dtype {q_rope.dtype} must match q_nope's {q_nope.dtype}")
    d_rope = q_rope.shape[-1]
    if d_nope + d_rope == 0:  # no key at all (and the default scale 1/sqrt(0))
        raise ValueError(f"q_nope and q_rope must not both be empty: D_nope + D_R is 0 "
                         f"(shapes {tuple(q_nope.shape)}, {tuple(q_rope.shape)})")
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be (P, page_size, H_kv, D_v), got {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] < d_nope:
        raise ValueError(f"kv_cache width {kv_cache.shape[3]} must be >= q_nope's D_nope {d_nope}")
    if rope_cache.dim() != 3 or rope_cache.shape[:2] != kv_cache.shape[:2] or rope_cache.shape[2] != d_rope:
        raise ValueError(f"rope_cache must be (P, page_size, D_R) = {(*kv_cache.shape[:2], d_rope)}, "
                         f"got {tuple(rope_cache.shape)}")
    _check_cache_dtype("kv_cache", kv_cache, q_nope, kv_scale)
    _check_cache_dtype("rope_cache", rope_cache, q_nope, kv_scale)
    _check_scale("kv_scale", kv_scale)
    n_kv = kv_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"kv_cache has {n_kv} heads, which must divide q_nope's {n_heads} heads")


def takes_keyword(fn, name: str, unreadable: bool = True) -> bool:
    """Whether a callable takes the keyword `name` (or any keyword): a backend registered from
    outside may predate a keyword its hooks now take. `unreadable`: the answer for a callable
    whose signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return unreadable
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=None)
def _run_prefill_tied_takes_values(fn) -> bool:
    """`takes_keyword(fn, "v_cache")`, once per function (every latent layer of a step asks)."""
    return takes_keyword(fn, "v_cache")


def _check_values(v_cache: Tensor, kv_cache: Tensor) -> None:
    """ValueError naming `v_cache` unless it is a value cache on kv_cache's pages and heads:
    (P, page_size, H_kv, D_v), its dtype and device."""
    if not isinstance(v_cache, Tensor):
        raise ValueError(f"v_cache must be a tensor or None, got {type(v_cache).__name__}")
    if v_cache.dim() != 4 or v_cache.shape[:3] != kv_cache.shape[:3] or v_cache.shape[3] == 0:
        raise ValueError(f"v_cache must be (P, page_size, H_kv, D_v) = "
                         f"({', '.join(map(str, kv_cache.shape[:3]))}, D_v > 0) as kv_cache, "
                         f"got {tuple(v_cache.shape)}")
    if v_cache.dtype != kv_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} must match kv_cache's {kv_cache.dtype}")
    if v_cache.device != kv_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device} but kv_cache is on {kv_cache.device}")


def _check_store(cache: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
    """ValueError naming the argument unless `new` (N, *feat) fits `cache` (P, page, *feat)
    and `slot_mapping` is (N,) int32/int64 on the cache's device."""
    if cache.dim() < 2:
        raise ValueError(f"cache must be paged as (P, page_size, *feat), got {tuple(cache.shape)}")
    if new.shape[1:] != cache.shape[2:]:
        raise ValueError(f"new tokens {tuple(new.shape)} do not fit cache {tuple(cache.shape)}: "
                         f"expected (N, {', '.join(map(str, cache.shape[2:]))})")
    if slot_mapping.shape != (new.shape[0],):
        raise ValueError(f"slot_mapping must be (N={new.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    _check_index("slot_mapping", slot_mapping)
    for name, t in (("new", new), ("slot_mapping", slot_mapping)):
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but cache is on {cache.device}")


def _check_prefill_plan(plan: PrefillPlan, actual: PrefillPlan) -> None:
    """ValueError naming the first sequence whose planned query or cache length differs from
    the call's (`actual`, the plan of its cu_seqlens_q and cache_seqlens)."""
    if plan == actual:
        return
    if plan.batch != actual.batch:
        raise ValueError(f"plan was made for B={plan.batch}, not B={actual.batch}")
    b = next(b for b in range(plan.batch) if (plan.query_lens[b], plan.seqlens[b])
             != (actual.query_lens[b], actual.seqlens[b]))
    raise ValueError(f"plan was made for other lengths: sequence {b} was planned with "
                     f"{plan.query_lens[b]} queries over {plan.seqlens[b]} tokens, but "
                     f"cu_seqlens_q and cache_seqlens give it {actual.query_lens[b]} over "
                     f"{actual.seqlens[b]} (plan each step from its own lengths)")


def _check_states(caches, news, slot_mapping: Tensor, norm, rope) -> None:
    """`AttentionBackend.store_states`'s checks: ValueError naming the argument unless there
    are two caches and two tensors of new tokens that fit them (`_check_store`), the first
    (N, heads, d) and the second (N, d_R), `norm` (weight (heads, d) on their device, eps >= 0)
    and `rope` (cos, sin floating (N, d_R / 2) on their device, d_R even) where given."""
    if len(caches) != 2 or len(news) != 2:
        raise ValueError(f"store_states takes two caches and two tensors of new tokens, got "
                         f"{len(caches)} and {len(news)}")
    for cache, new in zip(caches, news):
        _check_store(cache, new, slot_mapping)
    if news[0].dim() != 3 or news[1].dim() != 2:
        raise ValueError(f"store_states takes news (N, heads, d) and (N, d_R), got "
                         f"{tuple(news[0].shape)} and {tuple(news[1].shape)}")
    if norm is not None:
        weight, eps = norm
        if weight.shape != news[0].shape[1:]:
            raise ValueError(f"norm weight must be (heads, d) = {tuple(news[0].shape[1:])}, "
                             f"got {tuple(weight.shape)}")
        if weight.device != news[0].device:
            raise ValueError(f"norm weight is on {weight.device} but news are on "
                             f"{news[0].device}")
        if not eps >= 0:
            raise ValueError(f"norm eps must be >= 0, got {eps}")
    if rope is not None:
        half = (news[1].shape[0], news[1].shape[1] // 2)
        for name, t in zip(("cos", "sin"), rope):
            if news[1].shape[1] % 2 or t.shape != half:
                raise ValueError(f"rope {name} must be (N, d_R / 2) = {half} for an even "
                                 f"d_R, got {tuple(t.shape)}")
            if not t.is_floating_point() or t.device != news[1].device:
                raise ValueError(f"rope {name} must be floating point on {news[1].device}, "
                                 f"got {t.dtype} on {t.device}")
