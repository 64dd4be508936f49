"""Checks of "training resumes exactly": a run stopped anywhere and resumed must
match the uninterrupted run bit for bit (weights, optimizer state, RNG, metrics.jsonl), and a
resume that would continue differently must be a clear error, not a silent change."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

import hwattn.train.trainer as T
from hwattn.data.loader import BatchSampler
from hwattn.train.metrics import read_metrics
from hwattn.train.trainer import STATE_FILE, TrainConfig, train
from tests.conftest import SMALL

QUIET = dict(progress=False, log=lambda *a: None)
TIMING = ("tokens_per_s", "mfu", "step_s")  # wall-clock fields, never reproducible


def _cfg(data, out, **kw):
    # log_every 3 and eval_every 4 do not divide every stop point, so a resumed run's log
    # must be rebuilt exactly around them.
    base = dict(data=str(data), out=str(out), variant="gla-2", seq_len=32, batch_size=4,
                accum_steps=2, steps=8, lr=5e-3, warmup_steps=2, eval_tokens=512, log_every=3,
                eval_every=4, model_overrides=SMALL, plot=False)
    base.update(kw)
    return TrainConfig(**base)


class Kill(Exception):
    """Stands for the process being killed at that point."""


def _metrics(out):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(out / "metrics.jsonl")]


def _state(out):
    return torch.load(out / "checkpoint" / STATE_FILE, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def reference(dataset_dir, tmp_path_factory):
    """The uninterrupted run: (run folder, final weights)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    res = train(_cfg(dataset_dir, out), **QUIET)
    return out, {k: v.clone() for k, v in res["model"].state_dict().items()}


@pytest.fixture(scope="module")
def stopped(dataset_dir, tmp_path_factory):
    """A run stopped (and checkpointed) after 2 of 8 steps; tests resume copies of it."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    train(_cfg(dataset_dir, out), stop_after=2, **QUIET)
    return out


def _copy(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _assert_same_as_reference(reference, out, res):
    ref_out, ref_weights = reference
    weights = res["model"].state_dict()
    assert weights.keys() == ref_weights.keys()
    for k in ref_weights:
        assert torch.equal(weights[k], ref_weights[k]), k
    a, b = _state(ref_out), _state(out)
    assert a["step"] == b["step"] == 8
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # lr position too
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), (i, k)
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert _metrics(ref_out) == _metrics(out)


# --- the metrics log -------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [1, 2, 4, 5, 7])
def test_metrics_log_of_a_stopped_and_resumed_run_equals_the_uninterrupted_one(
        dataset_dir, tmp_path, reference, stop):
    """Observed: the stopping call logs a training record at its last step even when
    log_every does not divide it (e.g. step 5 with log_every=3), a line the uninterrupted
    run never writes."""
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=stop, **QUIET)
    res = train(_cfg(dataset_dir, out), **QUIET)
    _assert_same_as_reference(reference, out, res)


def test_a_metrics_line_cut_short_by_a_kill_does_not_break_the_resume(
        dataset_dir, tmp_path, reference, stopped):
    """A kill in the middle of `append_metrics` leaves a partial last line. Observed: the
    resume crashed with json.JSONDecodeError in truncate_metrics."""
    out = _copy(stopped, tmp_path)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 768, "loss": 5.9')
    res = train(_cfg(dataset_dir, out), **QUIET)
    _assert_same_as_reference(reference, out, res)


def test_resuming_a_finished_run_changes_nothing(dataset_dir, tmp_path, reference):
    """Observed: the final validation record was appended a second time."""
    out = _copy(reference[0], tmp_path)
    before = _metrics(out)
    res = train(_cfg(dataset_dir, out), **QUIET)
    assert res["steps_done"] == 8 and res["val"]["val_loss"] == before[-1]["val_loss"]
    assert _metrics(out) == before
    _assert_same_as_reference(reference, out, res)


def test_resuming_a_finished_run_with_other_evaluation_settings_evaluates_again(
        dataset_dir, tmp_path, reference):
    """Observed: a finished run resumed with another eval_tokens (or amp) kept the final
    validation logged before, so the new setting was ignored and the summary reported the old
    number. The final evaluation is redone and replaces the logged one; resuming with the
    first settings again gives back the uninterrupted run's log."""
    out = _copy(reference[0], tmp_path)
    before = _metrics(out)
    res = train(_cfg(dataset_dir, out, eval_tokens=1024), **QUIET)
    assert res["val"]["val_loss"] != before[-1]["val_loss"]  # 1024 tokens, not 512
    finals = [r for r in _metrics(out) if r["step"] == 8 and "val_loss" in r]
    assert len(finals) == 1 and finals[0]["eval_tokens"] == 1024
    assert res["val"]["val_loss"] == finals[0]["val_loss"] != before[-1]["val_loss"]
    assert _metrics(out)[:-1] == before[:-1]
    res = train(_cfg(dataset_dir, out, amp="fp32"), **QUIET)
    assert res["val"]["amp"] == "fp32" and res["val"]["eval_tokens"] == 512
    assert [r for r in _metrics(out) if "val_loss" in r][-1] == {
        **before[-1], "amp": "fp32"}
    res = train(_cfg(dataset_dir, out), **QUIET)
    _assert_same_as_reference(reference, out, res)


