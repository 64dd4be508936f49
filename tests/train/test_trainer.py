"""The training loop: schedule, optimizer groups, exact resumption, outputs, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hwattn.models.checkpoint import load_checkpoint
from hwattn.train.metrics import read_metrics
from hwattn.train.trainer import TrainConfig, lr_at, param_groups, train
from tests.conftest import SMALL


def test_schedule_warms_up_then_decays_to_one_percent():
    cfg = TrainConfig(data="-", out="-", steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.01)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-5)
    mid = 10 + (99 - 10) / 2
    assert lr_at(int(mid), cfg) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(
        math.pi * (int(mid) - 10) / 89)))


def test_config_errors():
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainConfig(data="-", out="-", steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(data="-", out="-", variant="xyz")
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(data="-", out="-", amp="fp16")
    with pytest.raises(ValueError, match="sdpa must be one of"):
        TrainConfig(data="-", out="-", sdpa="flash3")
    # cuDNN's attention is a GPU kernel: asking for it on a CPU is an error, not ignored.
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train(TrainConfig(data="-", out="-", sdpa="cudnn", device="cpu"))


@pytest.mark.parametrize("bad", [
    {"log_every": 0}, {"eval_every": -2}, {"ckpt_every": -1}, {"seed": -1},
    {"eval_tokens": 16}, {"grad_clip": 0.0}, {"grad_clip": -1.0}, {"grad_clip": math.nan},
    {"weight_decay": -0.1}, {"beta1": 1.0}, {"beta2": -0.5}, {"lr": math.inf}, {"lr": math.nan},
    {"peak_tflops": 0.0}, {"peak_tflops": -1.0}, {"weight_decay": math.inf}, {"preset": "xyz"},
], ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))}")
def test_every_setting_is_checked_when_the_config_is_made(bad):
    """The CLI checks these flags, but the compare loop and the study scripts build
    TrainConfig directly. Observed: log_every=0 failed (ZeroDivisionError) and seed=-1
    (numpy) after the first step, eval_tokens < seq_len at the final evaluation, so that with
    resume=False the old checkpoint was already deleted and the new run's training lost;
    grad_clip <= 0 (zeroed or sign-flipped gradients), negative weight decay, eval_every and
    ckpt_every, an infinite lr (NaN training) and peak_tflops <= 0 (0: the H100 default,
    negative: a negative MFU) were taken silently. Also observed: an infinite weight decay
    was taken (`hwattn train` refuses it; every weight NaN after the first step), and an
    unknown preset failed as a bare KeyError('xyz'). Refused when the config is made,
    nothing of a run folder is touched."""
    with pytest.raises(ValueError, match=next(iter(bad))):
        _cfg("-", "-", resume=False, **bad)


@pytest.mark.parametrize("overrides, match", [
    ([("dim", 64)], r"model_overrides must be a dict.*list"),
    ("dim=64", r"model_overrides must be a dict.*str"),
    ({"dims": 64}, r"model_overrides key 'dims' is not a ModelConfig field.*valid keys: .*\bdim\b"),
    ({"attention": "mla"}, r"model_overrides key 'attention' is set by the variant.*valid keys"),
    ({"n_kv_heads": 4}, r"model_overrides key 'n_kv_heads' is set by the variant.*valid keys"),
    ({"preset": "mini"}, r"model_overrides key 'preset' is set by the preset.*valid keys"),
], ids=["list", "str", "unknown", "attention", "variant-count", "preset"])
def test_model_overrides_that_are_no_model_config_fields_are_refused_by_name(overrides, match):
    """Observed: a bare TypeError ("'list' object is not a mapping", "ModelConfig.__init__()
    got an unexpected keyword argument 'dims'", "from_preset() got multiple values for
    keyword argument 'n_kv_heads'") from model_config, naming neither the setting nor the
    keys it takes."""
    with pytest.raises(ValueError, match=match):
        _cfg("-", "-", variant="gqa-2", model_overrides=overrides)
    # The keys it takes still work.
    ok = _cfg("-", "-", variant="gqa-2", model_overrides={"dim": 64, "n_latent_heads": 2})
    assert ok.model_overrides == {"dim": 64, "n_latent_heads": 2}


@pytest.mark.parametrize("bad", [
    {"steps": 2.5}, {"log_every": 1.5}, {"eval_every": 2.5}, {"ckpt_every": 1.5},
    {"warmup_steps": 0.5}, {"seed": 1.5}, {"seq_len": 32.0}, {"eval_tokens": 512.5},
    {"batch_size": True},
], ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))}")
def test_a_count_that_is_not_an_integer_is_refused_when_the_config_is_made(bad):
    """Observed: steps=2.5 failed with TypeError ('float' object cannot be interpreted as an
    integer) at the training loop, after resume=False had deleted the old checkpoint;
    seed=1.5 with a RuntimeError from torch.manual_seed; log_every, eval_every, ckpt_every
    and warmup_steps of 1.5 were taken silently (records, evaluations and checkpoints at
    every third step, a warm-up of half a step)."""
    with pytest.raises(ValueError, match=f"{next(iter(bad))} must be an integer"):
        _cfg("-", "-", resume=False, **bad)


def test_a_deadline_under_torchrun_is_refused_before_the_old_checkpoint_is_deleted(
        dataset_dir, tmp_path, monkeypatch):
    """Deadlines are single-process only. Observed: under torchrun with resume=False the
    refusal came after the old run's checkpoint had been deleted. (One real gloo process
    group of one process, with the environment of rank 0 of two.)"""
    import socket

    import torch.distributed as dist

    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=1, progress=False, log=lambda *a: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        with pytest.raises(ValueError, match="deadline"):
            train(_cfg(dataset_dir, out, resume=False, device="cpu"), deadline=1e18,
                  progress=False, log=lambda *a: None)
    finally:
        dist.destroy_process_group()
    assert (out / "checkpoint" / "trainer_state.pt").is_file()


def test_no_decay_on_norms_and_embedding():
    from hwattn.config import ModelConfig
    from hwattn.models.transformer import Transformer

    model = Transformer(ModelConfig.from_preset("tiny", attention="mla", **SMALL))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("norm" in names[id(p)] or "tok_embeddings" in names[id(p)] for p in no_decay["params"])
    assert all(p.dim() >= 2 and "tok_embeddings" not in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def _cfg(dataset_dir, out, **kw):
    base = dict(data=str(dataset_dir), out=str(out), variant="gla-2", seq_len=32, batch_size=4,
                accum_steps=2, steps=8, lr=5e-3, warmup_steps=2, eval_tokens=512, log_every=1,
                model_overrides=SMALL, plot=False)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(dataset_dir, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    whole = train(_cfg(dataset_dir, tmp_path / "a"), **quiet)
    first = train(_cfg(dataset_dir, tmp_path / "b"), stop_after=3, **quiet)
    assert first["steps_done"] == 3
    assert (tmp_path / "b" / "checkpoint" / "trainer_state.pt").is_file()
    second = train(_cfg(dataset_dir, tmp_path / "b"), stop_after=2, **quiet)
    assert second["steps_done"] == 5
    resumed = train(_cfg(dataset_dir, tmp_path / "b"), **quiet)
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    losses = lambda p: [(r["step"], r["loss"]) for r in read_metrics(p) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "a" / "metrics.jsonl") == losses(tmp_path / "b" / "metrics.jsonl")
    with pytest.raises(ValueError, match="steps="):
        train(_cfg(dataset_dir, tmp_path / "b", steps=9), **quiet)


def test_short_run_learns_and_writes_everything(trained):
    out, res = trained
    recs = read_metrics(out / "metrics.jsonl")
    train_loss = [r["loss"] for r in recs if "loss" in r]
    vals = [r for r in recs if "val_loss" in r]
    uniform = math.log(res["model"].config.vocab_size)
    assert train_loss[-1] < train_loss[0] and train_loss[-1] < uniform - 0.5
    assert len(vals) == 2 and vals[-1]["val_loss"] < vals[0]["val_loss"] + 0.1
    assert set(vals[-1]) >= {"val_bpb", "val_loss/books", "val_loss/speeches"}
    ck = out / "checkpoint"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.pt"):
        assert (ck / name).is_file(), name
    assert (out / "loss.png").stat().st_size > 10_000
    model = load_checkpoint(ck)
    assert torch.equal(model.state_dict()["layers.0.attn.wkv.weight"],
                       res["model"].state_dict()["layers.0.attn.wkv.weight"])
    assert json.loads((ck / "config.json").read_text())["hwattn_train"]["step"] == 40
    assert res["steady_tokens_per_s"] > 0 and res["steady_mfu"] is None  # no CPU peak given


def test_train_cli(dataset_dir, tmp_path, capsys):
    from hwattn.cli import main

    out = tmp_path / "cli"
    args = ["train", "--data", str(dataset_dir), "--out", str(out), "--variant", "mqa",
            "--steps", "3", "--seq-len", "32", "--batch-size", "2", "--warmup", "1",
            "--eval-tokens", "256", "--peak-tflops", "1", "--json"]
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["steps_done"] == 3 and res["val"]["val_loss"] > 0
    assert main(args[:-1] + ["--no-resume", "--variant", "gqa-3"]) == 2  # 8 heads / 3
    assert main(["train", "--data", str(tmp_path / "none"), "--out", str(out / "x")]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("crash", ["old-only", "tmp-and-old", "partial-tmp"])
def test_resume_after_a_kill_inside_a_checkpoint_save(dataset_dir, tmp_path, crash):
    """A kill between the renames of a save leaves checkpoint.old (and maybe a complete
    checkpoint.tmp) but no checkpoint: the rerun resumes from them, never from step 0."""
    import shutil

    quiet = dict(progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=3, **quiet)
    ckpt = out / "checkpoint"
    if crash == "old-only":  # killed after `checkpoint` -> `.old`, with no stage left
        ckpt.rename(out / "checkpoint.old")
    elif crash == "tmp-and-old":  # killed between the two renames of the step-5 save
        train(_cfg(dataset_dir, out), stop_after=2, **quiet)
        shutil.copytree(ckpt, out / "checkpoint.tmp")
        train(_cfg(dataset_dir, tmp_path / "other"), stop_after=1, **quiet)
        shutil.rmtree(ckpt)
        shutil.copytree(tmp_path / "other" / "checkpoint", out / "checkpoint.old")
    else:  # killed while writing the stage: the stage has no trainer state yet
        shutil.copytree(ckpt, out / "checkpoint.tmp")
        (out / "checkpoint.tmp" / "trainer_state.pt").unlink()
    logs = []
    res = train(_cfg(dataset_dir, out), stop_after=1, progress=False, log=logs.append)
    expected = {"old-only": 4, "tmp-and-old": 6, "partial-tmp": 4}[crash]
    assert res["steps_done"] == expected, logs
    assert (ckpt / "trainer_state.pt").is_file()
    assert not (out / "checkpoint.old").exists() and not (out / "checkpoint.tmp").exists()


def test_incomplete_checkpoint_is_an_error_not_a_restart(dataset_dir, tmp_path):
    quiet = dict(progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    train(_cfg(dataset_dir, out), stop_after=2, **quiet)
    (out / "checkpoint" / "trainer_state.pt").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        train(_cfg(dataset_dir, out), **quiet)
    (out / "checkpoint" / "model.safetensors").write_bytes(b"garbage")
    (out / "checkpoint.old").mkdir()
    with pytest.raises(ValueError, match="incomplete"):
        train(_cfg(dataset_dir, out), **quiet)


def test_deadline_checkpoints_and_the_next_call_finishes(dataset_dir, tmp_path):
    import time

    quiet = dict(progress=False, log=lambda *a: None)
    out = tmp_path / "run"
    seen = []
    first = train(_cfg(dataset_dir, out), deadline=time.time() - 1, on_step=seen.append, **quiet)
    assert first["steps_done"] == 1 and (out / "checkpoint" / "trainer_state.pt").is_file()
    rest = train(_cfg(dataset_dir, out), on_step=seen.append, **quiet)
    assert rest["steps_done"] == 8 and "val" in rest
    # on_step hears of every optimizer step once, with the count done, across the resume.
    assert seen == list(range(1, 9))


def test_a_model_passed_for_another_configuration_is_refused(dataset_dir, tmp_path):
    """`model=` reuses a built model for the run's configuration. Observed: an MHA model
    passed to a GLA-2 run was trained as it was, its checkpoint then holding an MHA
    config.json under the trainer state of a gla-2 run (refused at the next resume)."""
    from hwattn.models.transformer import Transformer
    from hwattn.train.trainer import model_config

    cfg = _cfg(dataset_dir, tmp_path / "run")
    other = Transformer(model_config(_cfg(dataset_dir, tmp_path / "x", variant="mha"), 512))
    with pytest.raises(ValueError, match="attention"):
        train(cfg, model=other, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "checkpoint").exists()
