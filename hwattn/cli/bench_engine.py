"""`hwattn bench engine`: offline throughput and per-step decode latency of the engine, with
the time spent in attention kernels versus the rest of the step."""

from __future__ import annotations

import json


def register(sub) -> None:
    from hwattn.cli.serve import add_engine_args

    p = sub.add_parser("engine", help="offline engine throughput and decode-step breakdown",
                       description="Runs N requests at once to completion (output tokens/s, "
                                   "TTFT, ITL, TPOT, e2e), then times one decode step at "
                                   "batch B and context L split into attention kernels, the "
                                   "rest of the forward, and host overhead.")
    p.add_argument("model", help="checkpoint directory or preset")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--repetitive", action="store_true",
                   help="prompts of repeated phrases (where n-gram speculation shines)")
    p.add_argument("--breakdown-batch", type=int, default=None,
                   help="B of the decode-step breakdown (default: --num-prompts)")
    p.add_argument("--breakdown-context", type=int, default=None,
                   help="L of the decode-step breakdown (default: prompt + output length)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--out", default=None, help="also write the JSON document to this file")
    add_engine_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from hwattn.cli.serve import engine_from_args
    from hwattn.engine.benchmark import decode_breakdown, random_prompts, run_offline
    from hwattn.engine.loader import model_config

    for name in ("num_prompts", "prompt_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    overrides = {"max_seq_len": args.max_seq_len} if args.max_seq_len else None
    context = args.max_model_len or model_config(args.model, args.attention, overrides).max_seq_len
    if args.prompt_len >= context:  # said before any worker process starts
        raise ValueError(f"--prompt-len {args.prompt_len} leaves no room to generate in the "
                         f"model's context of {context} tokens")
    engine = engine_from_args(args)
    try:
        prompts = random_prompts(args.num_prompts, args.prompt_len, engine.model_config.vocab_size,
                                 seed=args.seed, repetitive=args.repetitive)
        run_offline(engine, prompts[:2], 4)  # warm-up (kernel compilation, allocator)
        res = run_offline(engine, prompts, args.output_len, args.temperature,
                          progress=not args.json)
        batch = args.breakdown_batch or min(args.num_prompts, args.max_num_seqs)
        context = args.breakdown_context or args.prompt_len + args.output_len
        brk = decode_breakdown(engine, batch, context)
        doc = dict(model=args.model, variant=engine.model_config.label, tp=args.tp, dp=args.dp,
                   device=str(engine.device), dtype=str(engine.dtype).replace("torch.", ""),
                   speculative=args.speculative,
                   kv_bytes_per_token_per_rank=engine.kv_bytes_per_token,
                   offline=res.as_dict(), decode_step=brk)
        report(doc, args, res, brk)  # before teardown: a slow shutdown cannot lose the results
    finally:
        engine.shutdown()
    return 0


def report(doc: dict, args, res, brk) -> None:
    if not args.json:
        ms = 1e3
        print(f"{doc['variant']} on {doc['device']} ({doc['dtype']}, TP={args.tp}, DP={args.dp}), "
              f"{res.requests} requests x {args.prompt_len} prompt + {args.output_len} output tokens")
        print(f"  output throughput   {res.output_tokens_per_s:10.1f} tok/s "
              f"(decode phase {res.decode_tokens_per_s:.1f} tok/s"
              f"{' per replica' if args.dp > 1 else ''})")
        print(f"  {'':18}{'mean':>10}{'median':>10}{'p99':>10}  ms")
        for name, s in (("TTFT", res.ttft_s), ("ITL (step)", res.itl_s), ("TPOT", res.tpot_s),
                        ("end-to-end", res.e2e_s)):
            print(f"  {name:18}{s['mean'] * ms:10.2f}{s['median'] * ms:10.2f}{s['p99'] * ms:10.2f}")
        if args.speculative:
            print(f"  draft tokens accepted            {res.acceptance_rate:.0%}")
        print(f"  decode step, B={brk['batch']} L={brk['context_len']} "
              f"(CUDA graphs: {'on' if brk['cuda_graphs'] else 'off'}"
              f"{', replica 0' if args.dp > 1 else ''}):")
        print(f"    step wall {brk['step_wall_s'] * ms:.3f} ms | forward on device "
              f"{brk['forward_device_s'] * ms:.3f} ms | attention kernels "
              f"{brk['attention_s'] * ms:.3f} ms ({brk['attention_share']:.0%} of the step)")
        print(f"    outside attention {brk['outside_attention_share']:.0%} | host overhead beyond "
              f"the forward {brk['host_overhead_share']:.0%}")
    line = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line, flush=True)
