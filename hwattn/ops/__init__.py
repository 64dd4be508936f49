"""Paged decode ops: the two kernel shapes every attention variant reduces to (DESIGN §4).

    decode(q, k_cache, v_cache, block_table, cache_seqlens, ...)            # MHA / MQA / GQA
    decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, ...)     # GTA, MLA, GLA
    plan_decode(...)                                                         # split-KV schedule
    store_kv(cache, new, slot_mapping)                                       # write new tokens

Each op has a plain PyTorch reference in `reference.py`; `backend="auto"` picks the Triton
kernel for CUDA tensors and the reference for CPU tensors.
"""

from hwattn.ops.interface import decode, decode_tied, plan_decode, store_kv

__all__ = ["decode", "decode_tied", "plan_decode", "store_kv"]
