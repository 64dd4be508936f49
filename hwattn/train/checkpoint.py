"""A training run's checkpoints: what a save writes beside the model (the trainer state: step,
optimizer, RNG streams, data position, device), how a save is made atomic and recovered after
a crash, and what a resume checks against the run it continues. `hwattn.train.trainer` saves
and resumes through these."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from hwattn.models.checkpoint import save_checkpoint
from hwattn.models.transformer import Transformer

if TYPE_CHECKING:
    from hwattn.train.trainer import TrainConfig

STATE_FILE = "trainer_state.pt"
# TrainConfig fields a resumed run must share with its checkpoint: they decide the model, the
# batch of each step, the learning-rate schedule and the optimizer's updates.
RESUME_MUST_MATCH = ("preset", "variant", "model_overrides", "seq_len", "batch_size",
                     "accum_steps", "steps", "lr", "warmup_steps", "min_lr_ratio", "weight_decay",
                     "beta1", "beta2", "grad_clip", "seed")
# Fields that only change how the same computation is rounded: a change is allowed (a run may
# move to another machine) but announced, as the result is then not bit-identical.
RESUME_NUMERICS = ("compile", "amp", "fused_loss", "sdpa")
# The settings of a validation, kept in its record: a finished run resumed with others
# evaluates again rather than report the number the old settings measured.
EVAL_SETTINGS = ("eval_tokens", "amp")


def device_label(device: torch.device) -> str:
    """What decides the kernels a device runs: the GPU's model, or the CPU's vector unit
    (a resume on another GPU model or CPU generation is not bit-identical)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if device.type == "cuda":
        # The training device's generator alone: a list of every visible device's (as
        # `get_rng_state_all` gives) fails to restore on a machine with fewer of them.
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    """Put back the Python, NumPy, torch and (on a GPU) `device`'s CUDA generators saved in a
    trainer state's "rng"; a CUDA state for a device the saving run did not have is skipped."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):  # written before: one state per visible device
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= len(cuda):
            return
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


def data_fingerprint(data) -> dict:
    """What identifies a dataset's training stream wherever its folder lies: the training
    split's token count and hash, and the tokenizer's hash (None where the manifest has none)."""
    man = getattr(data, "manifest", None) or {}
    return {"train_tokens": int(len(data.train)),
            "train_sha256": man.get("splits", {}).get("train", {}).get("sha256"),
            "tokenizer_sha256": man.get("tokenizer", {}).get("sha256")}


def save_training_checkpoint(path: Path, model: Transformer, optimizer, step: int, cfg: TrainConfig,
                             tokenizer=None, extra: dict | None = None,
                             run_state: dict | None = None) -> None:
    """Write the checkpoint folder so that a kill at any moment leaves one whole checkpoint.

    The new folder is staged as `<path>.tmp`; its `trainer_state.pt` is written last (by
    rename), so a stage holding it is complete. The previous folder is then moved to
    `<path>.old`, the stage renamed into place, and the old one deleted. Whichever two of
    these renames a kill falls between, `recover_checkpoint` finds a complete folder. The
    stage's files reach the disk (fsync) before its trainer state is named, and the renames
    before the old folder is deleted: after a machine crash (power, a preempted VM) the
    renames may be on disk while unflushed file contents are not, which lost both.
    """
    stage = path.with_name(path.name + ".tmp")
    shutil.rmtree(stage, ignore_errors=True)
    save_id = uuid.uuid4().hex  # in config.json and the trainer state: `check_one_save`
    save_checkpoint(model, stage, extra={"hwattn_train": {"step": step, "save_id": save_id,
                                                          **(extra or {})}},
                    eos_token_id=None if tokenizer is None else tokenizer.eot_id)
    if tokenizer is not None:
        tokenizer.save(stage)
    part = stage / (STATE_FILE + ".part")
    device = next(model.parameters()).device
    torch.save({"step": step, "save_id": save_id, "optimizer": optimizer.state_dict(),
                "rng": _rng_state(device),
                "train_config": dataclasses.asdict(cfg), **(run_state or {})}, part)
    for file in sorted(stage.iterdir()):
        _fsync(file)
    os.replace(part, stage / STATE_FILE)
    _fsync(stage)
    old = path.with_name(path.name + ".old")
    if (path / STATE_FILE).is_file():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    else:  # a partial folder (or none); a complete .old, if any, stays until the new one is in
        shutil.rmtree(path, ignore_errors=True)
    stage.rename(path)
    _fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync(path: Path) -> None:
    """Flush the file or folder `path` to disk (a folder: the names in it). Some systems
    refuse to open or flush a folder; its renames then stand as the system keeps them."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def recover_checkpoint(path: Path, log=print) -> Path | None:
    """The complete checkpoint folder at `path` after an interrupted save, or None if there
    is none. A complete `<path>.tmp` (newest) or `<path>.old` is renamed back into place."""
    if (path / STATE_FILE).is_file():
        return path
    for suffix in (".tmp", ".old"):
        cand = path.with_name(path.name + suffix)
        if (cand / STATE_FILE).is_file():
            if path.exists():
                shutil.rmtree(path)
            cand.rename(path)
            _fsync(path.parent)
            log(f"{path}: the last save was interrupted; recovered the checkpoint from {cand.name}")
            return path
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"{path} holds no {STATE_FILE} and no complete {path.name}.tmp or "
                         f"{path.name}.old: the checkpoint is incomplete; move it away to "
                         "start over, or pass --no-resume")
    return None


