"""benchmarks/split_profile.py's parts that need no GPU: its case and plan syntax, and the
timeline of a call's kernels (span and idle time) from the profiler's intervals."""

import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import triton.testing

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "split_profile.py"
_spec = importlib.util.spec_from_file_location("split_profile", _SCRIPT)
split_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(split_profile)


def test_timeline_of_sequential_and_overlapping_kernels():
    # two calls of two kernels: 10-50 then 54-60 (4 idle); 100-140 then 130-150 (overlap)
    timeline = split_profile.call_timeline([(10, 50), (54, 60), (100, 140), (130, 150)], reps=2)
    assert timeline == dict(span_us=pytest.approx(50.0), idle_us=pytest.approx(2.0))  # 4 and 0


def test_timeline_is_none_when_the_kernels_do_not_split_into_calls():
    assert split_profile.call_timeline([(0, 1), (2, 3), (4, 5)], reps=2) == dict(span_us=None,
                                                                                idle_us=None)
    assert split_profile.call_timeline([], reps=2)["span_us"] is None


def test_cases_and_plans_parse_and_bad_ones_are_refused_by_name():
    case = split_profile.parse_case("gta-4@32:1x131072")
    assert (case["variant"], case["heads"], case["lengths"]) == ("gta-4", 32, [131072])
    assert split_profile.parse_case("mla:131072x1+1024x2")["lengths"] == [131072, 1024, 1024]
    assert split_profile.parse_plan("p1-m512-strided") == (dict(programs_per_sm=1, min_piece=512),
                                                           "strided")
    with pytest.raises(ValueError, match="--cases entry 'mla:12'"):
        split_profile.parse_case("mla:12")
    with pytest.raises(ValueError, match="--plans entry 'q3'"):
        split_profile.parse_plan("q3")


def test_a_separate_kv_case_runs_its_backends_plan_alone(monkeypatch, tmp_path, capsys):
    """The script's loop end to end on the CPU for a GQA case (the Triton kernel under the
    interpreter; the GPU's timing and profiling replaced by stand-ins): other plan settings
    are named as skipped, the default's row is written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "cpu")
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), 0.01)[1])
    monkeypatch.setattr(split_profile, "graphed", lambda fn, device: (fn, "eager"))
    monkeypatch.setattr(split_profile, "kernel_times", lambda fn: (
        {"attend_kernel": 6.0, "combine_rows_kernel": 1.0}, dict(span_us=8.0, idle_us=1.0)))
    monkeypatch.setattr(split_profile, "Inputs", functools.partial(split_profile.Inputs,
                                                                   device="cpu"))
    out = tmp_path / "split.json"
    assert split_profile.main(["--cases", "gqa-4@8:2x256", "--plans", "default,p2",
                               "--out", str(out)]) == 0
    assert "separate K/V, the default plan alone" in capsys.readouterr().out
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["plan"], row["config"], row["span_us"], row["idle_us"]) == ("default", "triton",
                                                                            8.0, 1.0)
    assert row["attend_us"] == 6.0 and row["combine_us"] == 1.0 and row["us"] == 10.0
