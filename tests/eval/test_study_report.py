"""The GPU quality study, run on CPU at toy size across two commands (one resuming a killed
run), and the report written from its files."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
from pathlib import Path

import pytest

from hwattn.eval.claims import MAX_SEEDS, claim_results, seeds_to_decide, t95, t_interval
from hwattn.eval.report import main as report_main, render, write_report

ROOT = Path(__file__).resolve().parents[2]
CLAIM = "gqa-4,gta-4,mla,gla-2"


def _study_module():
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "benchmarks" / "quality_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def study(tmp_path_factory, dataset_dir):
    """Command 1 resumes a run killed at step 2 and stops after three runs; command 2 does
    the other five. Returns (module, study dir, export dir, argv, records after command 1)."""
    from hwattn.train.trainer import train

    mod = _study_module()
    root = tmp_path_factory.mktemp("study")
    argv = ["--smoke", "--data", str(dataset_dir), "--study", str(root / "s"), "--work",
            str(root / "w"), "--export", str(root / "e"), "--variants", CLAIM, "--seeds", "0,1",
            "--extra-seeds", "", "--steps", "4", "--deadline-s", "1e6"]
    killed = mod.run_config(mod.parse_args(argv), "gqa-4", 0, "cpu", False)
    train(killed, stop_after=2, progress=False, log=lambda *a: None)
    assert mod.main(argv + ["--max-runs", "3"]) == 0
    first = [json.loads(x) for x in (root / "s" / "study_runs.jsonl").read_text().splitlines()]
    assert mod.main(argv) == 0
    return mod, root / "s", root / "e", argv, first


def test_plan_puts_the_claim_pairs_first():
    mod = _study_module()
    runs = mod.plan(mod.parse_args([]))
    assert len(runs) == 16 and len(set(runs)) == 16
    assert all(v in mod.CLAIM_VARIANTS for v, _ in runs[:12])
    assert runs[:4] == [("gqa-4", 0), ("gta-4", 0), ("mla", 0), ("gla-2", 0)]
    assert sorted(s for v, s in runs if v == "mha") == [0, 1]


@pytest.mark.slow
def test_study_resumes_and_keeps_finished_runs(study):
    mod, sdir, export, argv, first = study
    log = (sdir / "study_log.txt").read_text()
    assert "resuming gqa-4 from step 2 of 4" in log
    assert [(r["variant"], r["seed"]) for r in first] == [("gqa-4", 0), ("gta-4", 0), ("mla", 0)]
    runs = [json.loads(x) for x in (sdir / "study_runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [
        (v, s) for s in (0, 1) for v in CLAIM.split(",")]
    assert runs[:3] == first  # not trained again by the second command
    assert sorted(p.name for p in export.iterdir()) == [
        "study_log.txt", "study_runs.jsonl", "study_summary.json"]
    summary = json.loads((sdir / "study_summary.json").read_text())
    assert summary["pending"] == [] and len(summary["commands"]) == 2


@pytest.mark.slow
def test_a_checkpointed_run_resumes_where_a_fresh_one_would_not_start(tmp_path, dataset_dir):
    """--min-start-s holds back fresh runs only: a run an earlier command checkpointed goes
    on with --resume-min-s left, and no fresh run starts after it."""
    from hwattn.train.trainer import train

    mod = _study_module()
    argv = ["--smoke", "--data", str(dataset_dir), "--study", str(tmp_path / "s"), "--work",
            str(tmp_path / "w"), "--variants", CLAIM, "--seeds", "0", "--extra-seeds", "",
            "--steps", "4", "--deadline-s", "1000", "--min-start-s", "5000"]
    train(mod.run_config(mod.parse_args(argv), "gqa-4", 0, "cpu", False), stop_after=2,
          progress=False, log=lambda *a: None)
    assert mod.main(argv) == 0
    log = (tmp_path / "s" / "study_log.txt").read_text()
    assert "resuming gqa-4 from step 2 of 4" in log
    assert "starting no more runs in this command" in log
    runs = [json.loads(x) for x in (tmp_path / "s" / "study_runs.jsonl").read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in runs] == [("gqa-4", 0)]
    assert mod.main(argv + ["--resume-min-s", "5000"]) == 0  # nothing checkpointed is left
    assert len((tmp_path / "s" / "study_runs.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_records_share_tokens_and_parameters(study):
    _, sdir, _, _, _ = study
    runs = [json.loads(x) for x in (sdir / "study_runs.jsonl").read_text().splitlines()]
    assert {r["tokens"] for r in runs} == {4 * 4 * 64}
    assert len({round(r["params"], -4) for r in runs}) == 1  # parameter-matched
    for r in runs:
        assert r["tokens_per_non_embedding_param"] == pytest.approx(r["tokens"] / r["non_embedding_params"])
        assert set(r["eval"]) >= {"ppl", "cloze", "mc", "recall"}
        assert any("val_loss" in c for c in r["curve"]) and any("loss" in c for c in r["curve"])
    ppl = {(r["variant"], r["seed"]): r["eval"]["ppl"]["average"]["ppl"] for r in runs}
    assert ppl[("gta-4", 0)] != ppl[("gta-4", 1)]  # two seeds, two initialisations


@pytest.mark.slow
def test_study_refuses_runs_of_another_setup(study):
    mod, _, _, argv, _ = study
    with pytest.raises(SystemExit, match="another setup"):
        mod.main(argv + ["--steps", "5"])


@pytest.mark.slow
def test_report_from_study_files(study, tmp_path):
    _, sdir, _, _, _ = study
    out = tmp_path / "docs" / "quality.md"
    assert report_main(["--study", str(sdir), "--out", str(out)]) == 0
    text = out.read_text()
    for label in CLAIM.split(","):
        assert f"| {label} | 2 |" in text
    assert "gta-4 vs gqa-4" in text and "gla-2 vs mla" in text and "95% interval" in text
    assert "Recall probe" in text and "10.129" in text and " ± " in text
    assert (tmp_path / "docs" / "quality_loss.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "quality_gaps.png").stat().st_size > 10_000
    assert (tmp_path / "docs" / "quality_raw" / "study_runs.jsonl").is_file()
    assert report_main(["--study", str(tmp_path / "nothing")]) == 2


def _run(v, seed, ppl_a, ppl_b):
    avg = (ppl_a + ppl_b) / 2
    return {"variant": v, "seed": seed, "preset": "study", "params": 3.6e7,
            "non_embedding_params": 1.9e7, "hidden_dim": 1, "kv_bytes_per_token_per_layer": 256,
            "curve": [], "eval": {"ppl": {"code": {"ppl": ppl_a, "bpb": 1.0},
                                          "prose": {"ppl": ppl_b, "bpb": 1.0},
                                          "average": {"ppl": avg, "bpb": 1.0}}}}


def test_t_interval_against_hand_computation():
    vals = [0.01, 0.02, 0.06]
    m, lo, hi = t_interval(vals)
    half = 4.303 * statistics.stdev(vals) / math.sqrt(3)
    assert m == pytest.approx(0.03) and lo == pytest.approx(0.03 - half) and hi == pytest.approx(0.03 + half)
    assert t_interval([0.1]) is None and t95(1) == 12.706 and t95(22) == t95(20)


def test_t_quantile_beyond_the_table_is_not_the_normal_one():
    """Beyond 30 degrees of freedom t95 was 1.96, the normal quantile: 4% narrower intervals at
    31. The quantiles below are scipy.stats.t.ppf(0.975, df)."""
    for df, want in ((31, 2.039513), (40, 2.021075), (60, 2.000298), (99, 1.984217),
                     (120, 1.979930), (1000, 1.962339)):
        assert t95(df) == pytest.approx(want, abs=2e-4)
    assert t95(30) > t95(31) > t95(40) > t95(1000) > 1.96


def test_seeds_to_decide_against_hand_computation():
    # Gaps +3.23%, +1.27%, +1.38%: mean 1.96%, sd 1.101%, 0.96% from the margin. Seven seeds
    # give a half-width of 2.447 * 1.101 / sqrt(7) = 1.018% (not clear), eight 0.921% (clear).
    assert seeds_to_decide([0.0323, 0.0127, 0.0138]) == 8
    # Read as a claim's second look, the t quantile is that of 1 − 0.025/6: thirteen seeds give
    # 3.153 * 1.101 / sqrt(13) = 0.963% (not clear), fourteen 3.107 * 1.101 / sqrt(14) = 0.914%.
    assert seeds_to_decide([0.0323, 0.0127, 0.0138], looks=2) == 14
    assert seeds_to_decide([0.01, 0.01]) is None  # on the margin, no spread
    assert seeds_to_decide([0.02]) is None
    assert seeds_to_decide([0.0100, 0.0101, 0.0099, 0.0100001]) == MAX_SEEDS + 1


def test_verdicts_follow_the_numbers():
    runs = []
    for seed, (gqa, gta, mla, gla) in enumerate([(20.0, 19.9, 20.0, 21.0), (20.2, 20.1, 20.1, 21.1),
                                                 (20.1, 20.0, 19.9, 20.9)]):
        runs += [_run("gqa-4", seed, gqa, gqa), _run("gta-4", seed, gta, gta),
                 _run("mla", seed, mla, mla), _run("gla-2", seed, gla, gla)]
    res = {(r["new"], r["metric"]): r for r in claim_results(
        {v: [r for r in runs if r["variant"] == v] for v in ("gqa-4", "gta-4", "mla", "gla-2")},
        ["code", "prose"])}
    assert res[("gta-4", "average")]["verdict"] == "holds"  # ~0.5% better, tight
    assert res[("gla-2", "average")]["verdict"] == "fails"  # ~5% worse, tight
    assert [s for s, _ in res[("gta-4", "prose")]["gaps"]] == [0, 1, 2]
    text = render(runs, {})
    gta = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4 vs gqa-4"))
    gla = next(ln for ln in text.splitlines() if ln.startswith("- **gla-2 vs mla"))
    assert "the claim holds at this scale" in gta and "better with 95% confidence" in gta
    assert "this report is the first look at the claim, and corrected for it" in gta
    assert "does not hold" in gla and "worse by" in gla
    noisy = [_run("gqa-4", 0, 20, 20), _run("gta-4", 0, 20.4, 20.4), _run("gqa-4", 1, 20, 20),
             _run("gta-4", 1, 19.9, 19.9)]
    text = render(noisy, {})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4"))
    assert "is not decided" in line
    # gaps +2%, -0.5%: mean 0.75% < 1%, sd 1.77%: read as its second look (t quantile of
    # 1 − 0.025/6), the interval clears the margin at 352 seeds
    assert "> 100 paired seeds would show that it holds" in line
    row = next(ln for ln in text.splitlines() if ln.startswith("| gta-4 vs gqa-4 | average"))
    assert row.endswith("| inconclusive | > 100 |")
    assert "untested" in next(ln for ln in text.splitlines() if ln.startswith("- **gla-2"))


@pytest.mark.slow
def test_throughput_script_runs_on_cpu(dataset_dir, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("study_throughput",
                                                  ROOT / "benchmarks" / "study_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--data", str(dataset_dir), "--variants", "gta-4,gla-2",
                     "--sdpa", "auto,cudnn", "--profile-steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "study_throughput.json").read_text())
    rows = res["rows"]
    # Profiling adds one logging window (2 steps in the smoke), of which the last step ran
    # under the profiler (no GPU kernels on a CPU); that window is not in the steady rate.
    assert (res["steps"], res["steps_run"], res["profile_steps"]) == (6, 8, 1)
    assert all(r["profiled_steps"] == 1 and r["kernels"]["kernels_per_step"] == 0
               for r in rows[:2])
    assert [(r["variant"], r["sdpa"]) for r in rows] == [
        ("gta-4", "auto"), ("gla-2", "auto"), ("gta-4", "cudnn"), ("gla-2", "cudnn")]
    assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in rows[:2])
    # cuDNN's attention on a CPU: each row says why it did not run, and the others still ran.
    assert all("CUDA device" in r["error"] for r in rows[2:])
    out = capsys.readouterr().out
    assert "| gta-4 | chunked | auto |" in out and "| gla-2 | chunked | cudnn | ValueError" in out
    assert "GPU time per training step by part" in out


def test_throughput_steady_rate_leaves_out_warm_up_and_profiled_windows():
    spec = importlib.util.spec_from_file_location("study_throughput",
                                                  ROOT / "benchmarks" / "study_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    windows = [{"tokens_per_s": r} for r in (10.0, 100.0, 300.0, 1.0)]
    # 600 tokens per window: 6 s + 2 s for the middle two -> 1200 / 8
    assert mod.steady_rate(windows, 600, skip_last=True) == pytest.approx(150.0)
    assert mod.steady_rate(windows, 600, skip_last=False) == pytest.approx(1800 / (6 + 2 + 600))
    assert mod.steady_rate(windows[:2], 600, skip_last=True) == 0.0
    with pytest.raises(SystemExit):  # more profiled steps than a window holds
        mod.main(["--smoke", "--profile-steps", "3"])


@pytest.mark.slow
def test_parallel_workers_share_the_plan(dataset_dir, tmp_path):
    """Two worker processes (CPU stand-ins for two GPUs) claim runs: each runs exactly once."""
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "benchmarks" / "quality_study.py"), "--smoke", "--device",
           "cpu", "--gpus", "2", "--data", str(dataset_dir), "--study", str(tmp_path / "s"),
           "--work", str(tmp_path / "w"), "--variants", "mqa,gta-4", "--seeds", "0,1",
           "--extra-seeds", "", "--steps", "2", "--n-cloze", "0", "--n-mc", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    runs = [json.loads(x) for x in (tmp_path / "s" / "study_runs.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in runs) == [
        ("gta-4", 0), ("gta-4", 1), ("mqa", 0), ("mqa", 1)]
    log = (tmp_path / "s" / "study_log.txt").read_text()
    assert "2 workers on the CPU" in log and "[gpu 0]" in log and "[gpu 1]" in log
    assert sum(f"{v}-s{s}: val ppl" in log for v in ("mqa", "gta-4") for s in (0, 1)) == 4


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
            r = _run(v, seed, ppl, ppl)
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


def test_commands_survive_a_reset_of_the_tracked_copies(tmp_path, dataset_dir):
    """A GPU machine lent one command at a time restores the study folder's tracked files
    before each command; the work folder's journal still brings every command of the
    machine's lifetime into the summary and the log, in order, without repeating one."""
    mod = _study_module()
    study, work = tmp_path / "s", tmp_path / "w"
    argv = ["--smoke", "--data", str(dataset_dir), "--study", str(study), "--work", str(work),
            "--export", str(tmp_path / "e"), "--variants", "gqa-4", "--seeds", "0",
            "--extra-seeds", ""]
    args = mod.parse_args(argv)
    study.mkdir()
    committed = "[   1.0s] command of an earlier sitting ×\n"
    (study / mod.LOG_FILE).write_text(committed)

    def command(date: str, note: str):
        log = mod.Log(study / mod.LOG_FILE)
        start = (study / mod.LOG_FILE).stat().st_size
        env = {"date": date, "argv": argv}
        log("command", json.dumps(env))
        log(note)
        return mod.write_study(args, log, env, start)

    command("2026-12-05T01:00:00+00:00", "first command's run")
    (study / mod.LOG_FILE).write_text(committed)  # the tracked copies, restored
    (study / mod.SUMMARY_FILE).unlink()
    command("2026-12-05T02:00:00+00:00", "second command's run")
    summary = command("2026-12-05T03:00:00+00:00", "third command, tracked copies kept")
    assert [c["environment"]["date"][11:13] for c in summary["commands"]] == ["01", "02", "03"]
    lines = (study / mod.LOG_FILE).read_text().splitlines()
    assert lines[0] == committed.strip()
    order = [i for i, line in enumerate(lines) if line.endswith(
        ("first command's run", "second command's run", "third command, tracked copies kept"))]
    assert len(order) == 3 and order == sorted(order)
    assert sum("command {" in line for line in lines) == 3
    assert (tmp_path / "e" / mod.LOG_FILE).read_text() == (study / mod.LOG_FILE).read_text()


