"""`hwattn train`: train one model on a built dataset (DDP under torchrun)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT_WARMUP = 20


def register(sub) -> None:
    from hwattn.cli import add_cpu_threads
    from hwattn.config import PRESETS, SDPA_CHOICES

    p = sub.add_parser("train", help="train one model on a dataset built by `hwattn data build`",
                       description="AdamW (0.9, 0.95), weight decay 0.1 on matrices (not on norms "
                                   "or the tied embedding), clipping 1.0, warm-up then cosine to "
                                   "1% of the peak, bf16 autocast on GPU, optional torch.compile, "
                                   "DDP when launched with torchrun. Checkpoints in <out>/checkpoint "
                                   "are Hugging Face folders and resume exactly; metrics go to "
                                   "<out>/metrics.jsonl and <out>/loss.png.")
    p.add_argument("--data", required=True, help="dataset folder (from `hwattn data build`)")
    p.add_argument("--out", required=True, help="run folder (resumed if it holds a checkpoint)")
    p.add_argument("--preset", default="tiny", choices=tuple(PRESETS), help="model shape (default tiny)")
    p.add_argument("--variant", default="mha", help="mha, mqa, gqa-4, gta-4, mla, gla-2, ... (default mha)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per micro-batch per GPU (default 16)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (default 1)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"warm-up steps (default {DEFAULT_WARMUP}, at most a tenth of --steps so "
                        "that a short run still decays; a resumed run keeps its own)")
    p.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak (default 0.01)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip, > 0 (default 1.0; inf: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast: auto = bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--sdpa", default="auto", choices=SDPA_CHOICES,
                   help="attention kernels: auto = PyTorch's choice (FlashAttention-2 on a GPU, "
                        "differing key/value widths zero-padded); cudnn = cuDNN's fused "
                        "attention first, widths as they are (CUDA only)")
    p.add_argument("--eval-every", type=int, default=0, help="validation every N steps (default: end only)")
    p.add_argument("--eval-tokens", type=int, default=65536, help="validation tokens per domain, scored in whole windows of --seq-len (a remainder is dropped, with a warning)")
    p.add_argument("--ckpt-every", type=int, default=0, help="checkpoint every N steps (default: end only)")
    p.add_argument("--log-every", type=int, default=10, help="metrics record every N steps")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU "
                                                     "(default 989 on CUDA = H100 bf16, none on CPU)")
    p.add_argument("--no-resume", action="store_true", help="start over, discarding any checkpoint in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def default_warmup(args) -> tuple[int, str]:
    """The warm-up when --warmup is not given, and a note saying where it comes from. A run
    resumed in --out keeps the one it started with (its train_config.json), as the trainer
    refuses another. Else 20 steps, at most a tenth of --steps (at least 1): the old default,
    min(20, steps), made a run of 20 steps or fewer all warm-up, its learning rate rising to
    the peak at the last step and never decaying.

    Only where --out holds a checkpoint the trainer resumes (`recover_checkpoint`'s folders):
    every run writes train_config.json as it starts, so one stopped before its first
    checkpoint left one that a new run, starting afresh, must not take its warm-up from."""
    from hwattn.train.trainer import STATE_FILE

    ckpt = Path(args.out) / "checkpoint"
    try:
        resumes = any((ckpt.with_name(ckpt.name + suffix) / STATE_FILE).is_file()
                      for suffix in ("", ".tmp", ".old"))
    except OSError:  # an unreadable --out is named by check_output_dir
        resumes = False
    if resumes and not args.no_resume:
        try:
            saved = json.loads((Path(args.out) / "train_config.json").read_text())
            warmup = saved["warmup_steps"]
        except (OSError, ValueError, TypeError, KeyError):
            warmup = None
        if isinstance(warmup, int) and not isinstance(warmup, bool) and 0 <= warmup <= args.steps:
            return warmup, f"that of the run resumed in {args.out}"
    return (min(DEFAULT_WARMUP, max(1, args.steps // 10)),
            f"the default, {DEFAULT_WARMUP} but at most a tenth of --steps {args.steps}")


def check_args(args) -> list[str]:
    """ValueError for what `TrainConfig` leaves to fail late (after training, or after
    --no-resume has removed the old checkpoint) or would take silently. Sets --warmup when
    not given; returns notes for stderr (the warm-up chosen, when it is not 20; a run that is
    all warm-up), to print once every check has passed."""
    import math

    from hwattn.cli import (at_least, check_dataset, check_device, check_not_the_dataset,
                            check_output_dir, positive)

    notes = []
    at_least(args, 1, "steps", "seq_len", "batch_size", "accum", "log_every")
    if args.warmup is None:
        args.warmup, origin = default_warmup(args)
        if args.warmup != DEFAULT_WARMUP:
            notes.append(f"hwattn train: --warmup not given: {args.warmup} warm-up "
                         f"step{'s' if args.warmup != 1 else ''} ({origin})")
    at_least(args, 0, "warmup", "eval_every", "ckpt_every", "seed", "weight_decay")
    if not math.isfinite(args.weight_decay):  # inf: every weight NaN after the first step
        raise ValueError(f"--weight-decay must be a finite number >= 0, got {args.weight_decay}")
    if args.warmup > args.steps:
        raise ValueError(f"--warmup {args.warmup} exceeds --steps {args.steps}")
    if args.warmup == args.steps > 1:
        notes.append(f"hwattn train: warning: --warmup {args.warmup} equals --steps: the whole "
                     f"run is warm-up, its learning rate rising to --lr {args.lr:g} at the last "
                     f"step with no decay; a shorter --warmup leaves steps for the cosine to "
                     f"--min-lr-ratio")
    positive(args, "lr", "peak_tflops")
    if not args.clip > 0:  # 0 would zero every gradient, a negative clip flip its sign
        raise ValueError(f"--clip must be > 0 (inf: no clipping), got {args.clip}")
    check_device(args.device)
    check_output_dir(args.out)
    check_not_the_dataset(args.out, args.data)
    if args.eval_tokens < args.seq_len:
        raise ValueError(f"--eval-tokens {args.eval_tokens} is less than one evaluation window "
                         f"of --seq-len {args.seq_len} tokens")
    if args.eval_tokens % args.seq_len:
        windows = args.eval_tokens // args.seq_len
        print(f"hwattn train: warning: --eval-tokens {args.eval_tokens} is not a multiple of "
              f"--seq-len {args.seq_len}: validation scores at most {windows * args.seq_len} "
              f"tokens per domain ({windows} windows)", file=sys.stderr)
    from hwattn.data.loader import TokenDataset

    check_dataset(args.data)
    data = TokenDataset(args.data)
    for domain, tokens in data.val.items():
        if len(tokens) <= args.seq_len:
            raise ValueError(f"--seq-len {args.seq_len} is longer than the {len(tokens)} "
                             f"validation tokens of domain {domain!r} in {args.data}: lower "
                             f"--seq-len or rebuild with a larger --val-fraction")
    return notes


def run(args) -> int:
    from hwattn.cli import model_params
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.cpu_threads import describe, use_default_cpu_threads
    from hwattn.device import resolve_device
    from hwattn.train.trainer import TrainConfig, train

    notes = check_args(args)
    device = resolve_device(args.device)
    shape = ModelConfig.from_preset(args.preset, **parse_variant(args.variant))
    use_default_cpu_threads(model_params(shape), device)
    # Under torchrun rank 0 alone evaluates, checkpoints and reports (the trainer checks RANK).
    main = os.environ.get("RANK", "0").strip() in ("0", "")  # a bad RANK: train() names it
    if device.type == "cpu" and not args.json and main:
        print(f"training on {describe()}")
    cfg = TrainConfig(data=args.data, out=args.out, preset=args.preset, variant=args.variant,
                      seq_len=args.seq_len, batch_size=args.batch_size, accum_steps=args.accum,
                      steps=args.steps, lr=args.lr, warmup_steps=args.warmup,
                      min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
                      grad_clip=args.clip, seed=args.seed, device=args.device, amp=args.amp,
                      compile=args.compile, sdpa=args.sdpa, eval_every=args.eval_every,
                      eval_tokens=args.eval_tokens, ckpt_every=args.ckpt_every,
                      log_every=args.log_every, peak_tflops=args.peak_tflops,
                      resume=not args.no_resume)
    # One process: under torchrun each rank trains on its own GPU, which the trainer picks.
    # Not compiled: Inductor recomputes what eager keeps, so the eager bound is none there.
    if os.environ.get("WORLD_SIZE", "1").strip() in ("1", "") and not cfg.compile:
        from hwattn.data.loader import TokenDataset
        from hwattn.train.memory import check_batch_fits
        from hwattn.train.trainer import model_config

        check_batch_fits([model_config(cfg, TokenDataset(args.data).vocab_size)], cfg.seq_len,
                         cfg.batch_size, device, cfg.amp)
    if main:
        for note in notes:
            print(note, file=sys.stderr)
    # With --json, stdout holds the summary alone; what the run says (a resume, a warning
    # that it will not be bit-identical) goes to stderr rather than nowhere.
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    res = train(cfg, progress=not args.json, log=log)
    res.pop("model", None)
    if not main:
        return 0
    if args.json:
        print(json.dumps(res))
    else:
        val = res.get("val", {})
        tps = res.get("steady_tokens_per_s")
        mfu = res.get("steady_mfu")
        print(f"{cfg.variant}: {res['params']:,} params, {res['tokens']:,} tokens"
              + (f", val loss {val['val_loss']:.4f} ({val['val_bpb']:.3f} bits/byte)" if val else "")
              + (f", {tps:,.0f} tok/s" if tps else "") + (f", MFU {100 * mfu:.1f}%" if mfu else ""))
        print(f"checkpoint: {res['checkpoint']}")
    return 0
