"""benchmarks/engine_speed.py on the tiny preset: every measurement runs, the ratios it
reports follow from its own numbers, and `--before` measures another tree in a subprocess."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_engine_speed_tiny_before_and_after(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_speed.py"), "--tiny",
           "--variants", "gla-2", "--ks", "1,3", "--before", str(ROOT), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "engine_speed.json").read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    for side in ("before", "after"):
        rep = report[side]
        assert Path(rep["hwattn"]) == ROOT
        row = rep["variants"]["gla-2"]
        serving = row["serving"]
        assert serving["output_tokens"] == 6 * 10
        assert serving["itl_p50_s"] <= serving["itl_p99_s"]
        assert serving["itl_p99_over_p50"] == serving["itl_p99_s"] / serving["itl_p50_s"]
        assert 0 <= row["decode"]["beyond_forward_share"] < 1 and row["decode"]["steps"] > 0
        spec = row["speculation"]
        assert set(spec) == {"0", "1", "3"}
        for k in ("1", "3"):
            assert 0 <= spec[k]["acceptance"] <= 1
            assert spec[k]["speedup"] == spec[k]["decode_tok_s"] / spec["0"]["decode_tok_s"]
    table = (tmp_path / "engine_speed.md").read_text()
    assert "| gla-2 | ITL p99 / p50 |" in table and "n-gram k=3 (after)" in table