def test_no_resume_discards_the_old_checkpoint(dataset_dir, tmp_path, reference):
    """--no-resume starts over; if that run is killed before its first checkpoint, the next
    (resuming) call must not pick up the discarded run's checkpoint. Observed: it resumed
    from the old step-5 checkpoint after the new run's metrics had been cut to steps <= 2,
    so metrics.jsonl lost the records of steps 3 and 4."""
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=5, **QUIET)

    def die(done):
        if done == 4:
            raise Kill

    with pytest.raises(Kill):
        train(_cfg(dataset_dir, out, resume=False), on_step=die, **QUIET)
    res = train(_cfg(dataset_dir, out), **QUIET)
    _assert_same_as_reference(reference, out, res)


# --- kills at awkward moments (all resume exactly) --------------------------------------------


@pytest.mark.parametrize("where", ["mid-accumulation", "during-eval", "after-checkpoint",
                                   "during-final-eval"])
def test_kill_anywhere_then_resume_is_exact(dataset_dir, tmp_path, reference, monkeypatch, where):
    out = tmp_path / "run"
    real_batch, real_eval, real_save = (BatchSampler.batch, T.evaluate_domains,
                                        T.save_training_checkpoint)
    calls = []

    def batch(self, step, micro=0):
        if step == 4 and micro == 1:
            raise Kill
        return real_batch(self, step, micro)

    def evaluate(*a, **kw):
        calls.append(1)
        if len(calls) == {"during-eval": 1, "during-final-eval": 2}[where]:
            raise Kill
        return real_eval(*a, **kw)

    def save(path, model, opt, step, *a, **kw):
        real_save(path, model, opt, step, *a, **kw)
        if step == 4:
            raise Kill

    if where == "mid-accumulation":
        monkeypatch.setattr(BatchSampler, "batch", batch)
    elif where == "after-checkpoint":
        monkeypatch.setattr(T, "save_training_checkpoint", save)
    else:
        monkeypatch.setattr(T, "evaluate_domains", evaluate)
    with pytest.raises(Kill):
        train(_cfg(dataset_dir, out, ckpt_every=2), **QUIET)
    monkeypatch.undo()
    res = train(_cfg(dataset_dir, out, ckpt_every=2), **QUIET)
    _assert_same_as_reference(reference, out, res)


def test_resume_after_the_dataset_folder_moved(dataset_dir, tmp_path, reference):
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    out = tmp_path / "run"
    train(_cfg(data, out), stop_after=3, **QUIET)
    moved = tmp_path / "elsewhere" / "data"
    moved.parent.mkdir()
    data.rename(moved)
    res = train(_cfg(moved, out), **QUIET)
    _assert_same_as_reference(reference, out, res)


# --- resume inputs that would continue differently --------------------------------------------


@pytest.mark.parametrize("change", [
    {"batch_size": 2}, {"seq_len": 16}, {"accum_steps": 1}, {"seed": 1}, {"lr": 1e-3},
    {"warmup_steps": 1}, {"min_lr_ratio": 0.1}, {"weight_decay": 0.0}, {"grad_clip": 0.5},
    {"beta2": 0.99}, {"model_overrides": {**SMALL, "dim": 128}},
], ids=lambda c: next(iter(c)))
def test_resume_with_changed_settings_is_an_error(dataset_dir, tmp_path, stopped, change):
    """Observed: each of these resumed silently, training the checkpoint's model on other
    batches or with another schedule or optimizer."""
    out = _copy(stopped, tmp_path)
    name = next(iter(change))
    with pytest.raises(ValueError, match=name):
        train(_cfg(dataset_dir, out, **change), **QUIET)
    assert _state(out)["step"] == 2  # nothing was overwritten


def test_resume_on_another_data_build_is_an_error(dataset_dir, tmp_path, stopped):
    """A dataset with the same tokenizer but other training tokens. Observed: resumed
    silently on the other data."""
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    man = json.loads((data / "manifest.json").read_text())
    tokens = np.fromfile(data / "train.bin", dtype=man["dtype"])
    tokens[::-1].copy().tofile(data / "train.bin")
    # A consistent build of its own (the loader's integrity check passes): the resume check
    # is what must refuse it.
    sha = hashlib.sha256((data / "train.bin").read_bytes()).hexdigest()
    man["splits"]["train"]["sha256"] = man["files"]["train"]["sha256"] = sha
    (data / "manifest.json").write_text(json.dumps(man))
    out = _copy(stopped, tmp_path)
    with pytest.raises(ValueError, match="trained on other data"):
        train(_cfg(data, out), **QUIET)