def test_speed_columns_come_from_one_gpu():
    """A run trained on another card changes tok/s, not quality: the speed columns average
    the runs of the GPU most runs used, and the page says which runs were left out."""
    runs = []
    for seed, gpu, tps in ((0, "H200", 1.5e6), (1, "H200", 1.6e6), (2, "H100", 1.0e6)):
        r = _run("gqa-4", seed, 20.0, 20.0)
        r.update(gpu=gpu, steady_tokens_per_s=tps, steady_mfu=tps / 4e6)
        runs.append(r)
    text = render(runs, {})
    assert "1,550,000 ± 70,711" in text and "38.8%" in text
    assert "the runs on H200 only" in text and "gqa-4 seed 2 on H100" in text
    same = render(runs[:2], {})
    assert "1,550,000 ± 70,711" in same and "Trained elsewhere" not in same


def test_a_study_that_cannot_be_rendered_leaves_the_earlier_report_whole(tmp_path):
    """A run record lacking a field the page needs was a KeyError traceback, after the plot and
    the raw copies beside the earlier page had been replaced with the bad study's: the page no
    longer matched its raw files. Now one error naming the file, and nothing is replaced."""
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    good = [_run("gqa-4", 0, 20.0, 20.0), _run("gta-4", 0, 20.1, 20.1)]
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


