"""The GPU quality study, run on CPU at toy size, and the report written from its files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hwattn.eval.report import main as report_main
from hwattn.eval.report import render

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def study(tmp_path_factory, dataset_dir):
    out = tmp_path_factory.mktemp("study")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_study.py"), "--smoke",
           "--data", str(dataset_dir), "--out", str(out), "--variants", "gqa-4,gta-4,mla,gla-2",
           "--seeds", "0,1", "--steps", "4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_study_writes_few_small_files(study):
    files = sorted(p.name for p in study.iterdir())
    assert files == ["loss_curves.png", "study_log.txt", "study_runs.jsonl", "study_summary.json"]
    assert all((study / f).stat().st_size < 16 * 2**20 for f in files)
    runs = [json.loads(x) for x in (study / "study_runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [  # seeds outermost
        (v, s) for s in (0, 1) for v in ("gqa-4", "gta-4", "mla", "gla-2")]
    assert len({r["steps"] for r in runs}) == 1 and {r["tokens"] for r in runs} == {4 * 4 * 128}
    assert len({round(r["params"], -4) for r in runs}) == 1  # parameter-matched
    for r in runs:
        assert set(r["eval"]) >= {"ppl", "cloze", "mc", "recall"}
        assert any("val_loss" in c for c in r["curve"])
    # Two seeds really are two different initialisations.
    ppl = {(r["variant"], r["seed"]): r["eval"]["ppl"]["average"]["ppl"] for r in runs}
    assert ppl[("gta-4", 0)] != ppl[("gta-4", 1)]
    summary = json.loads((study / "study_summary.json").read_text())
    assert summary["schedule"]["steps"] == 4 and set(summary["variants"]) == {"gqa-4", "gta-4", "mla", "gla-2"}
    assert summary["variants"]["gta-4"]["val_ppl"]["spread"] >= 0


def test_report_from_study_files(study, tmp_path):
    out = tmp_path / "docs" / "quality.md"
    assert report_main(["--study", str(study), "--out", str(out)]) == 0
    text = out.read_text()
    for label in ("gqa-4", "gta-4", "mla", "gla-2"):
        assert f"| {label} |" in text
    assert "gta-4 vs gqa-4" in text and "gla-2 vs mla" in text
    assert "10.129" in text  # the paper's numbers beside ours
    assert "LEAD" in text and "What this scale can and cannot show" in text
    assert (tmp_path / "docs" / "quality_loss.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "quality_raw" / "study_runs.jsonl").is_file()
    assert report_main(["--study", str(tmp_path / "nothing")]) == 2


def test_claims_follow_the_numbers():
    """The derived sentences say 'larger' only when the gap exceeds the seed spread."""
    def run(v, seed, ppl):
        return {"variant": v, "seed": seed, "preset": "mini", "params": 5e7, "hidden_dim": 1,
                "kv_bytes_per_token_per_layer": 256, "curve": [],
                "eval": {"ppl": {"a": {"ppl": ppl}, "average": {"ppl": ppl, "bpb": 1.0}}}}
    runs = [run("gqa-4", 0, 20.0), run("gqa-4", 1, 20.1), run("gta-4", 0, 20.05), run("gta-4", 1, 20.12),
            run("mla", 0, 20.0), run("mla", 1, 20.02), run("gla-2", 0, 21.0), run("gla-2", 1, 21.02)]
    text = render(runs, {})
    gta = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4 vs gqa-4**"))
    gla = next(ln for ln in text.splitlines() if ln.startswith("- **gla-2 vs mla**"))
    assert "not larger" in gta and "within ±1%" in gta
    assert "is larger" in gla and "outside ±1%" in gla
