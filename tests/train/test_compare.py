"""`hwattn compare` end to end at toy size: every variant trained, evaluated and timed."""

from __future__ import annotations

import json

import pytest

from hwattn.train.compare import (SET_BY_COMPARE, SMOKE_NOTE, CompareConfig, chance_notes,
                                  plot_compare, run_compare, train_settings)
from tests.conftest import SMALL

ROW = {"params": 1e6, "kv_bytes_per_token": 576, "val_loss": 5.3, "val_ppl": 200.0,
       "val_bpb": 2.4, "cloze_acc": 0.0, "mc_acc": 0.16, "mc_acc_norm": 0.3,
       "recall": {"mean": 0.0, "chance": 0.0025}, "train_tokens_per_s": 9e3,
       "decode_tokens_per_s": 400.0}


def test_notes_give_chance_levels_and_say_why_columns_sit_at_zero():
    rows = [dict(ROW, variant="mha"), dict(ROW, variant="gla-2", mc_acc=0.2, cloze_acc=0.01)]
    notes = chance_notes(rows)
    assert "chance 25%" in notes[0] and "below chance (16.0%-20.0%)" in notes[0]
    assert "At 1.0% or less for every variant" in notes[1] and "cannot rank" in notes[1]
    assert "chance 0.25%" in notes[2] and "At 0.0% for every variant" in notes[2]
    assert "not learned to copy" in notes[2]
    learned = chance_notes([dict(ROW, variant="mha", mc_acc=0.4, cloze_acc=0.3,
                                 recall={"mean": 0.5, "chance": 0.0025})])
    assert not any("below chance" in n or "cannot rank" in n for n in learned)


def test_plot_starts_every_bar_axis_at_zero(tmp_path):
    cfg = CompareConfig(device="cpu").resolved()
    cfg.steps = 10
    rows = [dict(ROW, variant="mla", val_ppl=263.0), dict(ROW, variant="gla-2", val_ppl=158.0)]
    curves = {r["variant"]: [{"tokens": 1024, "loss": 6.0}, {"tokens": 2048, "loss": 5.5,
                                                             "val_loss": 5.6}] for r in rows}
    fig = plot_compare(rows, curves, tmp_path / "c.png", cfg, SMOKE_NOTE)
    titled = {ax.get_title(): ax for ax in fig.axes}
    ppl = next(ax for t, ax in titled.items() if t.startswith("validation perplexity"))
    assert ppl.get_ylim()[0] == 0
    tasks = next(ax for t, ax in titled.items() if t.startswith("task accuracy"))
    assert [line.get_ydata()[0] for line in tasks.get_lines()] == [25.0]  # the MC chance line
    assert any("star: all held-out tokens" in t for t in titled)
    assert (tmp_path / "c.png").stat().st_size > 20_000


@pytest.mark.slow  # training every variant
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
    assert "Smoke test, not evidence" in table and "rank the variants by seed noise" in table
    assert "benchmarks/quality_study.py" in table and "MC acc (norm), chance 25%" in table
    assert "Multiple choice: 4 choices, chance 25%" in table and "wall time" in table
    assert saved["smoke_test"] is True and saved["notes"][0].startswith("Smoke test")
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 20_000


