"""`hwattn demo`: the cost table of the xl preset and a short greedy decode of a tiny
random-weight model of each variant, with decode tokens/s and KV cache bytes."""

from __future__ import annotations

import statistics


def register(sub) -> None:
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("demo", help="cost table (xl) plus a greedy decode of each tiny variant",
                       description="Prints `hwattn analyze --preset xl --tp 1,2,4`, then decodes "
                                   "with a tiny random-weight model of each variant through the "
                                   "paged KV cache and reports tokens/s (median of repeated runs "
                                   "after a warm-up, with their spread) and cache bytes.")
    p.add_argument("--batch", type=int, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (default 3)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def spread(rates: list[float]) -> tuple[float, float, float]:
    """(median, lowest, highest) of repeated measurements."""
    return statistics.median(rates), min(rates), max(rates)


def speed_verdict(rows: list[tuple[str, list[float]]]) -> str:
    """One line on what the tokens/s say: which variants are faster than which beyond the
    run-to-run spread (ranges that do not overlap), or that none is."""
    ranges = {label: spread(rates) for label, rates in rows}
    order = sorted(ranges, key=lambda k: -ranges[k][0])
    clear = [(a, b) for i, a in enumerate(order) for b in order[i + 1:]
             if ranges[a][1] > ranges[b][2]]
    if not clear:
        return ("decode tokens/s: every difference is within the run-to-run spread, so no "
                "variant is faster here; at this size a step is framework overhead, not KV-cache "
                "reads (the kernels' speed is `hwattn bench decode` on a GPU)")
    faster = {}
    for a, b in clear:
        faster.setdefault(a, []).append(b)
    parts = [f"{a} > {', '.join(bs)}" for a, bs in faster.items()]
    return ("decode tokens/s, only differences beyond the run-to-run spread: " + "; ".join(parts)
            + " (tiny models: framework overhead, not KV-cache reads)")


def run(args) -> int:
    import torch

    from hwattn.analysis.cost import DEFAULT_VARIANTS, GPUS, analyze, format_table
    from hwattn.cli import model_params
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.cpu_threads import describe, use_default_cpu_threads
    from hwattn.models import Transformer, greedy_generate

    from hwattn.cli import check_device

    for name in ("batch", "prompt_len", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_device(args.device)
    from hwattn.device import resolve_device

    args.device = str(resolve_device(args.device))  # "auto" as the device it stands for
    configs = [ModelConfig.from_preset("tiny", **parse_variant(label)) for label in DEFAULT_VARIANTS]
    context = min(c.max_seq_len for c in configs)
    if args.prompt_len + args.new_tokens > context:
        raise ValueError(f"--prompt-len {args.prompt_len} + --new-tokens {args.new_tokens} "
                         f"exceed the tiny models' context of {context} tokens")
    use_default_cpu_threads(max(model_params(c) for c in configs), args.device)
    print("== KV cache and decode roofline, xl preset (per rank) ==")
    print(format_table(analyze("xl", DEFAULT_VARIANTS, (1, 2, 4)), GPUS["h100"]))
    where = args.device + (f", {describe()}" if torch.device(args.device).type == "cpu" else "")
    print(f"\n== greedy decode, tiny preset, random weights, {where} ==")
    print(f"{'variant':<8} {'params':>9} {'KV B/token':>11} {'cache bytes':>12} "
          f"{'tok/s (median, range of ' + str(args.repeats) + ')':>32}  tokens")
    timings = []
    for cfg in configs:
        torch.manual_seed(0)
        model = Transformer(cfg, device=args.device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), device=args.device)
        greedy_generate(model, prompt, min(4, args.new_tokens))  # warm-up: allocator, kernels
        rates = []
        for _ in range(args.repeats):
            tokens, stats = greedy_generate(model, prompt, args.new_tokens)
            rates.append(stats.decode_tokens_per_s)
        mid, lo, hi = spread(rates)
        timings.append((cfg.label, rates))
        print(f"{cfg.label:<8} {model.num_params():>9,} {model.kv_bytes_per_token(1, torch.float32):>11,} "
              f"{stats.kv_cache_bytes:>12,} {f'{mid:,.0f} ({lo:,.0f}-{hi:,.0f})':>32}  "
              f"{tokens[0, args.prompt_len:args.prompt_len + 6].tolist()}")
    print(speed_verdict(timings))
    return 0
