"""Multi-head, grouped-query and multi-query attention: one class, the KV head count decides.

MHA caches K and V for every head, GQA-G for G KV heads shared by contiguous blocks of
g_q = h_q / G query heads, MQA for a single head. Per token per layer the cache holds
2 · h_kv · d_h elements. RoPE rotates the whole head. Decode runs the backend's `decode`,
prefill its variable-length `prefill` over the same cache.
"""

from __future__ import annotations

import math

from torch import Tensor

from hwattn.config import ModelConfig
from hwattn.layers.base import Attention, Linear, causal_attention, select_heads, set_weight
from hwattn.layers.metadata import AttentionMetadata, PrefillForm
from hwattn.layers.rope import apply_rope
from hwattn.variants import VariantSpec, register_variant


class GroupedQueryAttention(Attention):
    """MHA (n_kv_heads = n_heads), GQA (1 < n_kv_heads < n_heads) or MQA (n_kv_heads = 1)."""

    def __init__(self, config: ModelConfig, device=None, dtype=None):
        super().__init__(config)
        d, h, hk = config.dim, config.n_heads, config.n_kv_heads
        self.n_kv_heads = hk
        self.scale = 1.0 / math.sqrt(self.head_dim)
        kw = dict(bias=False, device=device, dtype=dtype)
        self.wq = Linear(d, h * self.head_dim, **kw)
        self.wk = Linear(d, hk * self.head_dim, **kw)
        self.wv = Linear(d, hk * self.head_dim, **kw)
        self.wo = Linear(h * self.head_dim, d, **kw)

    input_projections = ("wq", "wk", "wv")

    def project(self, x: Tensor, cos: Tensor, sin: Tensor):
        b, t, _ = x.shape
        q, k, v = self.in_proj(x)
        q = q.view(b, t, self.n_heads, self.head_dim)  # (B, T, H, d_h)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)  # (B, T, H_kv, d_h)
        return (apply_rope(q, cos, sin),), (apply_rope(k, cos, sin), v)

    def attend(self, q, states) -> Tensor:
        k, v = states
        return causal_attention(q[0], k, v, self.scale)

    def decode(self, q, cache, meta: AttentionMetadata) -> Tensor:
        return self.kernel_call(meta.backend, q, cache, meta.block_table, meta.cache_seqlens,
                                plan=meta.plan)

    def prefill_forms(self) -> tuple[PrefillForm, ...]:
        return (PrefillForm("paged", False, self.n_heads, self.n_kv_heads, self.head_dim,
                            self.head_dim, 0, self.scale),)

    def prefill(self, q, cache, meta: AttentionMetadata) -> Tensor:
        return self.prefill_forms()[0].run(meta.backend, q, cache, meta.block_table,
                                           meta.cu_seqlens_q, meta.cache_seqlens, plan=meta.plan)

    def cache_layout(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        heads = self.local_heads(tp)[1]
        return {"k": (heads, self.head_dim), "v": (heads, self.head_dim)}

    def decode_widths(self) -> tuple[int, int]:
        return self.head_dim, self.head_dim

    def decode_query_shapes(self, batch: int, query_len: int, tp: int = 1):
        return ((batch, query_len, self.local_heads(tp)[0], self.head_dim),)

    def kernel_call(self, backend, queries, cache, block_table, cache_seqlens, *, plan=None,
                    cache_scale=None, return_lse=False):
        k_cache, v_cache = cache
        return backend.decode(queries[0], k_cache, v_cache, block_table, cache_seqlens,
                              softmax_scale=self.scale, plan=plan, k_scale=cache_scale,
                              v_scale=cache_scale, return_lse=return_lse)

    def kernel_operands(self, queries, caches):
        k, v = caches  # (B, L, H_kv, d_h) each
        return queries[0], k, v

    def shard_heads(self, q_heads: range, c_heads: range) -> dict:
        set_weight(self.wq, select_heads(self.wq.weight, q_heads, self.head_dim))
        set_weight(self.wk, select_heads(self.wk.weight, c_heads, self.head_dim))
        set_weight(self.wv, select_heads(self.wv.weight, c_heads, self.head_dim))
        self.n_kv_heads = len(c_heads)
        return dict(n_kv_heads=len(c_heads))


MHA = register_variant(VariantSpec(
    "mha", GroupedQueryAttention, "multi-head attention: K and V for every query head",
    groups=None, fixed_groups=True))
MQA = register_variant(VariantSpec(
    "mqa", GroupedQueryAttention, "multi-query attention: one K and V head for all",
    groups=1, fixed_groups=True))
GQA = register_variant(VariantSpec(
    "gqa", GroupedQueryAttention, "grouped-query attention: G KV heads (default 4)", groups=4))
