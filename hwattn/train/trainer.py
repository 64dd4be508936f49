"""The training loop behind `hwattn train`, `hwattn compare` and the quality study.

AdamW (β = 0.9, 0.95; weight decay on matrices only — norms and the tied embedding are not
decayed), gradient clipping, linear warm-up then cosine decay to `min_lr_ratio` of the peak,
gradient accumulation, bf16 autocast on CUDA, optional `torch.compile`, DDP under `torchrun`.

Checkpoints (`<out>/checkpoint/`) are Hugging Face-layout model folders (config.json,
model.safetensors, tokenizer.json) plus `trainer_state.pt` (optimizer, step, RNG states).
The batch of step s is a pure function of (seed, s) (`hwattn.data.loader.BatchSampler`) and
the learning rate a function of s, so resuming reproduces the uninterrupted run. The trainer
state also records the world size and the training data's hash: resuming with other settings
(`RESUME_MUST_MATCH`), processes or data is an error, not a silent change of course.
Metrics go to `<out>/metrics.jsonl`; the loss curve to `<out>/loss.png`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hwattn.config import ModelConfig, parse_variant
from hwattn.data.loader import BatchSampler, TokenDataset
from hwattn.data.progress import progress_bar
from hwattn.eval.perplexity import AMP_CHOICES, autocast_for, evaluate_domains
from hwattn.layers import SDPA_CHOICES, sdpa_choice
from hwattn.device import resolve_device
from hwattn.models.checkpoint import load_model
from hwattn.models.transformer import Transformer
from hwattn.train.checkpoint import (EVAL_SETTINGS, STATE_FILE, check_one_save, check_resume,
                                     data_fingerprint, device_label, on_this_device,
                                     read_trainer_state, recover_checkpoint, restore_rng_state,
                                     save_training_checkpoint)
from hwattn.train.loss import linear_cross_entropy
from hwattn.train.metrics import append_metrics, drop_metrics, read_metrics, truncate_metrics

H100_BF16_TFLOPS = 989.0


@dataclass
class TrainConfig:
    """One training run. `steps` optimizer steps of `batch_size · accum_steps · world`
    sequences of `seq_len` tokens each."""

    data: str
    out: str
    preset: str = "tiny"
    variant: str = "mha"
    seq_len: int = 256
    batch_size: int = 16
    accum_steps: int = 1
    steps: int = 200
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    compile: bool = False
    sdpa: str = "auto"
    fused_loss: bool = True
    eval_every: int = 0
    eval_tokens: int = 65_536
    ckpt_every: int = 0
    log_every: int = 10
    peak_tflops: float | None = None
    resume: bool = True
    save_final: bool = True
    plot: bool = True
    model_overrides: dict = field(default_factory=dict)

    def __post_init__(self):
        # Checked here, not only by `hwattn train` (hwattn/cli/train.py): the compare loop and
        # the study scripts build this directly, and a value that fails mid-run would do so
        # after resume=False has deleted the old checkpoint (or, for eval_tokens, at the
        # final evaluation, before the final checkpoint is written).
        for name in ("seq_len", "batch_size", "accum_steps", "steps", "log_every", "eval_every",
                     "ckpt_every", "seed", "warmup_steps", "eval_tokens"):
            value = getattr(self, name)  # 2.5 steps: a TypeError at the loop; 1.5: taken
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("seq_len", "batch_size", "accum_steps", "steps", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "ckpt_every", "seed"):  # every/ckpt 0: at the end only
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if not self.grad_clip > 0:  # 0 would zero every gradient, a negative clip flip its sign
            raise ValueError(f"grad_clip must be > 0 (inf: no clipping), got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):  # inf: NaN weights
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eval_tokens < self.seq_len:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) is less than one evaluation "
                             f"window of seq_len ({self.seq_len}) tokens")
        if self.peak_tflops is not None and not (self.peak_tflops > 0
                                                 and math.isfinite(self.peak_tflops)):
            raise ValueError(f"peak_tflops must be a finite number > 0 (None: the default), "
                             f"got {self.peak_tflops}")
        if self.amp not in AMP_CHOICES:
            raise ValueError(f"amp must be auto, bf16 or fp32, got {self.amp!r}")
        if self.sdpa not in SDPA_CHOICES:
            raise ValueError(f"sdpa must be one of {SDPA_CHOICES}, got {self.sdpa!r}")
        from hwattn.config import PRESETS

        if self.preset not in PRESETS:  # model_config would fail with a bare KeyError
            raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {self.preset!r}")
        variant = parse_variant(self.variant)
        # model_config would fail with a bare TypeError (not a mapping, an unexpected or a
        # repeated keyword argument).
        if not isinstance(self.model_overrides, dict):
            raise ValueError(f"model_overrides must be a dict of ModelConfig fields, got "
                             f"{type(self.model_overrides).__name__}")
        fixed = {"preset": "the preset", **{k: f"the variant ({self.variant})" for k in variant}}
        valid = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in fixed]
        for key in self.model_overrides:
            if key not in valid:
                why = f"is set by {fixed[key]}" if key in fixed else "is not a ModelConfig field"
                raise ValueError(f"model_overrides key {key!r} {why}; valid keys: "
                                 f"{', '.join(valid)}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over `warmup_steps`,
    then cosine from `lr` to `min_lr_ratio · lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The model `cfg` trains on data of `vocab_size` ids (`run_model_config`)."""
    return run_model_config(cfg.preset, cfg.variant, cfg.seq_len, vocab_size,
                            cfg.model_overrides)


