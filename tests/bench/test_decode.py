"""`hwattn bench decode` on CPU: its accounting, its SDPA baseline (which must agree with the
kernel it checks), and a clear error without a GPU."""

from __future__ import annotations

import pytest
import torch

from hwattn.bench import decode, decode_cases, decode_table
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
    assert "Hopper µs" in decode_table.format_table([row], (1000.0, 100.0))


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
    cases = decode_cases.standard_suite()
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
    assert "FA3 5" in decode_table.format_table([row], (1000.0, 100.0), fake)
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


# --- uneven batches (--mixed) ----------------------------------------------------------------

MIXED = "131072x1+1024x63"


def test_mixed_specs_give_each_sequence_its_length_in_order():
    assert decode_cases.parse_mixed(MIXED) == [(MIXED, [131072] + [1024] * 63)]
    assert decode_cases.parse_mixed(" 70x2 + 5x1 ;9X3;") == [("70x2+5x1", [70, 70, 5]),
                                                       ("9x3", [9, 9, 9])]


@pytest.mark.parametrize("text, needle", [
    ("1024x0", "lengths and counts must be positive, got '1024x0'"),
    ("0x4+8x1", "lengths and counts must be positive, got '0x4'"),
    ("-5x2", "lengths and counts must be positive"),
    ("1024", "each term must be LENGTHxCOUNT"),
    ("1024x1+", "each term must be LENGTHxCOUNT"),
    ("128Kx1", "each term must be LENGTHxCOUNT"),
    ("4x2x2", "each term must be LENGTHxCOUNT"),
    (";", "names no batch"),
    ("4x2;4x2", "--mixed names 4x2 more than once"),
])
def test_a_bad_mixed_spec_is_named(text, needle):
    with pytest.raises(ValueError, match="--mixed") as err:
        decode_cases.parse_mixed(text)
    assert needle in str(err.value)


def _cli_cases(*argv) -> list[dict]:
    from hwattn.cli import bench_decode, build_parser

    args = build_parser().parse_args(["bench", "decode", *argv])
    bench_decode.check_args(args)
    return bench_decode.cases(args)


def _shape(case: dict) -> tuple:
    return case["variant"], case["batch"], case["context"], case["query_len"], case.get("mixed")


def test_mixed_cases_alone_or_beside_the_product():
    """--mixed alone times only its batches; with --batch or --context the product runs too
    (engine_check.sh's `small`: MLA and GLA-2 at B 1 and 4, L 32K, and 1 x 128K + 63 x 1K)."""
    alone = _cli_cases("--variants", "mla", "--mixed", MIXED, "--query-len", "1,2")
    assert [_shape(c) for c in alone] == [("mla", 64, 131072, l_q, MIXED) for l_q in (1, 2)]
    assert alone[0]["lengths"] == [131072] + [1024] * 63 and alone[0]["heads"] == 128
    small = _cli_cases("--variants", "mla,gla-2", "--batch", "1,4", "--context", "32768",
                       "--mixed", MIXED, "--query-len", "1", "--no-sdpa")
    assert [_shape(c) for c in small] == [
        (v, b, length, 1, spec) for v in ("mla", "gla-2")
        for b, length, spec in ((1, 32768, None), (4, 32768, None), (64, 131072, MIXED))]
    assert not any("lengths" in c for c in small if c["batch"] != 64)
    # one of --batch / --context given: the other at its default; specs repeated or ';'-joined
    some = _cli_cases("--variants", "mla", "--batch", "2", "--mixed", "9x3;4x1+2x1",
                      "--mixed", "5x1")
    assert [(c["batch"], c["context"], c.get("lengths")) for c in some] == [
        (2, 8192, None), (3, 9, [9, 9, 9]), (2, 4, [4, 2]), (1, 5, [5])]
    assert [_shape(c) for c in _cli_cases("--variants", "mla")] == [("mla", 128, 8192, 1, None)]


@pytest.mark.parametrize("argv, needle", [
    (["--mixed", "1024x0"], "--mixed '1024x0'"),
    (["--mixed", "4x1+1x2", "--query-len", "1,2"], "--mixed 4x1+1x2 has a sequence of 1 token(s), "
                                                    "shorter than --query-len 2"),
    (["--suite", "standard", "--mixed", MIXED], "--mixed only apply to --suite custom"),
    # given at the default value, still not silently ignored
    (["--suite", "standard", "--batch", "128"], "--batch only apply to --suite custom"),
])
def test_cli_refuses_a_mixed_batch_it_cannot_time(capsys, argv, needle):
    assert main(["bench", "decode", "--variants", "mla", *argv]) == 2
    err = capsys.readouterr().err
    assert "hwattn bench decode: error:" in err and needle in err, err


