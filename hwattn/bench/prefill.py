"""The paged prefill op on the GPU: time, TFLOP/s and % of the matmul peak, per prefill form.

For a variant and a shape (B sequences, each with `query_len` new tokens over `prefix` cached
ones, page size), every form the layer's prefill can take (`Attention.prefill_forms`: one for
GQA / GTA, absorbed and expanded for MLA / GLA) is timed on random paged data with a shuffled
block table: the median of CUDA-event timings of single calls after warm-up, TFLOP/s of the op
(`PrefillForm.attention_flops`: QK^T and PV over the visible causal pairs), and the % of the
bf16 matmul rate measured in the same run. A form's full cost, building its operands included
(`PrefillForm.flops`), is printed beside it: that is what the layer compares to choose. Every
row is first checked against the PyTorch reference on a slice of the batch.

    python -m hwattn.bench.prefill --variants gla-2,mla,gqa-4 --query-len 8192
    python -m hwattn.bench.prefill --variants gqa-4 --prefix 4096 --query-len 512 --block-m 64

A human table first, one line of JSON last (`--out` also writes it to a file).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass

CHECK_LIMIT = 2e-2  # relative L2 error vs the reference; bf16 operands land near 3e-3


@dataclass(frozen=True)
class PrefillCase:
    """One shape: `batch` sequences of `query_len` new tokens after `prefix` cached ones."""

    variant: str
    heads: int = 16
    head_dim: int = 128
    rope_dim: int = 64
    batch: int = 1
    query_len: int = 8192
    prefix: int = 0
    page: int = 64

    def __post_init__(self):
        for name in ("heads", "head_dim", "rope_dim", "batch", "query_len", "page"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix < 0:
            raise ValueError(f"prefix must be >= 0, got {self.prefix}")

    @property
    def context(self) -> int:
        return self.prefix + self.query_len


def case_inputs(torch, layer, form, case: PrefillCase, device, dtype=None) -> dict:
    """Random queries and paged caches of one form (its `query_shapes` / `cache_shapes`),
    a shuffled block table with spare pages, the lengths and the step's plan."""
    dtype = dtype or torch.bfloat16
    pages = -(-case.context // case.page)
    n_pool = case.batch * pages + 7
    table = torch.randperm(n_pool)[: case.batch * pages].to(torch.int32).view(case.batch, pages)
    n_tokens = case.batch * case.query_len
    cu = torch.arange(case.batch + 1, dtype=torch.int32) * case.query_len
    seqlens = torch.full((case.batch,), case.context, dtype=torch.int32)
    return dict(
        queries=tuple(torch.randn(s, device=device, dtype=dtype) for s in form.query_shapes(n_tokens)),
        caches=tuple(torch.randn(n_pool, case.page, *s, device=device, dtype=dtype)
                     for s in form.cache_shapes()),
        block_table=table.to(device), cu_seqlens_q=cu.to(device), cache_seqlens=seqlens.to(device),
        plan_args=(cu, seqlens))


def cuda_median_ms(torch, fn, warmup: int, iters: int) -> float:
    """Median of `iters` CUDA-event timings of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def matmul_tflops(torch, timer) -> float:
    """bf16 matmul rate of this GPU now (8192³), TFLOP/s."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = timer(lambda: a @ b)
    return 2 * n**3 / ms / 1e9


def _check(form, inputs, case: PrefillCase, backend) -> float:
    """Relative L2 error of the backend against the PyTorch reference on the first sequence."""
    from hwattn import ops

    n = case.query_len
    args = (tuple(q[:n] for q in inputs["queries"]), inputs["caches"], inputs["block_table"][:1],
            inputs["cu_seqlens_q"][:2], inputs["cache_seqlens"][:1])
    plan = ops.plan_prefill([0, n], [case.context])
    got = form.run(backend, *args, plan=plan).float()
    want = form.run(ops.get_backend("torch"), *args, plan=plan).float()
    return float((got - want).norm() / want.norm())


def bench_case(case: PrefillCase, *, backend, timer, peak_tflops: float | None = None,
               forms: tuple[str, ...] | None = None, check: bool = True, device="cuda",
               dtype=None) -> list[dict]:
    """Time every prefill form of `case`'s layer (or those named in `forms`); one row each.

    timer: `f(fn) -> ms` (CUDA events on the GPU). peak_tflops: the matmul rate to compare to.
    """
    import torch

    from hwattn.bench.decode import layer_for

    layer = layer_for(case.variant, case.heads, case.head_dim, case.rope_dim)
    available = {f.name: f for f in layer.prefill_forms()}
    if forms:
        unknown = [f for f in forms if f not in available]
        if unknown:
            raise ValueError(f"forms: {case.variant} has {tuple(available)}, not {unknown}")
    rows = []
    q_lens, seqlens = [case.query_len] * case.batch, [case.context] * case.batch
    for form in available.values():
        if forms and form.name not in forms:
            continue
        inputs = case_inputs(torch, layer, form, case, device, dtype)
        plan = backend.plan_prefill(*inputs["plan_args"])
        row = dict(asdict(case), form=form.name, backend=backend.name,
                   attention_flops=form.attention_flops(q_lens, seqlens),
                   form_flops=form.flops(q_lens, seqlens))
        if check:
            row["check_rel_err"] = _check(form, inputs, case, backend)
            if not row["check_rel_err"] < CHECK_LIMIT:
                raise RuntimeError(f"{case.variant}/{form.name}: the kernel differs from the "
                                   f"reference by {row['check_rel_err']:.2e} (relative L2)")

        def call(form=form, inputs=inputs, plan=plan):
            return form.run(backend, inputs["queries"], inputs["caches"], inputs["block_table"],
                            inputs["cu_seqlens_q"], inputs["cache_seqlens"], plan=plan)

        row["ms"] = timer(call)
        row["tflops"] = row["attention_flops"] / row["ms"] / 1e9
        if peak_tflops:
            row["peak_tflops"] = peak_tflops
            row["pct_peak"] = 100 * row["tflops"] / peak_tflops
        rows.append(row)
    return rows


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hwattn.bench.prefill",
                                description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--variants", default="gla-2,mla,gqa-4,gta-4",
                   help="comma-separated labels (mha, mqa, gqa-G, gta-G, mla, gla-H)")
    p.add_argument("--heads", type=_positive, default=16, help="query heads h_q (default 16, xl)")
    p.add_argument("--head-dim", type=_positive, default=128, help="d_h (default 128)")
    p.add_argument("--rope-dim", type=_positive, default=64, help="d_R of gta/mla/gla (default 64)")
    p.add_argument("--batch", type=_ints, default=[1], help="B values (default 1)")
    p.add_argument("--query-len", type=_ints, default=[8192], help="new tokens per sequence")
    p.add_argument("--prefix", type=_ints, default=[0], help="cached tokens before them")
    p.add_argument("--page-size", type=_ints, default=[64], help="page sizes (default 64)")
    p.add_argument("--forms", default="", help="only these forms (paged, absorbed, expanded)")
    p.add_argument("--backend", default="triton", help="attention backend (default triton)")
    p.add_argument("--block-m", type=int, help="force the Triton prefill tile's rows")
    p.add_argument("--block-n", type=int, help="force its keys per step")
    p.add_argument("--warps", type=int, help="force its num_warps")
    p.add_argument("--stages", type=int, help="force its num_stages")
    p.add_argument("--warmup", type=_positive, default=5, help="untimed calls first (default 5)")
    p.add_argument("--iters", type=_positive, default=20, help="timed calls (default 20)")
    p.add_argument("--no-check", action="store_true", help="skip the check against the reference")
    p.add_argument("--out", metavar="FILE.json", help="also write the JSON document here")
    return p


