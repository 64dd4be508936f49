"""benchmarks/straggler_step.py on the tiny preset (CPU, no graphs): both runners time both
steps of every variant, and bad sizes are refused naming the argument."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "straggler_step.py"


def test_straggler_step_tiny(tmp_path):
    subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--variants", "gta-4", "--batch", "4",
                    "--short", "20", "--long", "90", "--out", str(tmp_path)],
                   check=True, cwd=ROOT, timeout=280, capture_output=True)
    rows = json.loads((tmp_path / "straggler_step.json").read_text())["rows"]
    assert {(r["runner"], r["shape"]) for r in rows} == {
        (k, s) for k in ("room", "no_room") for s in ("even", "straggler")}
    assert all(r["step_s"] > 0 and r["batch"] == 4 for r in rows)
    assert {r["longest"] for r in rows if r["shape"] == "straggler"} == {90}


def test_straggler_step_refuses_a_long_shorter_than_short(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--short", "64", "--long", "32",
                          "--out", str(tmp_path)], cwd=ROOT, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "--long (32) must be at least --short (64)" in res.stderr


def test_straggler_step_refuses_a_batch_of_none(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--batch", "0",
                          "--out", str(tmp_path)], cwd=ROOT, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "--batch must be a finite number > 0, got 0" in res.stderr