def test_a_damaged_runs_file_is_named_with_its_line(tmp_path, capsys):
    (tmp_path / "study_runs.jsonl").write_text(json.dumps(_run("mha", 0, 2.0, 2.0)) + "\n{oops\n")
    assert report_main(["--study", str(tmp_path), "--out", str(tmp_path / "q.md")]) == 2
    err = capsys.readouterr().err
    assert "study_runs.jsonl: line 2 is not a JSON record" in err
    assert not (tmp_path / "q.md").exists()


def test_the_page_says_how_much_held_out_text_it_scores():
    """Perplexity is scored in whole windows, so a domain's last partial window is left out:
    the page gives the scored and the held-out token counts instead of 'every token'."""
    r = _run("gqa-4", 0, 20.0, 20.0)
    r["seq_len"] = 1024
    r["eval"]["ppl"]["code"]["tokens"], r["eval"]["ppl"]["prose"]["tokens"] = 2048, 1024
    text = render([r], {"dataset": {"splits": {"val": {"code": 2100, "prose": 1500}}}})
    assert "every token scored" not in text
    assert ("scored in windows of 1,024 tokens, up to each domain's last whole window "
            "(code 2,048 of 2,100, prose 1,024 of 1,500 tokens)") in text


@pytest.mark.slow
def test_keep_checkpoints_leaves_a_finished_run_loadable(tmp_path, dataset_dir):
    """--keep-checkpoints keeps the finished run's folder under --work, in the form
    study_speculative.py --checkpoint takes; without it the folder is deleted."""
    import importlib
    import sys

    from hwattn.models.checkpoint import load_checkpoint

    mod = _study_module()
    base = ["--smoke", "--data", str(dataset_dir), "--variants", "gqa-4", "--seeds", "0",
            "--extra-seeds", "", "--steps", "2", "--deadline-s", "1e6"]
    for keep in (False, True):
        root = tmp_path / f"keep{keep}"
        argv = base + ["--study", str(root / "s"), "--work", str(root / "w")]
        assert mod.main(argv + (["--keep-checkpoints"] if keep else [])) == 0
        assert (root / "w" / "gqa-4-s0" / "checkpoint").is_dir() is keep
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        folder = importlib.import_module("study_speculative_train").checkpoint_folder(
            str(tmp_path / "keepTrue" / "w" / "gqa-4-s0"))
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert load_checkpoint(folder).config.label.startswith("gqa")


