"""Grouped Latent Attention (GLA-h_c): MLA's latent split into h_c latent heads.

Each latent head has d_c = 2·d_h, its own RMSNorm and its own up-projections, and serves a
contiguous block of g_q = h_q / h_c query heads; one RoPE key is shared by every head. GLA-2
caches as much as MLA (2 · 2·d_h + d_R per token per layer) but each query head attends to
half the latent, halving the FLOPs per byte read, and under tensor parallelism each rank holds
only its own latent heads (no duplication while TP <= h_c). Decode is absorbed per latent
head through the backend's `decode_tied`. The machinery is `LatentAttention` in `mla.py`.
"""

from __future__ import annotations

from hwattn.layers.mla import LatentAttention
from hwattn.variants import VariantSpec, register_variant


class GroupedLatentAttention(LatentAttention):
    """GLA with `n_latent_heads` latent heads of `latent_dim` = 2·d_h each (by default)."""


GLA = register_variant(VariantSpec(
    "gla", GroupedLatentAttention, "grouped latent attention: h_c latents of 2·d_h + a RoPE key",
    groups=2, latent_width=2, partial_rope=True, bench_heads=128, takes_bias=True))
