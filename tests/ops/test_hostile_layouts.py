"""Hostile layouts the cases of `test_decode.py` / `test_prefill.py` leave out, for every
Triton attention kernel (interpreted on CPU, compiled with HWATTN_TEST_DEVICE=cuda) and its
PyTorch reference against the fp64 truth:

- pages shared and reused (`paged.shared_table`): one page at the head of every sequence's
  row, and at two positions of one row;
- inf / -inf (not NaN) in every slot no sequence owns below its length;
- non-contiguous operands: queries transposed out of a wider buffer, K and V caches as views of
  one interleaved (P, page, 2, H_kv, D) buffer, the tied state and its RoPE key as views of one
  per-token row, q_nope / q_rope as the two halves of one query;
- prefill: a sequence whose queries fill exactly one page from position 0, queries crossing a
  page boundary, one past a page, a sequence with no queries, and one with no tokens at all
  (a padding slot of the batch).
"""

from __future__ import annotations

import math

import pytest
import torch

from hwattn import ops
from tests.ops.paged import (DEVICE, attention_truth, check_out_lse, copied_with_layout,
                             fill_cache, gather_truth, on_device, shared_table)
from tests.ops.test_prefill import prefill_truth, varlen

FORCED_SPLIT = 64


def _strided_queries(shape, dtype, heads_dim: int):
    """Random queries of `shape` whose head (`heads_dim`) and token dimensions are swapped in
    memory and whose rows are padded: non-contiguous, unit stride in the last dimension only."""
    *lead, width = shape
    perm = list(range(len(lead)))
    perm[heads_dim], perm[heads_dim - 1] = perm[heads_dim - 1], perm[heads_dim]
    buf = torch.randn(*[lead[i] for i in perm], width + 8).to(dtype)
    q = buf[..., :width].permute(*perm, len(lead))
    assert q.shape == tuple(shape) and not q.is_contiguous() and q.stride(-1) == 1
    return q


def _interleaved(k_cache, v_cache):
    """k_cache and v_cache (P, page, H, D) as views of one (P, page, 2, H, D) buffer."""
    buf = torch.empty(*k_cache.shape[:2], 2, *k_cache.shape[2:], dtype=k_cache.dtype)
    buf[:, :, 0], buf[:, :, 1] = k_cache, v_cache
    k, v = buf[:, :, 0], buf[:, :, 1]
    assert not k.is_contiguous() and torch.equal(k.view(torch.uint8), k_cache.view(torch.uint8))
    return k, v


def _one_row(kv_cache, rope_cache):
    """kv_cache (P, page, H, D_v) and rope_cache (P, page, D_R) as views of one per-token row
    (P, page, H * D_v + D_R + 8), the last 8 columns someone else's (NaN)."""
    n_pool, page, heads, d_v = kv_cache.shape
    width = heads * d_v
    buf = torch.full((n_pool, page, width + rope_cache.shape[-1] + 8), float("nan"),
                     dtype=kv_cache.dtype)
    buf[..., :width] = kv_cache.flatten(2)
    buf[..., width:width + rope_cache.shape[-1]] = rope_cache
    kv, rope = buf[..., :width].unflatten(-1, (heads, d_v)), buf[..., width:-8]
    assert not kv.is_contiguous() and not rope.is_contiguous()
    return kv, rope


def _tied_truth(q_nope, q_rope, kv_real, rope_real, table, lengths, h_kv, query_lens=None):
    """fp64 (out, lse) of tied attention: decode's layout, or prefill's if `query_lens`."""
    d_nope, d_rope = q_nope.shape[-1], q_rope.shape[-1]
    keys, values = [], []
    for b, n in enumerate(lengths):
        state = gather_truth(kv_real, table, b, n)
        rope = gather_truth(rope_real, table, b, n)[:, None, :].expand(n, h_kv, d_rope)
        keys.append(torch.cat([state[..., :d_nope], rope], -1))
        values.append(state)
    q = torch.cat([q_nope, q_rope], -1)
    scale = 1 / math.sqrt(d_nope + d_rope)
    if query_lens is None:
        return attention_truth(q, keys, values, scale), scale
    return prefill_truth(q, query_lens, keys, values, scale), scale


