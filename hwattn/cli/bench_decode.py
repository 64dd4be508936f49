"""`hwattn bench decode`: the paged decode kernels against the roofline and baselines.

Times each variant's decode kernel at every (B, L, L_q, page size), and on uneven batches
(--mixed 131072x1+1024x63: one sequence of 128K tokens beside 63 of 1K): µs, GB/s, TFLOP/s,
arithmetic intensity and the % of the roofline measured in the same run, with the speed-up
over PyTorch SDPA (every row is checked against it), FlashMLA and FA3 timed in this process on
the same paged data where their packages import (docs/external_baselines.md: how to build
them; each row is checked against SDPA too) and, beside matching rows, the measured FlashMLA /
FA3 anchors of this GPU model (`hwattn.bench.decode` has the details).

    hwattn bench decode --variants gla-2,mla --batch 128 --context 8192,16384 --query-len 1,2
    hwattn bench decode --suite standard --out results.json
    hwattn bench decode --variants mla,gla-2,gqa-4 --context 16384 --no-hopper --no-external
    hwattn bench decode --variants mla --mixed 131072x1+1024x63
    hwattn bench decode --variants mla,gla-2 --batch 1,4 --context 32768 --mixed 131072x1+1024x63
"""

from __future__ import annotations

import argparse

from hwattn.cli.analyze import int_list

DEFAULT_BATCH, DEFAULT_CONTEXT = [128], [8192]


def register(sub) -> None:
    from hwattn.bench.decode import CACHE_DTYPES
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("decode", help="paged decode kernels: µs, GB/s, TFLOP/s, %% of roofline",
                       description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--suite", choices=("custom", "standard"), default="custom",
                   help="custom: the product of the lists below; standard: the sweep of "
                        "docs/results/decode.md (latent variants at h_q 128, per-rank shapes, "
                        "long contexts, page sizes) (default custom)")
    p.add_argument("--variants", default="gla-2,mla,gqa-4,gta-4,mqa",
                   help="comma-separated labels (mha, mqa, gqa-G, gta-G, mla, gla-H; default "
                        "%(default)s)")
    p.add_argument("--heads", type=int, help="query heads h_q (default 128 for mla/gla, 32 otherwise)")
    p.add_argument("--head-dim", type=int, default=128, help="d_h (default 128)")
    p.add_argument("--rope-dim", type=int, help="d_R of gta/mla/gla (default 64)")
    p.add_argument("--tp", type=int_list, default=[1],
                   help="tensor-parallel degrees: per-rank shapes (default 1)")
    p.add_argument("--batch", type=int_list,
                   help=f"B values (default {DEFAULT_BATCH[0]}; with --mixed, only if --batch "
                        f"or --context is given)")
    p.add_argument("--context", type=int_list,
                   help=f"L values (default {DEFAULT_CONTEXT[0]}; with --mixed, only if --batch "
                        f"or --context is given)")
    p.add_argument("--mixed", action="append", metavar="SPEC",
                   help="an uneven batch, LENGTHxCOUNT terms joined by '+' (131072x1+1024x63: "
                        "one sequence of 128K tokens and 63 of 1K), timed at every variant, "
                        "--tp, --query-len and --page-size; repeat it or separate specs with "
                        "';'. Added to the --batch x --context rows when either is given, else "
                        "timed alone")
    p.add_argument("--query-len", type=int_list, default=[1], help="L_q values (default 1)")
    p.add_argument("--page-size", type=int_list, default=[64], help="page sizes (default 64)")
    p.add_argument("--cache-dtype", choices=tuple(CACHE_DTYPES), default="bf16",
                   help="KV cache dtype; queries are bf16 (fp8 uses a per-tensor scale; "
                        "default bf16)")
    p.add_argument("--configs", default="",
                   help="extra kernel tile configs to time, 'block_n:warps:stages:max_rows;...'; "
                        "each row reports the fastest")
    p.add_argument("--programs-per-sm", type=int_list, default=[],
                   help="split-KV plans to time the Triton kernel under (programs in flight per "
                        "SM, e.g. 1,2,4; default: the planner's own); each row reports the fastest")
    p.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline and check")
    p.add_argument("--no-hopper", action="store_true",
                   help="skip the Hopper backend (timed by default on sm_90 GPUs)")
    p.add_argument("--external", action=argparse.BooleanOptionalAction, default=True,
                   help="time FlashMLA (flash_mla) and FA3 (flash_attn_interface) in this process "
                        "where they import, or the prebuilt libraries in $HWATTN_EXTERNAL_DIR "
                        "(benchmarks/fetch_external_kernels.sh) (default on; --no-external skips "
                        "them)")
    p.add_argument("--warmup-ms", type=int, default=25,
                   help="warm-up time in ms before each timing (do_bench's warmup; default "
                        "%(default)s)")
    p.add_argument("--rep-ms", type=int, default=100,
                   help="time in ms spent on timed repetitions; each row reports the median "
                        "(do_bench's rep; default %(default)s)")
    p.add_argument("--out", metavar="FILE.json",
                   help="also write the JSON document here, rewritten after every row (its "
                        "\"complete\" is false until the last row is in)")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def cases(args) -> list[dict]:
    """The cases the options name: `--suite standard`'s, else every variant, --tp, --query-len
    and --page-size at each --batch x --context shape (their defaults unless --mixed is given
    without them) and each --mixed batch. ValueError naming --mixed for a bad spec."""
    from hwattn.bench import decode_cases
    from hwattn.cli import variant_list

    if args.suite == "standard":
        return decode_cases.standard_suite()
    variants = variant_list(args.variants)
    mixed = decode_cases.parse_mixed(";".join(args.mixed)) if args.mixed else []
    uniform = not mixed or args.batch is not None or args.context is not None
    batch = (args.batch or DEFAULT_BATCH) if uniform else []
    context = (args.context or DEFAULT_CONTEXT) if uniform else []
    return decode_cases.product_suite(variants, args.heads, args.tp, batch, context, args.query_len,
                                args.page_size, mixed)


