"""A hostile user's review of the trainer: each test failed before the fix it names."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import hwattn.train.checkpoint as C
import hwattn.train.trainer as T
from hwattn.train.trainer import train
from tests.train.test_resume_exact import (QUIET, Kill, _assert_same_as_reference, _cfg,  # noqa: F401
                                           _state, reference)


def _without_validation(src, dst):
    """A copy of the built dataset `src` whose manifest lists no validation shard, as a corpus
    of one document per domain built (the build now refuses such a corpus)."""
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    for domain, entry in man["splits"]["val"].items():
        (dst / entry["file"]).unlink()
        del man["files"][f"val_{domain}"]
    man["splits"]["val"] = {}
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


def test_a_dataset_without_validation_is_refused_before_training(dataset_dir, tmp_path):
    """Observed: the run trained every step, then failed with `KeyError: 'average'` at its
    final evaluation, before its final checkpoint: all of it was lost (`hwattn train` showed
    a traceback)."""
    data = _without_validation(dataset_dir, tmp_path / "data")
    steps = []
    with pytest.raises(ValueError, match="no validation"):
        train(_cfg(data, tmp_path / "run"), on_step=steps.append, **QUIET)
    assert steps == []


def test_a_failed_final_evaluation_keeps_the_trained_steps(dataset_dir, tmp_path, reference,
                                                          monkeypatch):
    """The final evaluation ran before the final checkpoint was written. Observed: an error
    there (out of memory on a GPU, a kill) lost every step since the last periodic
    checkpoint; with none (the default), the rerun trained the whole run again."""
    calls = []
    real = T.evaluate_domains

    def evaluate(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # the final one (eval_every=4 of 8 steps)
            raise Kill
        return real(*a, **kw)

    out = tmp_path / "run"
    monkeypatch.setattr(T, "evaluate_domains", evaluate)
    with pytest.raises(Kill):
        train(_cfg(dataset_dir, out), **QUIET)
    monkeypatch.undo()
    assert _state(out)["step"] == 8
    steps = []
    res = train(_cfg(dataset_dir, out), on_step=steps.append, **QUIET)
    assert steps == []  # nothing trained again
    _assert_same_as_reference(reference, out, res)


def test_cuda_generator_state_is_the_training_devices_alone(monkeypatch):
    """The trainer state kept `torch.cuda.get_rng_state_all()`, one state per visible GPU,
    and restored them all: a run checkpointed on a machine with two GPUs (a single-process
    run sees both) failed to resume on a machine with one, `default_generators[1]` being out
    of range (the GPU test below). Now only the training device's state is kept and set; a
    list written before gives that device's entry."""
    got, put = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: got.append(device) or
                        torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: put.append((int(s), device)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = torch.device("cuda", 1)
    state = C._rng_state(dev)
    assert got == [dev] and int(state["cuda"]) == 7
    C.restore_rng_state(state, dev)
    assert put == [(7, dev)]
    legacy = {**state, "cuda": [torch.tensor([k], dtype=torch.uint8) for k in (3, 4)]}
    put.clear()
    C.restore_rng_state(legacy, dev)
    C.restore_rng_state(legacy, torch.device("cuda"))  # index None: the current device, 0
    C.restore_rng_state(legacy, torch.device("cuda", 5))  # none recorded for it: left alone
    C.restore_rng_state(legacy, torch.device("cpu"))
    assert put == [(4, dev), (3, torch.device("cuda"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_of_a_machine_with_more_gpus_resumes_on_this_one(dataset_dir, tmp_path):
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out, device="cuda"), stop_after=2, **QUIET)
    state = _state(out)
    one = state["rng"]["cuda"]
    one = one[0] if isinstance(one, (list, tuple)) else one
    state["rng"]["cuda"] = [one.clone() for _ in range(torch.cuda.device_count() + 1)]
    torch.save(state, out / "checkpoint" / T.STATE_FILE)
    res = train(_cfg(dataset_dir, out, device="cuda"), **QUIET)
    assert res["steps_done"] == 8


def test_a_checkpoint_is_on_disk_before_the_previous_one_is_deleted(dataset_dir, tmp_path,
                                                                    monkeypatch):
    """Renames and deletions are journalled before file contents that were never flushed: a
    machine crash (power, a preempted VM) right after a save could leave the new folder's
    files empty and the previous folder deleted, no checkpoint at all. Observed: no fsync
    anywhere in the save."""
    import os

    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=2, **QUIET)  # the checkpoint a save replaces
    events = []
    real_fsync, real_rmtree = os.fsync, T.shutil.rmtree

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rmtree(path, *a, **kw):
        events.append(("rmtree", str(path)))
        real_rmtree(path, *a, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(T.shutil, "rmtree", rmtree)
    train(_cfg(dataset_dir, out), stop_after=1, **QUIET)
    monkeypatch.undo()
    ckpt = out / "checkpoint"
    removed_old = max(i for i, e in enumerate(events) if e == ("rmtree", f"{ckpt}.old"))
    synced = {p for kind, p in events[:removed_old] if kind == "fsync"}
    stage = f"{ckpt}.tmp"
    names = sorted(p.name for p in ckpt.iterdir())
    missing = [n for n in names if f"{stage}/{n}" not in synced
               and f"{stage}/{n}.part" not in synced]
    assert not missing and {stage, str(out)} <= synced, (missing, events)
    assert _state(out)["step"] == 3


def test_train_json_still_tells_of_a_resume_that_is_not_bit_identical(dataset_dir, tmp_path,
                                                                      capsys):
    """`hwattn train --json` gave the trainer a log that dropped every line, so the warnings
    a resume gives (other kernels: not bit-identical; a log with no checkpoint: starting again
    at step 0) were never shown. They go to stderr; stdout keeps the JSON alone."""
    from hwattn.cli import main

    out = tmp_path / "run"
    args = ["train", "--data", str(dataset_dir), "--out", str(out), "--steps", "3",
            "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--eval-tokens", "256",
            "--json"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args + ["--amp", "fp32"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "warning" in captured.err and "amp" in captured.err


def test_a_training_split_shorter_than_one_sequence_names_seq_len(dataset_dir, tmp_path):
    """Observed: "the training split (40 tokens) is shorter than one sequence of 65", which
    names no setting to change."""
    from hwattn.data.build import head_build

    head_build(dataset_dir, tmp_path / "data", 40)
    with pytest.raises(ValueError, match=r"seq_len \+ 1 = 65 tokens; lower seq_len"):
        train(_cfg(tmp_path / "data", tmp_path / "run", seq_len=64), **QUIET)


def test_a_resume_on_another_gpu_model_is_announced(dataset_dir, tmp_path):
    """The trainer state kept the device's type only, so a run checkpointed on an H200 and
    resumed on an H100 (as the quality study's runs move) continued without a word, though
    cuBLAS picks other kernels there and the result is not bit-identical. The state now
    keeps the device's model (the test forges one on the CPU)."""
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=2, **QUIET)
    state = _state(out)
    assert state["device_name"] == T.device_label(torch.device("cpu"))
    state["device_name"] = "NVIDIA H200"
    torch.save(state, out / "checkpoint" / T.STATE_FILE)
    logs = []
    train(_cfg(dataset_dir, out), stop_after=1, progress=False, log=logs.append)
    assert any("warning" in m and "H200" in m for m in logs), logs


def test_a_diverged_run_says_so_once_and_goes_on(dataset_dir, tmp_path):
    """Observed: a run whose loss became NaN or inf trained on silently to its end; only the
    final evaluation's perplexity showed it. Now the first non-finite logged loss is named
    with its step and the lr, once; the run still finishes (`hwattn compare` reports a
    diverged variant beside the others)."""
    lines = []
    steps = []
    train(_cfg(dataset_dir, tmp_path / "run", lr=1e6, warmup_steps=1, log_every=1),
          progress=False, log=lambda *a: lines.append(" ".join(map(str, a))), on_step=steps.append)
    warned = [ln for ln in lines if "diverged" in ln]
    assert len(warned) == 1 and "lower lr (now 1e+06)" in warned[0], lines
    assert steps[-1] == 8
