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

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _store_row(cache_ptr, new_ptr, tok, slot, n_feat, stride_new, scale,
               SCALED: tl.constexpr, SATURATE: tl.constexpr, BLOCK: tl.constexpr):
    """Token `tok`'s features (n_feat, flattened) from `new` to `cache[slot]`."""
    for f0 in range(0, n_feat, BLOCK):
        offs_f = f0 + tl.arange(0, BLOCK)
        mask_f = offs_f < n_feat
        values = tl.load(new_ptr + tok.to(tl.int64) * stride_new + offs_f, mask=mask_f)  # (BLOCK,)
        if SCALED:
            values = values.to(tl.float32) / scale
        if SATURATE:
            values = tl.minimum(tl.maximum(values.to(tl.float32), -E4M3_MAX), E4M3_MAX)
        tl.store(cache_ptr + slot * n_feat + offs_f, values.to(cache_ptr.dtype.element_ty),
                 mask=mask_f)


@triton.jit
def store_kernel(cache_ptr, new_ptr, slots_ptr, n_slots, n_feat, stride_new, scale,
                 SCALED: tl.constexpr, SATURATE: tl.constexpr, BLOCK: tl.constexpr):
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
                      BLOCK_B: tl.constexpr):
    """Two caches written in one launch (a layer's K and V, or its latent and RoPE key):
    program (token, 0) writes the first, (token, 1) the second, at the same slot (`n_slots`:
    the fewer slots of the two caches)."""
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