def test_t_quantile_is_students():
    """The exact quantile by bisection agrees with the table of 97.5% quantiles, and with
    values of other levels (scipy.stats.t.ppf, written down)."""
    from hwattn.eval.claims import T95, t_quantile, t_within

    for df, q in T95.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)
    assert t_quantile(1 - 0.025 / 4, 5) == pytest.approx(3.8100047, abs=1e-6)
    assert t_quantile(1 - 0.025 / 20, 5) == pytest.approx(5.6041655, abs=1e-6)
    assert t_quantile(0.995, 7) == pytest.approx(3.4994833, abs=1e-6)
    assert t_quantile(0.9999, 2) == pytest.approx(70.700071, rel=1e-6)
    assert t_within(0.0, 3) == 0.0 and t_within(1e9, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.4, 3)


def test_each_look_at_a_claim_widens_its_interval():
    """Six gaps whose plain 95% interval just clears the margin (the study's GTA-4 gaps): the
    first look's corrected interval (t quantile of 1 − 0.025/2, a 97.5% interval) already
    straddles it; read as the fourth look at the claim (after 2, 3 and 4 seeds; 1 − 0.025/20,
    a 99.75% interval) it is wider still, and deciding takes more seeds."""
    from hwattn.eval.claims import record_looks, t_quantile_for

    gaps = [0.0323, 0.0127, 0.0138, 0.0088, 0.0262, 0.0274]
    runs = []
    for seed, g in enumerate(gaps):
        runs += [_run("gqa-4", seed, 20.0, 20.0), _run("gta-4", seed, 20 * (1 + g), 20 * (1 + g))]
    by = {v: [r for r in runs if r["variant"] == v] for v in ("gqa-4", "gta-4")}
    once = claim_results(by, ["code", "prose"])[0]
    assert once["looks"] == 1 and once["interval"][1] > 0.01  # read plainly: "fails"
    m, lo, hi = once["interval"]
    assert (hi - m) * t_quantile_for(1, 5) / t95(5) == pytest.approx(once["corrected"][2] - m)
    assert once["corrected"][1] < 0.01 and once["verdict"] == "inconclusive"
    looks = {"gta-4 vs gqa-4": [2, 3, 4, 6]}
    fourth = claim_results(by, ["code", "prose"], looks)[0]
    assert fourth["interval"] == once["interval"] and fourth["looks"] == 4
    assert fourth["corrected"][1] < once["corrected"][1] < 0.01 < once["interval"][1]
    # scipy.stats.t.ppf(1 - 0.025 / 20, 5) = 5.6041655: [+2.02% ∓ 2.20%]
    assert fourth["corrected"][1] == pytest.approx(-0.0017785, abs=1e-6)
    assert fourth["corrected"][2] == pytest.approx(0.0421785, abs=1e-6)
    assert fourth["verdict"] == "inconclusive" and fourth["seeds_needed"] > 6
    text = render(runs, {"looks": looks})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4"))
    assert "is not decided" in line and "look 4 at the claim (at 2, 3, 4, 6 paired seeds)" in line
    # A report over new seeds is a look; one rewritten over the same seeds is not.
    assert record_looks(by, {"gta-4 vs gqa-4": [2, 3, 4]}) == looks
    assert record_looks(by, looks) == looks
    assert record_looks({"gqa-4": by["gqa-4"][:1], "gta-4": by["gta-4"][:1]}, {}) == {}


