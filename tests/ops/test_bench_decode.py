"""`hwattn bench decode` on CPU: its accounting, its SDPA baseline (which must agree with the
kernel it checks), and a clear error without a GPU."""

from __future__ import annotations

import argparse

import pytest
import torch

from hwattn.cli import bench_decode, main
from tests.ops.paged import DEVICE


def _wall_clock(fn, warmup=0, rep=0, return_mode="median"):
    fn()
    return 1.0  # ms; this checks the plumbing, not the speed


@pytest.mark.parametrize("variant, heads, l_q", [("gqa-2", 4, 2), ("gla-2", 8, 1), ("gta-2", 4, 3)])
def test_bench_case_checks_against_sdpa(variant, heads, l_q):
    args = argparse.Namespace(cache_dtype="bf16", head_dim=32, rope_dim=16, no_sdpa=False,
                              warmup_ms=1, rep_ms=1)
    case = dict(variant=variant, heads=heads, tp=1, batch=2, context=70, query_len=l_q, page=16)
    hopper = _hopper_backend()
    row = bench_decode.bench_case(torch, _wall_clock, case, args, (1000.0, 100.0), [],
                                  device=DEVICE.type, hopper=hopper)
    assert row["check_rel_err"] < 1e-2, row
    if hopper is not None and DEVICE.type == "cpu":  # the Hopper kernels take no CPU call
        expected = "separate K/V" if variant.startswith("gqa") else "not a CUDA tensor"
        assert expected in row["hopper_note"] and "hopper_us" not in row, row
    layer = bench_decode._layer(variant, heads, 32, 16)
    assert row["bytes"] == 2 * layer.decode_bytes(70, l_q)
    assert row["flops"] == 2 * layer.decode_flops(70, l_q)
    assert row["us"] == 1000.0 and row["pct_roofline"] == pytest.approx(100 * row["roofline_us"] / 1000)


def test_hopper_columns_are_timed_and_checked(monkeypatch):
    """The Hopper backend's columns: its own plan, % of the same roofline, × Triton, checked
    against SDPA (on the CPU its calls run the Triton kernels; the plumbing is the same)."""
    hopper = _hopper_backend()
    if hopper is None:
        pytest.skip("Triton without Gluon")
    monkeypatch.setattr(bench_decode.Inputs, "hopper_declines", lambda self: None)
    args = argparse.Namespace(cache_dtype="bf16", head_dim=32, rope_dim=16, no_sdpa=False,
                              warmup_ms=1, rep_ms=1)
    case = dict(variant="mla", heads=4, tp=1, batch=2, context=70, query_len=1, page=64)
    row = bench_decode.bench_case(torch, _wall_clock, case, args, (1000.0, 100.0), [],
                                  device=DEVICE.type, hopper=hopper)
    assert row["hopper_us"] == 1000.0 and row["hopper_speedup_triton"] == 1.0, row
    assert row["hopper_pct_roofline"] == pytest.approx(row["pct_roofline"])
    assert row["hopper_check_rel_err"] < 1e-2 and "_hopper_out" not in row, row
    assert row["hopper_items"] and row["hopper_config"].startswith("ring"), row
    assert "Hopper µs" in bench_decode.format_table([row], (1000.0, 100.0))


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
    why = bench_decode.hopper_status(torch)
    assert why is None if expected is None else (expected in why and "Some GPU" in why)


def test_standard_suite_is_well_formed():
    cases = bench_decode._standard()
    assert {c["variant"] for c in cases} == {"gla-2", "mla", "gqa-4", "gta-4", "mqa"}
    for case in cases:
        layer = bench_decode._layer(case["variant"], case["heads"], 128, 64)
        layer.local_heads(case["tp"])  # every per-rank shape exists


def test_cli_without_gpu_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "decode", "--variants", "gla-2"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
