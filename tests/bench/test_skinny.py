"""The skinny-GEMM benchmark (hwattn/bench/skinny.py) on CPU: its rows, checks, table and
totals, with the Triton kernel under the interpreter and a wall clock in place of CUDA events.
The timings themselves mean nothing here."""

from __future__ import annotations

import time

import pytest
import torch

from hwattn.bench import skinny
from hwattn.ops.skinny_gemm import SkinnyConfig, choose_config, split_layout


def _wall_clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


CONFIGS = [SkinnyConfig(block_n=16, block_k=32, split_k=3, num_stages=1),
           SkinnyConfig(block_n=32, block_k=64, split_k=1, num_stages=1)]


def test_rows_carry_the_physics():
    m, n, k = 5, 40, 200
    rows = skinny.bench_shape("tiny", m, n, k, CONFIGS, timer=_wall_clock, copy_gbs=1.0,
                              device="cpu")
    assert [r["impl"] for r in rows] == ["cublas", "triton", "triton"]
    assert [r.get("chosen") for r in rows] == [None, True, False]
    cublas_us = rows[0]["us"]
    for r in rows[1:]:
        assert r["ok"] and r["deterministic"] and r["rel_err"] < skinny.CHECK_LIMIT
        assert r["gbs"] == (n * k + m * k + m * n) * 2 / r["us"] / 1e3
        assert r["pct_copy"] == 100 * r["gbs"] / 1.0
        assert r["speedup"] == cublas_us / r["us"]
        assert r["config"]["split_k"] in (1, 3)
    lines = [skinny.format_row(r) for r in rows]
    assert all(line.startswith("tiny") for line in lines) and "n16 k32 s3 w4 p1 *" in lines[1]
    total = skinny.summary(rows)[0]
    assert total["shapes"] == ["tiny"] and total["cublas_us"] == cublas_us
    assert total["best_us"] == min(r["us"] for r in rows[1:]) <= total["chosen_us"]


def test_wrong_or_failing_kernels_are_marked(monkeypatch):
    calls = []

    def off_by_a_little(x, weight, config=None, out=None):
        calls.append(config)
        if config.split_k == 1:
            raise RuntimeError("out of shared memory")
        y = torch.nn.functional.linear(x, weight) * 1.05
        return y if out is None else out.copy_(y)

    monkeypatch.setattr(skinny, "skinny_linear", off_by_a_little)
    rows = skinny.bench_shape("tiny", 5, 40, 200, CONFIGS, timer=_wall_clock, device="cpu",
                              cublas_us=3.0)
    assert [r["impl"] for r in rows] == ["triton", "triton"]  # cuBLAS time given, not retimed
    wrong, failing = rows
    assert not wrong["ok"] and wrong["rel_err"] > skinny.CHECK_LIMIT
    assert wrong["speedup"] == 3.0 / wrong["us"]
    assert not failing["ok"] and failing["us"] is None
    assert "out of shared memory" in failing["error"]
    assert "FAILED" in skinny.format_row(wrong) and "FAILED" in skinny.format_row(failing)
    assert skinny.summary(rows)[0]["shapes"] == []  # no cuBLAS row, no passing chosen row


def test_sweep_starts_with_the_chosen_tiles():
    for m in skinny.ROWS:
        for n, k in skinny.SHAPES.values():
            configs = skinny.sweep_configs(m, n, k, 132)
            chosen = choose_config(m, n, k, 132)
            assert configs[0] == chosen and 2 <= len(configs) <= 8
            assert len(set(configs)) == len(configs)
            for c in configs:  # split_k is what launches
                assert split_layout(k, c.block_k, c.split_k)[1] == c.split_k


def test_run_two_passes_within_the_deadline():
    lines = []
    rows, totals = skinny.run({"tiny": (40, 72), "ragged": (33, 37)}, rows=(5, 1),
                              timer=_wall_clock, device="cpu", sms=2, sweep_limit=3,
                              log=lines.append)
    chosen = [r for r in rows if r.get("chosen")]
    assert len(chosen) == 4 and rows.index(chosen[-1]) < 8  # every chosen row before a sweep
    assert all(r["ok"] for r in rows) and len(lines) == 1 + len(rows) + len(totals)
    assert [t["m"] for t in totals] == [5, 1]
    assert all(t["shapes"] == ["tiny", "ragged"] for t in totals)
    rows, _ = skinny.run({"tiny": (40, 72)}, rows=(5,), timer=_wall_clock, device="cpu", sms=2,
                         seconds=0.0, log=lines.append)
    assert rows == []


def test_blas_variants_compute_the_same_product_and_are_timed_against_linear():
    m, n, k = 5, 40, 200
    rows = skinny.bench_blas("tiny", m, n, k, timer=_wall_clock, copy_gbs=1.0, device="cpu")
    assert [r["impl"] for r in rows] == list(skinny.BLAS_VARIANTS)
    for r in rows:
        assert r["ok"] and r["rel_err"] < skinny.CHECK_LIMIT, r
        assert r["gbs"] == (n * k + m * k + m * n) * 2 / r["us"] / 1e3
        assert r["speedup"] == rows[0]["us"] / r["us"]
    assert rows[0]["speedup"] == 1.0
    assert "FAILED" not in "".join(skinny.format_row(r) for r in rows)


def test_a_blas_variant_that_is_wrong_or_fails_is_marked(monkeypatch):
    real = skinny.blas_call

    def broken(variant, x, weight):
        prepare, op = real(variant, x, weight)
        if variant == "mm_wt":
            return prepare, (lambda x, w: op(x, w) * 1.05)
        if variant == "addmm_lt":
            def fails(x, w):
                raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
            return prepare, fails
        return prepare, op

    monkeypatch.setattr(skinny, "blas_call", broken)
    rows = {r["impl"]: r for r in skinny.bench_blas("tiny", 5, 40, 200, timer=_wall_clock,
                                                      device="cpu")}
    assert rows["linear"]["ok"] and rows["linear_lt"]["ok"]
    assert not rows["mm_wt"]["ok"] and rows["mm_wt"]["rel_err"] > skinny.CHECK_LIMIT
    assert not rows["addmm_lt"]["ok"] and "NOT_SUPPORTED" in rows["addmm_lt"]["error"]
    assert rows["addmm_lt"]["us"] is None and "FAILED" in skinny.format_row(rows["addmm_lt"])
    with pytest.raises(ValueError, match="unknown cuBLAS variant 'gemv'"):
        skinny.blas_call("gemv", torch.zeros(1, 2), torch.zeros(3, 2))


def test_run_blas_takes_the_template_variant_and_keeps_its_failure_to_its_row():
    """The Inductor template variant (`TEMPLATE_VARIANT`, a GPU measurement) is known to
    `run_blas`; where it cannot compile (this CPU has no Triton GEMM templates) its row says
    why and the cuBLAS row beside it is unharmed."""
    lines = []
    rows = skinny.run_blas({"tiny": (40, 200)}, rows=(5,), timer=_wall_clock, device="cpu",
                           variants=("linear", skinny.TEMPLATE_VARIANT), log=lines.append)
    assert [r["impl"] for r in rows] == ["linear", skinny.TEMPLATE_VARIANT]
    assert rows[0]["ok"]
    template = rows[1]
    assert template["ok"] or template["error"], template
    if template["ok"]:
        assert template["rel_err"] < skinny.CHECK_LIMIT
    assert len(lines) == 3
