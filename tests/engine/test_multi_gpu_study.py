"""The multi-GPU serving study's code path on CPU (`--tiny`): a tensor-parallel and a
data-parallel server, each driven over HTTP by `hwattn bench serve --url`."""

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # live servers in subprocesses

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

STUDY = Path(__file__).resolve().parents[2] / "benchmarks" / "multi_gpu_serving_study.py"


def load():
    spec = importlib.util.spec_from_file_location("multi_gpu_serving_study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_study_tiny_through_live_servers(tmp_path, capsys):
    study = load()
    assert study.main(["--tiny", "--configs", "gla-2:tp2,mla:tp1:dp2", "--minutes", "3",
                       "--prompts-per-concurrency", "1", "--name", "t", "--out",
                       str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi_gpu_serving_t.json",
                                                          "multi_gpu_serving_t.md"]
    doc = json.loads((tmp_path / "multi_gpu_serving_t.json").read_text())
    assert doc["complete"] and [r["name"] for r in doc["configs"]] == ["gla-2 TP=2",
                                                                       "mla TP=1 x DP=2"]
    for row in doc["configs"]:
        assert "error" not in row, row
        assert list(row["workloads"]) == ["c16", "c64", "c128", "long"]
        for w in row["workloads"].values():
            assert w["completed"] == w["requests"] and not w["errors"], w
            assert w["output_tokens"] == w["requests"] * 8
            assert w["output_tokens_per_s"] > 0 and w["itl_s"]["n"] > 0
        assert row["max_sequences"] > 0 and row["kv_pool_bytes_per_gpu"] > 0
        assert row["server_log"][0].startswith("hwattn serve:")
    # Per-GPU KV of the tiny shape in fp32: GLA-2 keeps one latent head of 32 + RoPE 8 at
    # TP=2; MLA keeps its whole latent of 64 + 8.
    assert [r["kv_bytes_per_token_per_layer_per_gpu"] for r in doc["configs"]] == [160, 288]
    long = doc["configs"][1]["workloads"]["long"]
    assert long["concurrency"] == 2 and long["prompt_spread"] > 0.5
    (gla, other, ratios), = doc["ratios"]
    assert (gla, other) == ("gla-2 TP=2", "mla TP=1 x DP=2") and set(ratios) == set(doc["settings"]["workloads"])
    out = capsys.readouterr().out
    assert "| gla-2 TP=2 | c64 |" in out and "paper: GLA-8 TP=8 / MLA" in out
    assert study.report([str(tmp_path / "multi_gpu_serving_t.json")]) == 0
    assert "| gla-2 TP=2 / mla TP=1 x DP=2 |" in capsys.readouterr().out


def test_configs_parse_and_name():
    study = load()
    assert study.parse_config("mla:tp2:dp2") == dict(variant="mla", tp=2, dp=2,
                                                    name="mla TP=2 x DP=2")
    assert study.parse_config("gla-4:tp4")["name"] == "gla-4 TP=4"
    with pytest.raises(ValueError, match="tpN / dpN"):
        study.parse_config("mla:pp2")
    assert all(study.parse_config(c)["tp"] * study.parse_config(c)["dp"] <= 4
               for c in study.CONFIGS[4].split(","))


def test_eight_gpu_set_is_the_papers(tmp_path):
    """`--gpus 8`: GLA-8 TP=8 against MLA TP=8 and TP=2 x DP=4 on the paper's workloads."""
    study = load()
    assert study.CONFIGS[8] == "gla-8:tp8,mla:tp8,mla:tp2:dp4"
    st = study.settings(False, 2, gpus=8)
    w = st["workloads"]
    assert list(w) == ["c16", "c64", "c128", "ctx32k", "ctx64k", "imb_r0", "imb_r0.125"]
    assert [w[n]["concurrency"] for n in w] == [16, 64, 128, 16, 16, 4, 4]
    assert (w["ctx32k"]["mean"], w["ctx64k"]["mean"]) == (32768, 65536)
    for name, lo in (("imb_r0", 1024), ("imb_r0.125", 16384)):
        mean, spread = w[name]["mean"], w[name]["spread"]
        assert abs(mean * (1 - spread) - lo) < 8 and abs(mean * (1 + spread) - 131072) < 8
    assert abs(sum(x["weight"] for x in w.values()) - 1) < 1e-9
    assert st["serve"][-2:] == ["--max-seq-len", str(130 * 1024)]  # 128K prompts + 1K output, rounded up
    assert "--max-seq-len" not in study.settings(False, 2, gpus=4)["serve"]


@pytest.mark.timeout(240)
def test_eight_gpu_workloads_run_tiny(tmp_path):
    study = load()
    assert study.main(["--tiny", "--gpus", "8", "--configs", "gla-2:tp1", "--minutes", "2",
                       "--prompts-per-concurrency", "1", "--name", "t8", "--out",
                       str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "multi_gpu_serving_t8.json").read_text())
    row, = doc["configs"]
    assert "error" not in row, row
    assert list(row["workloads"]) == list(doc["settings"]["workloads"])
    for w in row["workloads"].values():
        assert w["completed"] == w["requests"] and not w["errors"], w
    assert "| imb_r0.125 |" in (tmp_path / "multi_gpu_serving_t8.md").read_text()
