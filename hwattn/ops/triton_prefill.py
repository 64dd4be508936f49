"""Launchers of the Triton prefill kernel (kernels/prefill.py); arguments validated in
`hwattn.ops.backends.base`.

    prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, plan=...)
    prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, cu_seqlens_q, ...)

The step's `PrefillPlan` gives the longest query run on the host, which sizes the grid; nothing
is read back from the device. The tile shape is a `PrefillConfig`, chosen per call by
`choose_prefill_config` or forced (benchmarks sweep it on the GPU). On CPU tensors the kernel
runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from hwattn.ops.kernels.prefill import prefill_kernel
from hwattn.ops.plan import PrefillPlan
from hwattn.ops.triton_decode import (LOG2E, check_kernel_dtypes, check_tile, interpreting,
                                     pad_width)

__all__ = ["PrefillConfig", "choose_prefill_config", "compile_sm90", "kernel_constants", "prefill",
           "prefill_layout", "prefill_tied"]


@dataclass(frozen=True)
class PrefillConfig:
    """Tile shape of one prefill launch.

    block_m: rows of a program, (query heads of one KV head) × (query tokens); a power of two
        >= 16. Long chunks fill it with the tokens of one head, short ones with the heads.
    block_n: key positions per loop step (a power of two >= 16).
    """

    block_m: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        check_tile(self, ("block_m", "block_n"))


# Tile shapes measured fastest on one H200 for a 2048-token chunk over a 6144-token cached
# prefix, B = 1, 16 query heads (the engine's chunked-prefill step at `xl`): 8 configurations
# swept per form, benchmarks/results/prefill_tiles_h200_2026-12-04/ (ms against the shape's
# previous default in brackets). Keyed by the padded (key, value, RoPE key) widths of the
# launch (RoPE 0: untied).
_TUNED = {
    (128, 128, 0): PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=3),  # GQA: 0.368 (0.485)
    (64, 128, 64): PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),  # GTA: 0.406 (0.479)
    (256, 256, 64): PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=2),  # GLA absorbed: 0.611 (1.159)
    # Expanded MLA / GLA (per-head keys of 128 beside the shared RoPE key of 64, values of
    # their own): the fastest of the tiles timed on one H100, 2026-12-07 (4 for MLA, 6 for
    # GLA-2), MLA 0.506 / GLA-2 0.564 ms (benchmarks/results/prefill_split_h100_2026-12-07/).
    (128, 128, 64): PrefillConfig(block_m=64, block_n=64, num_warps=4, num_stages=2),
}


def choose_prefill_config(dk_pad: int, dv_pad: int, dr_pad: int = 0) -> PrefillConfig:
    """Tile shape for padded key, value and RoPE-key widths (0: untied): the shape measured
    fastest on the GPU for the widths of the layers we ship (`_TUNED`); otherwise 128 rows
    while the fp32 accumulator (rows × dv_pad) and the query tile fit the registers of 8 warps,
    fewer rows and keys beyond. `hwattn bench prefill --block-m ...` sweeps it."""
    if interpreting():  # small tiles: several query tiles and key blocks even in tiny tests
        return PrefillConfig(block_m=32, block_n=16, num_warps=4, num_stages=1)
    if (dk_pad, dv_pad, dr_pad) in _TUNED:
        return _TUNED[(dk_pad, dv_pad, dr_pad)]
    widest = max(dk_pad, dv_pad)
    if widest <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    if widest <= 128:
        return PrefillConfig(block_m=128, block_n=64, num_warps=8, num_stages=3)
    if widest <= 256:
        return PrefillConfig(block_m=64, block_n=64, num_warps=8, num_stages=2)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8, num_stages=1)


def prefill_layout(group: int, max_seqlen_q: int, block_m: int) -> tuple[int, int, int, int]:
    """(query tokens per tile, heads per program, head blocks per KV head, BLOCK_M) for g_q
    query heads per KV head and the step's longest query run: as many tokens as the longest
    run needs (up to block_m), the remaining rows filled with heads."""
    tokens = min(triton.next_power_of_2(max(1, max_seqlen_q)), block_m)
    heads = min(group, max(1, block_m // tokens))
    head_blocks = triton.cdiv(group, heads)
    rows = max(16, tokens * triton.next_power_of_2(heads))
    return tokens, heads, head_blocks, rows


def kernel_constants(*, tied: bool, group: int, d_qk: int, d_v: int, d_rope: int,
                     page_size: int, max_seqlen_q: int, fp32: bool, split_values: bool = False,
                     config: PrefillConfig | None = None) -> tuple[dict, PrefillConfig]:
    """The compile-time arguments of one prefill launch (`prefill_kernel`'s constexprs) and its
    tile shape: `group` query heads per KV head, widths of the query/key (`d_qk`), value and
    RoPE key (`d_rope`, tied only), the step's longest query run; `split_values`: a tied call
    whose values are a cache of their own."""
    dk_pad, dv_pad = pad_width(d_qk), pad_width(d_v)
    # Tied states with a key as wide (padded) as the value: one tile serves as both.
    shared = tied and not split_values and dk_pad == dv_pad
    config = config or choose_prefill_config(dk_pad, dv_pad, pad_width(d_rope) if tied else 0)
    tokens, heads, head_blocks, block_m = prefill_layout(group, max_seqlen_q, config.block_m)
    return dict(
        TOKENS=tokens, HEADS_PER_PROG=heads, HEAD_BLOCKS=head_blocks,
        BLOCK_M=block_m, BLOCK_N=config.block_n, D_QK=d_qk, D_V=d_v,
        DK_PAD=dv_pad if shared else dk_pad, DV_PAD=dv_pad, D_R=d_rope, DR_PAD=pad_width(d_rope),
        PAGE=page_size, TIED=tied, SHARED_TILE=shared,
        DOT_PRECISION="ieee" if fp32 else "tf32"), config


def compile_sm90(*, tied: bool, group: int, d_qk: int, d_v: int, d_rope: int = 16,
                 page_size: int = 64, max_seqlen_q: int = 2048, split_values: bool = False,
                 config: PrefillConfig | None = None):
    """The bf16 prefill kernel compiled for Hopper (sm_90) on any machine, GPU or not (ptxas
    ships with Triton), with the constants `_launch` would give it: (compiled kernel, config).
    `kernel_code.resources` reads its registers and shared memory. Run without
    TRITON_INTERPRET (the interpreter replaces the functions the compiler needs)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hwattn.ops.kernel_code import signature

    constexprs, config = kernel_constants(tied=tied, group=group, d_qk=d_qk, d_v=d_v,
                                          d_rope=d_rope, page_size=page_size,
                                          max_seqlen_q=max_seqlen_q, fp32=False,
                                          split_values=split_values, config=config)
    pointers = dict(q_ptr="bf16", q_rope_ptr="bf16", k_ptr="bf16", v_ptr="bf16", rope_ptr="bf16",
                    block_table_ptr="i32", cu_seqlens_ptr="i32", seqlens_ptr="i32",
                    out_ptr="bf16", lse_ptr="fp32")
    # (Strides as a launch of 16-element multiples specialises them, but for the two the
    # kernel keeps unspecialised: the block table's and lse's.)
    types, attrs = signature(prefill_kernel.arg_names, constexprs, pointers,
                             floats=("qk_scale", "v_scale"),
                             aligned=lambda name: (name.startswith("stride")
                                                   and name not in ("stride_lh", "stride_btb")))
    source = ASTSource(fn=prefill_kernel, signature=types, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    return kernel, config


def _launch(q, q_rope, k_cache, v_cache, rope_cache, block_table, cu_seqlens_q, cache_seqlens,
            *, softmax_scale: float, plan: PrefillPlan, k_scale: float, v_scale: float,
            tied: bool, config: PrefillConfig | None, split_values: bool = False):
    n_tokens, n_heads, d_qk = q.shape
    n_kv, d_v = k_cache.shape[2], v_cache.shape[3]
    page_size = k_cache.shape[1]
    out = torch.empty(n_tokens, n_heads, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(n_heads, n_tokens, dtype=torch.float32, device=q.device)
    if n_tokens == 0:
        return out, lse
    group = n_heads // n_kv
    if tied:
        d_rope = q_rope.shape[-1]
        qr_strides, r_strides = q_rope.stride()[:2], rope_cache.stride()[:2]
    else:
        d_rope, q_rope, rope_cache = 16, q, k_cache
        qr_strides, r_strides = (0, 0), (0, 0)
    constexprs, config = kernel_constants(
        tied=tied, group=group, d_qk=d_qk, d_v=d_v, d_rope=d_rope, page_size=page_size,
        max_seqlen_q=plan.max_seqlen_q, fp32=q.dtype == torch.float32,
        split_values=split_values, config=config)
    tokens, head_blocks = constexprs["TOKENS"], constexprs["HEAD_BLOCKS"]
    grid = (triton.cdiv(plan.max_seqlen_q, tokens), plan.batch, n_kv * head_blocks)
    prefill_kernel[grid](
        q, q_rope, k_cache, v_cache, rope_cache, block_table, cu_seqlens_q, cache_seqlens,
        out, lse,
        softmax_scale * k_scale * LOG2E, v_scale, group, n_tokens,
        block_table.shape[1] * page_size,
        *q.stride()[:2], *qr_strides, *k_cache.stride()[:3], *v_cache.stride()[:3], *r_strides,
        block_table.stride(0), *out.stride()[:2], lse.stride(0),
        **constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out, lse


def prefill(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
            cu_seqlens_q: Tensor, cache_seqlens: Tensor, *, softmax_scale: float,
            plan: PrefillPlan, k_scale: float | None = None, v_scale: float | None = None,
            config: PrefillConfig | None = None):
    """Separate K/V varlen paged prefill; shapes as `AttentionBackend.prefill`. Returns
    (out (N, H_q, D_v), lse (H_q, N))."""
    check_kernel_dtypes(q=q, k_cache=k_cache, v_cache=v_cache)
    return _launch(q, None, k_cache, v_cache, None, block_table, cu_seqlens_q, cache_seqlens,
                   softmax_scale=softmax_scale, plan=plan, k_scale=k_scale or 1.0,
                   v_scale=v_scale or 1.0, tied=False, config=config)


def prefill_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                 block_table: Tensor, cu_seqlens_q: Tensor, cache_seqlens: Tensor, *,
                 softmax_scale: float, plan: PrefillPlan, kv_scale: float | None = None,
                 config: PrefillConfig | None = None, v_cache: Tensor | None = None):
    """Tied-state varlen paged prefill; shapes as `AttentionBackend.prefill_tied` (`v_cache`:
    values of their own, else the state's). Returns (out (N, H_q, D_v), lse (H_q, N))."""
    check_kernel_dtypes(q_nope=q_nope, q_rope=q_rope, kv_cache=kv_cache, rope_cache=rope_cache,
                        **({} if v_cache is None else dict(v_cache=v_cache)))
    scale = kv_scale or 1.0
    return _launch(q_nope, q_rope, kv_cache, kv_cache if v_cache is None else v_cache,
                   rope_cache, block_table, cu_seqlens_q, cache_seqlens,
                   softmax_scale=softmax_scale, plan=plan, k_scale=scale, v_scale=scale,
                   tied=True, config=config, split_values=v_cache is not None)
