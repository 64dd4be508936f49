"""`hwattn compare` end to end at toy size: every variant trained, evaluated and timed."""

from __future__ import annotations

import json

import pytest

from hwattn.train.compare import CompareConfig, run_compare
from tests.conftest import SMALL

pytestmark = pytest.mark.slow  # training every variant


def test_run_compare_writes_table_plot_and_json(dataset_dir, tmp_path):
    cfg = CompareConfig(out=str(tmp_path / "cmp"), variants=("mha", "gta-4", "gla-2"),
                        data=str(dataset_dir), device="cpu", steps=4, seq_len=32, batch_size=2,
                        n_cloze=4, n_mc=4, recall_pairs=(4,), recall_seqs=2, decode_batch=2,
                        decode_prompt=8, decode_new=4, extra={"model_overrides": SMALL})
    res = run_compare(cfg, progress=False, log=lambda *a: None)
    rows = {r["variant"]: r for r in res["rows"]}
    assert list(rows) == ["mha", "gta-4", "gla-2"]
    # KV bytes per token come from the models: GTA-4 caches 4·16 + 8 per layer vs MHA's 2·4·16.
    assert rows["mha"]["kv_bytes_per_token_per_layer"] == 2 * 4 * 16 * 2
    assert rows["gta-4"]["kv_bytes_per_token_per_layer"] == (4 * 16 + 8) * 2
    for r in rows.values():
        assert r["train_tokens"] == 4 * 2 * 32 and r["decode_tokens_per_s"] > 0
        assert r["val_ppl"] > 1 and 0 <= r["mc_acc"] <= 1
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert [r["variant"] for r in saved["rows"]] == ["mha", "gta-4", "gla-2"]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert sum(ln.startswith("| ") for ln in table.splitlines()) == 1 + 3 and "| gta-4 |" in table
    assert "CPU numbers are a smoke test" in table and "benchmarks/quality_study.py" in table
    assert saved["smoke_test"] is True
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 20_000


def test_compare_cli(dataset_dir, tmp_path, capsys):
    from hwattn.cli import main

    assert main(["compare", "--variants", "", "--data", str(dataset_dir)]) == 2
    assert main(["compare", "--steps", "0", "--data", str(dataset_dir)]) == 2
    assert main(["compare", "--variants", "mqa", "--data", str(dataset_dir), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"][0]["variant"] == "mqa" and res["config"]["steps"] == 2
