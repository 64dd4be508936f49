"""`hwattn bench prefill`: the paged prefill op per variant and form, in ms, TFLOP/s and % of
the matmul peak measured in the same run (`hwattn.bench.prefill` has the details).

    hwattn bench prefill --variants gla-2,mla,gqa-4 --query-len 8192
    hwattn bench prefill --variants gqa-4 --prefix 4096 --query-len 512 --block-m 64
"""

from __future__ import annotations

import argparse

from hwattn.cli import add_cpu_threads, emit_json
from hwattn.cli.analyze import int_list


def register(sub) -> None:
    p = sub.add_parser("prefill", help="paged prefill op: ms, TFLOP/s, %% of the matmul peak",
                       description=" ".join(__doc__.split("\n\n")[0].split()),
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--variants", default="gla-2,mla,gqa-4,gta-4",
                   help="comma-separated labels (mha, mqa, gqa-G, gta-G, mla, gla-H; default "
                        "%(default)s)")
    p.add_argument("--heads", type=int, default=16, help="query heads h_q (default 16, xl)")
    p.add_argument("--head-dim", type=int, default=128, help="d_h (default 128)")
    p.add_argument("--rope-dim", type=int, help="d_R of gta/mla/gla (default 64)")
    p.add_argument("--batch", type=int_list, default=[1], help="B values (default 1)")
    p.add_argument("--query-len", type=int_list, default=[8192],
                   help="new tokens per sequence (default 8192)")
    p.add_argument("--prefix", type=lambda text: int_list(text, minimum=0), default=[0],
                   help="cached tokens before them (default 0)")
    p.add_argument("--page-size", type=int_list, default=[64], help="page sizes (default 64)")
    p.add_argument("--forms", default="",
                   help="comma-separated: only these forms (paged, absorbed, expanded; default: "
                        "every form of each variant)")
    p.add_argument("--backend", default="triton",
                   help="attention backend: triton, hopper, torch or auto (default triton)")
    p.add_argument("--block-m", type=int, help="force the Triton prefill tile's rows")
    p.add_argument("--block-n", type=int, help="force its keys per step")
    p.add_argument("--warps", type=int, help="force its num_warps")
    p.add_argument("--stages", type=int, help="force its num_stages")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed calls (default 20)")
    p.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON document here")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def cases_from(args) -> list:
    """The product of the shape lists, one `PrefillCase` each (ValueError on a bad shape)."""
    from hwattn.bench.prefill import PrefillCase
    from hwattn.cli import variant_list

    rope_dim = PrefillCase.rope_dim if args.rope_dim is None else args.rope_dim
    return [PrefillCase(variant, args.heads, args.head_dim, rope_dim, batch, q_len, prefix,
                        page)
            for variant in variant_list(args.variants)
            for batch in args.batch for q_len in args.query_len for prefix in args.prefix
            for page in args.page_size]


def form_list(text: str) -> tuple[str, ...]:
    """The form names of a comma-separated --forms, blanks around them dropped (empty: every
    form); ValueError for a name given twice or a list of nothing but commas."""
    forms = tuple(f.strip() for f in text.split(",") if f.strip())
    if text.strip() and not forms:
        raise ValueError(f"--forms {text!r} names no form; leave it out for every form")
    twice = sorted({f for f in forms if forms.count(f) > 1})
    if twice:
        raise ValueError(f"--forms names {', '.join(twice)} more than once")
    return forms


def check_forms(args, cases) -> None:
    """ValueError for a shape no layer can take, a --rope-dim no chosen variant reads, and a
    --forms name that a chosen variant does not have (on the GPU each was a skipped row, and
    exit status 0 with nothing timed)."""
    from hwattn.bench.decode import check_shapes

    layers = check_shapes(sorted({(c.variant, c.heads, 1) for c in cases}), args.head_dim,
                          args.rope_dim)
    forms = form_list(args.forms)
    for (variant, _), layer in layers.items():
        available = tuple(f.name for f in layer.prefill_forms())
        unknown = [f for f in forms if f not in available]
        if unknown:
            raise ValueError(f"--forms {','.join(unknown)}: {variant} has "
                             f"{', '.join(available)} only")


def tile_config(args):
    """The forced `PrefillConfig`, or None (the launcher chooses per shape)."""
    knobs = dict(block_m=args.block_m, block_n=args.block_n, num_warps=args.warps,
                 num_stages=args.stages)
    if all(v is None for v in knobs.values()):
        return None
    from hwattn.ops.triton_prefill import PrefillConfig

    default = PrefillConfig()
    return PrefillConfig(**{k: (v if v is not None else getattr(default, k)) for k, v in knobs.items()})


def run(args) -> int:
    for name in ("warmup", "iters"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    cases = cases_from(args)
    from hwattn.cli import check_output_file
    from hwattn.variants import parse_variant

    for case in cases:  # named here, not only on a GPU
        parse_variant(case.variant)
    check_forms(args, cases)
    check_output_file(args.out)
    config = tile_config(args)
    from hwattn.ops import backend_names

    if args.backend != "auto" and args.backend not in backend_names():  # named on any machine
        raise ValueError(f"--backend must be auto or one of {', '.join(backend_names())}, "
                         f"got {args.backend!r}")
    import torch

    if not torch.cuda.is_available():
        raise ValueError("the prefill benchmark needs a CUDA GPU (the ops tests check the "
                         "kernel on CPU under TRITON_INTERPRET=1)")
    from hwattn import ops
    from hwattn.bench.prefill import run as run_cases

    backend = ops.get_backend(args.backend, "cuda")
    if config is not None:
        if not hasattr(backend, "with_prefill_config"):
            raise ValueError(f"--block-m/--block-n/--warps/--stages need the Triton kernels, "
                             f"not backend {backend.name!r}")
        backend = backend.with_prefill_config(config)
    doc = run_cases(cases, backend=backend, forms=form_list(args.forms) or None,
                    check=not args.no_check, warmup=args.warmup, iters=args.iters, config=config)
    emit_json(doc, args.out)
    return 0
