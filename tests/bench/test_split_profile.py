"""benchmarks/split_profile.py's parts that need no GPU: its case and plan syntax, and the
timeline of a call's kernels (span and idle time) from the profiler's intervals."""

import importlib.util
from pathlib import Path

import pytest

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