def read_trainer_state(file: Path) -> dict:
    """The trainer state saved in `file`; ValueError, naming the file and `--no-resume`, if it
    cannot be read or lacks the step, optimizer, RNG or config a resume needs."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:  # a damaged pickle raises whatever its bytes trip over
        raise ValueError(f"{file} cannot be read ({type(err).__name__}: {err}); move the "
                         "checkpoint away or pass --no-resume") from None
    kinds = {"step": int, "optimizer": dict, "rng": dict, "train_config": dict}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t)
                                          for k, t in kinds.items()):
        raise ValueError(f"{file} is not an hwattn trainer state (it needs "
                         f"{', '.join(kinds)}); move the checkpoint away or pass --no-resume")
    return state


# AdamW's param-group flags that choose the kernel, not the numbers: they belong to the device
# a run is on, whatever device wrote its checkpoint.
OPTIMIZER_KERNEL_FLAGS = ("fused", "foreach", "capturable")


def on_this_device(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """`saved` (an optimizer state dict) with the kernel flags of `optimizer`, built for this
    run's device. `load_state_dict` takes every param-group setting from the checkpoint, so a
    run checkpointed on the CPU went on with the unfused AdamW on a GPU. The flags are set
    before loading, as they also decide where the loaded `step` counters are put."""
    if len(saved.get("param_groups", ())) != len(optimizer.param_groups):
        return saved  # refused by load_state_dict, which names the mismatch
    groups = [{**old, **{k: new[k] for k in OPTIMIZER_KERNEL_FLAGS if k in new}}
              for old, new in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


def check_one_save(state: dict, ckpt: Path) -> None:
    """ValueError if `ckpt`'s weights (config.json's `hwattn_train`, written with
    model.safetensors) and its trainer state come from different saves (a folder put together
    by hand): by the save id both carry, or by the step for checkpoints older than the id."""
    try:
        saved = json.loads((ckpt / "config.json").read_text()).get("hwattn_train")
    except (OSError, ValueError, AttributeError):
        return  # load_model names an unreadable config.json
    if not isinstance(saved, dict):
        return  # a model saved outside training: nothing to tie
    ids = saved.get("save_id"), state.get("save_id")
    steps = saved.get("step"), state["step"]
    if (None not in ids and ids[0] != ids[1]) or (steps[0] is not None and steps[0] != steps[1]):
        raise ValueError(f"{ckpt} mixes two saves: model.safetensors and config.json are of "
                         f"step {steps[0]} (save {str(ids[0])[:8]}), {STATE_FILE} of step "
                         f"{steps[1]} (save {str(ids[1])[:8]}); put back the files of one "
                         "save, or use a new --out or --no-resume")


def check_resume(state: dict, cfg: TrainConfig, ckpt: Path, world: int, data_fp: dict,
                  device: torch.device) -> list[str]:
    """ValueError naming every setting in which `cfg` (on this data, with `world` processes)
    would continue `ckpt`'s run differently; returns warnings for rounding-only changes."""
    saved = state["train_config"]
    diff = [f"{k}={saved[k]!r} (this run: {getattr(cfg, k)!r})" for k in RESUME_MUST_MATCH
            if k in saved and saved[k] != getattr(cfg, k)]
    if "world" in state and state["world"] != world:
        diff.append(f"world size {state['world']} processes (this run: {world})")
    if diff:
        raise ValueError(f"{ckpt} holds a run with other settings: {', '.join(diff)}; resume "
                         "it with its own settings, or use a new --out or --no-resume")
    old = state.get("data")
    if old is not None:
        bad = [k for k, v in data_fp.items() if v is not None and old.get(k) is not None
               and old[k] != v]
        if bad:
            show = lambda fp: ", ".join(f"{k}={str(fp.get(k))[:16]}" for k in bad)  # noqa: E731
            raise ValueError(f"{ckpt} was trained on other data ({show(old)}) than the dataset "
                             f"{cfg.data} ({show(data_fp)}); resume it on the data build it "
                             "started with, or use a new --out or --no-resume")
    warn = [f"{k}={saved[k]!r} -> {getattr(cfg, k)!r}" for k in RESUME_NUMERICS
            if k in saved and saved[k] != getattr(cfg, k)]
    if "device" in state and state["device"] != device.type:
        warn.append(f"device {state['device']} -> {device.type}")
    elif state.get("device_name") not in (None, device_label(device)):  # e.g. H200 -> H100
        warn.append(f"device {state['device_name']} -> {device_label(device)}")
    if warn:
        return [f"warning: resuming {ckpt} with {', '.join(warn)}: kernels round differently, "
                "so the result will not be bit-identical to an uninterrupted run"]
    return []
