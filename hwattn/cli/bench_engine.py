"""`hwattn bench engine`: offline throughput and latency of the engine, and one decode step
split into attention, cache writes, GEMMs, other kernels, gaps and host time beside its floor."""

from __future__ import annotations

import math

from hwattn.cli import emit_json


def register(sub) -> None:
    from hwattn.cli.serve import add_engine_args

    p = sub.add_parser("engine", help="offline engine throughput and decode-step breakdown",
                       description="Runs N requests at once to completion (output tokens/s, "
                                   "TTFT, ITL, TPOT, e2e), then times one decode step at "
                                   "batch B and context L split into attention, cache writes, "
                                   "GEMMs, other kernels, gaps between them (GPU, from the "
                                   "profiler's trace) and host time, beside its roofline floor.")
    p.add_argument("model", help="checkpoint directory or preset")
    p.add_argument("--num-prompts", type=int, default=16,
                   help="requests N submitted at once (default %(default)s)")
    p.add_argument("--prompt-len", type=int, default=256,
                   help="tokens in each random prompt (default %(default)s)")
    p.add_argument("--output-len", type=int, default=64,
                   help="tokens generated per request, end-of-sequence ignored (default "
                        "%(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature of the offline run, 0 = greedy (default "
                        "%(default)s)")
    p.add_argument("--repetitive", action="store_true",
                   help="prompts of repeated phrases (where n-gram speculation shines)")
    p.add_argument("--breakdown-batch", type=int, default=None,
                   help="B of the decode-step breakdown, at most --max-num-seqs (default: "
                        "--num-prompts, capped at --max-num-seqs)")
    p.add_argument("--breakdown-context", type=int, default=None,
                   help="L of the decode-step breakdown (default: prompt + output length)")
    p.add_argument("--json", action="store_true",
                   help="print only the JSON line (no table, no progress bar)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar of the offline run's tokens on stderr")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from hwattn.bench.engine import bench_engine, format_engine_report
    from hwattn.cli import at_least, check_output_file
    from hwattn.cli.serve import engine_config, engine_from_args
    from hwattn.engine.loader import model_config

    for name in ("num_prompts", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    at_least(args, 1, "breakdown_batch", "breakdown_context")
    # Said here, not by the sampler once the engine has started and warmed up.
    if not (args.temperature >= 0 and math.isfinite(args.temperature)):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.breakdown_batch is not None and args.breakdown_batch > args.max_num_seqs:
        # Its step would run eagerly, beyond the CUDA graphs captured up to --max-num-seqs,
        # while the report said "CUDA graphs: on": a step the engine never runs.
        raise ValueError(f"--breakdown-batch {args.breakdown_batch} is more than --max-num-seqs "
                         f"{args.max_num_seqs}, the most sequences the engine decodes in one "
                         f"step; raise --max-num-seqs too")
    check_output_file(args.out)
    engine_config(args)  # the engine options' own checks, before any worker process starts
    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len else None
    context = args.max_model_len or model_config(args.model, args.attention, overrides).max_seq_len
    if args.prompt_len >= context:  # said before any worker process starts
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room to generate in the "
                         f"model's context of {context} tokens")
    if args.prompt_len + args.output_len > context:
        raise ValueError(f"--prompt-len {args.prompt_len} + --output-len {args.output_len} "
                         f"exceed the model's context of {context} tokens")
    if args.breakdown_context is not None and args.breakdown_context > context:
        raise ValueError(f"--breakdown-context {args.breakdown_context} exceeds the model's "
                         f"context of {context} tokens")
    engine = engine_from_args(args)
    try:
        doc = bench_engine(engine, args.num_prompts, args.prompt_len, args.output_len,
                           args.temperature, args.repetitive, args.seed, args.breakdown_batch,
                           args.breakdown_context, progress=not (args.json or args.no_progress))
        doc = dict(model=args.model, **doc)
        # Printed before teardown: a slow shutdown cannot lose the results.
        if not args.json:
            print(format_engine_report(doc))
        emit_json(doc, args.out)
    finally:
        engine.shutdown()
    return 0
