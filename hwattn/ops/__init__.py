"""Paged decode ops: the two kernel shapes every attention variant reduces to (DESIGN §4).

    decode(q, k_cache, v_cache, block_table, cache_seqlens, ...)            # MHA / MQA / GQA
    decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, ...)     # GTA, MLA, GLA
    plan_decode(...)                                                         # split-KV schedule
    store_kv(cache, new, slot_mapping)                                       # write new tokens

Each op has a plain PyTorch reference in `reference.py`; `backend="auto"` picks the Triton
kernels (`triton_decode.py` launching `kernels/attend.py`, `kernels/combine.py`,
`kernels/store.py`) for CUDA tensors and the reference for CPU tensors. `plan.py` holds the
split-KV planner.
"""

from hwattn.ops.interface import decode, decode_tied, store_kv
from hwattn.ops.plan import DecodePlan, plan_decode

__all__ = ["DecodePlan", "decode", "decode_tied", "plan_decode", "store_kv"]
