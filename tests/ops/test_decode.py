"""Paged decode: Triton kernels (interpreted on CPU) and the PyTorch reference against an fp64
truth, over awkward shapes and hostile cache data (see `paged.py`).

Tolerances are derived (tests/conftest.py): each backend may be off the truth by a small
multiple of the error the reference makes in the same dtype. Every case also runs with forced
split-KV pieces, so the combine kernel is checked on the same shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from hwattn import ops
from tests.ops.paged import (DEVICE, attention_truth, check_out_lse, fill_cache, gather_truth,
                              on_device, paged_table, tied_case)

FP8 = torch.float8_e4m3fn

# (lengths, L_q, H_q, H_kv, D, page, dtype, cache dtype)
DECODE_CASES = [
    pytest.param(([1], 1, 4, 4, 64, 1, torch.bfloat16, None), id="len1-ratio1-page1-bf16"),
    pytest.param(([63, 64, 65], 2, 6, 2, 64, 16, torch.bfloat16, None), id="len63-64-65-ratio3-page16-lq2"),
    pytest.param(([339, 3], 3, 16, 2, 128, 64, torch.float16, None), id="len339-3-ratio8-page64-lq3-fp16"),
    pytest.param(([257, 97], 4, 4, 1, 256, 256, torch.bfloat16, None), id="prime-ratioHq-page256-lq4-d256"),
    pytest.param(([131], 1, 8, 2, 96, 16, torch.float32, None), id="prime131-d96-page16-fp32"),
    pytest.param(([16, 40], 16, 2, 1, 64, 16, torch.bfloat16, None), id="lq16-page16"),
    pytest.param(([65, 339], 2, 8, 2, 128, 16, torch.bfloat16, FP8), id="fp8-cache-page16"),
]

# (lengths, L_q, H_q, H_kv, D_nope, D_v, D_R, page, dtype, cache dtype)
TIED_CASES = [
    pytest.param(([63, 65], 1, 16, 4, 64, 128, 64, 16, torch.bfloat16, None), id="gta-len63-65-ratio4-page16"),
    pytest.param(([339], 2, 16, 2, 256, 256, 32, 64, torch.bfloat16, None), id="gla-len339-ratio8-page64-lq2"),
    pytest.param(([1, 257], 1, 8, 1, 512, 512, 64, 256, torch.bfloat16, None), id="mla-len1-prime-page256"),
    pytest.param(([37], 3, 3, 1, 128, 192, 64, 1, torch.float16, None), id="dv192-ratio3-page1-lq3-fp16"),
    pytest.param(([64], 4, 4, 2, 384, 384, 32, 16, torch.float16, None), id="mla384-len64-page16-lq4"),
    pytest.param(([97, 5], 1, 2, 2, 112, 128, 16, 64, torch.float32, None), id="dr16-ratio1-page64-fp32"),
    pytest.param(([339, 64], 2, 16, 2, 256, 256, 64, 64, torch.bfloat16, FP8), id="gla-fp8-cache"),
]

FORCED_SPLIT = 64  # pieces of 64 tokens: every sequence longer than that is split


def _plans(lengths, n_kv, query_len):
    """auto (the op's own plan), split (every sequence in 64-token pieces) and full: the
    plan of a batch that fills the GPU one piece per sequence (one SM per sequence and KV
    head), where a sequence 1.5x the mean or longer is still cut near the mean."""
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return {"auto": None,
            "split": ops.plan_decode(seqlens, num_heads_kv=n_kv, query_len=query_len,
                                     split_tokens=FORCED_SPLIT),
            "full": ops.plan_decode(seqlens, num_heads_kv=n_kv, query_len=query_len,
                                    num_sms=len(lengths) * n_kv, programs_per_sm=1,
                                    min_piece=64)}


def test_the_full_plan_cuts_a_long_sequence():
    """The "full" plan above does split where a case has a long sequence."""
    assert _plans([65, 339], 2, 1)["full"].max_pieces == 2
    assert _plans([63, 65], 4, 1)["full"].max_pieces == 1


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_matches_fp64(case):
    lengths, l_q, h_q, h_kv, dim, page, dtype, cache_dtype = case
    cache_dtype = cache_dtype or dtype
    scales = (0.05, 0.07) if cache_dtype == FP8 else (None, None)
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, cache_dtype, scales[0])
    v_cache, v_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, cache_dtype, scales[1])
    q = torch.randn(len(lengths), l_q, h_q, dim).to(dtype)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth = attention_truth(q, [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                            [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)],
                            1 / math.sqrt(dim))
    kw = dict(return_lse=True, k_scale=scales[0], v_scale=scales[1])
    baseline = ops.decode(q, k_cache, v_cache, table, seqlens, backend="torch", **kw)
    check_out_lse("reference", baseline, truth, baseline)
    for name, plan in _plans(lengths, h_kv, l_q).items():
        got = ops.decode(*on_device(q, k_cache, v_cache, table, seqlens), backend="triton",
                         plan=plan, **kw)
        check_out_lse(f"triton/{name}", got, truth, baseline)


@pytest.mark.parametrize("case", TIED_CASES)
def test_decode_tied_matches_fp64(case):
    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype, cache_dtype = case
    cache_dtype = cache_dtype or dtype
    scale = 0.06 if cache_dtype == FP8 else None
    c = tied_case(lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype, cache_dtype, scale)
    q_nope, q_rope, kv_cache, rope_cache = c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"]
    table, seqlens, softmax_scale, truth = c["table"], c["seqlens"], c["softmax_scale"], c["truth"]
    kw = dict(softmax_scale=softmax_scale, return_lse=True, kv_scale=scale)
    baseline = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                               backend="torch", **kw)
    check_out_lse("reference", baseline, truth, baseline)
    for name, plan in _plans(lengths, h_kv, l_q).items():
        got = ops.decode_tied(*on_device(q_nope, q_rope, kv_cache, rope_cache, table, seqlens),
                              backend="triton", plan=plan, **kw)
        check_out_lse(f"triton/{name}", got, truth, baseline)


@pytest.mark.parametrize("block_n, page", [(64, 16), (32, 1), (64, 256)], ids=["bn64-page16", "bn32-page1", "bn64-page256"])
def test_other_token_blocks(block_n, page):
    """The GPU's larger token blocks: a block spanning several pages and one inside a page."""
    from hwattn.ops import triton_decode

    lengths, l_q, h_q, h_kv, dim = [339, 70], 2, 8, 2, 64
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    v_cache, v_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.randn(2, l_q, h_q, dim).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth = attention_truth(q, [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                            [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)], 0.125)
    baseline = ops.decode(q, k_cache, v_cache, table, seqlens, softmax_scale=0.125,
                          return_lse=True, backend="torch")
    config = triton_decode.KernelConfig(block_n=block_n, num_warps=4, num_stages=2, max_rows=8)
    for name, plan in _plans(lengths, h_kv, l_q).items():
        got = triton_decode.decode(*on_device(q, k_cache, v_cache, table, seqlens),
                                   softmax_scale=0.125, plan=plan, config=config)
        check_out_lse(f"block_n={block_n}/{name}", got, truth, baseline)


def test_default_scale_and_no_lse():
    """softmax_scale=None means 1/sqrt(D); return_lse=False returns the output alone."""
    lengths, page = [20], 16
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((1, 64), lengths, table, n_pool, page, torch.float32)
    v_cache, _ = fill_cache((1, 64), lengths, table, n_pool, page, torch.float32)
    q = torch.randn(1, 1, 2, 64)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    out = ops.decode(*on_device(q, k_cache, v_cache, table, seqlens), backend="triton").cpu()
    ref = ops.decode(q, k_cache, v_cache, table, seqlens, softmax_scale=0.125, backend="torch")
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_many_pieces_merge_in_several_steps():
    """More pieces than the combine kernel's tile (a plan refreshed in place for a CUDA graph
    that captured a smaller tile): it merges them over several steps."""
    lengths, l_q, h_q, h_kv, dim, page = [1000, 130], 2, 4, 2, 64, 16
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    v_cache, v_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.randn(2, l_q, h_q, dim).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth = attention_truth(q, [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                            [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)], 0.125)
    baseline = ops.decode(q, k_cache, v_cache, table, seqlens, softmax_scale=0.125,
                          return_lse=True, backend="torch")
    plan = ops.plan_decode(seqlens.to(DEVICE), num_heads_kv=h_kv, query_len=l_q,
                           split_tokens=FORCED_SPLIT)
    assert plan.max_pieces == 16
    plan.max_pieces = 2  # as after a refresh in place: the captured tile of 8 pieces is too small
    got = ops.decode(*on_device(q, k_cache, v_cache, table, seqlens), softmax_scale=0.125,
                     return_lse=True, plan=plan, backend="triton")
    check_out_lse("16 pieces", got, truth, baseline)