def _ever_wrong(quantile, seeds=(2, 3, 4, 6), draws=400_000, seed=20261206):
    """Monte Carlo: how often a claim whose true gap lies exactly on the margin is ever
    declared "fails", and ever declared "holds" (both wrong), when it is read at a look after
    each of `seeds` paired seeds with the t quantile `quantile(look, df)` and the reading
    stops at the first look that decides it; the gaps normal (the t-statistic does not depend
    on their spread)."""
    import numpy as np

    from hwattn.eval.claims import MATCH_MARGIN

    rng = np.random.default_rng(seed)
    gaps = MATCH_MARGIN + 0.01 * rng.standard_normal((draws, max(seeds)))
    fails, holds = np.zeros(draws, bool), np.zeros(draws, bool)
    for look, n in enumerate(seeds, 1):
        x = gaps[:, :n]
        m, half = x.mean(axis=1), quantile(look, n - 1) * x.std(axis=1, ddof=1) / math.sqrt(n)
        undecided = ~(fails | holds)
        fails |= undecided & (m - half > MATCH_MARGIN)
        holds |= undecided & (m + half <= MATCH_MARGIN)
    return float(fails.mean()), float(holds.mean())


def test_reading_a_claim_at_every_look_is_wrong_at_most_2_5_percent_a_side():
    """The correction for looks holds its promise when the reading stops at the first look
    that clears the margin: with the true gap on the margin and looks at 2, 3, 4 and 6 seeds
    (the study's GTA-4 looks), "fails" (and "holds") is ever declared at most 2.5% of the
    time, up to the Monte Carlo error (400,000 draws: a standard error of 0.025%). Bonferroni's
    1 − 0.025/k, used before, declared "fails" 4.1% of the time here; the levels
    0.025/(k(k+1)) sum to 0.025 · 4/5 over these looks (1.75% here)."""
    from hwattn.eval.claims import t_quantile_for

    assert sum(0.025 / (k * (k + 1)) for k in range(1, 1001)) < 0.025
    fails, holds = _ever_wrong(t_quantile_for)
    assert fails <= 0.025 + 0.001 and holds <= 0.025 + 0.001
    assert fails <= 0.02 + 0.001 and holds <= 0.02 + 0.001  # the union bound over four looks


