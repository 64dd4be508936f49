"""Grouped-Tied Attention (GTA): one tied state per KV head serves as both key and value.

`wkv: D -> h_kv · d_h` gives the tied state S per KV head. The value is all of S; the key is
[S[..., :d_h - d_R] (never rotated), RoPE(k_rope)] where `wk_rope: D -> d_R` is a single-head
projection shared by every head. The query's last d_R dims are rotated. Per token per layer
the cache holds h_kv · d_h + d_R elements, about half of GQA's 2 · h_kv · d_h.
Decode runs the backend's `decode_tied`, prefill its variable-length `prefill_tied`, each
reading S once for both roles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from hwattn.config import ModelConfig
from hwattn.layers.base import (Linear, TiedStateAttention, causal_attention, select_heads,
                                set_weight)
from hwattn.layers.metadata import AttentionMetadata
from hwattn.layers.rope import apply_rope
from hwattn.variants import VariantSpec, register_variant


class GroupedTiedAttention(TiedStateAttention):
    """GTA-G: G tied KV heads (`n_kv_heads`) and one shared RoPE key of `rope_dim` dims."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config)
        d, h, hk = config.dim, config.n_heads, config.n_kv_heads
        self.n_kv_heads = hk
        self.nope_dim = self.head_dim - self.rope_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = Linear(d, h * self.head_dim, **kw)
        self.wkv = Linear(d, hk * self.head_dim, **kw)
        self.wk_rope = Linear(d, self.rope_dim, bias=config.attention_bias, device=device,
                                 dtype=dtype)
        self.wo = Linear(h * self.head_dim, d, **kw)

    input_projections = ("wq", "wkv", "wk_rope")
    finishes_states_in_store = True  # the RoPE key rotated in a decode step's cache write

    def project(self, x: Tensor, cos: Tensor, sin: Tensor, finish: bool = True):
        b, t, _ = x.shape
        q, tied, k_rope = self.in_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)  # (B, T, H, d_h)
        q = torch.cat((q[..., :self.nope_dim], apply_rope(q[..., self.nope_dim:], cos, sin)), -1)
        tied = tied.view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        if finish:
            k_rope = apply_rope(k_rope, cos, sin)  # (B, T, d_R)
        return (q,), (tied, k_rope)

    def attend(self, q, states) -> Tensor:
        tied, k_rope = states
        b, n, hk, _ = tied.shape
        k = torch.cat((tied[..., :self.nope_dim],
                       k_rope[:, :, None, :].expand(b, n, hk, self.rope_dim)), -1)  # (B, L, H_kv, d_h)
        return causal_attention(q[0], k, tied, self.scale)

    def decode(self, q, cache, meta: AttentionMetadata) -> Tensor:
        q_full = q[0]
        return self.kernel_call(meta.backend, (q_full[..., :self.nope_dim], q_full[..., self.nope_dim:]),
                                cache, meta.block_table, meta.cache_seqlens, plan=meta.plan)

    def prefill_forms(self):
        return (self.tied_form(self.nope_dim),)

    def prefill(self, q, cache, meta: AttentionMetadata) -> Tensor:
        q_full = q[0]  # (N, H, d_h)
        return self.prefill_forms()[0].run(
            meta.backend, (q_full[..., :self.nope_dim], q_full[..., self.nope_dim:]), cache,
            meta.block_table, meta.cu_seqlens_q, meta.cache_seqlens, plan=meta.plan)

    def cache_layout(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        return {"kv": (self.local_heads(tp)[1], self.head_dim), "rope": (self.rope_dim,)}

    def decode_widths(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim

    def decode_query_shapes(self, batch: int, query_len: int, tp: int = 1):
        heads = self.local_heads(tp)[0]
        return (batch, query_len, heads, self.nope_dim), (batch, query_len, heads, self.rope_dim)

    def shard_heads(self, q_heads: range, c_heads: range) -> dict:
        set_weight(self.wq, select_heads(self.wq.weight, q_heads, self.head_dim))
        set_weight(self.wkv, select_heads(self.wkv.weight, c_heads, self.head_dim))
        self.n_kv_heads = len(c_heads)
        return dict(n_kv_heads=len(c_heads))


GTA = register_variant(VariantSpec(
    "gta", GroupedTiedAttention, "grouped-tied attention: G tied K/V states + a shared RoPE key",
    groups=4, partial_rope=True, rope_below_head=True, takes_bias=True))
