"""Wrong arguments raise ValueError naming the argument, before any kernel launches."""

from __future__ import annotations

import pytest
import torch

from hwattn import ops


def _decode_args(**override):
    args = dict(q=torch.randn(2, 1, 4, 64, dtype=torch.bfloat16),
                k_cache=torch.randn(6, 16, 2, 64, dtype=torch.bfloat16),
                v_cache=torch.randn(6, 16, 2, 64, dtype=torch.bfloat16),
                block_table=torch.arange(6, dtype=torch.int32).view(2, 3),
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32))
    args.update(override)
    return args


def _tied_args(**override):
    args = dict(q_nope=torch.randn(2, 1, 4, 64, dtype=torch.bfloat16),
                q_rope=torch.randn(2, 1, 4, 32, dtype=torch.bfloat16),
                kv_cache=torch.randn(6, 16, 2, 96, dtype=torch.bfloat16),
                rope_cache=torch.randn(6, 16, 32, dtype=torch.bfloat16),
                block_table=torch.arange(6, dtype=torch.int32).view(2, 3),
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32))
    args.update(override)
    return args


META = torch.device("meta")

DECODE_ERRORS = [
    pytest.param(dict(q=torch.randn(2, 4, 64)), "q", id="q-rank"),
    pytest.param(dict(q=torch.ones(2, 1, 4, 64, dtype=torch.int32)), "q", id="q-dtype"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 2, 64, dtype=torch.float16)), "k_cache", id="cache-dtype"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 2, 32, dtype=torch.bfloat16)), "k_cache", id="cache-width"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 3, 64, dtype=torch.bfloat16),
                      v_cache=torch.randn(6, 16, 3, 64, dtype=torch.bfloat16)), "k_cache", id="head-ratio"),
    pytest.param(dict(v_cache=torch.randn(6, 8, 2, 64, dtype=torch.bfloat16)), "v_cache", id="page-size-mismatch"),
    pytest.param(dict(k_cache=torch.randn(6, 0, 2, 64, dtype=torch.bfloat16),
                      v_cache=torch.randn(6, 0, 2, 64, dtype=torch.bfloat16)), "page size", id="page-size-zero"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 2, 64).to(torch.float8_e4m3fn)), "k_cache", id="fp8-without-scale"),
    pytest.param(dict(block_table=torch.arange(4, dtype=torch.int32).view(2, 2)), "block_table", id="table-too-short"),
    pytest.param(dict(block_table=torch.arange(6).view(2, 3)), "block_table", id="table-dtype"),
    pytest.param(dict(block_table=torch.arange(6, dtype=torch.int32).view(3, 2)), "block_table", id="table-batch"),
    pytest.param(dict(cache_seqlens=torch.tensor([40, 9])), "cache_seqlens", id="seqlens-dtype"),
    pytest.param(dict(cache_seqlens=torch.tensor([40, 0], dtype=torch.int32)), "cache_seqlens", id="seqlens-below-lq"),
    pytest.param(dict(block_table=torch.empty(2, 3, dtype=torch.int32, device=META)), "block_table", id="table-device"),
    pytest.param(dict(k_cache=torch.empty(6, 16, 2, 64, dtype=torch.bfloat16, device=META)), "k_cache", id="cache-device"),
]