def _mixed_case(variant, heads, l_q, spec="150x1+20x2+33x1", page=16):
    ((spec, lengths),) = decode_cases.parse_mixed(spec)
    (case,) = decode_cases.product_suite([variant], heads, [1], [], [], [l_q], [page], [(spec, lengths)])
    return case


@pytest.mark.parametrize("variant, heads, l_q", [("gqa-2", 4, 2), ("gla-2", 8, 2), ("mla", 4, 1)])
def test_uneven_inputs_own_their_pages_and_sdpa_matches_the_reference(variant, heads, l_q):
    """Each sequence holds the pages its own length needs, none shared, all in the pool; the
    SDPA baseline (one call per distinct length) agrees with the plain paged reference, which
    reads each sequence at its own length."""
    from hwattn.ops.reference import decode_reference, decode_tied_reference

    case = _mixed_case(variant, heads, l_q)
    lengths = case["lengths"]
    layer = decode.layer_for(variant, heads, 32, 16)
    inputs = decode.Inputs(torch, layer, case, torch.bfloat16, device="cpu")
    assert inputs.seqlens.dtype == torch.int32 and inputs.seqlens.tolist() == lengths
    pages = [-(-n // 16) for n in lengths]  # 10, 2, 2, 3
    assert inputs.block_table.shape == (4, max(pages))
    owned = [p for b, n in enumerate(pages) for p in inputs.block_table[b, :n].tolist()]
    n_pool = inputs.caches[0].shape[0]
    assert len(set(owned)) == len(owned) == sum(pages) and n_pool == sum(pages) + 7
    assert 0 <= int(inputs.block_table.min()) and int(inputs.block_table.max()) < n_pool
    assert all(c.shape[0] == n_pool for c in inputs.caches)

    fn, unpack = inputs.sdpa(torch)
    out = unpack(fn())
    reference = decode_tied_reference if inputs.tied else decode_reference
    ref, _ = reference(*inputs.queries, *inputs.caches, inputs.block_table, inputs.seqlens,
                       layer.scale)
    assert out.shape == ref.shape
    assert decode._rel_err(out, ref) < 1e-2
    # the check notices lengths: every sequence read to the longest (as a uniform batch's
    # baseline reads them) gives another answer
    uniform = decode.Inputs.__new__(decode.Inputs)
    uniform.__dict__.update(inputs.__dict__, lengths=[max(lengths)] * len(lengths))
    wrong_fn, wrong_unpack = uniform.sdpa(torch)
    assert decode._rel_err(wrong_unpack(wrong_fn()), ref) > 0.1


@pytest.mark.parametrize("variant, heads, l_q", [("gla-2", 8, 2), ("gqa-2", 4, 1)])
def test_an_uneven_batch_is_timed_and_checked_end_to_end(variant, heads, l_q):
    """A mixed case through `bench_case` (the Triton kernel under the interpreter): the byte
    floor and FLOPs are sums over the sequences, not B times the longest, the kernel agrees
    with SDPA at each sequence's length, and the table prints the spec as L."""
    options = decode.DecodeOptions(head_dim=32, rope_dim=16, warmup_ms=1, rep_ms=1,
                                   no_hopper=True, external=False)
    case = _mixed_case(variant, heads, l_q)
    row = decode.bench_case(torch, _wall_clock, case, options, (1000.0, 100.0), [],
                            device=DEVICE.type)
    layer = decode.layer_for(variant, heads, 32, 16)
    lengths = [150, 20, 20, 33]
    assert row["lengths"] == lengths and row["mixed"] == "150x1+20x2+33x1" and row["batch"] == 4
    assert row["bytes"] == sum(layer.decode_bytes(n, l_q) for n in lengths)
    assert row["flops"] == sum(layer.decode_flops(n, l_q) for n in lengths)
    assert row["bytes"] < 4 * layer.decode_bytes(150, l_q)
    assert row["check_rel_err"] < 1e-2, row
    table = decode_table.format_table([row, dict(case, batch=2, error="RuntimeError: x")],
                                (1000.0, 100.0))
    assert " 150x1+20x2+33x1 " in table and "L=150x1+20x2+33x1" in table
    assert "an uneven batch" in table
    head, line = table.splitlines()[1:3]
    assert line.index("150x1+20x2+33x1") + len("150x1+20x2+33x1") == head.index(" Lq")