def run_model_config(preset: str, variant: str, seq_len: int, vocab_size: int,
                     model_overrides: dict) -> ModelConfig:
    """The preset with the run's variant, the data's vocabulary (rounded up to 64), a context
    long enough for `seq_len`, and `model_overrides` (any `ModelConfig` field). The one rule,
    for the trainer and for whoever sizes its model before a `TrainConfig` exists
    (`hwattn compare`'s memory check)."""
    from hwattn.config import PRESETS

    vocab = -(-vocab_size // 64) * 64
    max_len = max(seq_len, PRESETS[preset]["max_seq_len"])
    kwargs = {"vocab_size": vocab, "max_seq_len": max_len, **model_overrides}
    # Refused here, before a run folder is touched: either failed at the first forward.
    if kwargs["vocab_size"] < vocab_size:
        raise ValueError(f"model_overrides vocab_size={kwargs['vocab_size']} is smaller than the "
                         f"data's vocabulary of {vocab_size} ids")
    if kwargs["max_seq_len"] < seq_len:
        raise ValueError(f"model_overrides max_seq_len={kwargs['max_seq_len']} is shorter than "
                         f"seq_len={seq_len}")
    return ModelConfig.from_preset(preset, **parse_variant(variant), **kwargs)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weights except embeddings; none on norms or the embedding (which
    the tied output shares)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 and "tok_embeddings" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _dist_env():
    """(world, rank, local rank) from torchrun's environment; ValueError naming the variable
    that is not an integer or out of range (a rank outside the world would otherwise wait in
    the rendezvous until its timeout)."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        text = os.environ.get(name, default)
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None
    world, rank, local_rank = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK must be in 0..{world - 1} "
                         f"(WORLD_SIZE={world}), got {rank}")
    if local_rank < 0:
        raise ValueError(f"environment variable LOCAL_RANK must be >= 0, got {local_rank}")
    return world, rank, local_rank


def _fused_adamw(device: torch.device) -> bool:
    """Whether AdamW runs its fused kernel on `device`: on CUDA, where it is one launch per
    step instead of a handful per parameter group."""
    return device.type == "cuda"


def train(cfg: TrainConfig, progress: bool = True, log=print, stop_after: int | None = None,
          dataset: TokenDataset | None = None, model: Transformer | None = None,
          compiled=None, deadline: float | None = None, on_step=None) -> dict:
    """Run (or resume) `cfg`; returns a summary dict (the trained model under "model").

    `stop_after` ends the run after that many optimizer steps of this call, checkpointing
    first (used to test resumption). `deadline` (a `time.time()` value) does the same once
    a step ends past it, so a run fits a time-limited job and resumes in the next one. `model` reuses an already-built model (re-initialised
    from `cfg.seed`), and `compiled` a `torch.compile` wrapper of it, so that several runs of
    one variant compile once. The whole run attends with the SDPA kernels `cfg.sdpa` picks
    (`hwattn.layers.sdpa_choice`); "cudnn" needs a CUDA device. `on_step(done)`, if given, is
    called after each optimizer step (and its logging) with the number of steps done, e.g. to
    drive a profiler over chosen steps."""
    if stop_after is not None and stop_after < 0:  # it would checkpoint a step not reached
        raise ValueError(f"stop_after must be >= 0 (None: run to the end), got {stop_after}")
    if deadline is not None and _dist_env()[0] > 1:  # before resume=False deletes anything
        raise ValueError("a deadline needs every rank to stop at the same step; it is supported "
                         "for single-process runs only")
    device = resolve_device(cfg.device)
    if cfg.sdpa != "auto" and device.type != "cuda":
        raise ValueError(f"sdpa={cfg.sdpa!r} needs a CUDA device (cuDNN's attention), got "
                         f"device {cfg.device!r}" + ("" if cfg.device == str(device) else f" ({device})"))
    with sdpa_choice(cfg.sdpa):
        return _train(cfg, progress, log, stop_after, dataset, model, compiled, deadline, on_step)


def _config_diff(have: ModelConfig, want: ModelConfig) -> str:
    """The fields in which `have` differs from `want` (this run's)."""
    return ", ".join(f"{f.name}={getattr(have, f.name)!r} (this run: {getattr(want, f.name)!r})"
                     for f in dataclasses.fields(want)
                     if f.compare and getattr(have, f.name) != getattr(want, f.name))


def _train(cfg: TrainConfig, progress, log, stop_after, dataset, model, compiled, deadline,
           on_step) -> dict:
    world, rank, local_rank = _dist_env()
    distributed = world > 1
    device = resolve_device(cfg.device)
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main = rank == 0
    out = Path(cfg.out)
    ckpt = out / "checkpoint"
    metrics_path = out / "metrics.jsonl"
    data = dataset or TokenDataset(cfg.data)
    if not data.val:  # else the final evaluation fails (KeyError) before the final checkpoint
        raise ValueError(f"the dataset {cfg.data} holds no validation shard (each domain of its "
                         "corpus had a single document, which went to training), so the run "
                         "could not be evaluated; rebuild it from a corpus with at least two "
                         "documents in a domain")
    for domain, tokens in data.val.items():  # else the evaluation fails after the training
        if len(tokens) <= cfg.seq_len:
            raise ValueError(f"seq_len {cfg.seq_len} is longer than the {len(tokens)} validation "
                             f"tokens of domain {domain!r} in {cfg.data} (one evaluation window "
                             f"needs seq_len + 1)")
    mcfg = model_config(cfg, data.vocab_size)

    torch.manual_seed(cfg.seed)
    start_step = 0
    state = None
    found = recover_checkpoint(ckpt, log) if cfg.resume and main else None
    if distributed:  # every rank resumes from what rank 0 found
        import torch.distributed as dist

        flag = [found is not None]
        dist.broadcast_object_list(flag, src=0)
        found = ckpt if flag[0] else None
    if cfg.resume and found is None and main:
        done = [r.get("step", 0) for r in read_metrics(metrics_path)]
        if done and max(done) > 0:
            log(f"warning: {out} logged {max(done)} steps but holds no checkpoint to resume "
                "from; training starts again at step 0")
    data_fp = data_fingerprint(data)
    if found is not None:
        state = read_trainer_state(ckpt / STATE_FILE)
        for line in check_resume(state, cfg, ckpt, world, data_fp, device):
            if main:
                log(line)
        model = load_model(ckpt, device=device)
        if model.config != mcfg:
            raise ValueError(f"{ckpt / 'config.json'} describes another model than this run's: "
                             f"{_config_diff(model.config, mcfg)}; use a new --out or --no-resume")
        check_one_save(state, ckpt)  # (after the model's own check, which names what differs)
        start_step = state["step"]
        if not 0 <= start_step <= cfg.steps:
            raise ValueError(f"{ckpt / STATE_FILE} is at step {start_step}, outside this run's "
                             f"0..{cfg.steps}; move the checkpoint away or pass --no-resume")
    elif model is None:
        model = Transformer(mcfg).to(device)
        model.init_weights(seed=cfg.seed)
    elif model.config != mcfg:  # it would train, and checkpoint, another model than cfg's
        raise ValueError("the model passed is another model than this run's: "
                         f"{_config_diff(model.config, mcfg)}")
    else:
        model.init_weights(seed=cfg.seed)
    raw_model = model
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                                  betas=(cfg.beta1, cfg.beta2), fused=_fused_adamw(device))
    if state is not None:
        optimizer.load_state_dict(on_this_device(state["optimizer"], optimizer))
        restore_rng_state(state["rng"], device)
    train_model = model
    if compiled is not None and state is None:
        train_model = compiled
    elif cfg.compile and distributed:
        train_model = torch.compile(model)  # DDP wraps modules; a whole-model compile is one
    elif cfg.compile:
        from hwattn.train.compile import RegionallyCompiled

        train_model = RegionallyCompiled(model)  # compiles one block's graph, reused by all
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = BatchSampler(data.train, cfg.seq_len, cfg.batch_size, cfg.accum_steps, cfg.seed,
                           rank, world)
    run_state = {"world": world, "data": data_fp, "device": device.type,
                 "device_name": device_label(device)}
    flops_tok = raw_model.flops_per_token(cfg.seq_len)
    peak = cfg.peak_tflops or (H100_BF16_TFLOPS if device.type == "cuda" else None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:  # starting over: a later resume must not pick up the old run
            for suffix in ("", ".tmp", ".old"):
                shutil.rmtree(ckpt.with_name(ckpt.name + suffix), ignore_errors=True)
        truncate_metrics(metrics_path, start_step)
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if start_step:
            log(f"resuming {cfg.variant} from step {start_step} of {cfg.steps}")

    def evaluate(step: int) -> dict:
        raw_model.eval()
        res = evaluate_domains(raw_model, data, cfg.seq_len, cfg.eval_tokens, amp=cfg.amp)
        raw_model.train()
        rec = {"step": step, "tokens": step * sampler.tokens_per_step,
               "val_loss": res["average"]["loss"], "val_bpb": res["average"]["bpb"]}
        rec.update({f"val_loss/{d}": r["loss"] for d, r in res.items() if d != "average"})
        rec.update({k: getattr(cfg, k) for k in EVAL_SETTINGS})
        return rec

    model.train()
    bar = progress_bar(total=cfg.steps, initial=start_step, desc=f"train {cfg.variant}",
                       disable=not (progress and main), unit="step")
    t_window, tok_window, last = time.perf_counter(), 0, {}
    steady_tokens, steady_time = 0, 0.0
    warned_diverged = False  # a non-finite training loss is said once
    end = cfg.steps if stop_after is None else min(cfg.steps, start_step + stop_after)
    head = raw_model.output.weight
    for step in range(start_step, end):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.accum_steps):
            x, y = sampler.batch(step, micro)
            if device.type == "cuda":  # pinned, so the copies overlap the previous step
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = not distributed or micro == cfg.accum_steps - 1
            ctx = train_model.no_sync() if distributed and not sync else _Null()
            with ctx, autocast_for(device, cfg.amp):
                if cfg.fused_loss:  # no (B, T, V) logits: see hwattn.train.loss
                    loss = linear_cross_entropy(train_model(x, hidden_only=True), head, y)
                else:
                    logits = train_model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / cfg.accum_steps).backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tok_window += sampler.tokens_per_step
        done = step + 1
        # The log holds the records an uninterrupted run writes; a call stopping early still
        # measures its last step (for its summary) but logs it only where that run would.
        log_now = done % cfg.log_every == 0 or done == cfg.steps
        if log_now or done == end:
            loss_val = float(loss_sum) / cfg.accum_steps
            if distributed:
                import torch.distributed as dist
                t = torch.tensor([loss_val], device=device)
                dist.all_reduce(t)
                loss_val = float(t) / world
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t_window
            tps = tok_window / elapsed
            if step - start_step >= cfg.log_every:  # leave the first window (compile, warm-up) out
                steady_tokens += tok_window
                steady_time += elapsed
            mfu = tps * flops_tok / (peak * 1e12) / world if peak else None
            last = {"step": done, "tokens": done * sampler.tokens_per_step, "loss": loss_val,
                    "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps, "mfu": mfu,
                    "step_s": time.perf_counter() - t0}
            if main and not math.isfinite(loss_val) and not warned_diverged:
                warned_diverged = True
                log(f"warning: step {done}: the training loss is {loss_val} (diverged); the run "
                    f"goes on, but its weights will not recover: train again with a lower lr "
                    f"(now {cfg.lr:g}) or a longer warm-up")
            if main and log_now:
                append_metrics(metrics_path, last)
                bar.set_postfix_str(f"loss {loss_val:.3f} lr {lr:.2e} {tps / 1e3:.1f}k tok/s"
                                    + (f" MFU {100 * mfu:.1f}%" if mfu is not None else ""))
            t_window, tok_window = time.perf_counter(), 0
        if main:
            bar.update(1)
        if on_step is not None:
            on_step(done)
        if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps and main:
            append_metrics(metrics_path, evaluate(done))
            t_window = time.perf_counter()
        if cfg.ckpt_every and done % cfg.ckpt_every == 0 and done != end and main:
            save_training_checkpoint(ckpt, raw_model, optimizer, done, cfg, data.tokenizer,
                                     run_state=run_state)
            t_window = time.perf_counter()
        if deadline is not None and done < end and time.time() >= deadline:
            log(f"{cfg.variant}: deadline reached after step {done} of {cfg.steps}; checkpointing")
            end = done
            break
    bar.close()
    summary = {"variant": cfg.variant, "steps_done": end, "steps": cfg.steps,
               "params": raw_model.num_params(), "tokens": end * sampler.tokens_per_step,
               "flops_per_token": flops_tok, "last": last}
    if steady_time > 0:
        summary["steady_tokens_per_s"] = steady_tokens / steady_time
        summary["steady_mfu"] = (summary["steady_tokens_per_s"] * flops_tok / (peak * 1e12) / world
                                 if peak else None)
    if main:
        def checkpoint():
            save_training_checkpoint(ckpt, raw_model, optimizer, end, cfg, data.tokenizer,
                                     run_state=run_state)
            summary["checkpoint"] = str(ckpt)

        save = cfg.save_final or end < cfg.steps
        # Steps trained by this call are checkpointed before the final evaluation: one that
        # fails (out of memory, a kill) must not take them with it. A finished run resumed
        # again is saved after it, as its checkpoint's settings then still describe the
        # evaluation logged before (the fallback for records that do not hold them).
        if save and end > start_step:
            checkpoint()
        if end == cfg.steps:
            # A finished run resumed again keeps the final evaluation it logged, unless that
            # was made with other evaluation settings (those of the checkpoint for a record
            # that does not hold them); then it is made again and replaces it.
            final = lambda r: r.get("step") == end and "val_loss" in r  # noqa: E731
            saved = state["train_config"] if state is not None else {}
            prev = [r for r in read_metrics(metrics_path) if final(r)] if start_step == end else []
            if prev and all(prev[-1].get(k, saved.get(k)) == getattr(cfg, k)
                            for k in EVAL_SETTINGS):
                rec = prev[-1]
            else:
                rec = evaluate(end)
                if prev:  # replaced, not logged twice
                    drop_metrics(metrics_path, final)
                append_metrics(metrics_path, rec)
            summary["val"] = rec
        if save and end == start_step:
            checkpoint()
        if end == cfg.steps and cfg.plot:
            try:
                from hwattn.train.plot import plot_loss

                plot_loss({cfg.variant: read_metrics(metrics_path)}, out / "loss.png")
                summary["plot"] = str(out / "loss.png")
            except ImportError:
                pass
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["model"] = raw_model
    return summary


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
