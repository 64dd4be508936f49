"""The GPU quality study: do GTA-4 match GQA-4 and GLA-2 match MLA at equal parameters?

One command, one H100, a fixed wall-clock budget (default 500 s of the device's 10-minute
limit). Trains parameter-matched `mini` models (d_h = 64) for mha, mqa, gqa-4, gta-4, mla and
gla-2, two seeds each, on the same tokens with the same schedule, then evaluates each one
(per-domain perplexity and bits per byte, cloze, 4-way multiple choice, recall probe).

How the budget is kept: a calibration pass builds every variant once, times a few steps in
eager mode, and — when `--compile auto` — compiles the blocks of the first variant
(`hwattn.train.compile`) and keeps compiling only if the measured speed-up repays the compile
time of the remaining variants. The step count, the same for every run, is then chosen so
that all runs plus their evaluation fit the remaining budget. Compiled models are reused for
the second seed (weights re-initialised in place), so each variant compiles once.

Writes under --out (default $OUT, else runs/quality_study), at most 4 files:

    study_runs.jsonl     one line per run: config, throughput and MFU, loss curve, evaluation
    study_summary.json   environment, calibration, schedule, per-variant means and seed spread
    loss_curves.png      validation loss vs tokens, one colour per variant, one style per seed
    study_log.txt        everything printed

`python -m hwattn.eval.report --study DIR` turns these into docs/results/quality.md.
CPU smoke test: `python benchmarks/quality_study.py --smoke` (tiny preset, a few steps).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from hwattn.data.loader import BatchSampler, TokenDataset  # noqa: E402
from hwattn.eval.suite import EvalConfig, build_tasks, evaluate_model  # noqa: E402
from hwattn.models.transformer import Transformer  # noqa: E402
from hwattn.train.trainer import (H100_BF16_TFLOPS, TrainConfig, model_config, param_groups,  # noqa: E402
                                  read_metrics, resolve_device, train)

VARIANTS = ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")


class Tee:
    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        stamp = f"[{time.perf_counter() - T_START:6.1f}s] "
        print(stamp + line, flush=True)
        self.file.write(stamp + line + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=".carry/quality_data", help="built dataset (GPT-2 tokens)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/quality_study"))
    p.add_argument("--preset", default="mini")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="sequences per micro-batch")
    p.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--budget-s", type=float, default=500.0, help="wall-clock budget of the whole script")
    p.add_argument("--steps", type=int, help="fixed step count; 0 or unset: sized to the budget")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--min-steps", type=int, default=20)
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"))
    p.add_argument("--calib-steps", type=int, default=3, help="timed steps per variant in calibration")
    p.add_argument("--evals-per-run", type=int, default=4, help="validation points on the loss curve")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="validation tokens per domain during training")
    p.add_argument("--n-cloze", type=int, default=400)
    p.add_argument("--n-mc", type=int, default=400)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--eval-reserve-s", type=float, default=8.0, help="assumed final-eval seconds per run")
    p.add_argument("--device", default="auto")
    p.add_argument("--keep-checkpoint", metavar="DIR",
                   help="save the first seed's model of --keep-variant (with the tokenizer) to DIR, "
                        "for decoding studies after the run")
    p.add_argument("--keep-variant", default="gla-2")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke test: tiny preset, seq 128, few steps, small eval")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_size, args.accum = "tiny", 128, 4, 1
        args.steps = 6 if args.steps is None else args.steps
        args.n_cloze, args.n_mc, args.eval_tokens, args.eval_batch = 8, 8, 2048, 8
        args.evals_per_run = 2
    return args


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def timed_steps(step_fn, n: int, device) -> float:
    """Seconds per call of step_fn over n calls (after synchronising)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def make_step(forward, model, sampler, device, amp_ctx):
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95),
                            fused=device.type == "cuda")
    state = {"k": 0}

    def step():
        for micro in range(sampler.accum_steps):
            x, y = sampler.batch(state["k"], micro)
            x, y = x.to(device), y.to(device)
            with amp_ctx():
                logits = forward(x)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / sampler.accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["k"] += 1

    return step


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("study_runs.jsonl", "study_log.txt"):
        (out / name).unlink(missing_ok=True)
    log = Tee(out / "study_log.txt")
    deadline = T_START + args.budget_s
    device = resolve_device(args.device)
    variants = [v for v in args.variants.split(",") if v]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "argv": sys.argv[1:], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "commit": _git_commit()}
    log("environment", json.dumps(env))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = TokenDataset(args.data)
    log(f"data {args.data}: {len(data.train):,} train tokens, val domains {data.domains}, "
        f"tokenizer {data.manifest['tokenizer']['name']}")
    ecfg = EvalConfig(seq_len=args.seq_len, ppl_tokens=None, n_cloze=args.n_cloze, n_mc=args.n_mc,
                      recall_pairs=(16, 64, 128) if not args.smoke else (8, 16),
                      recall_queries=32 if not args.smoke else 4, recall_seqs=64 if not args.smoke else 4,
                      batch_size=args.eval_batch, seed=0)
    tasks = build_tasks(data, ecfg)
    log(f"tasks: {len(tasks['cloze'])} cloze, {len(tasks['mc'])} multiple choice")
    scratch = Path(tempfile.mkdtemp(prefix="hwattn-study-"))

    # Calibration: build every variant, time eager steps, decide on compilation.
    from hwattn.eval.perplexity import autocast_for
    from hwattn.train.compile import RegionallyCompiled

    probe_cfg = TrainConfig(data=args.data, out=str(scratch), preset=args.preset, seq_len=args.seq_len,
                            batch_size=args.batch_size, accum_steps=args.accum)
    sampler = BatchSampler(data.train, args.seq_len, args.batch_size, args.accum, seed=12345)
    amp = lambda: autocast_for(device, "auto")  # noqa: E731
    models, compiled, calib = {}, {}, {}
    use_compile = args.compile == "on"
    for i, label in enumerate(variants):
        probe_cfg.variant = label
        model = Transformer(model_config(probe_cfg, data.vocab_size)).to(device)
        models[label] = model
        step = make_step(model, model, sampler, device, amp)
        step()  # warm-up (allocator, kernels)
        eager_s = timed_steps(step, args.calib_steps, device)
        rec = {"eager_step_s": eager_s, "params": model.num_params(),
               "flops_per_token": model.flops_per_token(args.seq_len)}
        decide_here = args.compile == "auto" and i == 0
        if use_compile or decide_here:
            try:
                t0 = time.perf_counter()
                fn = RegionallyCompiled(model)
                cstep = make_step(fn, model, sampler, device, amp)
                cstep()
                cstep()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                rec["compile_s"] = time.perf_counter() - t0
                rec["compiled_step_s"] = timed_steps(cstep, args.calib_steps, device)
                compiled[label] = fn
            except Exception as err:  # a compiler failure must not cost the study
                log(f"{label}: torch.compile failed ({type(err).__name__}: {err}); eager")
                rec["compile_error"] = f"{type(err).__name__}: {err}"[:500]
                use_compile = False
            if decide_here and "compiled_step_s" in rec:
                remaining = args.budget_s - (time.perf_counter() - T_START)
                train_share = 0.6 * remaining  # rough share of the budget spent training
                gain = train_share * (1 - rec["compiled_step_s"] / eager_s)
                cost = rec["compile_s"] * (len(variants) - 1)
                use_compile = gain > cost
                rec["compile_decision"] = {"projected_gain_s": gain, "projected_cost_s": cost,
                                           "use_compile": use_compile}
                if not use_compile:
                    compiled.pop(label)
        rec["step_s"] = rec.get("compiled_step_s") if label in compiled else eager_s
        calib[label] = rec
        log(f"calibrate {label}: {rec['params']:,} params, eager {eager_s * 1e3:.0f} ms/step"
            + (f", compiled {rec['compiled_step_s'] * 1e3:.0f} ms/step after {rec['compile_s']:.1f} s "
               "compile" if "compiled_step_s" in rec else "")
            + (f" -> compile {'on' if use_compile else 'off'}" if "compile_decision" in rec else ""))
    if device.type == "cuda":
        torch.cuda.synchronize()

    # The schedule: the same step count for every run, sized to the remaining budget.
    n_runs = len(variants) * len(seeds)
    evals_cost = args.evals_per_run * 1.0 + args.eval_reserve_s
    if args.steps:  # 0 or None: size to the budget
        steps = args.steps
    else:
        remaining = deadline - time.perf_counter() - n_runs * evals_cost - 10.0
        per_step_all = sum(calib[v]["step_s"] for v in variants) * len(seeds)
        steps = int(remaining / per_step_all) if per_step_all > 0 else args.min_steps
        steps = max(args.min_steps, min(args.max_steps, steps))
    tokens_per_step = sampler.tokens_per_step
    log(f"schedule: {steps} steps x {tokens_per_step:,} tokens = {steps * tokens_per_step:,} tokens "
        f"per run ({steps * tokens_per_step / len(data.train):.2f} epochs), {n_runs} runs")

    runs, skipped = [], []
    warmup = max(1, int(args.warmup_frac * steps))
    # Seeds outermost: if time runs short, every variant still has its first seed.
    for seed in seeds:
        for label in variants:
            projected = steps * calib[label]["step_s"] + evals_cost
            if time.perf_counter() + projected > deadline + 20:
                log(f"{label} seed {seed}: skipped, {projected:.0f} s would overrun the budget")
                skipped.append({"variant": label, "seed": seed})
                continue
            t0 = time.perf_counter()
            cfg = TrainConfig(data=args.data, out=str(scratch / f"{label}-s{seed}"), preset=args.preset,
                              variant=label, seq_len=args.seq_len, batch_size=args.batch_size,
                              accum_steps=args.accum, steps=steps, lr=args.lr, warmup_steps=warmup,
                              seed=seed, device=str(device), eval_every=max(1, steps // args.evals_per_run),
                              eval_tokens=args.eval_tokens, log_every=max(1, steps // 50),
                              resume=False, save_final=False, plot=False)
            res = train(cfg, progress=False, log=log, dataset=data, model=models[label],
                        compiled=compiled.get(label))
            model = res.pop("model")
            train_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            ev = evaluate_model(model, data, ecfg, tasks)
            rec = {"variant": label, "seed": seed, "preset": args.preset, "steps": steps,
                   "tokens": res["tokens"], "params": res["params"],
                   "hidden_dim": model.config.hidden_dim,
                   "kv_bytes_per_token": model.kv_bytes_per_token(1, torch.bfloat16),
                   "kv_bytes_per_token_per_layer": model.kv_bytes_per_token(1, torch.bfloat16)
                   // model.config.n_layers,
                   "compiled": label in compiled, "train_s": train_s,
                   "eval_s": time.perf_counter() - t1,
                   "steady_tokens_per_s": res.get("steady_tokens_per_s"),
                   "steady_mfu": res.get("steady_mfu"),
                   "peak_tflops": H100_BF16_TFLOPS if device.type == "cuda" else None,
                   "flops_per_token": res["flops_per_token"],
                   "curve": read_metrics(Path(cfg.out) / "metrics.jsonl"), "eval": ev}
            runs.append(rec)
            with open(out / "study_runs.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            mfu = rec["steady_mfu"]
            log(f"{label} seed {seed}: val ppl {ev['ppl']['average']['ppl']:.3f} "
                f"(bpb {ev['ppl']['average']['bpb']:.4f}), cloze {100 * ev['cloze']['acc']:.1f}%, "
                f"MC {100 * ev['mc']['acc_norm']:.1f}%, recall {100 * ev['recall'].get('mean', 0):.1f}%; "
                f"train {train_s:.1f} s at {rec['steady_tokens_per_s'] or 0:,.0f} tok/s"
                + (f" (MFU {100 * mfu:.1f}%)" if mfu else "") + f", eval {rec['eval_s']:.1f} s")
            shutil.rmtree(cfg.out, ignore_errors=True)
            if args.keep_checkpoint and label == args.keep_variant and seed == seeds[0]:
                from hwattn.models.checkpoint import save_checkpoint
                save_checkpoint(model, args.keep_checkpoint, extra={"study_seed": seed})
                shutil.copy(Path(args.data) / "tokenizer.json", Path(args.keep_checkpoint))
                log(f"kept {label} seed {seed} in {args.keep_checkpoint}")
            write_summary(out, env, args, calib, steps, tokens_per_step, warmup, data, runs, skipped)

    write_summary(out, env, args, calib, steps, tokens_per_step, warmup, data, runs, skipped)
    try:
        from hwattn.eval.report import plot_study
        plot_study(runs, out / "loss_curves.png")
    except Exception as err:  # the numbers matter more than the picture
        log(f"plot failed: {type(err).__name__}: {err}")
    shutil.rmtree(scratch, ignore_errors=True)
    log(f"done in {time.perf_counter() - T_START:.1f} s; files in {out}")
    return 0


def write_summary(out, env, args, calib, steps, tokens_per_step, warmup, data, runs, skipped):
    """study_summary.json, rewritten after every run so a cut-short study keeps its numbers."""
    summary = {"environment": env, "args": vars(args), "calibration": calib,
               "schedule": {"steps": steps, "tokens_per_step": tokens_per_step,
                            "tokens_per_run": steps * tokens_per_step, "warmup_steps": warmup,
                            "lr": args.lr, "train_tokens_available": len(data.train)},
               "dataset": {"path": args.data, "build_key": data.manifest["build_key"],
                           "tokenizer": data.manifest["tokenizer"]},
               "variants": summarise(runs), "skipped": skipped,
               "wall_s": time.perf_counter() - T_START}
    (out / "study_summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def summarise(runs: list[dict]) -> dict:
    """Per variant: mean and spread (max - min over seeds) of the headline numbers."""
    by = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    out = {}
    for label, rs in by.items():
        def stat(fn):
            vals = [fn(r) for r in rs]
            vals = [v for v in vals if v is not None]
            if not vals:
                return None
            return {"mean": statistics.fmean(vals), "spread": max(vals) - min(vals), "values": vals}
        out[label] = {
            "params": rs[0]["params"], "kv_bytes_per_token": rs[0]["kv_bytes_per_token"],
            "val_ppl": stat(lambda r: r["eval"]["ppl"]["average"]["ppl"]),
            "val_loss": stat(lambda r: r["eval"]["ppl"]["average"]["loss"]),
            "val_bpb": stat(lambda r: r["eval"]["ppl"]["average"]["bpb"]),
            "ppl_by_domain": {d: stat(lambda r, d=d: r["eval"]["ppl"][d]["ppl"])
                              for d in rs[0]["eval"]["ppl"] if d != "average"},
            "cloze_acc": stat(lambda r: r["eval"].get("cloze", {}).get("acc")),
            "mc_acc": stat(lambda r: r["eval"].get("mc", {}).get("acc")),
            "mc_acc_norm": stat(lambda r: r["eval"].get("mc", {}).get("acc_norm")),
            "recall": stat(lambda r: r["eval"].get("recall", {}).get("mean")),
            "tokens_per_s": stat(lambda r: r["steady_tokens_per_s"]),
            "mfu": stat(lambda r: r["steady_mfu"]),
        }
    return out


if __name__ == "__main__":
    sys.exit(main())
