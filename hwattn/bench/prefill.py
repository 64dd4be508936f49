"""The paged prefill op on the GPU: time, TFLOP/s and % of the matmul peak, per prefill form.

For a variant and a shape (B sequences, each with `query_len` new tokens over `prefix` cached
ones, page size), every form the layer's prefill can take (`Attention.prefill_forms`: one for
GQA / GTA, absorbed and expanded for MLA / GLA) is timed on random paged data with a shuffled
block table: the median of CUDA-event timings of single calls after warm-up, TFLOP/s of the op
(`PrefillForm.attention_flops`: QK^T and PV over the visible causal pairs), and the % of the
bf16 matmul rate measured in the same run. A form's full cost, building its operands included
(`PrefillForm.flops`), is printed beside it: that is what the layer compares to choose. Every
row is first checked against the PyTorch reference on a slice of the batch.

    hwattn bench prefill --variants gla-2,mla,gqa-4 --query-len 8192
    hwattn bench prefill --variants gqa-4 --prefix 4096 --query-len 512 --block-m 64

A human table first, one line of JSON last (`--out` also writes it to a file). The command
line is `hwattn/cli/bench_prefill.py`; `run` here does the work.
"""

from __future__ import annotations

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


def case_inputs(torch, form, case: PrefillCase, device, dtype=None) -> dict:
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
        inputs = case_inputs(torch, form, case, device, dtype)
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


def run(cases: list[PrefillCase], *, backend, forms: tuple[str, ...] | None = None,
        check: bool = True, warmup: int = 5, iters: int = 20, config=None) -> dict:
    """Time every case on this GPU (`bench_case`), printing a table as rows arrive; a case
    that fails (a check, a shape the backend refuses, memory) is reported and skipped.
    Returns the JSON-ready document: device, the matmul peak of this run, tiles, rows."""
    import torch

    from hwattn.bench.timing import DeviceTimer, device_peaks

    device_timer = DeviceTimer("cuda")

    def timer(fn):
        return device_timer(fn, iters=iters, warmup=warmup) * 1e3

    peak = device_peaks("cuda")[1]
    rows = []
    print(f"{torch.cuda.get_device_name()}  bf16 matmul {peak:.0f} TFLOP/s  backend "
          f"{backend.name}  tiles {config or 'per shape'}")
    print(f"{'variant':<8} {'form':<9} {'B':>3} {'L_q':>6} {'prefix':>6} {'page':>4} "
          f"{'ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'form GFLOP':>10} {'check':>8}")
    for case in cases:
        try:
            case_rows = bench_case(case, backend=backend, timer=timer, peak_tflops=peak,
                                   forms=forms, check=check)
        except (ValueError, RuntimeError, torch.cuda.OutOfMemoryError) as err:
            print(f"{case.variant:<8} skipped: {type(err).__name__}: {err}")
            rows.append(dict(asdict(case), error=f"{type(err).__name__}: {err}"))
            torch.cuda.empty_cache()
            continue
        for r in case_rows:
            checked = f"{r['check_rel_err']:.1e}" if "check_rel_err" in r else "-"
            print(f"{r['variant']:<8} {r['form']:<9} {r['batch']:>3} {r['query_len']:>6} "
                  f"{r['prefix']:>6} {r['page']:>4} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
                  f"{r['pct_peak']:>6.1f} {r['form_flops'] / 1e9:>10.1f} {checked:>8}")
        rows.extend(case_rows)
    return dict(bench="prefill", device=torch.cuda.get_device_name(), matmul_tflops=peak,
                config=None if config is None else asdict(config), rows=rows)