def test_write_report_records_its_look_beside_the_runs(tmp_path):
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    runs = [_run(v, s, p, p) for s in (0, 1) for v, p in (("gqa-4", 20.0), ("gta-4", 20.2 + s))]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    write_report(study, out)
    first = json.loads((study / "study_looks.json").read_text())
    assert first == {"gta-4 vs gqa-4": [2]}
    write_report(study, out)  # the same seeds again: no new look
    assert json.loads((study / "study_looks.json").read_text()) == first
    assert (out.parent / "quality_raw" / "study_looks.json").read_text() == \
        (study / "study_looks.json").read_text()
    more = [_run(v, 2, p, p) for v, p in (("gqa-4", 20.0), ("gta-4", 20.3))]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs + more))
    write_report(study, out)
    assert json.loads((study / "study_looks.json").read_text()) == {"gta-4 vs gqa-4": [2, 3]}
    assert "| gta-4 vs gqa-4 | average | 3 |" in out.read_text()


def test_an_extended_plan_counts_its_own_runs_and_the_earlier_ones_apart():
    """A later command may plan more seeds of two variants: the page counts the plan's
    finished runs against the plan, and the runs of earlier plans beside them (it once
    printed '24 of 18 planned runs')."""
    runs = [_run(v, seed, 20.0, 20.0) for seed in (0, 1) for v in ("gqa-4", "gta-4")]
    summary = {"plan": ["gqa-4-s0", "gta-4-s0", "gqa-4-s2", "gta-4-s2"],
               "pending": ["gqa-4-s2", "gta-4-s2"]}
    text = render(runs, summary)
    assert ("**The study is incomplete: 2 of 4 planned runs are finished** (pending: "
            "gqa-4-s2, gta-4-s2), and 2 more from earlier plans.") in text
    summary["plan"] = summary["plan"][:2] + ["gqa-4-s1", "gta-4-s1"] + summary["plan"][2:]
    assert "4 of 6 planned runs are finished** (pending: gqa-4-s2, gta-4-s2). " in render(runs, summary)