# The options that make the custom product; `--suite standard` has its own shapes. (--batch and
# --context default to None so that given at all, even at their default values, they are seen.)
CUSTOM_ONLY = {"variants": "gla-2,mla,gqa-4,gta-4,mqa", "heads": None, "tp": [1], "batch": None,
               "context": None, "mixed": None, "query_len": [1], "page_size": [64]}


def check_args(args) -> None:
    """ValueError before the GPU check, so that bad options are named on any machine."""
    from hwattn.cli import at_least, check_output_file

    at_least(args, 1, "heads", "head_dim", "rope_dim", "rep_ms")
    at_least(args, 0, "warmup_ms")
    if args.suite == "standard":
        given = ["--" + k.replace("_", "-") for k, default in CUSTOM_ONLY.items()
                 if getattr(args, k) != default]
        if given:
            raise ValueError(f"{', '.join(given)} only apply to --suite custom; --suite standard "
                             f"times its own shapes")
        from hwattn.bench.decode import check_shapes
        from hwattn.bench.decode_cases import standard_suite

        # Its shapes take --head-dim and --rope-dim: a pair no layer can take is named here.
        try:
            check_shapes(sorted({(c["variant"], c["heads"], c["tp"]) for c in standard_suite()}),
                         args.head_dim, args.rope_dim)
        except ValueError as err:
            given = f"--head-dim {args.head_dim}" + ("" if args.rope_dim is None
                                                     else f" --rope-dim {args.rope_dim}")
            raise ValueError(f"--suite standard with {given}: {err}") from None
    else:
        from hwattn.bench.decode import check_shapes

        # Named here, not as an error in every row on the GPU (or, for no variant at all, an
        # empty table and exit status 0).
        chosen = cases(args)
        if not chosen:
            raise ValueError(f"--variants {args.variants!r} names no variant")
        check_shapes(sorted({(c["variant"], c["heads"], c["tp"]) for c in chosen}),
                     args.head_dim, args.rope_dim)
    check_output_file(args.out)


def run(args) -> int:
    from hwattn.bench import decode

    check_args(args)
    options = decode.DecodeOptions(head_dim=args.head_dim,
                                   rope_dim=decode.DecodeOptions.rope_dim
                                   if args.rope_dim is None else args.rope_dim,
                                   cache_dtype=args.cache_dtype, no_sdpa=args.no_sdpa,
                                   no_hopper=args.no_hopper, external=args.external,
                                   programs_per_sm=tuple(args.programs_per_sm),
                                   warmup_ms=args.warmup_ms, rep_ms=args.rep_ms)
    configs = decode.parse_configs(args.configs) if args.configs else []
    return decode.run(cases(args), options, configs, out=args.out)
