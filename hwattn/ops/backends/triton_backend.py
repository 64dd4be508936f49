"""The Triton backend: the kernels of `hwattn.ops.kernels` launched by `triton_decode` (decode,
store) and `triton_prefill` (variable-length prefill).

Its plan is the split-KV `DecodePlan` (`hwattn.ops.plan`), sized for the device's
multiprocessors; with a plan given, a decode step reads nothing back to the host, so it can be
captured in a CUDA graph. "auto" chooses it for CUDA tensors; on the CPU it runs only when
asked for by name, under Triton's interpreter (TRITON_INTERPRET=1 before triton is imported).
Importing this module imports triton.
"""

from __future__ import annotations

import copy

import torch

from hwattn.ops import reference, triton_decode, triton_prefill
from hwattn.ops.backends.base import AttentionBackend
from hwattn.ops.plan import plan_decode


class TritonBackend(AttentionBackend):
    """`config`: a `triton_decode.KernelConfig` forcing one tile shape for every decode call
    (benchmarks use it to sweep tiles); default: chosen per shape by `choose_config`.
    `prefill_config`: a `triton_prefill.PrefillConfig` forcing the prefill kernel's tiles;
    default: `choose_prefill_config`."""

    name = "triton"
    priority = 10
    kernel_names = {"attention": ("attend_kernel", "combine_kernel", "combine_rows_kernel",
                                  "prefill_kernel"),
                    "cache_write": ("store_kernel", "store_pair_kernel", "store_states_kernel")}
    varlen_prefill = True

    def __init__(self, config: triton_decode.KernelConfig | None = None,
                 prefill_config: triton_prefill.PrefillConfig | None = None):
        self.config = config
        self.prefill_config = prefill_config
        self._sms: dict[torch.device, int | None] = {}

    @classmethod
    def auto_select(cls, device) -> bool:
        return torch.device(device).type == "cuda"

    def with_config(self, config: triton_decode.KernelConfig | None) -> "TritonBackend":
        """A backend that launches every kernel with the tile shape `config`."""
        return TritonBackend(config, self.prefill_config)

    def with_prefill_config(self, config: triton_prefill.PrefillConfig | None) -> "TritonBackend":
        """This backend (of whatever subclass: the Hopper one keeps its decode kernels), with
        every prefill kernel launched with the tile shape `config`."""
        out = copy.copy(self)
        out.prefill_config = config
        return out

    def check_cache(self, page_size: int, dtype: torch.dtype) -> None:
        super().check_cache(page_size, dtype)
        if dtype not in triton_decode.CACHE_DTYPES:
            raise ValueError(f"cache dtype {dtype} is not one the Triton kernels read "
                             f"({', '.join(str(d) for d in triton_decode.CACHE_DTYPES)}); "
                             "use backend='torch'")

    def _num_sms(self, device: torch.device) -> int | None:
        if device not in self._sms:
            self._sms[device] = (torch.cuda.get_device_properties(device).multi_processor_count
                                 if device.type == "cuda" else None)
        return self._sms[device]

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None, out=None,
             reserve_pieces=False):
        device = torch.device(device) if device is not None else cache_seqlens.device
        plan = plan_decode(cache_seqlens, num_heads_kv=num_heads_kv, query_len=query_len,
                           page_size=page_size, num_sms=self._num_sms(device),
                           reserve_pieces=reserve_pieces, out=out)
        return plan if out is not None else plan.to(device)

    def run_decode(self, q, k_cache, v_cache, block_table, cache_seqlens, *, softmax_scale,
                   plan, k_scale, v_scale):
        return triton_decode.decode(q, k_cache, v_cache, block_table, cache_seqlens,
                                    softmax_scale=softmax_scale, plan=plan, k_scale=k_scale,
                                    v_scale=v_scale, config=self.config)

    def run_decode_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table, cache_seqlens,
                        *, softmax_scale, plan, kv_scale):
        return triton_decode.decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                         cache_seqlens, softmax_scale=softmax_scale, plan=plan,
                                         kv_scale=kv_scale, config=self.config)

    def run_prefill(self, q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens, *,
                    softmax_scale, plan, k_scale, v_scale):
        return triton_prefill.prefill(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                      cache_seqlens, softmax_scale=softmax_scale, plan=plan,
                                      k_scale=k_scale, v_scale=v_scale, config=self.prefill_config)

    def run_prefill_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table, cu_seqlens_q,
                         cache_seqlens, *, softmax_scale, plan, kv_scale, v_cache=None):
        return triton_prefill.prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                           cu_seqlens_q, cache_seqlens,
                                           softmax_scale=softmax_scale, plan=plan,
                                           kv_scale=kv_scale, config=self.prefill_config,
                                           v_cache=v_cache)

    @staticmethod
    def _stores(cache, new) -> bool:
        """Whether the store kernel takes this pair: it writes flat slots of a contiguous cache."""
        return (cache.is_contiguous() and new.dtype in triton_decode.KERNEL_DTYPES
                and cache.dtype in triton_decode.CACHE_DTYPES)

    def run_store_kv(self, cache, new, slot_mapping, *, scale) -> None:
        if self._stores(cache, new):
            triton_decode.store_kv(cache, new, slot_mapping, scale)
        else:
            reference.store_kv_reference(cache, new, slot_mapping, scale)

    def run_store_kvs(self, caches, news, slot_mapping, *, scale) -> None:
        if (len(caches) == 2 and caches[0].dtype == caches[1].dtype
                and all(map(self._stores, caches, news))):
            triton_decode.store_kv_pair(caches, news, slot_mapping, scale)  # one launch
        else:
            super().run_store_kvs(caches, news, slot_mapping, scale=scale)

    def run_store_states(self, caches, news, slot_mapping, *, norm, rope, scale) -> None:
        if (caches[0].dtype == caches[1].dtype and all(map(self._stores, caches, news))
                and all(t.stride(-1) == 1 for t in (*news, *(rope or ())))
                and (rope is None or rope[0].dtype == rope[1].dtype == torch.float32)
                and (norm is None or norm[0].dtype in triton_decode.KERNEL_DTYPES)):
            triton_decode.store_states(caches, news, slot_mapping, norm, rope, scale)  # one launch
        else:
            super().run_store_states(caches, news, slot_mapping, norm=norm, rope=rope,
                                     scale=scale)