def _plans(lengths, n_kv, query_len):
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return {"auto": None,
            "split": ops.plan_decode(seqlens, num_heads_kv=n_kv, query_len=query_len,
                                     split_tokens=FORCED_SPLIT)}


GARBAGE = [pytest.param(float("inf"), id="inf"), pytest.param(float("-inf"), id="-inf")]

# (lengths, L_q, H_q, H_kv, D, page, dtype): lengths one past 4 pages, exactly 4 pages, one
# token (its only page the shared one), one past 2 pages; every row reads the shared page.
DECODE_CASES = [
    pytest.param(([65, 64, 1, 33], 1, 4, 2, 32, 16, torch.bfloat16), id="len65-64-1-33-ratio2"),
    pytest.param(([16, 17, 131], 3, 6, 2, 32, 16, torch.float16), id="len16-17-131-lq3-ratio3"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_shared_pages_strided_operands(case, garbage):
    lengths, l_q, h_q, h_kv, dim, page, dtype = case
    table, n_pool = shared_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, dtype, garbage=garbage)
    v_cache, v_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, dtype, garbage=garbage)
    k_cache, v_cache = _interleaved(k_cache, v_cache)
    q = _strided_queries((len(lengths), l_q, h_q, dim), dtype, heads_dim=2)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth = attention_truth(q, [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                            [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)],
                            1 / math.sqrt(dim))
    baseline = ops.decode(q, k_cache, v_cache, table, seqlens, return_lse=True, backend="torch")
    check_out_lse("reference", baseline, truth, baseline)
    for name, plan in _plans(lengths, h_kv, l_q).items():
        got = ops.decode(*on_device(q, k_cache, v_cache, table, seqlens), return_lse=True,
                         plan=plan, backend="triton")
        check_out_lse(f"triton/{name}", got, truth, baseline)


# (lengths, L_q, H_q, H_kv, D_nope, D_v, D_R, page, dtype)
TIED_CASES = [
    pytest.param(([65, 3, 64], 2, 4, 1, 32, 64, 16, 16, torch.bfloat16), id="gta-like-len65-3-64-lq2"),
    pytest.param(([1, 129], 1, 4, 2, 64, 64, 16, 64, torch.float16), id="gla-like-len1-129-page64"),
]


@pytest.mark.parametrize("garbage", GARBAGE)
@pytest.mark.parametrize("case", TIED_CASES)
def test_decode_tied_shared_pages_strided_operands(case, garbage):
    lengths, l_q, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    table, n_pool = shared_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, dtype, garbage=garbage)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, dtype,
                                       garbage=garbage)
    kv_cache, rope_cache = _one_row(kv_cache, rope_cache)
    q = _strided_queries((len(lengths), l_q, h_q, d_nope + d_rope), dtype, heads_dim=2)
    q_nope, q_rope = q[..., :d_nope], q[..., d_nope:]
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    truth, scale = _tied_truth(q_nope, q_rope, kv_real, rope_real, table, lengths, h_kv)
    args = (q_nope, q_rope, kv_cache, rope_cache, table, seqlens)
    baseline = ops.decode_tied(*args, softmax_scale=scale, return_lse=True, backend="torch")
    check_out_lse("reference", baseline, truth, baseline)
    for name, plan in _plans(lengths, h_kv, l_q).items():
        got = ops.decode_tied(*on_device(*args), softmax_scale=scale, return_lse=True,
                              plan=plan, backend="triton")
        check_out_lse(f"triton/{name}", got, truth, baseline)


# Query lens and cache lens (page 16): 16 queries filling one page from position 0; 17
# queries over 81 tokens (crossing pages 4 and 5, one past 5 pages); one query one past 2
# pages; no queries over exactly 3 pages; a padding slot with no queries and no tokens.
PREFILL_LENS = ([16, 17, 1, 0, 0], [16, 81, 33, 48, 0])