def _pairs(gaps, base=20.0):
    runs = []
    for seed, g in enumerate(gaps):
        runs += [_run("gqa-4", seed, base, base),
                 _run("gta-4", seed, base * (1 + g), base * (1 + g))]
    return runs


def test_a_registered_batch_is_read_once_when_it_is_whole(tmp_path):
    """Seeds added as one batch registered before its first seed (`--next-look`) are not a
    look until the batch is whole: part-way, the claim's rows stay those of its last look
    and the looks file is unchanged; whole, the batch is one look over every seed."""
    from hwattn.eval.claims import record_looks
    from hwattn.eval.report import by_variant

    six = [0.0323, 0.0127, 0.0138, 0.0088, 0.0262, 0.0274]
    looks, registered = {"gta-4 vs gqa-4": [2, 3, 4, 6]}, {"gta-4 vs gqa-4": 10}
    at_six = claim_results(by_variant(_pairs(six)), ["code", "prose"], looks)[0]
    part = _pairs(six + [-0.05, -0.05])  # two new seeds that would move the interval a lot
    by = by_variant(part)
    assert record_looks(by, looks, registered) == looks
    row = claim_results(by, ["code", "prose"], looks, registered)[0]
    assert row["batch"] == (8, 10) and len(row["gaps"]) == 6
    assert row["corrected"] == at_six["corrected"] and row["looks"] == 4
    assert claim_results(by, ["code", "prose"], looks)[0]["corrected"] != at_six["corrected"]
    text = render(part, {"looks": looks, "next_looks": registered})
    assert "| gta-4 vs gqa-4 | average | 6 |" in text
    assert "inconclusive (batch to 10 seeds: 8 in)" in text
    assert "A batch registered before its first seed is part-way (8 of 10 paired seeds in)" in text
    whole = by_variant(_pairs(six + [0.02] * 4))
    assert record_looks(whole, looks, registered) == {"gta-4 vs gqa-4": [2, 3, 4, 6, 10]}
    row = claim_results(whole, ["code", "prose"], {"gta-4 vs gqa-4": [2, 3, 4, 6, 10]},
                        registered)[0]
    assert row["batch"] is None and len(row["gaps"]) == 10 and row["looks"] == 5


