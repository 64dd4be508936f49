"""`hwattn analyze`: per-variant parameters, KV cache and decode roofline of a preset."""

from __future__ import annotations

import argparse
import json

from hwattn.config import PRESETS


def int_list(text: str, minimum: int = 1) -> list[int]:
    """An argparse type: comma-separated integers, each at least `minimum` and none given
    twice (a repeated value would only repeat its rows)."""
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or any(v < minimum for v in values):
        kind = "positive" if minimum == 1 else f">= {minimum}"
        raise argparse.ArgumentTypeError(f"expected {kind} integers, got {text!r}")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise argparse.ArgumentTypeError(f"{', '.join(map(str, twice))} given more than once "
                                         f"in {text!r}")
    return values


def register(sub) -> None:
    from hwattn.analysis.cost import DEFAULT_VARIANTS, DTYPES, GPUS
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("analyze", help="KV cache, arithmetic intensity and roofline per variant",
                       description="One row per attention variant and TP degree: parameters, KV "
                                   "bytes per token per layer (per rank), total KV cache, "
                                   "arithmetic intensity at L_q = 1 and 2, and the roofline-bound "
                                   "attention decode time.")
    p.add_argument("--preset", default="xl", choices=tuple(PRESETS), help="model shape (default xl)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated labels such as mha,gqa-8,gta-4,gla-4, each once "
                        "(default: the six)")
    p.add_argument("--tp", type=int_list, default=[1],
                   help="TP degrees, e.g. 1,2,4,8, each once (default 1)")
    p.add_argument("--batch", type=int, default=128, help="concurrent sequences (default 128)")
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence (default 8192)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES),
                   help="KV cache dtype (default bf16)")
    p.add_argument("--gpu", default="h100", choices=tuple(GPUS), help="GPU peaks (default h100)")
    p.add_argument("--peak-tflops", type=float, help="override the GPU's dense TFLOP/s")
    p.add_argument("--bandwidth", type=float, help="override the GPU's memory TB/s")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    p.add_argument("--plot", metavar="FILE.png",
                   help="also draw KV bytes per GPU against the TP degree and the roofline, every "
                        "variant and TP degree, to this PNG")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from hwattn.analysis.cost import GPUS, analyze, format_table
    from hwattn.cli import check_output_file, positive, variant_list

    positive(args, "peak_tflops", "bandwidth", "batch", "context")
    variants = variant_list(args.variants)
    check_output_file(args.plot, "--plot")
    gpu = GPUS[args.gpu]
    if args.peak_tflops is not None or args.bandwidth is not None:
        gpu = replace(gpu, name=f"{gpu.name} (custom)",
                      tflops=args.peak_tflops if args.peak_tflops is not None else gpu.tflops,
                      tb_per_s=args.bandwidth if args.bandwidth is not None else gpu.tb_per_s)
    rows = analyze(args.preset, variants, args.tp, args.batch, args.context, args.dtype, gpu)
    if args.json:
        print(json.dumps({"gpu": gpu.__dict__, "rows": rows}))
    else:
        print(format_table(rows, gpu))
    if args.plot:
        from hwattn.analysis.plot import plot_analysis

        plot_analysis(rows, gpu, args.plot)
        if not args.json:
            print(f"plot (KV bytes per GPU vs TP degree, roofline) written to {args.plot}")
    return 0
