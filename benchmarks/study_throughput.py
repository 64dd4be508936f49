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
(`hwattn.layers.sdpa_choice`: cuDNN's fused attention first, MLA's and GLA's 192-wide keys and
128-wide values unpadded); a choice this PyTorch cannot run gets a row with its error.

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
    p.add_argument("--data", default="data/study")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--preset", default="study")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 / H200 bf16 dense")
    p.add_argument("--unfused-loss", action="store_true",
                   help="also time each variant with the plain (B·T, V) logits cross-entropy")
    p.add_argument("--sdpa", default="auto",
                   help="comma-separated attention kernel choices to time each variant with "
                        "(TrainConfig.sdpa: auto, cudnn); e.g. auto,cudnn")
    p.add_argument("--out", default=os.environ.get("OUT", "runs"))
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of the script: tiny preset, a few eager steps, no MFU")
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_size, args.steps, args.log_every = "tiny", 64, 4, 6, 2

    import torch

    from hwattn.data.loader import TokenDataset
    from hwattn.train.trainer import TrainConfig, train

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("study_throughput: needs a CUDA GPU (--smoke runs a CPU check)", file=sys.stderr)
        return 2
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
                              steps=args.steps, lr=2e-3, warmup_steps=2, compile=cuda,
                              device="cuda" if cuda else "cpu",
                              fused_loss=fused, eval_tokens=8192, log_every=args.log_every,
                              peak_tflops=args.peak_tflops if cuda else None, resume=False,
                              save_final=False,
                              plot=False)
            t0 = time.time()
            try:
                res = train(cfg, progress=False, log=lambda *a: None, dataset=data)
            except Exception as err:  # noqa: BLE001 - a kernel choice this build lacks: say so
                rows.append({"variant": variant, "fused_loss": fused, "sdpa": sdpa,
                             "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"})
                print(f"{variant:<6} sdpa {sdpa}: {rows[-1]['error']}", flush=True)
                torch._dynamo.reset()
                continue
            wall = time.time() - t0
            model = res.pop("model")
            tps = res.get("steady_tokens_per_s") or 0.0
            first = next((r for r in _metrics(Path(cfg.out)) if "step_s" in r), {})
            row = {"variant": variant, "fused_loss": fused, "sdpa": sdpa, "params": res["params"],
                   "non_embedding_params": model.num_params(non_embedding=True),
                   "flops_per_token": res["flops_per_token"], "tokens_per_s": tps,
                   "ms_per_step": 1e3 * args.batch_size * args.seq_len / tps if tps else None,
                   "tflops": tps * res["flops_per_token"] / 1e12,
                   "mfu": res.get("steady_mfu"),
                   "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                   "first_window_s": first.get("step_s"), "wall_s": wall,
                   # (the check is of the default path; a cuDNN row did not take it)
                   "flash_sdpa": flash_ok(model, args.seq_len) if cuda and sdpa == "auto" else "n/a"}
            rows.append(row)
            print(f"{variant:<6} {'fused' if fused else 'plain'} CE, sdpa {sdpa}: {tps:,.0f} tok/s, "
                  f"MFU {100 * (row['mfu'] or 0):.1f}%, {wall:.0f} s", flush=True)
            del model
            if cuda:
                torch.cuda.empty_cache()
    print(f"\n{gpu}, torch {torch.__version__}, preset {args.preset}, batch {args.batch_size} × "
          f"{args.seq_len}, {args.steps} steps, MFU against {args.peak_tflops:.0f} TFLOP/s\n")
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
    result = {"gpu": gpu, "torch": torch.__version__, "preset": args.preset,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
              "peak_tflops": args.peak_tflops, "rows": rows, "wall_s": time.time() - t_all}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.is_file() else []


if __name__ == "__main__":
    sys.exit(main())
