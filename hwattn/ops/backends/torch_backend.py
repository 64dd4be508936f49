"""The PyTorch backend: the plain references of `hwattn.ops.reference`, on any device.

It needs no plan (each call reads the lengths itself), takes every float dtype including fp64,
and is what "auto" chooses when no faster backend accepts the device (the CPU).
"""

from __future__ import annotations

from hwattn.ops import reference
from hwattn.ops.backends.base import AttentionBackend


class TorchBackend(AttentionBackend):
    name = "torch"
    priority = 0
    checks_page_ids = True  # the references check the pages they read

    @classmethod
    def auto_select(cls, device) -> bool:
        return True

    def check_plan(self, plan, batch: int, capacity: int) -> bool:
        # A plan is checked, then ignored: the references read the lengths themselves, so it
        # vouches for none of them and they are checked as without one (a plan made for a
        # shorter query gave NaN rows here).
        super().check_plan(plan, batch, capacity)
        return False

    def run_decode(self, q, k_cache, v_cache, block_table, cache_seqlens, *, softmax_scale,
                   plan, k_scale, v_scale):
        return reference.decode_reference(q, k_cache, v_cache, block_table, cache_seqlens,
                                          softmax_scale, k_scale, v_scale)

    def run_decode_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
                        *, softmax_scale, plan, kv_scale):
        return reference.decode_tied_reference(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                               cache_seqlens, softmax_scale, kv_scale)

    def run_prefill(self, q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, *,
                    softmax_scale, plan, k_scale, v_scale):
        return reference.prefill_reference(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                           cache_seqlens, softmax_scale, k_scale, v_scale)

    def run_prefill_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table, cu_seqlens_q,
                         cache_seqlens, *, softmax_scale, plan, kv_scale, v_cache=None):
        return reference.prefill_tied_reference(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                                cu_seqlens_q, cache_seqlens, softmax_scale,
                                                kv_scale, v_cache=v_cache)

    def run_store_kv(self, cache, new, slot_mapping, *, scale) -> None:
        reference.store_kv_reference(cache, new, slot_mapping, scale)