@pytest.mark.parametrize("override, name", DECODE_ERRORS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_rejects(override, name, backend):
    with pytest.raises(ValueError, match=name):
        ops.decode(**_decode_args(**override), backend=backend)


TIED_ERRORS = [
    pytest.param(dict(q_rope=torch.randn(2, 1, 4, 32, dtype=torch.float16)), "q_rope", id="rope-dtype"),
    pytest.param(dict(q_rope=torch.randn(2, 2, 4, 32, dtype=torch.bfloat16)), "q_rope", id="rope-shape"),
    pytest.param(dict(kv_cache=torch.randn(6, 16, 2, 48, dtype=torch.bfloat16)), "kv_cache", id="kv-narrower-than-nope"),
    pytest.param(dict(kv_cache=torch.randn(6, 16, 3, 96, dtype=torch.bfloat16)), "kv_cache", id="head-ratio"),
    pytest.param(dict(rope_cache=torch.randn(6, 8, 32, dtype=torch.bfloat16)), "rope_cache", id="rope-page-size"),
    pytest.param(dict(rope_cache=torch.randn(6, 16, 16, dtype=torch.bfloat16)), "rope_cache", id="rope-width"),
    pytest.param(dict(block_table=torch.arange(4, dtype=torch.int32).view(2, 2)), "block_table", id="table-too-short"),
    pytest.param(dict(rope_cache=torch.empty(6, 16, 32, dtype=torch.bfloat16, device=META)), "rope_cache", id="rope-device"),
]


@pytest.mark.parametrize("override, name", TIED_ERRORS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decode_tied_rejects(override, name, backend):
    with pytest.raises(ValueError, match=name):
        ops.decode_tied(**_tied_args(**override), softmax_scale=0.1, backend=backend)


def test_triton_rejects_fp64_and_bad_backend():
    args = _decode_args()
    args = {k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="q"):
        ops.decode(**args, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.decode(**_decode_args(), backend="cuda")


def test_plan_is_checked():
    args = _decode_args()
    other = ops.plan_decode(torch.tensor([5], dtype=torch.int32), num_heads_kv=2)
    with pytest.raises(ValueError, match="plan"):
        ops.decode(**args, plan=other, backend="triton")
    long = ops.plan_decode(torch.tensor([40, 900], dtype=torch.int32), num_heads_kv=2)
    with pytest.raises(ValueError, match="block_table"):
        ops.decode(**args, plan=long, backend="triton")


def test_store_kv_rejects():
    cache = torch.zeros(4, 16, 2, 8)
    with pytest.raises(ValueError, match="new"):
        ops.store_kv(cache, torch.randn(3, 2, 4), torch.arange(3))
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.store_kv(cache, torch.randn(3, 2, 8), torch.arange(4))
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.store_kv(cache, torch.randn(3, 2, 8), torch.arange(3.0))
    with pytest.raises(ValueError, match="slot_mapping"):
        ops.store_kv(cache, torch.randn(3, 2, 8), torch.arange(3, device=META))


def _prefill_args(**override):
    args = dict(q=torch.randn(12, 4, 64, dtype=torch.bfloat16),
                k_cache=torch.randn(6, 16, 2, 64, dtype=torch.bfloat16),
                v_cache=torch.randn(6, 16, 2, 48, dtype=torch.bfloat16),
                block_table=torch.arange(6, dtype=torch.int32).view(2, 3),
                cu_seqlens_q=torch.tensor([0, 3, 12], dtype=torch.int32),
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32))
    args.update(override)
    return args


def _prefill_tied_args(**override):
    args = dict(q_nope=torch.randn(12, 4, 64, dtype=torch.bfloat16),
                q_rope=torch.randn(12, 4, 32, dtype=torch.bfloat16),
                kv_cache=torch.randn(6, 16, 2, 96, dtype=torch.bfloat16),
                rope_cache=torch.randn(6, 16, 32, dtype=torch.bfloat16),
                block_table=torch.arange(6, dtype=torch.int32).view(2, 3),
                cu_seqlens_q=torch.tensor([0, 3, 12], dtype=torch.int32),
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32))
    args.update(override)
    return args


PREFILL_ERRORS = [
    pytest.param(dict(q=torch.randn(1, 12, 4, 64, dtype=torch.bfloat16)), "q", id="q-rank"),
    pytest.param(dict(q=torch.ones(12, 4, 64, dtype=torch.int32)), "q", id="q-dtype"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 2, 32, dtype=torch.bfloat16)), "k_cache", id="key-width"),
    pytest.param(dict(v_cache=torch.randn(6, 8, 2, 48, dtype=torch.bfloat16)), "v_cache", id="page-size-mismatch"),
    pytest.param(dict(v_cache=torch.randn(6, 16, 2, 48, dtype=torch.float16)), "v_cache", id="cache-dtype"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 3, 64, dtype=torch.bfloat16),
                      v_cache=torch.randn(6, 16, 3, 48, dtype=torch.bfloat16)), "k_cache", id="head-ratio"),
    pytest.param(dict(k_cache=torch.randn(6, 16, 2, 64).to(torch.float8_e4m3fn)), "k_cache", id="fp8-without-scale"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 3, 12])), "cu_seqlens_q", id="cu-dtype"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0], dtype=torch.int32)), "cu_seqlens_q", id="cu-empty"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([1, 3, 12], dtype=torch.int32)), "cu_seqlens_q", id="cu-start"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 5, 3], dtype=torch.int32)), "cu_seqlens_q", id="cu-decreasing"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 3, 10], dtype=torch.int32)), "cu_seqlens_q", id="cu-end-not-N"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 3, 6, 12], dtype=torch.int32)), "block_table", id="cu-batch"),
    pytest.param(dict(cache_seqlens=torch.tensor([40, 8], dtype=torch.int32)), "cache_seqlens", id="seqlens-below-queries"),
    pytest.param(dict(cache_seqlens=torch.tensor([40, 9])), "cache_seqlens", id="seqlens-dtype"),
    pytest.param(dict(block_table=torch.arange(4, dtype=torch.int32).view(2, 2)), "block_table", id="table-too-short"),
    pytest.param(dict(block_table=torch.arange(6).view(2, 3)), "block_table", id="table-dtype"),
    pytest.param(dict(cu_seqlens_q=torch.empty(3, dtype=torch.int32, device=META)), "cu_seqlens_q", id="cu-device"),
]