@pytest.mark.parametrize("garbage", GARBAGE)
def test_prefill_page_edges_shared_pages_strided_operands(garbage):
    query_lens, lengths = PREFILL_LENS
    h_q, h_kv, d_qk, d_v, page, dtype = 4, 2, 32, 16, 16, torch.bfloat16
    table, n_pool = shared_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, d_qk), lengths, table, n_pool, page, dtype, garbage=garbage)
    # Values narrower than keys (the latent variants' expanded form): interleave V padded to D_qk.
    v_cache, v_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, dtype, garbage=garbage)
    v_wide = torch.full((*v_cache.shape[:3], d_qk), float("nan"), dtype=dtype)
    v_wide[..., :d_v] = v_cache
    k_cache, v_wide = _interleaved(k_cache, v_wide)
    v_cache = v_wide[..., :d_v]
    q = _strided_queries((sum(query_lens), h_q, d_qk), dtype, heads_dim=1)
    cu, seqlens = varlen(query_lens), torch.tensor(lengths, dtype=torch.int32)
    truth = prefill_truth(q, query_lens,
                          [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                          [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)],
                          1 / math.sqrt(d_qk))
    args = (q, k_cache, v_cache, table, cu, seqlens)
    baseline = ops.prefill(*args, return_lse=True, backend="torch")
    check_out_lse("reference", baseline, truth, baseline)
    for name, plan in (("no plan", None), ("plan", ops.plan_prefill(cu, seqlens))):
        got = ops.prefill(*on_device(*args), return_lse=True, plan=plan, backend="triton")
        check_out_lse(f"triton/{name}", got, truth, baseline)


# e4m3fn holds no inf: an fp8 cache's garbage is NaN (and no other tied prefill case is fp8).
@pytest.mark.parametrize("garbage, cache_dtype", [
    pytest.param(float("inf"), None, id="inf"), pytest.param(float("-inf"), None, id="-inf"),
    pytest.param(float("nan"), torch.float8_e4m3fn, id="fp8-nan")])
def test_prefill_tied_page_edges_shared_pages_strided_operands(garbage, cache_dtype):
    query_lens, lengths = PREFILL_LENS
    h_q, h_kv, d_nope, d_v, d_rope, page, dtype = 4, 1, 32, 64, 16, 16, torch.bfloat16
    kv_scale = 0.06 if cache_dtype is not None else None
    cache_dtype = cache_dtype or dtype
    table, n_pool = shared_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, cache_dtype,
                                   kv_scale, garbage=garbage)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, cache_dtype,
                                       kv_scale, garbage=garbage)
    kv_cache, rope_cache = _one_row(kv_cache, rope_cache)
    q = _strided_queries((sum(query_lens), h_q, d_nope + d_rope), dtype, heads_dim=1)
    q_nope, q_rope = q[..., :d_nope], q[..., d_nope:]
    cu, seqlens = varlen(query_lens), torch.tensor(lengths, dtype=torch.int32)
    truth, scale = _tied_truth(q_nope, q_rope, kv_real, rope_real, table, lengths, h_kv,
                               query_lens)
    args = (q_nope, q_rope, kv_cache, rope_cache, table, cu, seqlens)
    kw = dict(softmax_scale=scale, return_lse=True, kv_scale=kv_scale)
    baseline = ops.prefill_tied(*args, backend="torch", **kw)
    check_out_lse("reference", baseline, truth, baseline)
    got = ops.prefill_tied(*on_device(*args), plan=ops.plan_prefill(cu, seqlens),
                           backend="triton", **kw)
    check_out_lse("triton", got, truth, baseline)


def test_shared_table_shares_and_reuses():
    """The helper does what the tests above rely on."""
    table, n_pool = shared_table([65, 64, 1, 33, 0], 16)
    assert (table[:4, 0] == table[0, 0]).all() and (table[[0, 1, 3], 2] == table[0, 0]).all()
    assert 0 <= int(table[0, 0]) < n_pool and (table[4] >= n_pool).any()


