"""Launchers of the Triton kernels behind `hwattn.ops` (arguments already validated there).

    decode(q, k_cache, v_cache, ...)                   kernels/attend.py (TIED=False) + combine
    decode_tied(q_nope, q_rope, kv_cache, rope_cache)  kernels/attend.py (TIED=True) + combine
    store_kv(cache, new, slot_mapping)                 kernels/store.py
    plan_decode(...)                                   plan.py

With a plan given, nothing here reads device memory from the host: the launch grid is fixed by
the plan's capacity, so the engine may capture these calls in a CUDA graph. On CPU tensors the
kernels run under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from hwattn.ops.kernels import interpreter
from hwattn.ops.kernels.attend import attend_kernel
from hwattn.ops.kernels.combine import combine
from hwattn.ops.kernels.pdl import launch_options
from hwattn.ops.kernels.store import store_kernel, store_pair_kernel, store_states_kernel
from hwattn.ops.plan import MIN_PIECE, PIECE_ALIGN, DecodePlan, plan_decode

__all__ = ["KernelConfig", "choose_config", "decode", "decode_tied", "plan_decode", "store_kv",
           "store_kv_pair", "store_states"]

LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# fp8 caches are widened to the query dtype in registers; e4m3 fits fp16 and bf16 exactly.
CACHE_DTYPES = KERNEL_DTYPES + (torch.float8_e4m3fn,)


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape of one attention launch.

    block_n: tokens per loop step (16, 32 or 64: pieces start on multiples of 64).
    max_rows: cap on the rows (query heads × L_q) of one program; a KV head's query heads are
        split into head blocks beyond it (MLA's 128 heads × 512-wide accumulators do not fit
        one program's registers).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    max_rows: int = 128

    def __post_init__(self):
        # Checked when made, as PrefillConfig is: a bad value otherwise surfaced only at the
        # first launch (block_n), or as an opaque compiler error on the GPU (num_warps).
        if self.block_n not in (16, 32, 64):
            raise ValueError(f"block_n must be 16, 32 or 64 (pieces start on multiples of 64), "
                             f"got {self.block_n}")
        check_tile(self, ())
        if self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {self.max_rows}")


def interpreting() -> bool:
    """Whether Triton runs kernels under its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if interpreting():
    interpreter.patch()


def pad_width(width: int) -> int:
    """A width (head width, row count) padded to the power of two, at least 16, that a
    kernel tile holds."""
    return max(16, triton.next_power_of_2(width))


