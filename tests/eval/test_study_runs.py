"""The GPU quality study, run on CPU at toy size across two commands (one resuming a killed
run), and its runs read back for the report (`hwattn.eval.report.runs`): a run recorded
twice, one of another setup, an unfinished one, a damaged runs file, the looks recorded
beside the runs."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hwattn.eval.report import main as report_main, write_report
from tests.eval.study_helpers import ROOT, fake_run, paired_runs, study_module, write_study_folder

CLAIM = "gqa-4,gta-4,mla,gla-2"


@pytest.fixture(scope="module")
def study(tmp_path_factory, dataset_dir):
    """Command 1 resumes a run killed at step 2 and stops after three runs; command 2 does
    the other five. Returns (module, study dir, export dir, argv, records after command 1)."""
    from hwattn.train.trainer import train

    mod = study_module()
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
    mod = study_module()
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

    mod = study_module()
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


def test_commands_survive_a_reset_of_the_tracked_copies(tmp_path, dataset_dir):
    """A GPU machine lent one command at a time restores the study folder's tracked files
    before each command; the work folder's journal still brings every command of the
    machine's lifetime into the summary and the log, in order, without repeating one."""
    mod = study_module()
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


@pytest.mark.slow
def test_keep_checkpoints_leaves_a_finished_run_loadable(tmp_path, dataset_dir):
    """--keep-checkpoints keeps the finished run's folder under --work, in the form
    study_speculative.py --checkpoint takes; without it the folder is deleted."""
    import importlib
    import sys

    from hwattn.models.checkpoint import load_checkpoint

    mod = study_module()
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


def test_a_damaged_runs_file_is_named_with_its_line(tmp_path, capsys):
    (tmp_path / "study_runs.jsonl").write_text(json.dumps(fake_run("mha", 0, 2.0, 2.0)) + "\n{oops\n")
    assert report_main(["--study", str(tmp_path), "--out", str(tmp_path / "q.md")]) == 2
    err = capsys.readouterr().err
    assert "study_runs.jsonl: line 2 is not a JSON record" in err
    assert not (tmp_path / "q.md").exists()


def test_a_run_recorded_twice_is_counted_once(tmp_path):
    """A run whose record is in study_runs.jsonl twice (a hand merge, an export copied in
    twice) is one seed: it once made a fourth gap of three seeds, and a fourth seed of the
    variant in the table. Two different records of one run are refused, naming it."""
    runs = paired_runs([0.01, 0.02, 0.03])
    study = write_study_folder(tmp_path / "study", runs + [runs[1]])  # gta-4 seed 0 again
    out = write_report(study, tmp_path / "docs" / "quality.md")
    text = out.read_text()
    assert "| gta-4 vs gqa-4 | average | 3 |" in text and "| gta-4 | 3 |" in text
    assert json.loads((study / "study_looks.json").read_text()) == {"gta-4 vs gqa-4": [3]}
    other = dict(runs[1], eval={"ppl": {d: dict(v, ppl=v["ppl"] + 1)
                                        for d, v in runs[1]["eval"]["ppl"].items()}})
    study = write_study_folder(tmp_path / "study2", runs + [other])
    with pytest.raises(ValueError, match="gta-4-s0 is recorded twice"):
        write_report(study, tmp_path / "docs2" / "quality.md")


def test_runs_of_another_setup_or_unfinished_are_not_compared(tmp_path):
    """The report pairs runs of one setup (corpus build, schedule, shape), as the study folder
    is meant to hold: a record of another build (e.g. the `-head4000000` cut of the corpus)
    or one that stopped before its last step is refused by name, not paired silently."""
    def full(r, **kw):
        return dict(r, preset="study", steps=4, seq_len=8, batch_size=2, lr=2e-3,
                    warmup_steps=1, build_key="abc", tokens=64, **kw)

    runs = [full(r) for r in paired_runs([0.01, 0.02, 0.03])]
    assert write_report(write_study_folder(tmp_path / "ok", runs), tmp_path / "d0" / "q.md")
    mixed = runs[:-1] + [dict(runs[-1], build_key="abc-head4000000")]
    with pytest.raises(ValueError, match="gta-4-s2.*build_key"):
        write_report(write_study_folder(tmp_path / "mixed", mixed), tmp_path / "d1" / "q.md")
    short = runs[:-1] + [dict(runs[-1], tokens=32)]
    with pytest.raises(ValueError, match="gta-4-s2.*32 of its 64 tokens"):
        write_report(write_study_folder(tmp_path / "short", short), tmp_path / "d2" / "q.md")


def test_write_report_records_its_look_beside_the_runs(tmp_path):
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    runs = [fake_run(v, s, p, p) for s in (0, 1) for v, p in (("gqa-4", 20.0), ("gta-4", 20.2 + s))]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    write_report(study, out)
    first = json.loads((study / "study_looks.json").read_text())
    assert first == {"gta-4 vs gqa-4": [2]}
    write_report(study, out)  # the same seeds again: no new look
    assert json.loads((study / "study_looks.json").read_text()) == first
    assert (out.parent / "quality_raw" / "study_looks.json").read_text() == \
        (study / "study_looks.json").read_text()
    more = [fake_run(v, 2, p, p) for v, p in (("gqa-4", 20.0), ("gta-4", 20.3))]
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs + more))
    write_report(study, out)
    assert json.loads((study / "study_looks.json").read_text()) == {"gta-4 vs gqa-4": [2, 3]}
    assert "| gta-4 vs gqa-4 | average | 3 |" in out.read_text()


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_diverged_run_is_named_not_read_as_a_damaged_file(tmp_path, value):
    """A run whose final evaluation diverged (perplexity inf or NaN, as `hwattn.eval` reports
    it and json writes it) stopped the report with "its records lack what the report needs
    (AttributeError: 'float' object has no attribute 'numerator'); are they records of
    benchmarks/quality_study.py?". It is named, with its line and what is not finite, and
    nothing is written, the looks included."""
    runs = paired_runs([0.01, 0.02, 0.03])
    runs[3]["eval"]["ppl"]["code"]["ppl"] = value  # gta-4 seed 1, line 4
    study = write_study_folder(tmp_path / "study", runs)
    with pytest.raises(ValueError, match=r"run gta-4-s1 \(line 4\) diverged: its validation "
                                         f"perplexity of code is {value}"):
        write_report(study, tmp_path / "docs" / "quality.md")
    assert not (study / "study_looks.json").exists()
    assert not (tmp_path / "docs").exists()
