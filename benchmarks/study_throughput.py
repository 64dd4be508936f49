"""Training throughput and MFU of the quality study's setup, for all six variants, in one
command of about three minutes on one H200.

    python benchmarks/study_throughput.py --data data/study [--steps 24] [--out $OUT]

Each variant trains for `--steps` steps through `hwattn.train.trainer.train` with exactly the
study's settings (preset `study`, batch 128 × 1024 tokens, bf16 autocast, regionally
compiled blocks, fused AdamW, the chunked linear cross-entropy, pinned host batches), so
what it measures is what the study will get. Steady state leaves out the first logging
window (compilation and warm-up). It also checks that SDPA can run the variant's training
attention on the FlashAttention backend (a fallback to the math kernel would cost a lot).
`--sdpa auto,cudnn` times every variant under each attention-kernel choice
(`hwattn.layers.sdpa_choice`: cuDNN's fused attention first, MLA's and GLA's (d_h + d_R)-wide
keys and d_h-wide values unpadded, 96 and 64 at the `study` scale); a choice this PyTorch
cannot run gets a row with its error.

With `--profile-steps N` (2 by default, 0 for none) each run gets one more logging window, in
which the last N steps run under the profiler; that window is left out of the steady rate
like the first, and the kernels of the profiled steps are sorted into parts
(`hwattn.bench.training.train_breakdown`: GEMMs, attention, Inductor's fused kernels, the
optimizer, copies, other), printed per variant in ms per step beside the measured step, with
the GEMMs' achieved rate (6 FLOPs per matmul weight per token over their kernel time).

Prints a table (ms/step, tokens/s, achieved TFLOP/s, MFU against `--peak-tflops`, peak
memory, time to the first step) and one line of JSON; writes study_throughput.json under
`--out` (default $OUT, else runs/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

VARIANTS = ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")


def flash_ok(model, seq_len: int) -> str:
    """'yes' when one forward of the model runs with SDPA restricted to FlashAttention."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tokens = torch.randint(0, model.config.vocab_size, (2, seq_len), device="cuda")
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16), \
                sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            model(tokens, hidden_only=True)
        return "yes"
    except RuntimeError as err:
        return f"no ({str(err).splitlines()[0][:80]})"



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/study",
                   help="built dataset (default %(default)s)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated attention variants to train (default %(default)s)")
    p.add_argument("--preset", default="study", help="model shape (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per sequence (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=128,
                   help="sequences per step (default %(default)s)")
    p.add_argument("--steps", type=int, default=24,
                   help="training steps per run, a multiple of --log-every and at least two "
                        "logging windows (default %(default)s)")
    p.add_argument("--log-every", type=int, default=4,
                   help="steps per logging window; the first window (compilation, warm-up) is "
                        "left out of the steady rate (default %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 / H200 bf16 dense")
    p.add_argument("--unfused-loss", action="store_true",
                   help="also time each variant with the plain (B·T, V) logits cross-entropy")
    p.add_argument("--sdpa", default="auto",
                   help="comma-separated attention kernel choices to time each variant with "
                        "(TrainConfig.sdpa: auto, cudnn); e.g. auto,cudnn")
    p.add_argument("--profile-steps", type=int, default=2,
                   help="profile this many steps of one extra logging window per run and "
                        "report where their GPU time goes (0: no profile; CUDA only)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs"),
                   help="folder for study_throughput.json (default: $OUT, else runs)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: tiny preset, a few eager steps, no MFU")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_size, args.steps, args.log_every = "tiny", 64, 4, 6, 2
    if not 0 <= args.profile_steps <= args.log_every:
        p.error(f"--profile-steps must be in 0..--log-every ({args.log_every}), "
                f"got {args.profile_steps}")
    if args.steps < 2 * args.log_every or args.steps % args.log_every:
        p.error(f"--steps must be a multiple of --log-every ({args.log_every}) and at least two "
                f"windows (the first is left out as warm-up), got {args.steps}")

    import torch

    from hwattn.bench.training import train_breakdown
    from hwattn.data.loader import TokenDataset
    from hwattn.train.trainer import TrainConfig, train

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("study_throughput: needs a CUDA GPU (--smoke runs a CPU check)", file=sys.stderr)
        return 2
    profiled = args.profile_steps
    # One more logging window when profiling; it is left out of the steady rate.
    total_steps = args.steps + (args.log_every if profiled else 0)
    torch.backends.cuda.matmul.allow_tf32 = True
    data = TokenDataset(args.data)
    gpu = torch.cuda.get_device_name(0) if cuda else "CPU"
    rows = []
    t_all = time.time()
    choices = [c for c in args.sdpa.split(",") if c]
    cases = [(v, True, c) for c in choices for v in args.variants.split(",") if v]
    if args.unfused_loss:
        cases += [(v, False, c) for v, _, c in list(cases)]
    with tempfile.TemporaryDirectory(prefix="hwattn-throughput-") as tmp:
        for variant, fused, sdpa in cases:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            cfg = TrainConfig(data=args.data, out=f"{tmp}/{variant}-{int(fused)}-{sdpa}",
                              preset=args.preset, sdpa=sdpa,
                              variant=variant, seq_len=args.seq_len, batch_size=args.batch_size,
                              steps=total_steps, lr=2e-3, warmup_steps=2, compile=cuda,
                              device="cuda" if cuda else "cpu",
                              fused_loss=fused, eval_tokens=8192, log_every=args.log_every,
                              peak_tflops=args.peak_tflops if cuda else None, resume=False,
                              save_final=False,
                              plot=False)
            t0 = time.time()
            profiler = (StepProfiler(total_steps - profiled, total_steps, cuda) if profiled
                        else None)
            try:
                res = train(cfg, progress=False, log=lambda *a: None, dataset=data,
                            on_step=profiler)
            except Exception as err:  # noqa: BLE001 - a kernel choice this build lacks: say so
                rows.append({"variant": variant, "fused_loss": fused, "sdpa": sdpa,
                             "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
                print(f"{variant:<6} sdpa {sdpa}: {rows[-1]['error']}", flush=True)
                torch._dynamo.reset()
                continue
            wall = time.time() - t0
            model = res.pop("model")
            windows = [r for r in _metrics(Path(cfg.out)) if "step_s" in r]
            tps = (steady_rate(windows, args.batch_size * args.seq_len * args.log_every,
                               skip_last=bool(profiled))
                   if profiled else res.get("steady_tokens_per_s") or 0.0)
            first = windows[0] if windows else {}
            row = {"variant": variant, "fused_loss": fused, "sdpa": sdpa, "params": res["params"],
                   "attention_flops_per_token": model.attention_flops_per_token(args.seq_len),
                   "non_embedding_params": model.num_params(non_embedding=True),
                   "flops_per_token": res["flops_per_token"], "tokens_per_s": tps,
                   "ms_per_step": 1e3 * args.batch_size * args.seq_len / tps if tps else None,
                   "tflops": tps * res["flops_per_token"] / 1e12,
                   # From this row's steady rate (the trainer's own leaves the profiled
                   # window in), against the peak the run was given.
                   "mfu": (tps * res["flops_per_token"] / (cfg.peak_tflops * 1e12)
                           if cfg.peak_tflops and tps else None),
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                   "first_window_s": first.get("step_s"), "wall_s": wall,
                   # (the check is of the default path; a cuDNN row did not take it)
                   "flash_sdpa": flash_ok(model, args.seq_len) if cuda and sdpa == "auto" else "n/a"}
            if profiler is not None:
                if profiler.steps != profiled:
                    raise RuntimeError(f"{variant}: the profiler saw {profiler.steps} steps, "
                                       f"not {profiled}")
                row["kernels"] = train_breakdown(profiler.kernels, profiled)
                row["profiled_steps"] = profiled
            rows.append(row)
            print(f"{variant:<6} {'fused' if fused else 'plain'} CE, sdpa {sdpa}: {tps:,.0f} tok/s, "
                  f"MFU {100 * (row['mfu'] or 0):.1f}%, {wall:.0f} s", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n{gpu}, torch {torch.__version__}, preset {args.preset}, batch {args.batch_size} × "
          f"{args.seq_len}, {args.steps} steps"
          + (f" (+ {args.log_every}, the last {profiled} profiled)" if profiled else "")
          + f", MFU against {args.peak_tflops:.0f} TFLOP/s\n")
    print("| variant | loss | sdpa | params (non-emb) | ms/step | tokens/s | TFLOP/s | MFU | peak GiB "
          "| flash SDPA | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {'chunked' if r['fused_loss'] else 'plain'} | {r['sdpa']} | "
                  f"{r['error']} |" + " |" * 7)
            continue
        print(f"| {r['variant']} | {'chunked' if r['fused_loss'] else 'plain'} | {r['sdpa']} | "
              f"{r['params'] / 1e6:.1f}M ({r['non_embedding_params'] / 1e6:.1f}M) | "
              f"{r['ms_per_step'] or 0:.1f} | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
              f"{100 * (r['mfu'] or 0):.1f}% | {r['peak_mem_gb']:.1f} | {r['flash_sdpa']} | "
              f"{r['wall_s']:.0f} |")
    if any("kernels" in r for r in rows):
        print_breakdown(rows, args.batch_size * args.seq_len)
    result = {"gpu": gpu, "torch": torch.__version__, "preset": args.preset,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "profile_steps": profiled, "steps_run": total_steps,
              "peak_tflops": args.peak_tflops, "rows": rows, "wall_s": time.time() - t_all}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


class StepProfiler:
    """`train`'s `on_step` hook: the profiler runs over steps first+1 .. last (it starts when
    `first` steps are done and stops when `last` are); `kernels` then holds `trace_kernels`
    of them (GPU kernels: none without `cuda`, where only the plumbing runs)."""

    def __init__(self, first: int, last: int, cuda: bool):
        self.first, self.last, self.cuda = first, last, cuda
        self.kernels, self.steps, self._prof = [], 0, None

    def __call__(self, done: int) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        from hwattn.bench.timing import trace_kernels

        if done == self.first:
            if self.cuda:
                torch.cuda.synchronize()
            self._prof = profile(activities=[ProfilerActivity.CUDA if self.cuda
                                             else ProfilerActivity.CPU])
            self._prof.__enter__()
        elif done == self.last and self._prof is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self._prof.__exit__(None, None, None)
            self.kernels, self.steps, self._prof = trace_kernels(self._prof), done - self.first, None


def steady_rate(windows: list[dict], tokens_per_window: int, skip_last: bool) -> float:
    """Tokens/s over the logging windows of a run (metrics rows with `tokens_per_s`), leaving
    out the first (compilation, warm-up) and, with `skip_last`, the last (profiled) one."""
    keep = windows[1:len(windows) - 1] if skip_last else windows[1:]
    seconds = sum(tokens_per_window / w["tokens_per_s"] for w in keep)
    return tokens_per_window * len(keep) / seconds if seconds else 0.0


def print_breakdown(rows: list[dict], tokens_per_step: int) -> None:
    """Per profiled variant: ms per step in each part of `TRAIN_PARTS`, the kernels' sum
    beside the measured step, and the GEMMs' achieved TFLOP/s."""
    from hwattn.bench.training import TRAIN_PARTS

    print("\nGPU time per training step by part (ms; profiled steps, CUDA kernel time):\n")
    print("| variant | sdpa | " + " | ".join(TRAIN_PARTS) + " | kernels | step | kernels/step "
          "| GEMM TFLOP/s |")
    print("|---|---|" + "---|" * (len(TRAIN_PARTS) + 4))
    for r in rows:
        k = r.get("kernels")
        if not k:
            continue
        matmul_flops = r["flops_per_token"] - r["attention_flops_per_token"]
        gemm_rate = matmul_flops * tokens_per_step / k["gemm_s"] / 1e12 if k["gemm_s"] else 0.0
        print(f"| {r['variant']} | {r['sdpa']} | "
              + " | ".join(f"{1e3 * k[f'{p}_s']:.1f}" for p in TRAIN_PARTS)
              + f" | {1e3 * k['kernels_s']:.1f} | {r['ms_per_step'] or 0:.1f} | "
              f"{k['kernels_per_step']:.0f} | {gemm_rate:.0f} |")


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


if __name__ == "__main__":
    sys.exit(main())