def test_moving_to_the_test_device_keeps_the_layout():
    """What `on_device` relies on, checked with a CPU-to-CPU copy: views of one padded buffer
    come back as the same views of one new buffer, the padding's NaN with them."""
    buf = torch.full((3, 4, 10), float("nan"), dtype=torch.bfloat16)
    buf[..., :8] = torch.randn(3, 4, 8)
    kv, rope, q = buf[..., :6].unflatten(-1, (2, 3)), buf[..., 6:8], buf[..., :8].transpose(0, 1)
    moved = copied_with_layout(torch.device("cpu"), kv, rope, q, torch.arange(5))
    for old, new in zip((kv, rope, q, torch.arange(5)), moved):
        assert new.shape == old.shape and new.stride() == old.stride()
        assert new.storage_offset() == old.storage_offset() and torch.equal(new, old)
    assert moved[0].untyped_storage().data_ptr() == moved[2].untyped_storage().data_ptr()
    assert moved[0].untyped_storage().data_ptr() != kv.untyped_storage().data_ptr()
    whole = torch.empty(0, dtype=buf.dtype).set_(moved[0].untyped_storage(), 0, buf.shape)
    assert whole[..., 8:].isnan().all()


def test_store_from_views_of_a_fused_projection():
    """The new tokens as the engine hands them over: K and V as head slices of one fused
    (N, H_q + 2 H_kv, D) projection (rows strided), stored one cache at a time and as a pair,
    into NaN-filled caches at shuffled slots with padding: bit for bit the reference's, every
    other slot untouched."""
    n_tokens, page, h_q, h_kv, dim = 21, 16, 4, 2, 24
    fused = torch.randn(n_tokens, h_q + 2 * h_kv, dim).to(torch.bfloat16)
    k, v = fused[:, h_q:h_q + h_kv], fused[:, h_q + h_kv:]
    assert not k.is_contiguous() and k.stride(-1) == 1
    slots = torch.randperm(4 * page)[:n_tokens]
    slots[::5] = -1
    written = {}
    for backend in ("torch", "triton"):
        be = ops.get_backend(backend, torch.device(DEVICE))
        single = torch.full((4, page, h_kv, dim), float("nan")).to(torch.bfloat16).to(DEVICE)
        pair = tuple(torch.full((4, page, h_kv, dim), float("nan")).to(torch.bfloat16).to(DEVICE)
                     for _ in range(2))
        ops.store_kv(single, v.to(DEVICE), slots.to(DEVICE), backend=backend)
        be.store_kvs(pair, (k.to(DEVICE), v.to(DEVICE)), slots.to(DEVICE))
        written[backend] = [c.cpu() for c in (single, *pair)]
    keep = slots[slots >= 0]
    untouched = torch.ones(4 * page, dtype=torch.bool)
    untouched[keep] = False
    for ref, got, new in zip(written["torch"], written["triton"], (v, k, v)):
        torch.testing.assert_close(got.view(torch.uint8), ref.view(torch.uint8), rtol=0, atol=0)
        assert torch.equal(got.flatten(0, 1)[keep], new[slots >= 0])
        assert got.flatten(0, 1)[untouched].isnan().all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_store_into_a_cache_whose_pages_and_tokens_do_not_merge(backend):
    """A cache (P, page, H, D) viewed out of a token-major pool (page, P, H, D): the decode
    kernels read it through its strides, but the store (the reference, and the Triton
    backend's fallback for a non-contiguous cache) wrote through `cache.view(-1, ...)`, which
    fails for it with an opaque RuntimeError about view sizes and strides."""
    n_pool, page, h_kv, dim = 4, 16, 2, 8
    pool = torch.full((page, n_pool, h_kv, dim), float("nan"), device=DEVICE)
    cache = pool.transpose(0, 1)  # (P, page, H, D)
    new = torch.randn(5, h_kv, dim, device=DEVICE)
    slots = torch.tensor([3, -1, 17, 63, 32], device=DEVICE)
    ops.store_kv(cache, new, slots, backend=backend)
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:
            torch.testing.assert_close(cache[slot // page, slot % page], new[token],
                                       rtol=0, atol=0)
    assert cache.isnan().flatten(0, 1).all(-1).all(-1).sum() == n_pool * page - 4
