"""More hostile arguments for the `hwattn` command (tests/cli/test_arguments.py has the
helpers and the first round): each case is refused with one error line naming the option
before any work starts, or warned about, never a traceback or a silent substitute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_arguments import assert_error, dataset, no_server, run_cli  # noqa: F401

TRAIN = ["--seq-len", "32", "--batch-size", "2", "--eval-tokens", "256", "--json"]


# --- Ctrl-C ---------------------------------------------------------------------------------


def test_ctrl_c_is_one_line_and_status_130_not_a_traceback(capsys, monkeypatch):
    """Observed: Ctrl-C during `hwattn train` printed a 30-line KeyboardInterrupt traceback
    and exited with status 1."""
    import hwattn.analysis.cost as cost

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cost, "analyze", interrupted)
    code, out, err = run_cli(capsys, "analyze", "--preset", "tiny")
    assert code == 130, (code, err)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines() == ["hwattn analyze: interrupted"]


# --- devices --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_that_cannot_run_the_work_is_refused_before_it(capsys, dataset_dir, tmp_path,
                                                                device):
    """Observed: --device meta trained into --out until autocast failed (a RuntimeError
    traceback, and a run folder left behind); --device mps was a traceback from torch."""
    out = tmp_path / "run"
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "1",
                         "--device", device, *TRAIN), "--device", device)
    assert not out.exists()
    assert_error(run_cli(capsys, "demo", "--device", device, "--batch", "1", "--prompt-len", "2",
                         "--new-tokens", "2", "--repeats", "1"), "--device", device)
    assert_error(run_cli(capsys, "compare", "--out", tmp_path / "c", "--device", device,
                         "--steps", "1"), "--device", device)
    assert not (tmp_path / "c").exists()


# --- empty output paths ---------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    # Observed: trained (built) into the current folder.
    ["train", "--data", "DATA", "--steps", "1", *TRAIN],
    ["data", "build", "--tokenizer", "bpe:300"],
    # Observed: the default runs/compare-<preset> instead.
    ["compare", "--steps", "1", "--device", "cpu", "--variants", "mha"],
])
def test_an_empty_out_folder_is_refused(capsys, dataset_dir, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    argv = [str(dataset_dir) if a == "DATA" else a for a in command]
    assert_error(run_cli(capsys, *argv, "--out", ""), "--out")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_out_file_is_refused(capsys, monkeypatch):
    """Observed: `bench engine --out ''` ran and wrote no file, without a word."""
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("engine built before the check"))
    assert_error(run_cli(capsys, "bench", "engine", "tiny", "--num-prompts", "1", "--prompt-len",
                         "4", "--output-len", "2", "--json", "--out", ""), "--out")
    assert_error(run_cli(capsys, "analyze", "--preset", "tiny", "--plot", ""), "--plot")


@pytest.mark.parametrize("command", [["analyze", "--preset", "tiny"], ["data", "build"],
                                     ["bench", "decode"]])
def test_cpu_threads_below_one_is_named_as_the_option(capsys, command):
    # Observed: "error: cpu_threads must be >= 1, got 0", the library's name, not the option.
    assert_error(run_cli(capsys, *command, "--cpu-threads", "0"), "--cpu-threads must be >= 1")


# --- hwattn train / compare -----------------------------------------------------------------


def test_train_weight_decay_must_be_finite(capsys, dataset_dir, tmp_path):
    out = tmp_path / "run"  # was a run of NaN losses, exit status 0
    assert_error(run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "1",
                         "--weight-decay", "inf", *TRAIN), "--weight-decay")
    assert not out.exists()


def test_train_eval_tokens_off_the_window_says_what_it_scores(capsys, dataset_dir, tmp_path):
    # (was rounded down to whole windows without a word)
    tokens = [t if t != "256" else "300" for t in TRAIN]
    code, out, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", tmp_path / "run",
                             "--steps", "1", *tokens)
    assert code == 0, err
    assert ("warning: --eval-tokens 300 is not a multiple of --seq-len 32: validation scores "
            "at most 288 tokens per domain (9 windows)") in err
    code, out, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", tmp_path / "run2",
                             "--steps", "1", *TRAIN)
    assert code == 0 and "warning" not in err, err


def test_a_short_train_without_warmup_still_decays_and_says_its_warmup(capsys, dataset_dir,
                                                                     tmp_path):
    """Observed: --warmup defaulted to min(20, --steps), so a run of 20 steps or fewer was
    all warm-up: its learning rate rose to the peak at the last step and never decayed, and
    nothing said so. The default is now at most a tenth of the steps, and named."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "10",
                           *TRAIN)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["warmup_steps"] == 1
    assert "--warmup not given: 1 warm-up step (the default, 20 but at most a tenth of --steps 10)" in err, err
    lrs = [r["lr"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "lr" in r]
    assert lrs[-1] < 0.1 * 3e-3, lrs  # decayed towards 1% of the peak

    # All warm-up on purpose: allowed, but said.
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", tmp_path / "all",
                           "--steps", "3", "--warmup", "3", *TRAIN)
    assert code == 0, err
    assert "warning: --warmup 3 equals --steps" in err, err


