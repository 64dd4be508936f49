"""`hwattn bench decode` on CPU: its accounting, its SDPA baseline (which must agree with the
kernel it checks), and a clear error without a GPU."""

from __future__ import annotations

import pytest
import torch

from hwattn.bench import decode
from hwattn.bench.anchors import anchors_for, load_anchors
from hwattn.cli import main
from tests.ops.paged import DEVICE


def _wall_clock(fn, warmup=0, rep=0, return_mode="median"):
    fn()
    return 1.0  # ms; this checks the plumbing, not the speed


@pytest.mark.parametrize("variant, heads, l_q", [("gqa-2", 4, 2), ("gla-2", 8, 1), ("gta-2", 4, 3)])
def test_bench_case_checks_against_sdpa(variant, heads, l_q):
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant=variant, heads=heads, tp=1, batch=2, context=70, query_len=l_q, page=16)
    hopper = _hopper_backend()
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type, hopper=hopper)
    assert row["check_rel_err"] < 1e-2, row
    if hopper is not None and DEVICE.type == "cpu":  # the Hopper kernels take no CPU call
        expected = "separate K/V" if variant.startswith("gqa") else "not a CUDA tensor"
        assert expected in row["hopper_note"] and "hopper_us" not in row, row
    layer = decode.layer_for(variant, heads, 32, 16)
    assert row["bytes"] == 2 * layer.decode_bytes(70, l_q)
    assert row["flops"] == 2 * layer.decode_flops(70, l_q)
    assert row["us"] == 1000.0 and row["pct_roofline"] == pytest.approx(100 * row["roofline_us"] / 1000)


def test_hopper_columns_are_timed_and_checked(monkeypatch):
    """The Hopper backend's columns: its own plan, % of the same roofline, × Triton, checked
    against SDPA (on the CPU its calls run the Triton kernels; the plumbing is the same)."""
    hopper = _hopper_backend()
    if hopper is None:
        pytest.skip("Triton without Gluon")
    monkeypatch.setattr(decode.Inputs, "hopper_declines", lambda self: None)
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1)
    case = dict(variant="mla", heads=4, tp=1, batch=2, context=70, query_len=1, page=64)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type, hopper=hopper)
    assert row["hopper_us"] == 1000.0 and row["hopper_speedup_triton"] == 1.0, row
    assert row["hopper_pct_roofline"] == pytest.approx(row["pct_roofline"])
    assert row["hopper_check_rel_err"] < 1e-2 and "_hopper_out" not in row, row
    assert row["hopper_items"] and row["hopper_config"].startswith("ring"), row
    assert "Hopper µs" in decode.format_table([row], (1000.0, 100.0))


def _hopper_backend():
    try:
        from hwattn.ops.backends.hopper_backend import HopperBackend

        return HopperBackend()
    except ImportError:
        return None


@pytest.mark.parametrize("capability, expected", [((8, 0), "9.0"), ((9, 0), None)])
def test_hopper_column_says_why_it_is_missing(monkeypatch, capability, expected):
    pytest.importorskip("triton.experimental.gluon")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    why = decode.hopper_status(torch)
    assert why is None if expected is None else (expected in why and "Some GPU" in why)


def test_standard_suite_is_well_formed():
    cases = decode.standard_suite()
    assert {c["variant"] for c in cases} == {"gla-2", "mla", "gqa-4", "gta-4", "mqa"}
    for case in cases:
        layer = decode.layer_for(case["variant"], case["heads"], 128, 64)
        layer.local_heads(case["tp"])  # every per-rank shape exists


def test_cli_without_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "decode", "--variants", "gla-2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_anchors_are_data_with_provenance():
    sets = load_anchors()
    assert {s.gpu for s in sets} >= {"NVIDIA H100 80GB HBM3", "NVIDIA H200"}
    for s in sets:
        assert s.date and s.source and s.timings, s.name
    h100 = anchors_for("NVIDIA H100 80GB HBM3")
    assert h100.lookup("FlashMLA", "mla", 1, 16384) == 1022.6
    assert anchors_for("NVIDIA H200").lookup("FA3", "gla-2", 2, 16384) == 1090
    assert anchors_for("NVIDIA A100-SXM4-80GB") == sets[0]  # another GPU: the oldest reference
    case = dict(batch=128, heads=128, page=64, tp=1, cache_dtype="bf16", head_dim=128, rope_dim=64)
    assert h100.matches(case) and not h100.matches(dict(case, page=16))


def test_bench_case_prints_anchors_only_at_their_shape():
    anchors = anchors_for("NVIDIA H100 80GB HBM3")
    shape = dict(anchors.shape)
    fake = type(anchors)("test.json", anchors.gpu, anchors.date, anchors.source,
                         dict(shape, batch=2, heads=8, page=16, head_dim=32, rope_dim=16),
                         {("FA3", "gla-2", 1, 70): 5.0})
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_sdpa=True)
    case = dict(variant="gla-2", heads=8, tp=1, batch=2, context=70, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type, anchors=fake)
    assert row["anchor_FA3_us"] == 5.0
    assert "FA3 5" in decode.format_table([row], (1000.0, 100.0), fake)
    row = decode.bench_case(torch, _wall_clock, dict(case, page=8), options, (1000.0, 100.0), [],
                            device=DEVICE.type, anchors=fake)
    assert not any(k.startswith("anchor_") for k in row)


def test_programs_per_sm_sweep_times_each_plan_and_checks_it():
    """--programs-per-sm: the Triton kernel timed under each split-KV plan (B=1, L=1000 splits
    into more pieces the more programs per SM are wanted); the row's pick is checked against
    SDPA."""
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1,
                                   programs_per_sm=(1, 4), external=False)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=1, context=1000, query_len=1, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type)
    assert len(row["configs"]) == 2 and all("programs_per_sm=" in k for k in row["configs"])
    assert row["check_rel_err"] < 1e-2
    with pytest.raises(ValueError, match="programs_per_sm must be positive"):
        decode.DecodeOptions(programs_per_sm=(0,))


