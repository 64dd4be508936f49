"""The quality report's page and figures (`hwattn.eval.report.page`, `.figures`): what the
page says from the records it has, the committed page as the generator writes it, the gaps
figure beside the claims table, and a study that cannot be rendered replacing nothing."""

from __future__ import annotations

import json

import pytest

from hwattn.eval.claims import claim_results
from hwattn.eval.report import main as report_main, render, write_report
from tests.eval.study_helpers import ROOT, fake_run, paired_runs, write_study_folder


def test_committed_quality_page_is_what_the_generator_writes():
    """docs/results/quality.md is regenerated, never edited by hand: it equals what the
    report writes from the raw files beside it."""
    from hwattn.eval.report import load_runs

    runs, summary = load_runs(ROOT / "docs" / "results" / "quality_raw")
    assert render(runs, summary) == (ROOT / "docs" / "results" / "quality.md").read_text()


def test_report_states_setup_and_scale_from_the_records_it_has():
    runs = []
    for seed in (0, 1):
        for v, ppl in (("gqa-4", 20.0), ("gta-4", 20.5)):
            r = fake_run(v, seed, ppl, ppl)
            r["tokens"] = 3_800_000
            r["curve"] = [{"tokens": t, "val_loss": 4 - t / 5e6} for t in (1e6, 2.85e6, 3.8e6)]
            runs.append(r)
    text = render(runs, {})
    assert "None" not in text and "0.00M" not in text
    assert "19.0M non-embedding parameters" in text and "0.2 tokens per parameter" in text
    assert "still falling when it stopped: by 0.19–0.19 nats" in text
    assert "held-out domains are code, prose" in text
    old_format = [{k: v for k, v in r.items() if k != "non_embedding_params"} for r in runs]
    assert "36.00M parameters with the tied embedding" in render(old_format, {})
    assert "curve's last point is not the table's loss" not in text  # no per-domain points
    assert "Of the validation loss itself" not in text  # no losses recorded
    for r, loss in zip(runs, (2.0, 2.1, 2.0, 2.0)):  # gqa-4 s0, gta-4 s0, gqa-4 s1, gta-4 s1
        r["eval"]["ppl"]["average"]["loss"] = loss
    spread = render(runs, {})
    assert "| gqa-4 | 2 | 1 | 256 | 20.000 ± 0.000 | 0.00% | 0.00% |" in spread
    assert "| gta-4 | 2 | 1 | 256 | 20.500 ± 0.000 | 0.00% | 3.45% |" in spread  # 0.0707 / 2.05
    assert ("at most 3.45% (gta-4) of the loss: gta-4 above 0.5%, every other variant within "
            "it") in spread and "the loss, 2.02 nats here" in spread
    runs[0]["curve"][-1].update({"val_loss/code": 1.41, "val_loss/prose": 2.8})
    runs[0]["eval"]["ppl"]["code"]["loss"] = 1.24
    runs[0]["eval"]["ppl"]["prose"]["loss"] = 3.0
    assert ("gqa-4 seed 0 ends its curve at code 1.41 against 1.24, prose 2.80 against 3.00 "
            "nats") in render(runs, {})


def test_an_extended_plan_counts_its_own_runs_and_the_earlier_ones_apart():
    """A later command may plan more seeds of two variants: the page counts the plan's
    finished runs against the plan, and the runs of earlier plans beside them (it once
    printed '24 of 18 planned runs')."""
    runs = [fake_run(v, seed, 20.0, 20.0) for seed in (0, 1) for v in ("gqa-4", "gta-4")]
    summary = {"plan": ["gqa-4-s0", "gta-4-s0", "gqa-4-s2", "gta-4-s2"],
               "pending": ["gqa-4-s2", "gta-4-s2"]}
    text = render(runs, summary)
    assert ("**The study is incomplete: 2 of 4 planned runs are finished** (pending: "
            "gqa-4-s2, gta-4-s2), and 2 more from earlier plans.") in text
    summary["plan"] = summary["plan"][:2] + ["gqa-4-s1", "gta-4-s1"] + summary["plan"][2:]
    assert "4 of 6 planned runs are finished** (pending: gqa-4-s2, gta-4-s2). " in render(runs, summary)


def test_speed_columns_come_from_one_gpu():
    """A run trained on another card changes tok/s, not quality: the speed columns average
    the runs of the GPU most runs used, and the page says which runs were left out."""
    runs = []
    for seed, gpu, tps in ((0, "H200", 1.5e6), (1, "H200", 1.6e6), (2, "H100", 1.0e6)):
        r = fake_run("gqa-4", seed, 20.0, 20.0)
        r.update(gpu=gpu, steady_tokens_per_s=tps, steady_mfu=tps / 4e6)
        runs.append(r)
    text = render(runs, {})
    assert "1,550,000 ± 70,711" in text and "38.8%" in text
    assert "the runs on H200 only" in text and "gqa-4 seed 2 on H100" in text
    same = render(runs[:2], {})
    assert "1,550,000 ± 70,711" in same and "Trained elsewhere" not in same