def test_a_run_resumed_without_warmup_keeps_its_own(capsys, dataset_dir, tmp_path):
    """A run started with another warm-up than today's default (e.g. under the old
    min(20, --steps)) must resume when --warmup is left out, not be refused for a setting
    the user never gave."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "4",
                           "--warmup", "2", *TRAIN)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "4",
                           *TRAIN)
    assert code == 0, err
    assert f"--warmup not given: 2 warm-up steps (that of the run resumed in {out})" in err, err


def test_a_run_without_a_checkpoint_to_resume_takes_the_default_warmup(capsys, dataset_dir,
                                                                       tmp_path):
    """Observed: the warm-up of the run "resumed" was read from train_config.json, which every
    run writes as it starts: after a run of 1000 steps (warm-up 20) stopped before its first
    checkpoint (by default the last step), `--steps 10` in the same --out started afresh with
    20 warm-up steps (all warm-up, no decay), saying it kept the resumed run's."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"warmup_steps": 8, "steps": 1000}))
    code, _, err = run_cli(capsys, "train", "--data", dataset_dir, "--out", out, "--steps", "10",
                           *TRAIN)
    assert code == 0, err
    assert json.loads((out / "train_config.json").read_text())["warmup_steps"] == 1
    assert "1 warm-up step (the default" in err and "resumed" not in err, err


def test_train_refuses_a_batch_that_cannot_fit_in_memory(capsys, dataset_dir, tmp_path,
                                                         monkeypatch):
    """As `hwattn compare --batch-size 100000` (tests/cli/test_bench_and_compare_options.py):
    the first step grew until the kernel killed the process, with no word. Refused before the
    run folder is made, naming --batch-size and the largest batch that could fit."""
    from hwattn.train import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: memory.GIB)
    out = tmp_path / "run"
    argv = ["train", "--data", dataset_dir, "--out", out, "--steps", "1", *TRAIN]
    assert_error(run_cli(capsys, *argv, "--batch-size", "100000"), "--batch-size 100000",
                 "1.0 GiB free on cpu", "it cannot fit")
    assert not out.exists()
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err


def test_train_and_compare_refuse_the_dataset_folder_as_out(capsys, dataset, tmp_path):
    """Observed: the run's checkpoint, metrics and plots were written among the dataset's
    shards (and compare's <variant> folders and tables too)."""
    before = sorted(p.name for p in dataset.iterdir())
    assert_error(run_cli(capsys, "train", "--data", dataset, "--out", dataset, "--steps", "1",
                         *TRAIN), "--out", "--data")
    assert_error(run_cli(capsys, "compare", "--data", dataset, "--out", dataset, "--steps", "1",
                         "--device", "cpu", "--variants", "mha"), "--out", "--data")
    assert sorted(p.name for p in dataset.iterdir()) == before


# --- hwattn eval ----------------------------------------------------------------------------


@pytest.fixture
def no_evaluation(monkeypatch):
    import hwattn.eval.suite as suite

    def too_late(*a, **k):
        raise AssertionError("evaluated before the --lm-eval tasks were checked")

    monkeypatch.setattr(suite, "evaluate_model", too_late)


