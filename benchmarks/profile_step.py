"""Where the time of one prefill and one decode step goes, per variant, on a GPU.

A 2-layer model of the XL shape, bf16, page 64: one prefill of `--prompt` tokens and one
eager decode step of `--batch` sequences holding `--context` tokens, each under
torch.profiler; prints the top CUDA kernels by total device time.

    python benchmarks/profile_step.py --variants gqa-4,gta-4 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from hwattn import AttentionMetadata, ModelConfig, Transformer  # noqa: E402
from hwattn.config import parse_variant  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--variants", default="gqa-4,gta-4,gla-2,mla")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=8704)
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out")
    args = p.parse_args()
    dev, ps = torch.device("cuda"), 64
    report = {}
    for label in args.variants.split(","):
        cfg = ModelConfig.from_preset("xl", n_layers=2, max_seq_len=args.context + 64,
                                      **parse_variant(label))
        model = Transformer(cfg, device=dev, dtype=torch.bfloat16).eval()
        pages = -(-args.context // ps)
        caches = model.allocate_kv_cache(args.batch * pages + pages, ps)
        table = torch.randperm(args.batch * pages, device=dev).to(torch.int32).view(args.batch, pages)
        lens = torch.full((args.batch,), args.context, dtype=torch.int32, device=dev)
        dmeta = AttentionMetadata.for_step(table, lens, 1, ps)
        tok = torch.randint(0, cfg.vocab_size, (args.batch, 1), device=dev)
        ptable = torch.arange(args.batch * pages, args.batch * pages + pages, device=dev,
                              dtype=torch.int32)[None]
        plen = torch.tensor([args.prompt], dtype=torch.int32, device=dev)
        pmeta = AttentionMetadata.for_step(ptable, plen, args.prompt, ps, is_prefill=True)
        ptok = torch.randint(0, cfg.vocab_size, (1, args.prompt), device=dev)
        for t in (c for layer in caches for c in layer):
            t.normal_()
        rows = {}
        with torch.no_grad():
            for name, fn in (("prefill", lambda: model(ptok, meta=pmeta, kv_caches=caches)),
                             ("decode", lambda: model(tok, meta=dmeta, kv_caches=caches))):
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    fn()
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                events.sort(key=lambda e: -e.device_time_total)
                total = sum(e.device_time_total for e in events)
                rows[name] = dict(total_us=total, top=[(e.key[:90], round(e.device_time_total, 1),
                                                        e.count) for e in events[:args.top]])
                print(f"\n== {label} {name}: {total:.0f} µs device time (2 layers + head) ==")
                for key, us, n in rows[name]["top"]:
                    print(f"{us:>10.1f} µs  x{n:<3} {key}")
        report[label] = rows
        del model, caches
        torch.cuda.empty_cache()
    if args.out:
        with open(f"{args.out}/profile_step.json", "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