def test_a_batch_is_registered_only_before_its_first_seed(tmp_path, capsys):
    from hwattn.eval.claims import register_next_looks
    from hwattn.eval.report import by_variant

    by = by_variant(_pairs([0.01, 0.02, 0.03]))
    key = "gta-4 vs gqa-4"
    assert register_next_looks(by, {key: [3]}, {}, {key: 6}) == {key: 6}
    with pytest.raises(ValueError, match="1 of its 3 paired seeds have not been read"):
        register_next_looks(by, {key: [2]}, {}, {key: 6})
    with pytest.raises(ValueError, match="already has 3 paired seeds"):
        register_next_looks(by, {key: [3]}, {}, {key: 3})
    with pytest.raises(ValueError, match="unknown claim 'gta-4 vs mha'"):
        register_next_looks(by, {key: [3]}, {}, {"gta-4 vs mha": 6})
    # Through the command: the report's look first, then the registration, kept beside the runs.
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    (study / "study_runs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in _pairs([0.01, 0.02, 0.03])))
    assert report_main(["--study", str(study), "--out", str(out), "--next-look", "gta-4 vs gqa-4=6"]) == 0
    assert json.loads((study / "study_looks.json").read_text()) == {key: [3]}
    assert json.loads((study / "study_next_looks.json").read_text()) == {key: 6}
    assert (out.parent / "quality_raw" / "study_next_looks.json").is_file()
    capsys.readouterr()
    assert report_main(["--study", str(study), "--out", str(out), "--next-look", "gta-4 vs gqa-4"]) == 2
    assert "give CLAIM=SEEDS" in capsys.readouterr().err


def _write_study(study: Path, runs: list[dict], looks=None, next_looks=None) -> Path:
    study.mkdir()
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    if looks is not None:
        (study / "study_looks.json").write_text(json.dumps(looks, indent=1) + "\n")
    if next_looks is not None:
        (study / "study_next_looks.json").write_text(json.dumps(next_looks, indent=1) + "\n")
    return study


def test_the_report_draws_the_claims_table_beside_the_loss_plot(tmp_path):
    """The page's claims table is drawn as `<stem>_gaps.png` beside `<stem>_loss.png`, and
    the page shows it right under the table."""
    import matplotlib.pyplot as plt

    runs = _pairs([0.0323, 0.0127, 0.0138])
    runs += [_run("mla", 0, 20.0, 20.0), _run("gla-2", 0, 20.1, 20.1)]  # one seed: untested
    study = _write_study(tmp_path / "study", runs)
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
    at_six = claim_results(by_variant(_pairs(six)), ["code", "prose"], looks)
    study = _write_study(tmp_path / "study", _pairs(six + [-0.05, -0.05]), looks, registered)
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


def test_a_run_recorded_twice_is_counted_once(tmp_path):
    """A run whose record is in study_runs.jsonl twice (a hand merge, an export copied in
    twice) is one seed: it once made a fourth gap of three seeds, and a fourth seed of the
    variant in the table. Two different records of one run are refused, naming it."""
    runs = _pairs([0.01, 0.02, 0.03])
    study = _write_study(tmp_path / "study", runs + [runs[1]])  # gta-4 seed 0 again
    out = write_report(study, tmp_path / "docs" / "quality.md")
    text = out.read_text()
    assert "| gta-4 vs gqa-4 | average | 3 |" in text and "| gta-4 | 3 |" in text
    assert json.loads((study / "study_looks.json").read_text()) == {"gta-4 vs gqa-4": [3]}
    other = dict(runs[1], eval={"ppl": {d: dict(v, ppl=v["ppl"] + 1)
                                        for d, v in runs[1]["eval"]["ppl"].items()}})
    study = _write_study(tmp_path / "study2", runs + [other])
    with pytest.raises(ValueError, match="gta-4-s0 is recorded twice"):
        write_report(study, tmp_path / "docs2" / "quality.md")


def test_runs_of_another_setup_or_unfinished_are_not_compared(tmp_path):
    """The report pairs runs of one setup (corpus build, schedule, shape), as the study folder
    is meant to hold: a record of another build (e.g. the `-head4000000` cut of the corpus)
    or one that stopped before its last step is refused by name, not paired silently."""
    def full(r, **kw):
        return dict(r, preset="study", steps=4, seq_len=8, batch_size=2, lr=2e-3,
                    warmup_steps=1, build_key="abc", tokens=64, **kw)

    runs = [full(r) for r in _pairs([0.01, 0.02, 0.03])]
    assert write_report(_write_study(tmp_path / "ok", runs), tmp_path / "d0" / "q.md")
    mixed = runs[:-1] + [dict(runs[-1], build_key="abc-head4000000")]
    with pytest.raises(ValueError, match="gta-4-s2.*build_key"):
        write_report(_write_study(tmp_path / "mixed", mixed), tmp_path / "d1" / "q.md")
    short = runs[:-1] + [dict(runs[-1], tokens=32)]
    with pytest.raises(ValueError, match="gta-4-s2.*32 of its 64 tokens"):
        write_report(_write_study(tmp_path / "short", short), tmp_path / "d2" / "q.md")


def test_a_batch_is_not_registered_after_a_seed_no_look_has_read():
    """One paired seed is not read at any look (an interval needs two), but its gap is on the
    page: registering a batch then fixes the stopping point after seeing data of the batch."""
    from hwattn.eval.claims import register_next_looks
    from hwattn.eval.report import by_variant

    key = "gta-4 vs gqa-4"
    assert register_next_looks(by_variant(_pairs([])), {}, {}, {key: 6}) == {key: 6}
    with pytest.raises(ValueError, match="1 of its 1 paired seeds have not been read"):
        register_next_looks(by_variant(_pairs([0.05])), {}, {}, {key: 6})
