"""The external-kernel adapters of `hwattn bench decode`, on CPU, against stand-ins.

`fake_external` implements FlashMLA's and FA3's documented semantics in plain PyTorch; fed the
adapters' converted operands, they must give what hwattn's reference gives on our own layout, on
hostile paged data (shuffled pages, NaN in every slot no sequence owns, out-of-range table
entries past each sequence, uneven lengths, L_q = 2). The real libraries need an sm_90 GPU and
are not run here.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

from hwattn.bench import decode, external
from hwattn.cli import main
from hwattn.ops.reference import decode_reference, decode_tied_reference
from tests.bench.fake_external import fa3_module, flash_mla_module
from tests.ops.paged import attention_truth, fill_cache, gather_truth, paged_table, tied_case

LENGTHS = [70, 2, 129]  # uneven, one shorter than a page, one a page past two pages of 64


def _rel(out, ref) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _tied(variant):
    if variant == "mla":  # one latent of 512 + RoPE 64 on pages of 64: FlashMLA's shapes
        return tied_case(LENGTHS, 2, 4, 1, 512, 512, 64, 64, torch.bfloat16)
    return tied_case([37, 2, 50], 2, 8, 2, 64, 64, 32, 16, torch.bfloat16)  # GLA-2


def _separate_case(lengths=(37, 2, 50), l_q=2, h_q=8, h_kv=2, d=32, page=16):
    """GQA-4 on hostile paged K/V caches: operands, and the fp64 truth."""
    lengths = list(lengths)
    table, n_pool = paged_table(lengths, page)
    k_cache, k_real = fill_cache((h_kv, d), lengths, table, n_pool, page, torch.bfloat16)
    v_cache, v_real = fill_cache((h_kv, d), lengths, table, n_pool, page, torch.bfloat16)
    q = torch.randn(len(lengths), l_q, h_q, d).to(torch.bfloat16)
    scale = 1 / math.sqrt(d)
    keys = [gather_truth(k_real, table, b, n) for b, n in enumerate(lengths)]
    values = [gather_truth(v_real, table, b, n) for b, n in enumerate(lengths)]
    return dict(queries=(q,), caches=(k_cache, v_cache), table=table,
                seqlens=torch.tensor(lengths, dtype=torch.int32), scale=scale,
                truth=attention_truth(q, keys, values, scale)[0])


def _operands(variant):
    """(queries, caches, table, seqlens, scale, our reference's out, fp64 truth)."""
    if variant == "gqa-4":
        c = _separate_case()
        ref, _ = decode_reference(c["queries"][0], *c["caches"], c["table"], c["seqlens"], c["scale"])
        return c["queries"], c["caches"], c["table"], c["seqlens"], c["scale"], ref, c["truth"]
    c = _tied(variant)
    ref, _ = decode_tied_reference(c["q_nope"], c["q_rope"], c["kv_cache"], c["rope_cache"],
                                   c["table"], c["seqlens"], c["softmax_scale"])
    return ((c["q_nope"], c["q_rope"]), (c["kv_cache"], c["rope_cache"]), c["table"], c["seqlens"],
            c["softmax_scale"], ref, c["truth"][0])


MODULES = {"FlashMLA": flash_mla_module, "FA3": fa3_module}


@pytest.mark.parametrize("name, variant", [("FlashMLA", "mla"), ("FA3", "mla"), ("FA3", "gla-2"),
                                           ("FA3", "gqa-4")])
def test_adapter_matches_our_reference_on_hostile_pages(name, variant):
    queries, caches, table, seqlens, scale, ref, truth = _operands(variant)
    call = external.build(name, MODULES[name](), queries, caches, table, seqlens, scale)
    out = call.to_ours(call.run())
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "read a slot no sequence owns (NaN there)"
    # Both run bf16 operands in fp32 and round the output to bf16: the same error against the
    # fp64 truth, up to summation order.
    assert _rel(out, truth) <= 2 * _rel(ref, truth) + 1e-6, (_rel(out, truth), _rel(ref, truth))
    assert _rel(out, ref) < 1e-2


def test_fa3_without_a_schedule_function_still_runs():
    queries, caches, table, seqlens, scale, ref, _ = _operands("gla-2")
    call = external.fa3_call(fa3_module(with_schedule=False), queries, caches, table, seqlens, scale)
    assert _rel(call.to_ours(call.run()), ref) < 1e-2


def test_conversion_mistakes_are_caught():
    """The comparison sees a wrong page mapping and swapped score terms (it can fail)."""
    queries, caches, table, seqlens, scale, ref, _ = _operands("gla-2")
    swapped = table[[1, 0, 2]].contiguous()
    swapped_lens = seqlens[[1, 0, 2]].contiguous()
    call = external.fa3_call(fa3_module(), queries, caches, swapped, swapped_lens, scale)
    out = call.to_ours(call.run())
    assert not torch.isfinite(out).all() or _rel(out, ref) > 0.1
    wrong_rope = (queries[0], queries[1].flip(-1))
    call = external.fa3_call(fa3_module(), wrong_rope, caches, table, seqlens, scale)
    assert _rel(call.to_ours(call.run()), ref) > 0.05


def test_layout_views_and_copies():
    """MLA's caches reach FA3 as views of ours; GLA's RoPE cache is copied per KV head."""
    seen = {}

    def spy(q, k_cache, v_cache, **kw):
        seen.update(k=k_cache, v=v_cache)
        return q

    module = fa3_module(with_schedule=False)
    module.flash_attn_with_kvcache = spy
    for variant in ("mla", "gla-2"):
        queries, caches, table, seqlens, scale, _, _ = _operands(variant)
        call = external.fa3_call(module, queries, caches, table, seqlens, scale)
        call.run()
        assert seen["v"].data_ptr() == caches[0].data_ptr()
        shares = seen["k"].data_ptr() == caches[1].data_ptr()
        assert shares == (variant == "mla") and bool(call.converted) == (variant != "mla"), variant


@pytest.mark.parametrize("name, variant, why", [
    ("FlashMLA", "gla-2", "one latent of 512"), ("FlashMLA", "gqa-4", "MLA only"),
    ("FA3", "gta", "GTA"), ("FlashMLA", "gta", "GTA")])
def test_cases_without_an_external_call_say_why(name, variant, why):
    if variant == "gta":  # the state's first 48 dims are the key's un-rotated part
        c = tied_case([20, 9], 1, 4, 2, 48, 64, 16, 16, torch.bfloat16)
        args = ((c["q_nope"], c["q_rope"]), (c["kv_cache"], c["rope_cache"]), c["table"],
                c["seqlens"], c["softmax_scale"])
    else:
        args = _operands(variant)[:5]
    with pytest.raises(external.Unsupported, match=why):
        external.build(name, MODULES[name](), *args)


def test_fp8_cache_is_declined():
    queries, caches, table, seqlens, scale, _, _ = _operands("gqa-4")
    fp8 = tuple(c.to(torch.float8_e4m3fn) for c in caches)
    with pytest.raises(external.Unsupported, match="float8"):
        external.build("FA3", fa3_module(), queries, fp8, table, seqlens, scale, cache_scale=0.05)
    with pytest.raises(ValueError, match="name must be one of"):
        external.build("FlashInfer", None, queries, caches, table, seqlens, scale)


def _install(monkeypatch, flash_mla=None, fa3=None):
    """Put the stand-ins (or None: 'not importable') where `import` finds them."""
    monkeypatch.setitem(sys.modules, "flash_mla", flash_mla)
    monkeypatch.setitem(sys.modules, "flash_attn_interface", fa3)


def test_available_reports_versions_and_missing_packages(monkeypatch):
    _install(monkeypatch, fa3=fa3_module("3.0.0b1"))
    status = external.available()
    assert status["FA3"] == external.Availability("3.0.0b1", None)
    assert status["FlashMLA"].version is None and "flash_mla does not import" in status["FlashMLA"].why
    assert set(external.load()) == {"FA3"}
    modules, line = decode.external_kernels(decode.DecodeOptions())
    assert set(modules) == {"FA3"} and "FA3 3.0.0b1" in line and "FlashMLA not timed" in line
    assert decode.external_kernels(decode.DecodeOptions(external=False)) == (
        {}, "external kernels in this process: skipped (--no-external)")


def _wall_clock(fn, warmup=0, rep=0, return_mode="median"):
    fn()
    return 1.0  # ms; this checks the plumbing, not the speed


def test_bench_times_what_imports_and_skips_the_rest(monkeypatch):
    """A row on the CPU: FA3 (a stand-in) timed and checked against SDPA, FlashMLA absent (not
    importable) without a trace, and the table gets FA3's columns."""
    _install(monkeypatch, fa3=fa3_module())
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant="gla-2", heads=8, tp=1, batch=2, context=70, query_len=2, page=16)
    modules, _ = decode.external_kernels(options)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=modules)
    assert row["ext_FA3_us"] == 1000.0 and row["ext_FA3_ratio"] == 1.0, row
    assert row["ext_FA3_rel_err"] < 1e-2 and row["check_rel_err"] < 1e-2, row
    assert not any(k.startswith("ext_FlashMLA") for k in row), row
    table = decode.format_table([row], (1000.0, 100.0))
    assert "FA3 µs" in table and "hw/FA3" in table and "FlashMLA" not in table


