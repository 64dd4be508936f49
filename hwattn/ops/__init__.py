"""Paged attention ops: the two kernel shapes every attention variant reduces to
(docs/design.md §4), for decode and variable-length prefill, behind a registry of backends.

    decode(q, k_cache, v_cache, block_table, cache_seqlens, ...)            # MHA / MQA / GQA
    decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, ...)     # GTA, MLA, GLA
    plan_decode(...)                                                         # split-KV schedule
    prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, cache_seqlens)  # varlen, causal
    prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, ...)    # varlen, tied
    plan_prefill(cu_seqlens_q, cache_seqlens)                                # host lengths
    store_kv(cache, new, slot_mapping)                                       # write new tokens

An `AttentionBackend` (`backends/`) implements them: "torch" runs the plain references of
`reference.py`, "triton" the kernels (`triton_decode.py` launching `kernels/attend.py`,
`kernels/combine.py`, `kernels/store.py`; `kernels/pdl.py` their programmatic dependent
launch, HWATTN_PDL=1, off) with the split-KV planner of `plan.py`, and
`triton_prefill.py` launching `kernels/prefill.py`. "auto" picks
the Hopper backend (`hopper_backend.py`, Gluon kernels) on compute capability 9.0 GPUs, Triton on
other CUDA devices and the reference for CPU tensors; `register_backend` (or the
`hwattn.backends` entry-point group) adds others.

Beside them, `linear.py` holds the linear layers' product (`F.linear`, or, opted into with
HWATTN_SKINNY_GEMM=1, the few-row Triton GEMM of `skinny_gemm.py` / `kernels/skinny_gemm.py`),
and `argmax.py` the greedy tokens' argmax over few long rows, in two passes.
"""

from hwattn.ops.backends import AttentionBackend, backend_names, get_backend, register_backend
from hwattn.ops.interface import decode, decode_tied, prefill, prefill_tied, store_kv
from hwattn.ops.plan import DecodePlan, PrefillPlan, plan_decode, plan_prefill

__all__ = ["AttentionBackend", "DecodePlan", "PrefillPlan", "backend_names", "decode",
           "decode_tied", "get_backend", "plan_decode", "plan_prefill", "prefill", "prefill_tied",
           "register_backend", "store_kv"]
