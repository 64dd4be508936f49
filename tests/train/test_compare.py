"""`hwattn compare` end to end at toy size: every variant trained, evaluated and timed."""

from __future__ import annotations

import json

import pytest

from hwattn.train.compare import (SET_BY_COMPARE, CompareConfig, chance_notes,
                                  plot_compare, run_compare, train_settings)
from tests.conftest import SMALL

NOTE = "Smoke test, not evidence."  # the figure's caption (`smoke_note` in a run)

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
    fig = plot_compare(rows, curves, tmp_path / "c.png", cfg, NOTE)
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


def _evaluation_with_losses(losses: dict):
    """An `evaluate_model` whose average validation loss is losses[model's variant]: a real
    evaluation of a diverged model takes minutes; what is tested is what compare writes."""
    import math

    def evaluate_model(model, data, ecfg, tasks, progress=False):
        loss = losses[model.config.label]
        rec = {"loss": loss, "ppl": math.inf if loss > 709 else math.exp(loss),
               "bpb": loss / math.log(2) / 3}
        return {"ppl": {"books": rec, "average": rec}, "cloze": {"acc": 0.0},
                "mc": {"acc": 0.25, "acc_norm": 0.25}, "recall": {"mean": 0.0, "chance": 0.0025}}

    return evaluate_model


def _small_compare(out, **kw):
    return CompareConfig(out=str(out), variants=("gqa-2", "mla"), device="cpu", steps=1,
                         seq_len=32, batch_size=2, eval_tokens=64, n_cloze=2, n_mc=2,
                         recall_pairs=(4,), recall_seqs=2, decode_batch=1, decode_prompt=4,
                         decode_new=2, extra={"model_overrides": SMALL}, **kw)


def test_a_diverged_variant_is_tabled_plotted_and_written_as_strict_json(dataset_dir, tmp_path,
                                                                        monkeypatch):
    """Observed with `hwattn compare --lr 1000`: after every variant had trained, the plot
    failed ("Axis limits cannot be NaN or Inf"): exit status 2, no table printed, no
    compare.png beside the new compare.json, which held `Infinity` (not JSON to jq or a
    browser)."""
    import math

    from hwattn.train import compare

    monkeypatch.setattr(compare, "evaluate_model",
                        _evaluation_with_losses({"gqa-2": 1000.0, "mla": math.nan}))
    out = tmp_path / "cmp"
    res = run_compare(_small_compare(out, data=str(dataset_dir)), progress=False,
                      log=lambda *a: None)
    assert res["files"]["plot"] == str(out / "compare.png")
    assert (out / "compare.png").stat().st_size > 20_000
    text = (out / "compare.json").read_text()
    saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
    assert saved["diverged"] == ["gqa-2", "mla"]
    assert [r["val_ppl"] for r in saved["rows"]] == [None, None]
    assert saved["rows"][0]["val_loss"] == 1000.0
    table = (out / "compare.md").read_text()
    assert "| gqa-2 | " in table and "| 1000.000 | inf |" in table and "| nan | nan |" in table
    assert "Diverged: gqa-2 (val loss 1000), mla (val loss nan)" in table
    assert "lower --lr" in table


def test_the_smoke_note_gives_the_runs_own_sizes_and_tokens(dataset_dir, tmp_path, monkeypatch):
    """The note said "about 1M parameters ... a few hundred thousand tokens" whatever --steps
    and --preset were: beside a table of "1 steps x 2 x 32 tokens"."""
    from hwattn.train import compare

    monkeypatch.setattr(compare, "evaluate_model", _evaluation_with_losses({"gqa-2": 5.0,
                                                                            "mla": 5.0}))
    res = run_compare(_small_compare(tmp_path / "cmp", data=str(dataset_dir)), progress=False,
                      log=lambda *a: None)
    note = res["notes"][0]
    assert note.startswith("Smoke test, not evidence. On CPU every model is small (")
    assert "sees 64 training tokens with one seed" in note and "1M parameters" not in note
    params = sorted(f"{r['params'] / 1e6:.2f}M" for r in res["rows"])
    assert f"({params[0]}-{params[1]} parameters)" in note or f"({params[0]} parameters)" in note
    assert not any(n.startswith("Diverged") for n in res["notes"])