def test_bench_row_says_why_an_importable_kernel_has_no_call(monkeypatch):
    _install(monkeypatch, flash_mla=flash_mla_module())
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_sdpa=True)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=2, context=40, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external=external.load())
    assert "MLA only" in row["ext_FlashMLA_note"] and "ext_FlashMLA_us" not in row, row
    assert "FlashMLA" not in decode.format_table([row], (1000.0, 100.0))


def test_a_failing_external_call_is_recorded_not_raised(monkeypatch):
    broken = fa3_module()

    def fail(*args, **kwargs):
        raise RuntimeError("no kernel for this head dim")

    broken.flash_attn_with_kvcache = fail
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_sdpa=True)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=2, context=40, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device="cpu", external={"FA3": broken})
    assert "no kernel for this head dim" in row["ext_FA3_error"] and "ext_FA3_us" not in row
    assert "error" in decode.format_table([row], (1000.0, 100.0))


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-external"], False),
                                            (["--external"], True)])
def test_cli_external_flag(monkeypatch, flag, expected):
    seen = {}
    monkeypatch.setattr(decode, "run", lambda cases, options, configs, out=None:
                        seen.setdefault("options", options) and 0)
    assert main(["bench", "decode", "--variants", "mla", *flag]) == 0
    assert seen["options"].external is expected
