"""The training half of benchmarks/study_speculative.py: the quality study's run of one
variant and seed, trained as `benchmarks/quality_study.py` configures it (or its finished
checkpoint reused), with its progress logged, and the dataset and checkpoint it reads."""

from __future__ import annotations

import gc
import json
import threading
import time
from pathlib import Path

import quality_study


class TrainingProgress:
    """While a run trains, logs the newest training record of its metrics.jsonl every
    `every` seconds (the trainer prints nothing itself without its progress bar)."""

    def __init__(self, metrics: Path, steps: int, log, every: float = 30.0):
        self.metrics, self.steps, self.log, self.every = metrics, steps, log, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def _run(self) -> None:
        from hwattn.train.metrics import read_metrics

        while not self._stop.wait(self.every):
            try:
                records = [r for r in read_metrics(self.metrics) if "loss" in r]
            except (OSError, ValueError):  # a line being written
                continue
            if records:
                r = records[-1]
                self.log(f"step {r['step']} of {self.steps}: loss {r['loss']:.3f}, "
                         f"{r['tokens_per_s']:,.0f} tok/s"
                         + (f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""))


def checkpoint_folder(path: str) -> Path:
    """The checkpoint folder `--checkpoint` names (itself, or a run folder's checkpoint/)."""
    for cand in (Path(path), Path(path) / "checkpoint"):
        if (cand / "config.json").is_file():
            return cand
    raise SystemExit(f"--checkpoint: {path} holds no config.json; give a checkpoint folder "
                     "(config.json + model.safetensors) or a run folder holding checkpoint/")


def dataset(args, log):
    """The built dataset of `--data`; under --tiny, the embedded corpus built into --work
    when `--data` holds none."""
    from hwattn.data.build import MANIFEST, BuildOptions
    from hwattn.data.corpora import build_dataset
    from hwattn.data.loader import TokenDataset

    if args.tiny and not (Path(args.data) / MANIFEST).is_file():
        args.data = str(Path(args.work) / "data")
        if not (Path(args.data) / MANIFEST).is_file():
            log(f"--tiny: building the embedded corpus into {args.data}")
            build_dataset(args.data, "embedded", "bpe:512", BuildOptions(val_fraction=0.1),
                          progress=False, log=lambda *a: None)
    try:
        return TokenDataset(args.data)
    except ValueError as err:
        raise SystemExit(f"--data: {err}") from None


def train_study_run(args, data, device, gpu, deadline: float, log,
                    started: float) -> tuple[Path, dict]:
    """Train `--train` / `--seed` as the study does (quality_study's `run_config`: preset,
    schedule, batch, compilation, curve points), or reuse the finished checkpoint of the
    same run in --work; training stops `--measure-reserve-s` before `deadline` (a
    `time.time()`; `started`: the command's start, for the log). Returns (checkpoint folder,
    training record)."""
    import torch

    from hwattn.train.trainer import STATE_FILE, train

    study_argv = ["--data", args.data, "--work", args.work] + (["--smoke"] if args.tiny else [])
    cfg = quality_study.run_config(quality_study.parse_args(study_argv), args.train, args.seed,
                                   str(device), gpu is not None)
    ckpt = Path(cfg.out) / "checkpoint"
    record = {"variant": args.train, "seed": args.seed, "preset": cfg.preset, "steps": cfg.steps,
              "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "lr": cfg.lr,
              "compiled": cfg.compile, "run": cfg.out}
    if (ckpt / STATE_FILE).is_file():
        step = json.loads((ckpt / "config.json").read_text()).get("hwattn_train", {}).get("step")
        if step == cfg.steps:
            log(f"{args.train} seed {args.seed}: reusing the finished run in {cfg.out}")
            return ckpt, {**record, "steps_done": step, "finished": True, "reused": True}
    log(f"training {args.train} seed {args.seed}: {cfg.preset} preset, {cfg.steps} steps of "
        f"{cfg.batch_size} x {cfg.seq_len} tokens, until "
        f"{deadline - args.measure_reserve_s - started:.0f} s at the latest")
    t0 = time.time()
    with TrainingProgress(Path(cfg.out) / "metrics.jsonl", cfg.steps, log):
        res = train(cfg, progress=False, log=log, dataset=data,
                    deadline=deadline - args.measure_reserve_s)
    del res["model"]
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    record.update(steps_done=res["steps_done"], finished=res["steps_done"] == cfg.steps,
                  reused=False, tokens=res["tokens"], train_s=time.time() - t0,
                  steady_tokens_per_s=res.get("steady_tokens_per_s"),
                  steady_mfu=res.get("steady_mfu"), val=res.get("val"), gpu=gpu)
    val = (res.get("val") or {}).get("val_loss")
    log(f"trained {res['steps_done']} of {cfg.steps} steps in {record['train_s']:.0f} s"
        + (f", validation loss {val:.3f}" if val is not None else " (stopped at the deadline: "
           "the unfinished model is measured)"))
    return ckpt, record