def test_a_run_without_a_plot_leaves_no_earlier_plot_beside_its_numbers(dataset_dir, tmp_path,
                                                                      monkeypatch):
    """Without matplotlib compare writes no figure; a compare.png of an earlier run in the same
    folder stayed, passing for this run's."""
    from hwattn.train import compare

    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.png").write_bytes(b"an earlier run's figure")
    monkeypatch.setattr(compare, "evaluate_model", _evaluation_with_losses({"gqa-2": 5.0,
                                                                            "mla": 5.0}))

    def no_matplotlib(*args, **kwargs):
        raise ImportError("No module named 'matplotlib'")

    monkeypatch.setattr(compare, "plot_compare", no_matplotlib)
    res = run_compare(_small_compare(out, data=str(dataset_dir)), progress=False,
                      log=lambda *a: None)
    assert "plot" not in res["files"] and not (out / "compare.png").exists()


def test_plot_draws_variants_whose_numbers_are_not_finite(tmp_path):
    import math

    cfg = CompareConfig(device="cpu").resolved()
    cfg.steps = 10
    rows = [dict(ROW, variant="mla", val_ppl=math.inf, val_loss=1e3),
            dict(ROW, variant="gla-2", val_ppl=math.nan, val_loss=math.nan),
            dict(ROW, variant="gqa-4", val_ppl=158.0)]
    curves = {r["variant"]: [{"tokens": 1024, "loss": 6.0, "val_loss": r["val_loss"]}]
              for r in rows}
    fig = plot_compare(rows, curves, tmp_path / "c.png", cfg, NOTE)
    ppl = next(ax for ax in fig.axes if ax.get_title().startswith("validation perplexity"))
    assert ppl.get_ylim() == pytest.approx((0, 1.12 * 158.0))
    assert {t.get_text() for t in ppl.texts} == {"inf", "nan", "158.0"}


@pytest.mark.parametrize("overrides", [{}, {"n_layers": 1},
                                       {"max_seq_len": 4096, "vocab_size": 4096}])
def test_the_memory_check_sizes_the_models_the_variants_train(overrides):
    """`model_configs` (the models compare's memory check probes) is the trainer's own
    `model_config` of each variant's TrainConfig, overrides included."""
    from hwattn.train.compare import model_configs
    from hwattn.train.trainer import TrainConfig, model_config

    extra = {"model_overrides": overrides}
    cfg = CompareConfig(device="cpu", variants=("mha", "gqa-4", "gla-2"), steps=10,
                        extra=extra).resolved()
    for label, got in zip(cfg.variants, model_configs(cfg, 2000)):
        tcfg = TrainConfig(data="d", out="o", preset=cfg.preset, variant=label,
                           seq_len=cfg.seq_len, model_overrides=overrides)
        assert got == model_config(tcfg, 2000)


@pytest.mark.parametrize("key, value, needle", [
    ("max_seq_len", 64, "model_overrides max_seq_len=64 is shorter than seq_len=128"),
    ("vocab_size", 64, "model_overrides vocab_size=64 is smaller than the data's vocabulary"),
])
def test_the_memory_check_refuses_overrides_as_the_trainer_does(key, value, needle):
    """Observed: compare sized the models with a copy of the trainer's rule that lacked its
    checks, so a `max_seq_len` override shorter than --seq-len failed in the memory probe as
    "position 127 exceeds max_seq_len 64", and a `vocab_size` below the data's was probed
    as given; the trainer names both."""
    from hwattn.train.compare import model_configs

    cfg = CompareConfig(device="cpu", variants=("mha",),
                        extra={"model_overrides": {key: value}}).resolved()
    with pytest.raises(ValueError, match=needle):
        model_configs(cfg, 2048)