def test_the_page_says_how_much_held_out_text_it_scores():
    """Perplexity is scored in whole windows, so a domain's last partial window is left out:
    the page gives the scored and the held-out token counts instead of 'every token'."""
    r = fake_run("gqa-4", 0, 20.0, 20.0)
    r["seq_len"] = 1024
    r["eval"]["ppl"]["code"]["tokens"], r["eval"]["ppl"]["prose"]["tokens"] = 2048, 1024
    text = render([r], {"dataset": {"splits": {"val": {"code": 2100, "prose": 1500}}}})
    assert "every token scored" not in text
    assert ("scored in windows of 1,024 tokens, up to each domain's last whole window "
            "(code 2,048 of 2,100, prose 1,024 of 1,500 tokens)") in text


def test_the_report_draws_the_claims_table_beside_the_loss_plot(tmp_path):
    """The page's claims table is drawn as `<stem>_gaps.png` beside `<stem>_loss.png`, and
    the page shows it right under the table."""
    import matplotlib.pyplot as plt

    runs = paired_runs([0.0323, 0.0127, 0.0138])
    runs += [fake_run("mla", 0, 20.0, 20.0), fake_run("gla-2", 0, 20.1, 20.1)]  # one seed: untested
    study = write_study_folder(tmp_path / "study", runs)
    out = tmp_path / "docs" / "quality.md"
    assert report_main(["--study", str(study), "--out", str(out)]) == 0
    png = out.parent / "quality_gaps.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = plt.imread(png).shape
    assert 0 < width <= 1600 and height > 0
    lines = out.read_text().splitlines()
    image = lines.index("![the claims' paired gaps](quality_gaps.png)")
    table_end = max(i for i, ln in enumerate(lines) if ln.startswith("| gla-2 vs mla |"))
    assert image == table_end + 2 and lines[image + 2].startswith("Per claim and metric:")
    assert lines.index("![loss curves](quality_loss.png)") < table_end
    assert lines.index("In plain words:") > image


def test_the_gaps_figure_of_a_batch_in_progress_is_its_last_look(tmp_path, monkeypatch):
    """Part-way through a registered batch, the table keeps the claim's rows at the last
    look; the figure is handed those rows (the last look's six seeds, its looks and
    intervals), not the batch's new seeds."""
    from hwattn.eval import report
    from hwattn.eval.report import by_variant

    six = [0.0323, 0.0127, 0.0138, 0.0088, 0.0262, 0.0274]
    looks, registered = {"gta-4 vs gqa-4": [2, 3, 4, 6]}, {"gta-4 vs gqa-4": 10}
    at_six = claim_results(by_variant(paired_runs(six)), ["code", "prose"], looks)
    study = write_study_folder(tmp_path / "study", paired_runs(six + [-0.05, -0.05]), looks, registered)
    drawn = []
    real = report.plot_gaps
    monkeypatch.setattr(report, "plot_gaps", lambda rows, path: (drawn.append(rows),
                                                                 real(rows, path))[1])
    out = write_report(study, tmp_path / "docs" / "quality.md")
    assert json.loads((study / "study_looks.json").read_text()) == looks  # no new look
    (rows,) = drawn
    gta = [r for r in rows if r["new"] == "gta-4"]
    assert [r["metric"] for r in gta] == ["average", "code", "prose"]
    for row, last in zip(gta, at_six):
        assert [s for s, _ in row["gaps"]] == [0, 1, 2, 3, 4, 5]  # not seeds 6 and 7
        assert row["gaps"] == last["gaps"] and row["looks"] == 4 and row["batch"] == (8, 10)
        assert row["interval"] == last["interval"] and row["corrected"] == last["corrected"]
    text = out.read_text()
    m, lo, hi = gta[0]["interval"]
    assert ("| gta-4 vs gqa-4 | average | 6 | " in text
            and f"| {100 * m:+.2f}% | [{100 * lo:+.2f}%, {100 * hi:+.2f}%] | 4 |" in text)
    assert (out.parent / "quality_gaps.png").stat().st_size > 0


def test_a_study_that_cannot_be_rendered_leaves_the_earlier_report_whole(tmp_path):
    """A run record lacking a field the page needs was a KeyError traceback, after the plot and
    the raw copies beside the earlier page had been replaced with the bad study's: the page no
    longer matched its raw files. Now one error naming the file, and nothing is replaced."""
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    good = [fake_run("gqa-4", 0, 20.0, 20.0), fake_run("gta-4", 0, 20.1, 20.1)]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    assert report_main(["--study", str(study), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()}
    assert len(before) == 4  # the page, its two plots, the copy of study_runs.jsonl
    bad = dict(good[1])
    del bad["kv_bytes_per_token_per_layer"]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good[0], bad)))
    with pytest.raises(ValueError, match="study_runs.jsonl.*kv_bytes_per_token_per_layer"):
        write_report(study, out)
    assert {p: p.read_bytes() for p in out.parent.rglob("*") if p.is_file()} == before


def test_the_recall_table_does_not_need_the_first_run_to_have_run_the_probe():
    """The recall section read its chance level from the first record alone: a study whose
    first run has no recall results (and a later one has) stopped with a KeyError, reported
    as "its records lack what the report needs"."""
    runs = paired_runs([0.01, 0.02])
    for r in runs[1:]:
        r["eval"]["recall"] = {"pairs_8": 0.5, "mean": 0.5, "chance": 0.001}
    text = render(runs, {})
    assert "(chance 0.10%)" in text
    assert "| gqa-4 | 0.500 |" in text  # seed 1's alone: seed 0's gqa-4 ran no probe