def test_a_validation_domain_shorter_than_one_window_is_refused_before_training(
        dataset_dir, tmp_path, stopped):
    """A consistent build whose "books" validation shard holds 20 tokens, under seq_len 32.
    Observed: the run trained to the end and then failed at the final evaluation ("20 tokens
    are fewer than one evaluation window of 33"), before its final checkpoint was written;
    with resume=False the old run's checkpoint was already gone, so both runs were lost.
    (`hwattn train` and `hwattn compare` check this; TrainConfig users did not get it.)"""
    data = tmp_path / "data"
    shutil.copytree(dataset_dir, data)
    man = json.loads((data / "manifest.json").read_text())
    entry = man["splits"]["val"]["books"]
    shard = data / entry["file"]
    shard.write_bytes(shard.read_bytes()[:20 * np.dtype(man["dtype"]).itemsize])
    sha = hashlib.sha256(shard.read_bytes()).hexdigest()
    entry.update(tokens=20, sha256=sha)
    next(e for e in man["files"].values() if e["file"] == entry["file"])["sha256"] = sha
    (data / "manifest.json").write_text(json.dumps(man))
    out = _copy(stopped, tmp_path)
    with pytest.raises(ValueError, match="seq_len.*books"):
        train(_cfg(data, out, resume=False), **QUIET)
    assert _state(out)["step"] == 2


def test_resume_whose_model_files_do_not_fit_the_run_is_an_error(dataset_dir, tmp_path, stopped):
    """config.json / model.safetensors of another variant under this run's trainer state.
    Observed: an optimizer error about parameter-group sizes that names neither file nor
    the differing setting."""
    other = tmp_path / "other"
    train(_cfg(dataset_dir, other, variant="gqa-2"), stop_after=2, **QUIET)
    out = _copy(stopped, tmp_path)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(other / "checkpoint" / name, out / "checkpoint" / name)
    with pytest.raises(ValueError, match="attention"):
        train(_cfg(dataset_dir, out), **QUIET)


@pytest.mark.parametrize("override", [{"vocab_size": 64}, {"max_seq_len": 16}],
                         ids=lambda o: next(iter(o)))
def test_model_overrides_the_run_cannot_train_are_refused_before_anything_is_deleted(
        dataset_dir, tmp_path, stopped, override):
    """model_overrides replace the vocabulary the data needs and the context seq_len needs.
    Observed: vocab_size=64 on 512-id data failed at the first forward ("tokens holds id
    498, outside [0, vocab_size = 64)"), max_seq_len=16 under seq_len=32 likewise
    ("position 31 exceeds max_seq_len 16"), both after resume=False had deleted the
    checkpoint of the run in --out."""
    out = _copy(stopped, tmp_path)
    name = next(iter(override))
    with pytest.raises(ValueError, match=f"model_overrides.*{name}"):
        train(_cfg(dataset_dir, out, resume=False, model_overrides={**SMALL, **override}), **QUIET)
    assert _state(out)["step"] == 2


def test_resume_under_another_world_size_is_an_error(dataset_dir, tmp_path, stopped):
    """A checkpoint of a 2-process DDP run resumed by one process would take other batches
    (each step reads batch_size x world sequences)."""
    out = _copy(stopped, tmp_path)
    # Any trainer-state fix must record the world size; the test forges a 2-rank one.
    state = _state(out)
    state["world"] = 2
    torch.save(state, out / "checkpoint" / STATE_FILE)
    with pytest.raises(ValueError, match="world"):
        train(_cfg(dataset_dir, out), **QUIET)


@pytest.mark.parametrize("content", [{"hello": 1}, [1, 2], {"step": 2, "optimizer": {}}],
                         ids=["foreign-dict", "list", "no-config"])
def test_foreign_trainer_state_is_a_clear_error(dataset_dir, tmp_path, stopped, content):
    """A readable pickle that is not an hwattn trainer state. Observed: KeyError/TypeError."""
    out = _copy(stopped, tmp_path)
    torch.save(content, out / "checkpoint" / STATE_FILE)
    with pytest.raises(ValueError, match=STATE_FILE):
        train(_cfg(dataset_dir, out), **QUIET)


@pytest.mark.parametrize("name", ["model.safetensors", STATE_FILE, "config.json"])
def test_truncated_checkpoint_file_is_a_clear_error(dataset_dir, tmp_path, stopped, name):
    out = _copy(stopped, tmp_path)
    path = out / "checkpoint" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=name):
        train(_cfg(dataset_dir, out), **QUIET)