EVAL = ["--seq-len", "64", "--cloze", "0", "--mc", "0", "--recall-pairs", "4"]


def test_eval_lm_eval_file_is_checked_before_evaluating(capsys, checkpoints, dataset_dir,
                                                        tmp_path, no_evaluation):
    """Observed: a missing or unreadable task file was reported after the whole evaluation."""
    missing = tmp_path / "none.jsonl"
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, *EVAL,
                         "--lm-eval", f"t={missing}"), "--lm-eval", str(missing))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "?"}) + "\n")
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, *EVAL,
                         "--lm-eval", f"t={bad}"), "--lm-eval", str(bad))


def test_eval_lm_eval_name_given_twice_is_refused(capsys, checkpoints, dataset_dir, tmp_path,
                                                  no_evaluation):
    """Observed: the second task of a name replaced the first without a word."""
    files = []
    for name in ("a", "b"):
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps({"context": "x", "target": " y"}) + "\n")
        files.append(path)
    assert_error(run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, *EVAL,
                         "--lm-eval", f"t={files[0]}", "--lm-eval", f"t={files[1]}"),
                 "--lm-eval", "t")


# --- hwattn data build ----------------------------------------------------------------------


@pytest.mark.parametrize("corpus", ["hf:", "jsonl:", "hf:  "])
def test_build_corpus_without_a_name_is_refused(capsys, tmp_path, corpus):
    out = tmp_path / "b"  # hf: was an IndexError traceback, after making --out
    assert_error(run_cli(capsys, "data", "build", "--corpus", corpus, "--tokenizer", "bpe:300",
                         "--out", out), "--corpus")
    assert not out.exists()


# --- hwattn serve ---------------------------------------------------------------------------


def test_serve_empty_host_is_refused(capsys, monkeypatch):
    """Observed: --host '' reached uvicorn, which binds '' to every interface: the server
    listened beyond loopback although the user never asked for 0.0.0.0."""
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", "--device", "cpu", "--host", ""), "--host")


@pytest.mark.parametrize("flag", ["--no-cuda-graphs", "--no-prefill-graphs", "--no-compile",
                                  "--enforce-eager"])
def test_gpu_only_engine_flags_on_the_cpu_are_warned_about(capsys, monkeypatch, flag):
    """Observed: taken and dropped without a word on the CPU (no CUDA graphs, no compiled
    decode there in any case)."""
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "listen", lambda *a, **k: None)
    code, out, err = run_cli(capsys, "serve", "tiny", "--device", "cpu", "--port", "0", flag)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("hwattn serve: warning:")]
    assert len(warnings) == 1 and flag in warnings[0], err
    code, out, err = run_cli(capsys, "serve", "tiny", "--device", "cpu", "--port", "0")
    assert code == 0 and "warning" not in err, err


def test_eval_lm_eval_may_read_the_tasks_this_command_writes(capsys, checkpoints, dataset_dir,
                                                             tmp_path, monkeypatch):
    """--write-tasks DIR --lm-eval NAME=DIR/mc.jsonl: the file exists only once this command
    has written it, so it is not refused as missing."""
    import hwattn.eval.lm_eval_adapter as adapter
    import hwattn.eval.suite as suite

    monkeypatch.setattr(suite, "evaluate_model", lambda *a, **k: {"ppl": {"average": {
        "loss": 1.0, "ppl": 2.7, "bpb": 1.0}}})
    # Stands in for the harness: each task's file is there when lm-eval runs.
    monkeypatch.setattr(adapter, "run_lm_eval", lambda lm, specs: {
        name: {"acc": float(Path(f).is_file())} for name, f in specs.items()})
    tasks = tmp_path / "t"
    code, out, err = run_cli(capsys, "eval", checkpoints("mha"), "--data", dataset_dir, "--seq-len",
                             "64", "--cloze", "0", "--mc", "4", "--recall-pairs", "4",
                             "--write-tasks", tasks, "--lm-eval", f"mc={tasks / 'mc.jsonl'}",
                             "--json")
    assert code == 0, err
    assert json.loads(out)["lm_eval"] == {"mc": {"acc": 1.0}}