@pytest.mark.parametrize("variant, heads", [("gla-2", 8), ("gqa-2", 4)])
def test_fp8_rows_count_queries_and_outputs_in_bf16(variant, heads):
    """Over an fp8 cache the queries and the output stay bf16: the fewest bytes are the cache
    at one byte an element plus q and out at two (as benchmarks/hopper_decode.py counts)."""
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, cache_dtype="fp8", warmup_ms=1,
                                   rep_ms=1, no_sdpa=True, no_hopper=True, external=False)
    case = dict(variant=variant, heads=heads, tp=1, batch=2, context=70, query_len=2, page=16)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type)
    layer = decode.layer_for(variant, heads, 32, 16)
    d_qk, d_v = layer.decode_widths()
    q_and_out = 2 * heads * (d_qk + d_v) * 2  # L_q = 2 rows, bf16
    cache = 70 * layer.kv_bytes_per_token(1, torch.float8_e4m3fn)
    assert row["bytes"] == 2 * (cache + q_and_out)
    assert row["GBps"] == pytest.approx(row["bytes"] / row["us"] / 1e3)


def test_a_kernel_writing_nan_fails_the_run(monkeypatch, capsys):
    """A row whose output is NaN has a NaN relative error; NaN > limit is False, so the check
    must ask 'within the limit?', else the NaN kernel's time is published as a passing row."""
    real_kernel, real_case = decode.Inputs.kernel, decode.bench_case

    def nan_kernel(self, plan, config):
        fn = real_kernel(self, plan, config)
        return lambda: fn() * float("nan")

    def on_cpu(torch_, do_bench, case, options, peaks, configs, **kw):
        return real_case(torch_, _wall_clock, case, options, peaks, configs, device=DEVICE.type, **kw)

    monkeypatch.setattr(decode.Inputs, "kernel", nan_kernel)
    monkeypatch.setattr(decode, "bench_case", on_cpu)
    monkeypatch.setattr(decode, "measure_peaks", lambda torch_, do_bench: (1000.0, 100.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_hopper=True, external=False)
    case = dict(variant="gqa-2", heads=4, tp=1, batch=2, context=70, query_len=1, page=16)
    assert decode.run([case], options) == 1
    assert '"check_rel_err": NaN' in capsys.readouterr().out


def test_anchors_are_not_printed_beside_rows_of_other_head_widths():
    """The anchors were timed at d_h 128, d_R 64 (MLA's latent of 512, GLA-2's two of 256): a row
    at another --head-dim / --rope-dim (same batch, heads, page, TP, dtype) is another shape and
    gets no anchor beside it."""
    for s in load_anchors():
        assert (s.shape["head_dim"], s.shape["rope_dim"]) == (128, 64), s.name
    anchors = anchors_for("NVIDIA H100 80GB HBM3")
    fake = type(anchors)("test.json", anchors.gpu, anchors.date, anchors.source,
                         dict(anchors.shape, batch=2, heads=8, page=16, head_dim=128, rope_dim=64),
                         {("FA3", "gla-2", 1, 70): 5.0})
    case = dict(variant="gla-2", heads=8, tp=1, batch=2, context=70, query_len=1, page=16)
    for head_dim, rope_dim in ((32, 16), (128, 16)):
        options = decode.DecodeOptions(head_dim=head_dim, rope_dim=rope_dim, no_sdpa=True,
                                       no_hopper=True, external=False)
        row = decode.bench_case(torch, _wall_clock, case, options,
                                (1000.0, 100.0), [], device=DEVICE.type, anchors=fake)
        assert not any(k.startswith("anchor_") for k in row), (head_dim, rope_dim, row)


def _fake_gpu(monkeypatch, bench_case):
    monkeypatch.setattr(decode, "bench_case", bench_case)
    monkeypatch.setattr(decode, "measure_peaks", lambda torch_, do_bench: (1000.0, 100.0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def test_out_holds_every_row_measured_before_a_run_is_cut_off(monkeypatch, capsys, tmp_path):
    """`--out` was written once, after the last row: a sweep stopped by the session's time
    limit or Ctrl-C left no file (GPU sessions here end at 10 minutes a command)."""
    import json

    real_case = decode.bench_case

    def two_rows_then_cut(torch_, do_bench, case, options, peaks, configs, **kw):
        if case["batch"] == 3:
            raise KeyboardInterrupt
        return real_case(torch_, _wall_clock, case, options, peaks, configs, device=DEVICE.type,
                         **kw)

    _fake_gpu(monkeypatch, two_rows_then_cut)
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, no_hopper=True, external=False)
    cases = [dict(variant="gqa-2", heads=4, tp=1, batch=b, context=70, query_len=1, page=16)
             for b in (1, 2, 3)]
    out = tmp_path / "decode.json"
    out.write_text("an earlier run's document")
    with pytest.raises(KeyboardInterrupt):
        decode.run(cases, options, out=str(out))
    cut = json.loads(out.read_text())
    assert [r["batch"] for r in cut["rows"]] == [1, 2] and cut["complete"] is False
    assert cut["device"] == "Some GPU" and cut["copy_GBps"] == 1000.0
    assert [p.name for p in tmp_path.iterdir()] == ["decode.json"]  # no temporary left

    capsys.readouterr()
    assert decode.run(cases[:2], options, out=str(out)) == 0
    whole = json.loads(out.read_text())
    assert whole["complete"] is True and len(whole["rows"]) == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == whole  # stdout's last line