@pytest.mark.parametrize("override, name", PREFILL_ERRORS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_rejects(override, name, backend):
    with pytest.raises(ValueError, match=name):
        ops.prefill(**_prefill_args(**override), backend=backend)


PREFILL_TIED_ERRORS = [
    pytest.param(dict(q_nope=torch.randn(12, 4, 64), q_rope=torch.randn(12, 4, 32)), "kv_cache",
                 id="cache-dtype-mismatch"),
    pytest.param(dict(q_rope=torch.randn(12, 3, 32, dtype=torch.bfloat16)), "q_rope", id="rope-heads"),
    pytest.param(dict(q_rope=torch.randn(12, 4, 32, dtype=torch.float16)), "q_rope", id="rope-dtype"),
    pytest.param(dict(kv_cache=torch.randn(6, 16, 2, 48, dtype=torch.bfloat16)), "kv_cache", id="kv-narrower-than-nope"),
    pytest.param(dict(rope_cache=torch.randn(6, 16, 16, dtype=torch.bfloat16)), "rope_cache", id="rope-width"),
    pytest.param(dict(cu_seqlens_q=torch.tensor([0, 3, 11], dtype=torch.int32)), "cu_seqlens_q", id="cu-end-not-N"),
    pytest.param(dict(block_table=torch.arange(4, dtype=torch.int32).view(2, 2)), "block_table", id="table-too-short"),
]


@pytest.mark.parametrize("override, name", PREFILL_TIED_ERRORS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_tied_rejects(override, name, backend):
    with pytest.raises(ValueError, match=name):
        ops.prefill_tied(**_prefill_tied_args(**override), softmax_scale=0.1, backend=backend)


def test_prefill_plan_is_checked():
    args = _prefill_args()
    other = ops.plan_prefill([0, 3], [5])
    with pytest.raises(ValueError, match="plan"):
        ops.prefill(**args, plan=other, backend="triton")
    long = ops.plan_prefill([0, 3, 12], [40, 900])
    with pytest.raises(ValueError, match="block_table"):
        ops.prefill(**args, plan=long, backend="triton")
    with pytest.raises(ValueError, match="plan"):
        ops.prefill(**args, plan=ops.plan_decode(args["cache_seqlens"], num_heads_kv=2),
                    backend="torch")
    fp64 = {k: (v.double() if v.is_floating_point() else v) for k, v in args.items()}
    with pytest.raises(ValueError, match="q"):
        ops.prefill(**fp64, backend="triton")
