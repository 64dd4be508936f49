"""The store kernel: write new tokens into a paged cache through a flat slot mapping.

One program copies one token's features (all heads, flattened) to `cache[slot]`; negative
slots are padding and are skipped, and so are slots past the cache's `n_slots` (a bad slot
mapping is refused by the reference store; the kernel cannot raise without a device read, but
it never writes outside the cache). `store_pair_kernel` writes a layer's two caches (K and V,
or latent and RoPE key) in one launch, one fewer kernel per layer and step. For an fp8 cache the value is divided by the scale and
saturated to the e4m3 range before rounding, as `reference.store_kv_reference` does. No host
reads, so it is safe inside a captured CUDA graph (the reference's boolean indexing is not).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hwattn.ops.kernels.pdl import wait_for_predecessor

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _cache_write(cache_ptr, offs, values, mask, scale, SCALED: tl.constexpr,
                 SATURATE: tl.constexpr):
    """`values` (in the activations' dtype) into the cache at `offs`: divided by the fp8 scale
    and saturated to the e4m3 range where asked, then rounded to the cache's dtype."""
    if SCALED:
        values = values.to(tl.float32) / scale
    if SATURATE:
        values = tl.minimum(tl.maximum(values.to(tl.float32), -E4M3_MAX), E4M3_MAX)
    tl.store(cache_ptr + offs, values.to(cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_row(cache_ptr, new_ptr, tok, slot, n_feat, stride_new, scale,
               SCALED: tl.constexpr, SATURATE: tl.constexpr, BLOCK: tl.constexpr):
    """Token `tok`'s features (n_feat, flattened) from `new` to `cache[slot]`."""
    for f0 in range(0, n_feat, BLOCK):
        offs_f = f0 + tl.arange(0, BLOCK)
        mask_f = offs_f < n_feat
        values = tl.load(new_ptr + tok.to(tl.int64) * stride_new + offs_f, mask=mask_f)  # (BLOCK,)
        _cache_write(cache_ptr, slot * n_feat + offs_f, values, mask_f, scale, SCALED, SATURATE)


@triton.jit
def store_kernel(cache_ptr, new_ptr, slots_ptr, n_slots, n_feat, stride_new, scale,
                 SCALED: tl.constexpr, SATURATE: tl.constexpr, BLOCK: tl.constexpr,
                 PDL: tl.constexpr):
    wait_for_predecessor(PDL)
    pid_tok = tl.program_id(0)
    slot = tl.load(slots_ptr + pid_tok).to(tl.int64)
    if (slot < 0) | (slot >= n_slots):
        return
    _store_row(cache_ptr, new_ptr, pid_tok, slot, n_feat, stride_new, scale, SCALED, SATURATE,
               BLOCK)


@triton.jit
def store_pair_kernel(cache_a_ptr, new_a_ptr, n_feat_a, stride_a, cache_b_ptr, new_b_ptr,
                      n_feat_b, stride_b, slots_ptr, n_slots, scale,
                      SCALED: tl.constexpr, SATURATE: tl.constexpr, BLOCK_A: tl.constexpr,
                      BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """Two caches written in one launch (a layer's K and V, or its latent and RoPE key):
    program (token, 0) writes the first, (token, 1) the second, at the same slot (`n_slots`:
    the fewer slots of the two caches)."""
    wait_for_predecessor(PDL)
    pid_tok = tl.program_id(0)
    slot = tl.load(slots_ptr + pid_tok).to(tl.int64)
    if (slot < 0) | (slot >= n_slots):
        return
    if tl.program_id(1) == 0:
        _store_row(cache_a_ptr, new_a_ptr, pid_tok, slot, n_feat_a, stride_a, scale, SCALED,
                   SATURATE, BLOCK_A)
    else:
        _store_row(cache_b_ptr, new_b_ptr, pid_tok, slot, n_feat_b, stride_b, scale, SCALED,
                   SATURATE, BLOCK_B)


@triton.jit
def store_states_kernel(cache_a_ptr, new_a_ptr, stride_a_tok, stride_a_head, n_heads, head_dim,
                        norm_ptr, eps, cache_b_ptr, new_b_ptr, stride_b_tok, rope_dim,
                        cos_ptr, sin_ptr, stride_cs, slots_ptr, n_slots, scale,
                        NORM: tl.constexpr, ROPE: tl.constexpr, SCALED: tl.constexpr,
                        SATURATE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                        PDL: tl.constexpr):
    """A layer's two states finished and cached in one launch (`finish_states_reference`, then
    the store): program (token, j < n_heads) writes head j of the first state (RMSNorm'd with
    weight row j when NORM), program (token, n_heads) the second state (rotate-half RoPE by the
    token's cos / sin row when ROPE). Each result is rounded to the activations' dtype before
    the cache's, as the unfused layer stores it."""
    wait_for_predecessor(PDL)
    pid_tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + pid_tok).to(tl.int64)
    if (slot < 0) | (slot >= n_slots):
        return
    tok = pid_tok.to(tl.int64)
    if head < n_heads:
        offs = tl.arange(0, BLOCK_D)
        mask = offs < head_dim
        x = tl.load(new_a_ptr + tok * stride_a_tok + head * stride_a_head + offs, mask=mask)
        if NORM:
            xf = x.to(tl.float32)
            inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / head_dim + eps)
            w = tl.load(norm_ptr + head * head_dim + offs, mask=mask).to(tl.float32)
            x = (xf * inv_rms * w).to(new_a_ptr.dtype.element_ty)
        _cache_write(cache_a_ptr, (slot * n_heads + head) * head_dim + offs, x, mask, scale,
                     SCALED, SATURATE)
    else:  # names of their own: Triton rejects a name bound to two shapes in the branches
        half = rope_dim // 2
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < half
        row = new_b_ptr + tok * stride_b_tok
        x1 = tl.load(row + offs_r, mask=mask_r)
        x2 = tl.load(row + half + offs_r, mask=mask_r)
        if ROPE:
            c = tl.load(cos_ptr + tok * stride_cs + offs_r, mask=mask_r)
            s = tl.load(sin_ptr + tok * stride_cs + offs_r, mask=mask_r)
            x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
            dtype = new_b_ptr.dtype.element_ty
            x1, x2 = (x1f * c - x2f * s).to(dtype), (x2f * c + x1f * s).to(dtype)
        _cache_write(cache_b_ptr, slot * rope_dim + offs_r, x1, mask_r, scale, SCALED, SATURATE)
        _cache_write(cache_b_ptr, slot * rope_dim + half + offs_r, x2, mask_r, scale, SCALED,
                     SATURATE)
