"""`hwattn demo`: the cost table of the xl preset and a short greedy decode of a tiny
random-weight model of each variant, with decode tokens/s and KV cache bytes."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="cost table (xl) plus a greedy decode of each tiny variant",
                       description="Prints `hwattn analyze --preset xl --tp 1,2,4`, then decodes "
                                   "with a tiny random-weight model of each variant through the "
                                   "paged KV cache and reports tokens/s and cache bytes.")
    p.add_argument("--batch", type=int, default=4, help="sequences decoded together (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from hwattn.analysis.cost import DEFAULT_VARIANTS, GPUS, analyze, format_table
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.models import Transformer, greedy_generate

    print("== KV cache and decode roofline, xl preset (per rank) ==")
    print(format_table(analyze("xl", DEFAULT_VARIANTS, (1, 2, 4)), GPUS["h100"]))
    print(f"\n== greedy decode, tiny preset, random weights, {args.device} ==")
    print(f"{'variant':<8} {'params':>9} {'KV B/token':>11} {'cache bytes':>12} {'tok/s':>9}  tokens")
    for label in DEFAULT_VARIANTS:
        torch.manual_seed(0)
        cfg = ModelConfig.from_preset("tiny", **parse_variant(label))
        model = Transformer(cfg, device=args.device).eval()
        prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt_len), device=args.device)
        tokens, stats = greedy_generate(model, prompt, args.new_tokens)
        print(f"{cfg.label:<8} {model.num_params():>9,} {model.kv_bytes_per_token(1, torch.float32):>11,} "
              f"{stats.kv_cache_bytes:>12,} {stats.decode_tokens_per_s:>9.0f}  "
              f"{tokens[0, args.prompt_len:args.prompt_len + 6].tolist()}")
    return 0
