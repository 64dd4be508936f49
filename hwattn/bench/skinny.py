"""Skinny GEMMs on the GPU: cuBLAS (`torch.nn.functional.linear`) against the Triton kernel of
hwattn/ops/skinny_gemm.py, at the decode step's row counts, per weight of the xl model.

A decode step at batch 64 multiplies 64 rows by every weight once; the floor is the weight's
bytes at the copy rate, and what keeps cuBLAS off it is too few output tiles for the SMs. Per
(shape, M): cuBLAS, then the kernel under `choose_config`'s tiles, then a few other tiles
(`sweep_configs`). Each call is timed as the model runs it, with the weight cold: a CUDA graph
calls it once on each of enough copies of the weight to overflow L2 twice, x (as the previous
layer would leave it) warm; the median of CUDA-event timings of replays, over the copies.

Every Triton row is checked first: max |y - reference| / max |reference| <= CHECK_LIMIT
(`skinny_linear_reference` on fp32 copies of the operands, so not rounded), and the output
after the timed replays must equal the first call's bit for bit (split-K is meant to be deterministic); otherwise the row
is marked failed. Row fields: µs per call, GB/s (W + x + y bytes), % of the copy rate measured
in the same run, speed-up over cuBLAS. The `skinny` part of benchmarks/engine_diagnostics.py
runs `run` and saves the rows.

`run_blas` times cuBLAS itself asked four ways (`BLAS_VARIANTS`: `F.linear` as the model calls
it, the same under cuBLASLt, W stored transposed for `torch.mm`, `addmm` with a zero bias), in
the same way and with the same check; the `blas` part of engine_diagnostics.py runs it.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from hwattn.bench.timing import graphed
from hwattn.ops.reference import skinny_linear_reference
from hwattn.ops.skinny_gemm import SkinnyConfig, choose_config, skinny_linear, split_layout

# (N, K) of the xl model's weights at decode (nn.Linear layout), measured at 64 rows with the
# `gemm` part of benchmarks/engine_diagnostics.py.
SHAPES = {
    "qkv": (3072, 2048),
    "o": (2048, 2048),
    "gate_up": (12976, 2048),
    "down": (2048, 6488),
    "gla_in_a": (1600, 2048),
    "gla_in_b": (3072, 1024),
    "lm_head": (128256, 2048),
}
ROWS = (64, 16, 128)  # 64 first: the serving batch
CHECK_LIMIT = 1e-2  # max abs error over max |reference|, 16-bit outputs (rounding: <= 4e-3)
CHECK_LIMIT_FP32 = 1e-4
MAX_COPIES = 32
TABLE_HEADER = (f"{'shape':<9} {'M':>4} {'N':>6} {'K':>5} {'impl':<9} {'tiles':<20} {'µs':>8} "
                f"{'GB/s':>6} {'%copy':>6} {'×cuBLAS':>7}  check")


def sweep_configs(m: int, n: int, k: int, sms: int, elem_size: int = 2,
                  limit: int = 8) -> list[SkinnyConfig]:
    """`choose_config`'s tiles first, then up to limit - 1 others around it: twice and half
    the K split, 32 and 128 weight rows per program, twice the K step, a pipeline stage more
    and less, the other of 4 and 8 warps. Requests that launch the same grid are kept once."""
    chosen = choose_config(m, n, k, sms, elem_size=elem_size)
    candidates = [
        chosen,
        replace(chosen, split_k=chosen.split_k * 2),
        replace(chosen, split_k=max(1, chosen.split_k // 2)),
        choose_config(m, n, k, sms, elem_size=elem_size, block_n=32),
        choose_config(m, n, k, sms, elem_size=elem_size, block_n=128),
        choose_config(m, n, k, sms, elem_size=elem_size, block_k=2 * chosen.block_k),
        replace(chosen, num_stages=chosen.num_stages + 1),
        replace(chosen, num_stages=max(1, chosen.num_stages - 1)),
        replace(chosen, num_warps=4 if chosen.num_warps == 8 else 8),
    ]
    configs, seen = [], set()
    for config in candidates:
        launched = replace(config, split_k=split_layout(k, config.block_k, config.split_k)[1])
        if launched not in seen:
            seen.add(launched)
            configs.append(launched)
    return configs[:limit]


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref|, in fp32; inf if got has NaN or inf."""
    got, ref = got.float(), ref.float()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _weight_copies(weight_bytes: int, l2_bytes: int) -> int:
    return max(1, min(MAX_COPIES, -(-2 * l2_bytes // weight_bytes)))


def bench_shape(name: str, m: int, n: int, k: int, configs: list[SkinnyConfig], *, timer,
                copy_gbs: float | None = None, device="cuda", dtype=torch.bfloat16,
                l2_bytes: int = 0, cublas_us: float | None = None, chosen: int | None = 0,
                deadline: float | None = None) -> list[dict]:
    """Rows for Y (m, n) = X (m, k) W^T: cuBLAS (unless `cublas_us` is given, from an earlier
    call), then one per config until `deadline` (a `time.time()` value) passes.

    timer: `f(fn) -> seconds` per call of fn (CUDA events on the GPU); fn calls the op once per
    weight copy (`l2_bytes` sets how many). chosen: index of `choose_config`'s tiles in
    `configs`, flagged in its row. On CUDA the calls are graph-captured.
    """
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype)
    copies = _weight_copies(weight.numel() * elem, l2_bytes)
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    ref = skinny_linear_reference(x.float(), weight.float())  # unrounded: < 1/2 ulp off
    limit = CHECK_LIMIT if elem == 2 else CHECK_LIMIT_FP32
    moved = (n * k + m * k + m * n) * elem

    def per_call_us(op) -> tuple[float, str]:
        def every_copy():
            for w in weights:
                op(w)

        fn, how = graphed(every_copy, device)
        return timer(fn) / copies * 1e6, how

    def row(impl: str, tiles: SkinnyConfig | None, us: float | None, **extra) -> dict:
        r = dict(shape=name, m=m, n=n, k=k, impl=impl, dtype=str(dtype).removeprefix("torch."),
                 tiles=tiles.label() if tiles else None, copies=copies, us=us,
                 gbs=moved / us / 1e3 if us else None, **extra)
        r["pct_copy"] = 100 * r["gbs"] / copy_gbs if copy_gbs and us else None
        r["speedup"] = cublas_us / us if cublas_us and us else None
        return r

    rows = []
    if cublas_us is None:
        cublas_us, how = per_call_us(lambda w: torch.nn.functional.linear(x, w))
        rows.append(row("cublas", None, cublas_us, timing=how, ok=True))
    for i, config in enumerate(configs):
        if deadline is not None and time.time() > deadline:
            break
        flag = dict(chosen=i == chosen, config=vars(config).copy())
        try:
            first = skinny_linear(x, weight, config=config)
            err = relative_error(first, ref)
            out = torch.empty_like(first)
            us, how = per_call_us(lambda w, c=config, o=out: skinny_linear(x, w, c, o))
            repeats = bool(torch.equal(out, first))
        except Exception as failure:  # noqa: BLE001 - e.g. a tile shape out of shared memory
            rows.append(row("triton", config, None, ok=False,
                            error=f"{type(failure).__name__}: {str(failure)[:200]}", **flag))
            continue
        rows.append(row("triton", config, us, timing=how, rel_err=err, deterministic=repeats,
                        ok=err <= limit and repeats, **flag))
    return rows


# Ways of asking cuBLAS for Y = X W^T. Its heuristics pick the kernel per call from the
# operands' layout and the entry point, and at decode's few rows the default (`F.linear`:
# cublasGemmEx, W as the transposed operand) reads the small xl weights at a third to a half
# of the copy rate. Each variant gets the weight as it would store it once at load time.
BLAS_VARIANTS = ("linear", "linear_lt", "mm_wt", "addmm_lt")
# Inductor's own Triton GEMM templates for the same product, autotuned for the shape alone
# (`torch.compile` with max_autotune, Triton as its only GEMM backend): can a template reach
# the small weights faster than cuBLAS? (The whole decode step under max-autotune did not
# finish compiling within a device call, 2026-12-08.) GPU only; not in the default variants.
TEMPLATE_VARIANT = "triton_template"


def blas_call(variant: str, x: torch.Tensor, weight: torch.Tensor):
    """(prepare, op) for a cuBLAS variant: prepare(W (N, K)) gives the stored operand, op(x,
    stored) computes X W^T (M, N). `*_lt` run under cuBLASLt
    (`torch.backends.cuda.preferred_blas_library`, set by `bench_blas` around capture), the
    others under PyTorch's default library: `linear` as the model calls it, `mm_wt` with W
    stored transposed (K, N) and row-major, `addmm_lt` with a zero bias (PyTorch's fused bias
    path); `TEMPLATE_VARIANT` (not cuBLAS) Inductor's autotuned Triton templates."""
    f = torch.nn.functional
    if variant in ("linear", "linear_lt"):
        return (lambda w: w), (lambda x, w: f.linear(x, w))
    if variant == "mm_wt":
        return (lambda w: w.t().contiguous()), (lambda x, wt: torch.mm(x, wt))
    if variant == "addmm_lt":
        bias = torch.zeros(weight.shape[0], device=x.device, dtype=x.dtype)
        return (lambda w: w), (lambda x, w: torch.addmm(bias, x, w.t()))
    if variant == TEMPLATE_VARIANT:
        tuned = torch.compile(lambda x, w: f.linear(x, w), dynamic=False,
                              options={"max_autotune": True, "max_autotune_gemm_backends": "TRITON"})
        return (lambda w: w), tuned
    raise ValueError(f"unknown cuBLAS variant {variant!r}; expected one of "
                     f"{BLAS_VARIANTS + (TEMPLATE_VARIANT,)}")


def _blas_library(name: str | None):
    """Set cuBLAS or cuBLASLt as PyTorch's preferred library (CUDA only); returns the one it
    replaced, or None where there is nothing to set."""
    backends = getattr(torch.backends.cuda, "preferred_blas_library", None)
    if name is None or backends is None or not torch.cuda.is_available():
        return None
    before = backends()
    backends(name)
    return before


def bench_blas(name: str, m: int, n: int, k: int, *, timer, copy_gbs: float | None = None,
               device="cuda", dtype=torch.bfloat16, l2_bytes: int = 0,
               variants: tuple[str, ...] = BLAS_VARIANTS) -> list[dict]:
    """One row per cuBLAS variant (`blas_call`) for Y (m, n) = X (m, k) W^T, timed as
    `bench_shape` times cuBLAS (graph-captured, weights cold); `speedup` is over the first
    variant (`linear`, the model's call). Each output is checked against the unrounded
    reference (`CHECK_LIMIT`)."""
    device = torch.device(device)
    elem = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(m, k, device=device, dtype=dtype)
    weight = torch.randn(n, k, device=device, dtype=dtype)
    copies = _weight_copies(weight.numel() * elem, l2_bytes)
    ref = skinny_linear_reference(x.float(), weight.float())
    limit = CHECK_LIMIT if elem == 2 else CHECK_LIMIT_FP32
    moved = (n * k + m * k + m * n) * elem
    rows, base = [], None
    for variant in variants:
        prepare, op = blas_call(variant, x, weight)
        before = _blas_library("cublaslt" if variant.endswith("_lt") else None)
        try:
            stored = [prepare(weight)] + [prepare(weight.clone()) for _ in range(copies - 1)]
            err = relative_error(op(x, stored[0]), ref)

            def every_copy(stored=stored, op=op):
                for w in stored:
                    op(x, w)

            fn, how = graphed(every_copy, device)
            us = timer(fn) / copies * 1e6
            row = dict(timing=how, rel_err=err, ok=err <= limit)
        except Exception as failure:  # noqa: BLE001 - a library this build lacks
            us, row = None, dict(ok=False, error=f"{type(failure).__name__}: {str(failure)[:200]}")
        finally:
            _blas_library(before)
        base = us if base is None else base
        r = dict(shape=name, m=m, n=n, k=k, impl=variant, dtype=str(dtype).removeprefix("torch."),
                 tiles=None, copies=copies, us=us, gbs=moved / us / 1e3 if us else None, **row)
        r["pct_copy"] = 100 * r["gbs"] / copy_gbs if copy_gbs and us else None
        r["speedup"] = base / us if base and us else None
        rows.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_blas(shapes: dict[str, tuple[int, int]] | None = None, rows: tuple[int, ...] = ROWS, *,
             timer, copy_gbs: float | None = None, device="cuda", dtype=torch.bfloat16,
             l2_bytes: int | None = None, variants: tuple[str, ...] = BLAS_VARIANTS,
             log=print) -> list[dict]:
    """`bench_blas` over every shape and row count (`variants` as `bench_blas` takes them);
    prints the table as rows arrive."""
    device = torch.device(device)
    if l2_bytes is None:
        l2_bytes = (getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
                    if device.type == "cuda" else 0)
    log(TABLE_HEADER)
    out = []
    for m in rows:
        for name, (n, k) in (shapes or SHAPES).items():
            new = bench_blas(name, m, n, k, timer=timer, copy_gbs=copy_gbs, device=device,
                             dtype=dtype, l2_bytes=l2_bytes, variants=variants)
            for r in new:
                log(format_row(r))
            out.extend(new)
    return out


def format_row(r: dict) -> str:
    """One line of the table (TABLE_HEADER)."""
    def num(value, width: int, digits: int) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    tiles = (r["tiles"] or "") + (" *" if r.get("chosen") else "")
    if r["impl"] == "cublas":
        check = ""
    elif "error" in r:
        check = f"FAILED {r['error'][:60]}"
    else:
        check = (f"{r['rel_err']:.1e}" + ("" if r.get("deterministic", True) else " NONDETERMINISTIC")
                 + ("" if r["ok"] else " FAILED"))
    return (f"{r['shape']:<9} {r['m']:>4} {r['n']:>6} {r['k']:>5} {r['impl']:<9} {tiles:<20} "
            f"{num(r['us'], 8, 2)} {num(r['gbs'], 6, 0)} {num(r['pct_copy'], 6, 1)} "
            f"{num(r['speedup'], 7, 2)}  {check}")


def summary(rows: list[dict]) -> list[dict]:
    """Per M: the summed µs of the shapes that have a cuBLAS row and a passing chosen row,
    for cuBLAS, the chosen tiles and the fastest passing tiles of each shape."""
    out = []
    for m in dict.fromkeys(r["m"] for r in rows):
        mine = [r for r in rows if r["m"] == m]
        total = dict(m=m, shapes=[], cublas_us=0.0, chosen_us=0.0, best_us=0.0)
        for shape in dict.fromkeys(r["shape"] for r in mine):
            of = [r for r in mine if r["shape"] == shape]
            cublas = [r["us"] for r in of if r["impl"] == "cublas"]
            chosen = [r["us"] for r in of if r.get("chosen") and r["ok"]]
            passing = [r["us"] for r in of if r["impl"] == "triton" and r["ok"]]
            if cublas and chosen:
                total["shapes"].append(shape)
                total["cublas_us"] += cublas[0]
                total["chosen_us"] += chosen[0]
                total["best_us"] += min(passing)
        out.append(total)
    return out


def run(shapes: dict[str, tuple[int, int]] | None = None, rows: tuple[int, ...] = ROWS, *,
        timer, copy_gbs: float | None = None, device="cuda", dtype=torch.bfloat16,
        sms: int | None = None, l2_bytes: int | None = None, seconds: float = 100.0,
        sweep_limit: int = 8, log=print) -> tuple[list[dict], list[dict]]:
    """Every shape at every M: first cuBLAS and the chosen tiles of all of them, then the
    sweeps (`sweep_configs`, M in the order given) while `seconds` last. Prints the table as
    rows arrive and the per-M totals; returns (rows, summary)."""
    device = torch.device(device)
    shapes = shapes or SHAPES
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        sms = sms or props.multi_processor_count
        l2_bytes = l2_bytes if l2_bytes is not None else getattr(props, "L2_cache_size", 50 << 20)
    sms, l2_bytes = sms or 132, l2_bytes or 0
    elem = torch.empty((), dtype=dtype).element_size()
    deadline = time.time() + seconds
    log(TABLE_HEADER)
    results, cublas = [], {}
    plan = {(name, m): sweep_configs(m, n, k, sms, elem, sweep_limit)
            for m in rows for name, (n, k) in shapes.items()}
    for sweep in (False, True):
        for (name, m), configs in plan.items():
            if time.time() > deadline:
                break
            n, k = shapes[name]
            new = bench_shape(name, m, n, k, configs[1:] if sweep else configs[:1], timer=timer,
                              copy_gbs=copy_gbs, device=device, dtype=dtype, l2_bytes=l2_bytes,
                              cublas_us=cublas.get((name, m)), chosen=None if sweep else 0,
                              deadline=deadline)
            for r in new:
                if r["impl"] == "cublas":
                    cublas[(name, m)] = r["us"]
                log(format_row(r))
            results.extend(new)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    totals = summary(results)
    for t in totals:
        log(f"M={t['m']}: {len(t['shapes'])} shapes, cuBLAS {t['cublas_us']:.1f} µs, chosen tiles "
            f"{t['chosen_us']:.1f} µs, fastest tiles {t['best_us']:.1f} µs")
    return results, totals