def check_tile(config, blocks: tuple[str, ...]) -> None:
    """Raise ValueError naming the field unless each of `config`'s `blocks` fields is a power
    of two >= 16, its num_warps one Triton launches with, and its num_stages >= 1."""
    for name in blocks:
        value = getattr(config, name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {value}")
    if config.num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {config.num_warps}")
    if config.num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {config.num_stages}")


def choose_config(d_pad: int, query_len: int, group: int, tied: bool) -> KernelConfig:
    """Tile shape for a head width (padded to a power of two), L_q and g_q.

    Picked from compile reports (benchmarks/decode_compile.py: no spills, 2-3 tiles in flight)
    and H100 timings (benchmarks/notes_decode.md).
    """
    if interpreting():
        return KernelConfig(block_n=16, num_warps=4, num_stages=1, max_rows=128)
    if d_pad >= 512:  # MLA-like: 64 rows × 512 fp32 accumulators already fill 8 warps
        return KernelConfig(block_n=64, num_warps=8, num_stages=2, max_rows=64)
    rows = min(group * query_len, 128)
    if d_pad >= 256:  # GLA-like
        if rows <= 64:  # 4 warps: two programs per SM, each with two 32-token tiles in flight
            return KernelConfig(block_n=32, num_warps=4, num_stages=3, max_rows=128)
        return KernelConfig(block_n=64, num_warps=8, num_stages=3, max_rows=128)
    return KernelConfig(block_n=64, num_warps=4 if rows <= 64 else 8, num_stages=4, max_rows=128)


def head_layout(group: int, query_len: int, max_rows: int) -> tuple[int, int, int]:
    """(heads per program, head blocks per KV head, BLOCK_M) for g_q heads × L_q rows."""
    heads = min(group, max(1, max_rows // query_len))
    blocks = triton.cdiv(group, heads)
    block_m = max(16, triton.next_power_of_2(heads * query_len))
    return heads, blocks, block_m


def min_piece(q: Tensor, k_cache: Tensor, v_cache: Tensor, rope_cache: Tensor | None,
              tied: bool) -> int:
    """Shortest split-KV piece (tokens) whose fp32 partial, written and read back, costs at most
    half the cache bytes the piece reads (longer pieces would leave SMs idle at B = 1)."""
    batch, query_len, n_heads, _ = q.shape
    per_token = k_cache[0, 0].numel() * k_cache.element_size()
    per_token += (rope_cache[0, 0].numel() * rope_cache.element_size() if tied
                  else v_cache[0, 0].numel() * v_cache.element_size())
    return min_piece_for(n_heads, query_len, k_cache.shape[-1], per_token)


def min_piece_for(n_heads: int, query_len: int, d_v: int, cache_bytes_per_token: int) -> int:
    """`min_piece` from the shape alone: H_q query heads × L_q rows of d_v-wide partials
    against the cache bytes one token occupies."""
    partial = 2 * n_heads * query_len * (d_v + 1) * 4
    return max(MIN_PIECE, -(-2 * partial // cache_bytes_per_token // PIECE_ALIGN) * PIECE_ALIGN)


def check_kernel_dtypes(**tensors: Tensor) -> None:
    """Raise ValueError unless every tensor has a dtype the Triton kernels take (caches: also
    fp8) and is contiguous in its last dimension."""
    for name, t in tensors.items():
        allowed = CACHE_DTYPES if "cache" in name else KERNEL_DTYPES
        if t.dtype not in allowed:
            raise ValueError(f"{name} is {t.dtype}; the Triton kernels take "
                             f"{', '.join(str(d) for d in allowed)} (use backend='torch' for others)")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")


def _attend(q, q_rope, k_cache, v_cache, rope_cache, block_table, cache_seqlens, *,
            softmax_scale: float, plan: DecodePlan | None, k_scale: float, v_scale: float,
            d_qk: int, tied: bool, config: KernelConfig | None):
    batch, query_len, n_heads, _ = q.shape
    n_pages, page_size, n_kv, d_v = k_cache.shape
    group = n_heads // n_kv
    d_pad = pad_width(d_v)
    config = config or choose_config(d_pad, query_len, group, tied)
    if 64 % config.block_n or config.block_n < 16:
        raise ValueError(f"config.block_n must be 16, 32 or 64, got {config.block_n}")
    heads, head_blocks, block_m = head_layout(group, query_len, config.max_rows)
    if plan is None:
        plan = plan_decode(cache_seqlens, num_heads_kv=n_kv, query_len=query_len,
                           page_size=page_size, head_blocks=head_blocks,
                           min_piece=min_piece(q, k_cache, v_cache, rope_cache, tied))
    else:
        plan.check(batch, q.device, query_len)
    out, lse, part_out, part_lse = plan.buffers(query_len, n_heads, d_v, q.dtype, q.device)
    if tied:
        d_rope = q_rope.shape[-1]
        qr_strides, r_strides = q_rope.stride()[:3], rope_cache.stride()[:2]
    else:
        d_rope, q_rope, rope_cache = 16, q, k_cache
        qr_strides, r_strides = (0, 0, 0), (0, 0)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"

    attend_kernel[(n_kv * head_blocks, plan.capacity)](
        q, q_rope, k_cache, v_cache, rope_cache, block_table, cache_seqlens,
        plan.items, plan.splits, out, lse, part_out, part_lse,
        softmax_scale * k_scale * LOG2E, v_scale, n_heads, group,
        *q.stride()[:3], *qr_strides, *k_cache.stride()[:3], *v_cache.stride()[:3], *r_strides,
        block_table.stride(0), *out.stride()[:3], *lse.stride()[:2],
        L_Q=query_len, HEADS_PER_PROG=heads, HEAD_BLOCKS=head_blocks,
        BLOCK_M=block_m, BLOCK_N=config.block_n, D_QK=d_qk, D_V=d_v, D_PAD=d_pad,
        D_R=d_rope, DR_PAD=pad_width(d_rope),
        PAGE=page_size, TIED=tied, DOT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(q.device),
    )
    if plan.may_split:
        combine(part_out, part_lse, plan.splits, out, lse, max_pieces=plan.max_pieces)
    return out, lse


def decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
           cache_seqlens: Tensor, *, softmax_scale: float, plan: DecodePlan | None = None,
           k_scale: float | None = None, v_scale: float | None = None,
           config: KernelConfig | None = None):
    """Separate K/V paged decode; shapes as `hwattn.ops.decode`. Returns (out, lse)."""
    check_kernel_dtypes(q=q, k_cache=k_cache, v_cache=v_cache)
    return _attend(q, None, k_cache, v_cache, None, block_table, cache_seqlens,
                   softmax_scale=softmax_scale, plan=plan, k_scale=k_scale or 1.0,
                   v_scale=v_scale or 1.0, d_qk=q.shape[-1], tied=False, config=config)


def decode_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                block_table: Tensor, cache_seqlens: Tensor, *, softmax_scale: float,
                plan: DecodePlan | None = None, kv_scale: float | None = None,
                config: KernelConfig | None = None):
    """Tied-state paged decode; shapes as `hwattn.ops.decode_tied`. Returns (out, lse)."""
    check_kernel_dtypes(q_nope=q_nope, q_rope=q_rope, kv_cache=kv_cache, rope_cache=rope_cache)
    scale = kv_scale or 1.0
    return _attend(q_nope, q_rope, kv_cache, kv_cache, rope_cache, block_table, cache_seqlens,
                   softmax_scale=softmax_scale, plan=plan, k_scale=scale, v_scale=scale,
                   d_qk=q_nope.shape[-1], tied=True, config=config)


def _token_rows(new: Tensor) -> Tensor:
    """new (N, *feat) as (N, F) rows with unit feature stride (a copy only if needed)."""
    flat = new.reshape(new.shape[0], -1)
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _slots(cache: Tensor) -> int:
    """Slots of a paged cache (P, page_size, ...): the store kernels write none past them."""
    return cache.shape[0] * cache.shape[1]


def _store_block(n_feat: int) -> int:
    return min(1024, triton.next_power_of_2(n_feat))


def store_kv(cache: Tensor, new: Tensor, slot_mapping: Tensor, scale: float | None = None) -> None:
    """Write `new` (N, *feat) into the contiguous `cache` (P, page_size, *feat) at `slot_mapping`
    (negative slots and slots past the cache are skipped: the kernel never writes outside it)."""
    if not cache.is_contiguous():
        raise ValueError("cache must be contiguous for the Triton store")
    n_tokens = new.shape[0]
    if n_tokens == 0:
        return
    flat = _token_rows(new)
    n_feat = flat.shape[1]
    store_kernel[(n_tokens,)](
        cache, flat, slot_mapping, _slots(cache), n_feat, flat.stride(0),
        scale if scale is not None else 1.0,
        SCALED=scale is not None, SATURATE=cache.dtype == torch.float8_e4m3fn,
        BLOCK=_store_block(n_feat), **launch_options(cache.device),
    )


def store_kv_pair(caches: tuple[Tensor, Tensor], news: tuple[Tensor, Tensor],
                  slot_mapping: Tensor, scale: float | None = None) -> None:
    """`store_kv` of two caches of one dtype at the same slots, in one launch: caches[i]
    (P, page_size, *feat_i) contiguous, news[i] (N, *feat_i)."""
    (cache_a, cache_b), (new_a, new_b) = caches, news
    if not (cache_a.is_contiguous() and cache_b.is_contiguous()):
        raise ValueError("caches must be contiguous for the Triton store")
    if cache_a.dtype != cache_b.dtype:
        raise ValueError(f"the two caches must share a dtype, got {cache_a.dtype} and {cache_b.dtype}")
    n_tokens = new_a.shape[0]
    if new_b.shape[0] != n_tokens:
        raise ValueError(f"news hold {n_tokens} and {new_b.shape[0]} tokens: they must match")
    if n_tokens == 0:
        return
    flat_a, flat_b = _token_rows(new_a), _token_rows(new_b)
    store_pair_kernel[(n_tokens, 2)](
        cache_a, flat_a, flat_a.shape[1], flat_a.stride(0),
        cache_b, flat_b, flat_b.shape[1], flat_b.stride(0),
        slot_mapping, min(_slots(cache_a), _slots(cache_b)), scale if scale is not None else 1.0,
        SCALED=scale is not None, SATURATE=cache_a.dtype == torch.float8_e4m3fn,
        BLOCK_A=_store_block(flat_a.shape[1]), BLOCK_B=_store_block(flat_b.shape[1]),
        **launch_options(cache_a.device),
    )


def store_states(caches: tuple[Tensor, Tensor], news: tuple[Tensor, Tensor], slot_mapping: Tensor,
                 norm: tuple[Tensor, float] | None = None,
                 rope: tuple[Tensor, Tensor] | None = None, scale: float | None = None) -> None:
    """`finish_states_reference(news, norm, rope)` written into `caches` at `slot_mapping`, in
    one launch (`AttentionBackend.store_states`, whose checks it assumes): caches (P, page,
    heads, d) and (P, page, d_R) contiguous, of one dtype; news[0] (N, heads, d) and news[1]
    (N, d_R), each with unit stride in its last dimension (views of the input projection's
    output, as the layers pass them); norm = (weight (heads, d), eps); rope = (cos, sin), each
    (N, d_R / 2) fp32 with unit last stride."""
    (cache_a, cache_b), (new_a, new_b) = caches, news
    n_tokens, n_heads, head_dim = new_a.shape
    rope_dim = new_b.shape[1]
    if n_tokens == 0:
        return
    weight, eps = norm if norm is not None else (new_a, 0.0)  # (a pointer never read)
    cos, sin = rope if rope is not None else (new_b, new_b)
    store_states_kernel[(n_tokens, n_heads + 1)](
        cache_a, new_a, new_a.stride(0), new_a.stride(1), n_heads, head_dim, weight.contiguous(),
        eps, cache_b, new_b, new_b.stride(0), rope_dim, cos, sin, cos.stride(0), slot_mapping,
        min(_slots(cache_a), _slots(cache_b)), scale if scale is not None else 1.0,
        NORM=norm is not None, ROPE=rope is not None, SCALED=scale is not None,
        SATURATE=cache_a.dtype == torch.float8_e4m3fn,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_R=triton.next_power_of_2(rope_dim // 2),
        **launch_options(cache_a.device),
    )