def test_compile_switched_across_a_resume_is_announced(dataset_dir, tmp_path, stopped, monkeypatch):
    """Turning --compile on (or off) mid-run is allowed, but Inductor's kernels round
    differently (measured: 7e-6 weight drift after 6 steps), so the resumed run is not
    bit-identical to either uninterrupted one; the trainer must say so, not stay silent.
    With dynamo's eager backend (no code generation) the run is still exact."""
    from hwattn.train import compile as C

    real_init = C.RegionallyCompiled.__init__
    monkeypatch.setattr(C.RegionallyCompiled, "__init__",
                        lambda self, m, **kw: real_init(self, m, backend="eager"))
    torch._dynamo.reset()
    out = _copy(stopped, tmp_path)
    logs = []
    train(_cfg(dataset_dir, out, compile=True), stop_after=2, progress=False, log=logs.append)
    assert any("compile" in str(m) and "warning" in str(m) for m in logs), logs


def test_a_negative_stop_after_is_an_error_not_a_checkpoint_that_lies(dataset_dir, tmp_path, stopped):
    """Observed: stop_after=-1 on a run at step 2 trained nothing and saved the step-2
    weights and optimizer as a checkpoint of step 1, so the resume after it took other
    batches and learning rates than the uninterrupted run."""
    out = _copy(stopped, tmp_path)
    with pytest.raises(ValueError, match="stop_after"):
        train(_cfg(dataset_dir, out), stop_after=-1, **QUIET)
    assert _state(out)["step"] == 2


def test_a_checkpoint_mixing_two_saves_is_a_clear_error(dataset_dir, tmp_path, stopped):
    """The weights (model.safetensors, config.json) of one save beside the trainer state of
    another (a folder put back together by hand) would train on silently: the optimizer's
    moments and the data position of one step applied to another step's weights."""
    out = _copy(stopped, tmp_path)  # stopped at step 2
    later = _copy(stopped, tmp_path / "later")
    train(_cfg(dataset_dir, later), stop_after=4, **QUIET)
    shutil.copyfile(later / "checkpoint" / STATE_FILE, out / "checkpoint" / STATE_FILE)
    with pytest.raises(ValueError, match="two saves"):
        train(_cfg(dataset_dir, out), **QUIET)
    # The same step, another save (e.g. a rerun of the same schedule): still two saves.
    other = _copy(stopped, tmp_path / "other")
    shutil.rmtree(other / "checkpoint")
    train(_cfg(dataset_dir, other, resume=False), stop_after=2, **QUIET)
    out = _copy(stopped, tmp_path / "again")
    shutil.copyfile(other / "checkpoint" / STATE_FILE, out / "checkpoint" / STATE_FILE)
    with pytest.raises(ValueError, match="two saves"):
        train(_cfg(dataset_dir, out), **QUIET)



def test_a_cpu_checkpoint_resumed_on_a_gpu_gets_the_gpus_optimizer(dataset_dir, tmp_path,
                                                                   monkeypatch):
    """Observed: `load_state_dict` copies the checkpoint's param-group flags over the
    optimizer's, so a run checkpointed on the CPU (unfused AdamW) went on unfused when
    resumed on CUDA, where a fresh run is fused. The kernel is now the current device's.
    On this CPU the device's choice is faked (CPU AdamW has a fused kernel too); the
    resumed run must still equal an uninterrupted fused run bit for bit."""
    def device_fuses(answer):
        monkeypatch.setattr(T, "_fused_adamw", lambda device: answer)

    def fused_flags(out):
        return [g["fused"] for g in _state(out)["optimizer"]["param_groups"]]

    device_fuses(False)  # the CPU leg
    out = tmp_path / "moved"
    train(_cfg(dataset_dir, out), stop_after=2, **QUIET)
    cpu_groups = _state(out)["optimizer"]["param_groups"]
    assert fused_flags(out) == [False, False]
    device_fuses(True)  # resumed where a fresh run fuses
    train(_cfg(dataset_dir, out), stop_after=1, **QUIET)
    assert fused_flags(out) == [True, True]

    # Bit for bit: the fused and unfused kernels round apart, so the stopped leg is a fused
    # one whose checkpoint carries the CPU leg's flags; only the kernel choice is foreign.
    ref = tmp_path / "ref"
    res = train(_cfg(dataset_dir, ref), **QUIET)
    reference = ref, {k: v.clone() for k, v in res["model"].state_dict().items()}
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=2, **QUIET)
    state = _state(out)
    state["optimizer"]["param_groups"] = cpu_groups
    torch.save(state, out / "checkpoint" / STATE_FILE)
    res = train(_cfg(dataset_dir, out), **QUIET)
    assert fused_flags(out) == [True, True]
    _assert_same_as_reference(reference, out, res)