@pytest.mark.slow
def test_compare_cli(dataset_dir, tmp_path, capsys):
    from hwattn.cli import main

    assert main(["compare", "--variants", "", "--data", str(dataset_dir)]) == 2
    assert main(["compare", "--steps", "0", "--data", str(dataset_dir)]) == 2
    assert main(["compare", "--variants", "mqa", "--data", str(dataset_dir), "--steps", "2",
                 "--seq-len", "32", "--batch-size", "2", "--device", "cpu",
                 "--out", str(tmp_path / "c"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rows"][0]["variant"] == "mqa" and res["config"]["steps"] == 2


@pytest.mark.parametrize("extra, needle", [
    # Observed: a bare "TrainConfig() got multiple values for keyword argument 'steps'",
    # raised after the dataset was built.
    ({"steps": 5}, r"extra names 'steps', which compare sets for every variant; set steps on "
                   r"CompareConfig itself"),
    ({"plot": True, "seq_len": 64}, r"extra names 'seq_len', 'plot', which compare sets"),
    ({"stepz": 5, "lrr": 1.0}, r"extra names 'lrr', 'stepz', not TrainConfig fields"),
    (["model_overrides"], r"extra must be a dict"),
])
def test_extra_keys_compare_sets_or_training_lacks_are_refused_when_resolved(extra, needle,
                                                                             tmp_path):
    with pytest.raises(ValueError, match=needle):
        CompareConfig(device="cpu", extra=extra).resolved()
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match=needle):  # before the shipped corpus is built
        run_compare(CompareConfig(out=str(out), device="cpu", extra=extra), progress=False,
                    log=lambda *a: None)
    assert not out.exists()


def test_extra_may_set_the_other_training_fields():
    cfg = CompareConfig(device="cpu", extra={"model_overrides": SMALL, "accum_steps": 2,
                                             "amp": "fp32"}).resolved()
    assert cfg.extra["accum_steps"] == 2


def test_the_fields_compare_sets_are_the_ones_extra_may_not_name():
    from pathlib import Path
    from types import SimpleNamespace

    cfg = CompareConfig(device="cpu", steps=10).resolved()
    fields = train_settings(cfg, SimpleNamespace(path="data"), Path("out"), "mha")
    assert sorted(fields) == sorted(SET_BY_COMPARE)


def test_seq_len_beyond_the_scales_eval_tokens_is_refused_naming_the_flag_and_limit():
    """Observed: "--seq-len 10000 is longer than the 8192 validation tokens per domain the
    training curves score (eval_tokens)": eval_tokens is no flag of `hwattn compare`."""
    with pytest.raises(ValueError, match=r"^--seq-len 10000 is longer than the 8192 validation "
                                         r"tokens per domain that the training curves score at "
                                         r"the cpu scale: give --seq-len at most 8192$"):
        CompareConfig(device="cpu", seq_len=10000).resolved()
    with pytest.raises(ValueError, match=r"\(eval_tokens 100\): give --seq-len at most 100$"):
        CompareConfig(device="cpu", seq_len=128, eval_tokens=100).resolved()


@pytest.mark.parametrize("existing", [False, True])
def test_a_seq_len_the_shipped_corpus_cannot_hold_leaves_no_data_behind(tmp_path, existing):
    """Refused after the shipped corpus was built (its validation domains are only known
    then): the folders the build made for this run are removed, an existing --out is kept."""
    out = tmp_path / "new" / "cmp"
    if existing:
        out.mkdir(parents=True)
    cfg = CompareConfig(out=str(out), device="cpu", variants=("mha",), seq_len=60_000,
                        eval_tokens=100_000)
    with pytest.raises(ValueError, match=r"^--seq-len 60000 is longer than the \d+ validation "
                                         r"tokens of domain .*: give --seq-len at most \d+"):
        run_compare(cfg, progress=False, log=lambda *a: None)
    assert out.exists() == existing and not (out / "data").exists()
    assert (tmp_path / "new").exists() == existing


def test_a_warmup_given_is_kept_and_only_the_scales_default_is_capped():
    """Observed: warmup_steps=30 over 100 steps trained with a warm-up of 10 (the cap of the
    scale's default, a tenth of the run, was applied to a value the caller chose)."""
    from pathlib import Path
    from types import SimpleNamespace

    def warmup(**kw):
        cfg = CompareConfig(device="cpu", steps=100, **kw).resolved()
        return train_settings(cfg, SimpleNamespace(path="data"), Path("out"), "mha")["warmup_steps"]

    assert warmup(warmup_steps=30) == 30
    assert warmup() == 10  # the CPU scale's 16, capped at a tenth of the run
