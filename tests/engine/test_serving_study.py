"""The GPU serving study's code path, run on the tiny preset (CPU) so the one GPU shot works."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the whole serving study on a tiny model

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_study.py"


def test_serving_study_tiny(tmp_path, capsys):
    pytest.importorskip("numpy")
    spec = importlib.util.spec_from_file_location("serving_study", STUDY)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    assert study.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--budget", "120"]) == 0
    doc = json.loads((tmp_path / "serving_study.json").read_text())
    assert [v["variant"] for v in doc["variants"]] == ["gla-2", "mla", "gqa-4", "gta-4"]
    for v in doc["variants"]:
        assert "error" not in v, v
        assert v["offline"]["output_tokens"] == v["workload"]["requests"] * v["workload"]["output_len"]
        assert v["decode_step"]["attention_s"] > 0
    assert set(doc["ratios"]) == {"GLA-2 / MLA", "GTA-4 / GQA-4"}
    assert doc["speculative"]["acceptance"] > 0
    assert len(doc["tp_rank_shapes"]) == 8
    md = (tmp_path / "serving_study.md").read_text()
    assert "| gla-2 |" in md and md in capsys.readouterr().out