def cases_from(args) -> list[PrefillCase]:
    """The product of the shape lists, one `PrefillCase` each (ValueError on a bad shape)."""
    cases = []
    for variant in filter(None, args.variants.split(",")):
        for batch in args.batch:
            for q_len in args.query_len:
                for prefix in args.prefix:
                    for page in args.page_size:
                        cases.append(PrefillCase(variant, args.heads, args.head_dim,
                                                 args.rope_dim, batch, q_len, prefix, page))
    if not cases:
        raise ValueError("variants: name at least one variant")
    return cases


def tile_config(args):
    """The forced `PrefillConfig`, or None (the launcher chooses per shape)."""
    knobs = dict(block_m=args.block_m, block_n=args.block_n, num_warps=args.warps,
                 num_stages=args.stages)
    if all(v is None for v in knobs.values()):
        return None
    from hwattn.ops.triton_prefill import PrefillConfig

    default = PrefillConfig()
    return PrefillConfig(**{k: (v if v is not None else getattr(default, k)) for k, v in knobs.items()})


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cases = cases_from(args)
        config = tile_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("error: the prefill benchmark needs a CUDA GPU (the ops tests check the kernel "
              "on CPU under TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from hwattn import ops

    backend = ops.get_backend(args.backend, "cuda")
    if config is not None:
        if not hasattr(backend, "with_prefill_config"):
            print(f"error: --block-m/--block-n/--warps/--stages need the Triton kernels, not "
                  f"backend {backend.name!r}", file=sys.stderr)
            return 2
        backend = backend.with_prefill_config(config)

    def timer(fn):
        return cuda_median_ms(torch, fn, args.warmup, args.iters)

    peak = matmul_tflops(torch, timer)
    forms = tuple(filter(None, args.forms.split(","))) or None
    rows = []
    print(f"{torch.cuda.get_device_name()}  bf16 matmul {peak:.0f} TFLOP/s  backend "
          f"{backend.name}  tiles {config or 'per shape'}")
    print(f"{'variant':<8} {'form':<9} {'B':>3} {'L_q':>6} {'prefix':>6} {'page':>4} "
          f"{'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'form GFLOP':>10} {'check':>8}")
    for case in cases:
        try:
            case_rows = bench_case(case, backend=backend, timer=timer, peak_tflops=peak,
                                   forms=forms, check=not args.no_check)
        except (ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as err:
            print(f"{case.variant:<8} skipped: {type(err).__name__}: {err}")
            rows.append(dict(asdict(case), error=f"{type(err).__name__}: {err}"))
            torch.cuda.empty_cache()
            continue
        for r in case_rows:
            check = f"{r['check_rel_err']:.1e}" if "check_rel_err" in r else "-"
            print(f"{r['variant']:<8} {r['form']:<9} {r['batch']:>3} {r['query_len']:>6} "
                  f"{r['prefix']:>6} {r['page']:>4} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
                  f"{r['pct_peak']:>6.1f} {r['form_flops'] / 1e9:>10.1f} {check:>8}")
        rows.extend(case_rows)
    doc = dict(bench="prefill", device=torch.cuda.get_device_name(), matmul_tflops=peak,
               config=None if config is None else asdict(config), rows=rows)
    line = json.dumps(doc)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
