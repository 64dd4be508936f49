"""Variable-length paged prefill: the Triton kernel (interpreted on CPU) and the PyTorch
reference against an fp64 truth, over awkward shapes and hostile cache data (see `paged.py`).

Each case is a batch of sequences, each with its own number of query tokens (the last ones of
its cached tokens) and its own cached prefix; the queries are packed as rows (N, H_q, D).
Tolerances are derived (tests/conftest.py): each backend may be off the truth by a small
multiple of the error the reference makes in the same dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

from hwattn import ops
from tests.ops.paged import (attention_truth, check_out_lse, fill_cache, gather_truth, on_device,
                              paged_table)

FP8 = torch.float8_e4m3fn


def prefill_truth(q: torch.Tensor, query_lens: list[int], keys: list[torch.Tensor],
                  values: list[torch.Tensor], scale: float):
    """fp64 (out (N, H_q, E_v), lse (H_q, N)): `attention_truth` one sequence at a time on its
    rows of the packed queries q (N, H_q, E)."""
    n_heads, d_v = q.shape[1], values[0].shape[-1]
    out = torch.full((q.shape[0], n_heads, d_v), float("nan"), dtype=torch.float64)
    lse = torch.full((n_heads, q.shape[0]), float("nan"), dtype=torch.float64)
    start = 0
    for b, n in enumerate(query_lens):
        if n:
            o, l = attention_truth(q[start:start + n][None], [keys[b]], [values[b]], scale)
            out[start:start + n], lse[:, start:start + n] = o[0], l[0]
        start += n
    return out, lse


def varlen(query_lens: list[int]):
    return torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)


# (query lens, cache lens, H_q, H_kv, D_qk, D_v, page, dtype, cache dtype)
SEPARATE_CASES = [
    pytest.param(([1], [1], 4, 4, 64, 64, 16, torch.bfloat16, None), id="q1-prefix0-ratio1"),
    pytest.param(([37], [37], 8, 2, 64, 64, 16, torch.bfloat16, None), id="prime37-prefix0-ratio4"),
    pytest.param(([15, 17], [15, 81], 4, 1, 32, 32, 16, torch.bfloat16, None), id="page-1-page+1-ratioall"),
    pytest.param(([5, 0, 23, 1], [5, 40, 150, 97], 8, 2, 64, 64, 16, torch.float16, None),
                 id="four-seqs-one-empty-fp16"),
    pytest.param(([63, 65], [63, 200], 2, 2, 32, 32, 64, torch.bfloat16, None), id="page64-prefix-long"),
    pytest.param(([13, 3], [13, 70], 4, 1, 48, 32, 16, torch.float32, None), id="dqk48-dv32-fp32"),
    pytest.param(([11, 29], [40, 29], 4, 4, 96, 64, 64, torch.bfloat16, None), id="expanded-mla-like-d96-64"),
    pytest.param(([9], [50], 4, 2, 64, 64, 1, torch.bfloat16, None), id="page1"),
    pytest.param(([7, 19], [30, 19], 4, 2, 64, 64, 16, torch.bfloat16, FP8), id="fp8-cache"),
]

# (query lens, cache lens, H_q, H_kv, D_nope, D_v, D_R, page, dtype)
TIED_CASES = [
    pytest.param(([17, 1, 0], [17, 64, 30], 4, 1, 32, 64, 32, 16, torch.bfloat16), id="gta-like-dnope32-dv64"),
    pytest.param(([31, 2], [96, 2], 8, 2, 64, 128, 64, 64, torch.bfloat16), id="gta-xl-widths-page64"),
    pytest.param(([3, 13], [67, 13], 4, 1, 512, 512, 64, 16, torch.bfloat16), id="mla-like-dv512-dr64"),
    pytest.param(([16, 5], [16, 33], 4, 2, 128, 128, 32, 16, torch.float16), id="gla-like-d128-fp16"),
    pytest.param(([1, 1, 1], [9, 47, 1], 6, 2, 48, 64, 16, 16, torch.float32), id="decode-rows-ratio3-fp32"),
]


@pytest.mark.parametrize("case", SEPARATE_CASES)
def test_prefill_matches_fp64(case):
    query_lens, lengths, h_q, h_kv, d_qk, d_v, page, dtype, cache_dtype = case
    cache_dtype = cache_dtype or dtype
    scales = (0.05, 0.07) if cache_dtype == FP8 else (None, None)
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, d_qk), lengths, table, n_pool, page, cache_dtype, scales[0])
    v_cache, v_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, cache_dtype, scales[1])
    q = torch.randn(sum(query_lens), h_q, d_qk).to(dtype)
    cu, seqlens = varlen(query_lens), torch.tensor(lengths, dtype=torch.int32)
    scale = 1 / math.sqrt(d_qk)
    truth = prefill_truth(q, query_lens,
                          [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                          [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)], scale)
    kw = dict(return_lse=True, k_scale=scales[0], v_scale=scales[1])
    baseline = ops.prefill(q, k_cache, v_cache, table, cu, seqlens, backend="torch", **kw)
    check_out_lse("reference", baseline, truth, baseline)
    plan = ops.plan_prefill(cu, seqlens)
    for name, p in (("no plan", None), ("plan", plan)):
        got = ops.prefill(*on_device(q, k_cache, v_cache, table, cu, seqlens), backend="triton",
                          plan=p, **kw)
        check_out_lse(f"triton/{name}", got, truth, baseline)


# Per-head keys beside one shared RoPE key, values of their own (`v_cache`: MLA / GLA expanded).
# (query lens, cache lens, H_q, H_kv, D_nope, D_v, D_R, page, dtype)
SPLIT_CASES = [
    # Key and value of one padded width: the one-tile shortcut of tied states must not apply.
    pytest.param(([11, 29], [40, 29], 4, 4, 64, 64, 32, 16, torch.bfloat16), id="expanded-like-d64-dr32"),
    pytest.param(([31, 2, 0], [96, 2, 7], 4, 4, 128, 128, 64, 64, torch.bfloat16), id="xl-widths-page64"),
    pytest.param(([5, 9], [70, 9], 8, 2, 32, 48, 16, 16, torch.float16), id="ratio4-dv48-fp16"),
    pytest.param(([1, 1], [33, 1], 2, 2, 48, 16, 16, 1, torch.float32), id="decode-rows-page1-fp32"),
]


@pytest.mark.parametrize("case, split", [pytest.param(p.values[0], False, id=p.id) for p in TIED_CASES]
                         + [pytest.param(p.values[0], True, id=f"values-{p.id}") for p in SPLIT_CASES])
def test_prefill_tied_matches_fp64(case, split):
    """Tied states (keys [S[..., :D_nope], R], values S) or, `split`, keys [K_nope, R] with
    values V of their own."""
    query_lens, lengths, h_q, h_kv, d_nope, d_v, d_rope, page, dtype = case
    table, n_pool = paged_table(lengths, page)
    kv_cache, kv_real = fill_cache((h_kv, d_nope if split else d_v), lengths, table, n_pool, page, dtype)
    rope_cache, rope_real = fill_cache((d_rope,), lengths, table, n_pool, page, dtype)
    v_cache, v_real = fill_cache((h_kv, d_v), lengths, table, n_pool, page, dtype) if split \
        else (None, kv_real)
    n = sum(query_lens)
    q_nope, q_rope = torch.randn(n, h_q, d_nope).to(dtype), torch.randn(n, h_q, d_rope).to(dtype)
    cu, seqlens = varlen(query_lens), torch.tensor(lengths, dtype=torch.int32)
    scale = 1 / math.sqrt(d_nope + d_rope)
    keys, values = [], []
    for b, length in enumerate(lengths):
        rope = gather_truth(rope_real, table, b, length)[:, None, :].expand(length, h_kv, d_rope)
        keys.append(torch.cat([gather_truth(kv_real, table, b, length)[..., :d_nope], rope], -1))
        values.append(gather_truth(v_real, table, b, length))
    truth = prefill_truth(torch.cat([q_nope, q_rope], -1), query_lens, keys, values, scale)
    args = (q_nope, q_rope, kv_cache, rope_cache, table, cu, seqlens)
    baseline = ops.prefill_tied(*args, softmax_scale=scale, return_lse=True, backend="torch",
                                v_cache=v_cache)
    check_out_lse("reference", baseline, truth, baseline)
    *device_args, device_v = on_device(*args, v_cache if split else kv_cache)
    got = ops.prefill_tied(*device_args, softmax_scale=scale, return_lse=True,
                           v_cache=device_v if split else None,
                           plan=ops.plan_prefill(cu, seqlens), backend="triton")
    check_out_lse("triton", got, truth, baseline)


def test_a_backend_from_before_v_cache_gets_split_values_through_prefill():
    """A backend registered from outside whose run_prefill_tied predates `v_cache` is given
    the call through its run_prefill, over keys [K_nope, R] built per head."""
    from hwattn.ops.backends.torch_backend import TorchBackend

    class Older(TorchBackend):
        name = "older"
        calls: list = []

        def run_prefill_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table,
                             cu_seqlens_q, cache_seqlens, *, softmax_scale, plan, kv_scale):
            self.calls.append("tied")
            return super().run_prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                            cu_seqlens_q, cache_seqlens,
                                            softmax_scale=softmax_scale, plan=plan,
                                            kv_scale=kv_scale)

        def run_prefill(self, *args, **kwargs):
            self.calls.append("separate")
            return super().run_prefill(*args, **kwargs)

    lengths, query_lens, h_kv = [40, 9], [7, 9], 2
    table, n_pool = paged_table(lengths, 16)
    k_cache, _ = fill_cache((h_kv, 32), lengths, table, n_pool, 16, torch.float32)
    rope_cache, _ = fill_cache((16,), lengths, table, n_pool, 16, torch.float32)
    v_cache, _ = fill_cache((h_kv, 24), lengths, table, n_pool, 16, torch.float32)
    q_nope, q_rope = torch.randn(16, 4, 32), torch.randn(16, 4, 16)
    args = (q_nope, q_rope, k_cache, rope_cache, table, varlen(query_lens),
            torch.tensor(lengths, dtype=torch.int32))
    want = ops.prefill_tied(*args, v_cache=v_cache, return_lse=True, backend="torch")
    older = Older()
    got = older.prefill_tied(*args, v_cache=v_cache, return_lse=True)
    assert older.calls == ["separate"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    older.prefill_tied(*args)  # without values of their own: its tied kernel, as before
    assert older.calls == ["separate", "tied"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_prefill_tied_refuses_values_that_do_not_fit(backend):
    table, n_pool = paged_table([20], 16)
    k_cache, _ = fill_cache((2, 32), [20], table, n_pool, 16, torch.float32)
    rope_cache, _ = fill_cache((16,), [20], table, n_pool, 16, torch.float32)
    q_nope, q_rope = torch.randn(20, 4, 32), torch.randn(20, 4, 16)
    cu, seqlens = varlen([20]), torch.tensor([20], dtype=torch.int32)
    args = (q_nope, q_rope, k_cache, rope_cache, table, cu, seqlens)
    wrong = [(torch.randn(n_pool, 16, 1, 32), "v_cache must be"),  # other heads
             (torch.randn(n_pool + 1, 16, 2, 32), "v_cache must be"),  # other pages
             (torch.randn(n_pool, 16, 2, 0), "v_cache must be"),
             (torch.randn(n_pool, 16, 2, 32, dtype=torch.float64), "v_cache dtype"),
             (k_cache.numpy(), "v_cache must be a tensor")]
    for v_cache, message in wrong:
        with pytest.raises(ValueError, match=message):
            ops.prefill_tied(*args, v_cache=v_cache, backend=backend)


@pytest.mark.parametrize("block_m, block_n, page", [(16, 64, 16), (64, 32, 64), (128, 16, 1)],
                         ids=["bm16-bn64-page16", "bm64-bn32-page64", "bm128-bn16-page1"])
def test_other_tiles(block_m, block_n, page):
    """The GPU's tile shapes: a key block spanning several pages, one inside a page, query
    tiles of one head and of many."""
    from hwattn.ops import triton_prefill

    query_lens, lengths, h_q, h_kv, dim = [70, 3, 1], [70, 99, 130], 8, 2, 64
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    v_cache, v_real = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.randn(sum(query_lens), h_q, dim).to(torch.bfloat16)
    cu, seqlens = varlen(query_lens), torch.tensor(lengths, dtype=torch.int32)
    truth = prefill_truth(q, query_lens,
                          [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)],
                          [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)], 0.125)
    baseline = ops.prefill(q, k_cache, v_cache, table, cu, seqlens, softmax_scale=0.125,
                           return_lse=True, backend="torch")
    config = triton_prefill.PrefillConfig(block_m=block_m, block_n=block_n, num_warps=4)
    got = triton_prefill.prefill(*on_device(q, k_cache, v_cache, table, cu, seqlens),
                                 softmax_scale=0.125, plan=ops.plan_prefill(cu, seqlens),
                                 config=config)
    check_out_lse(f"block_m={block_m} block_n={block_n}", got, truth, baseline)


def test_rows_of_equal_length_equal_decode():
    """Sequences that all have L_q queries: prefill gives decode's output and LSE, re-laid out
    (out (B, L_q, H, D) -> (B·L_q, H, D); lse (B, H, L_q) -> (H, B·L_q))."""
    lengths, l_q, h_q, h_kv, dim, page = [9, 40, 3], 3, 4, 2, 32, 16
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.float32)
    v_cache, _ = fill_cache((h_kv, dim), lengths, table, n_pool, page, torch.float32)
    q = torch.randn(len(lengths), l_q, h_q, dim)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    dec_out, dec_lse = ops.decode(q, k_cache, v_cache, table, seqlens, return_lse=True,
                                  backend="torch")
    for backend in ("torch", "triton"):
        args = on_device(q.flatten(0, 1), k_cache, v_cache, table, varlen([l_q] * 3), seqlens)
        out, lse = (t.cpu() for t in ops.prefill(*args, return_lse=True, backend=backend))
        torch.testing.assert_close(out, dec_out.flatten(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, dec_lse.permute(1, 0, 2).flatten(1), rtol=1e-5, atol=1e-5)


def test_no_query_rows():
    """A step whose sequences have no queries returns empty results without launching."""
    lengths, page = [5, 9], 16
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((1, 32), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.empty(0, 2, 32, dtype=torch.bfloat16)
    for backend in ("torch", "triton"):
        out, lse = ops.prefill(*on_device(q, k_cache, k_cache, table, varlen([0, 0]),
                                           torch.tensor(lengths, dtype=torch.int32)),
                               return_lse=True, backend=backend)
        assert out.shape == (0, 2, 32) and lse.shape == (2, 0)


def test_plan_reads_the_lengths_once():
    plan = ops.plan_prefill(torch.tensor([0, 3, 3, 10], dtype=torch.int32), [5, 2, 7])
    assert (plan.query_lens, plan.seqlens) == ((3, 0, 7), (5, 2, 7))
    assert (plan.batch, plan.total_q, plan.max_seqlen_q, plan.max_seqlen_k) == (3, 10, 7, 7)
    assert plan.cu_seqlens_q == [0, 3, 3, 10]
    for cu, lens, name in (([1, 3], [3], "start at 0"), ([0, 3, 2], [3, 3], "non-decreasing"),
                           ([0, 4], [3], "sequence 0"), ([0, 1], [1, 1], "B \\+ 1"),
                           ([0], [], "at least one")):
        with pytest.raises(ValueError, match=name):
            ops.plan_prefill(cu, lens)


def test_tuned_tiles_match_the_shipped_layers(monkeypatch):
    """The tile table measured on the GPU is keyed by the padded widths of the xl layers'
    prefill forms: if a layer's widths change, its tuned tile must be measured again."""
    from hwattn.bench.decode import layer_for
    from hwattn.ops import triton_prefill
    from hwattn.ops.triton_decode import pad_width

    monkeypatch.setattr(triton_prefill, "interpreting", lambda: False)
    widths = set()
    for variant in ("gqa-4", "gta-4", "gla-2", "mla"):
        for form in layer_for(variant, 16, 128, 64).prefill_forms():
            d_qk = form.query_shapes(1)[0][-1]
            caches = form.cache_shapes()
            # Values: the last cache of an untied or split call, the state of a tied one.
            d_v = caches[0][-1] if form.tied and not form.split_values else caches[-1][-1]
            d_rope = pad_width(form.d_rope) if form.tied else 0
            widths.add((pad_width(d_qk), pad_width(d_v), d_rope))
    assert widths == set(triton_prefill._TUNED) | {(512, 512, 64)}  # MLA absorbed: its default
    for key, config in triton_prefill._TUNED.items():
        assert triton_prefill.choose_prefill_config(*key) is config
    assert triton_prefill.choose_prefill_config(512, 512, 64).block_n == 32
