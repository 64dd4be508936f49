"""`hwattn compare`: train, evaluate and time all six variants at one scale, side by side."""

from __future__ import annotations

import json
import sys


def check_model_options(args, variants) -> None:
    """ValueError naming --variants, --preset or --tokenizer when one names nothing that
    exists (the library's errors said "variant must ...", "preset must ...", "tokenizer must
    ..."); checked before the shipped corpus is built."""
    from hwattn.config import PRESETS
    from hwattn.variants import parse_variant

    for v in variants:
        try:
            parse_variant(v)
        except ValueError as err:
            raise ValueError(f"--variants {v}: {err}") from None
    if args.preset is not None and args.preset not in PRESETS:
        raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    if args.tokenizer is not None and args.tokenizer != "gpt2":  # gpt2 is fetched when built
        import tempfile

        from hwattn.data.corpora import tokenizer_factory

        try:
            with tempfile.TemporaryDirectory() as cache:  # bpe:N and files read nothing there
                tokenizer_factory(args.tokenizer, cache)
        except ValueError as err:
            raise ValueError(f"--tokenizer {args.tokenizer}: {err}") from None


def _scale_default(key: str, fmt=str) -> str:
    """'default X on CPU, Y on a GPU' from the compare scales (`hwattn.train.compare.SCALES`)."""
    from hwattn.train.compare import SCALES

    return f"default {fmt(SCALES['cpu'][key])} on CPU, {fmt(SCALES['cuda'][key])} on a GPU"


def register(sub) -> None:
    from hwattn.analysis.cost import DEFAULT_VARIANTS
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("compare", help="train + evaluate + time every variant, one table and plot",
                       description="The main job. For each attention variant: train a "
                                   "parameter-matched model on the same tokens with the same "
                                   "schedule, evaluate it (per-domain perplexity, bits per byte, "
                                   "cloze, multiple choice, recall probe), and measure its KV "
                                   "bytes per token and decode tokens/s. On CPU: tiny models on "
                                   "the shipped corpus (a few minutes on two cores); on a GPU: "
                                   "the mini preset at sequence length 1024.")
    p.add_argument("--out", default=None, help="output folder (default runs/compare-<preset>)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help="comma-separated variant labels (default: the six)")
    p.add_argument("--data", help="a dataset built by `hwattn data build` (default: the shipped "
                                  "corpus, tokenized into <out>/data)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--preset", help="model preset (default tiny on CPU, mini on GPU)")
    p.add_argument("--tokenizer", help="tokenizer for the shipped corpus: bpe:N, gpt2 or a "
                                       "tokenizer.json (default bpe:2048 on CPU, bpe:8192 on GPU)")
    p.add_argument("--steps", type=int,
                   help=f"optimizer steps per variant ({_scale_default('steps')}, at most two "
                        f"epochs of the training tokens and at least 20)")
    p.add_argument("--seq-len", type=int,
                   help=f"training sequence length ({_scale_default('seq_len')})")
    p.add_argument("--batch-size", type=int,
                   help=f"sequences per step ({_scale_default('batch_size')})")
    p.add_argument("--lr", type=float,
                   help=f"peak learning rate ({_scale_default('lr', '{:g}'.format)})")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order (default 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (training, evaluation) on stderr")
    p.add_argument("--json", action="store_true",
                   help="print only the result, as one JSON document (no table, no progress "
                        "bars; NaN and inf as null, as in compare.json)")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from hwattn.cli import model_params, variant_list
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.cpu_threads import describe, use_default_cpu_threads
    from hwattn.train.compare import CompareConfig, run_compare
    from hwattn.device import resolve_device

    # Each variant trains into <out>/<label>: a second run would overwrite the first.
    variants = variant_list(args.variants)
    for name in ("steps", "seq_len", "batch_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    from hwattn.cli import (at_least, check_dataset, check_device, check_not_the_dataset,
                            check_output_dir, positive)

    check_dataset(args.data)
    at_least(args, 0, "seed")
    positive(args, "lr")
    check_device(args.device)
    check_output_dir(args.out)
    check_not_the_dataset(args.out, args.data)
    if args.data and args.tokenizer:
        raise ValueError("--tokenizer only applies to the shipped corpus; a dataset given with "
                         "--data keeps the tokenizer it was built with")
    check_model_options(args, variants)
    cfg = CompareConfig(variants=variants, data=args.data, device=args.device, preset=args.preset,
                        tokenizer=args.tokenizer, steps=args.steps, seq_len=args.seq_len,
                        batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                        compile=args.compile, out=args.out or "")
    cfg = cfg.resolved()
    for v in variants:  # each label at the scale's preset (gqa-3 of 8 heads is no model)
        try:
            ModelConfig.from_preset(cfg.preset, **parse_variant(v))
        except ValueError as err:
            raise ValueError(f"--variants {v} (preset {cfg.preset}): {err}") from None
    device = resolve_device(cfg.device)
    use_default_cpu_threads(max(model_params(ModelConfig.from_preset(cfg.preset, **parse_variant(v)))
                                for v in variants), device)
    if device.type == "cpu" and not args.json:
        print(f"CPU: {describe()}")
    if args.data is None and cfg.preset != "tiny":  # stderr: stdout holds only the JSON
        print("note: training on the small shipped corpus; for a meaningful comparison at this "
              "scale build the registry corpus (`hwattn data build --corpus registry --tokenizer "
              "bpe:32768 --out data/study`, see docs/data.md) and pass --data, or run the quality "
              "study (benchmarks/quality_study.py)", file=sys.stderr)
    if not args.out:
        cfg.out = f"runs/compare-{cfg.preset}"
    log = (lambda *a, **k: None) if args.json else print
    res = run_compare(cfg, progress=not (args.no_progress or args.json), log=log)
    if args.json:
        from hwattn.files import finite_json

        print(json.dumps(finite_json({k: v for k, v in res.items() if k != "table"}),
                         allow_nan=False))
    else:
        print()
        print(res["table"])
        print("written: " + ", ".join(res["files"].values()))
    return 0
