"""The Hopper tied decode kernel (`hwattn/ops/hopper_decode.py`) against the Triton kernel on an
H100/H200, in one command: correctness first, then the peaks, then the timings.

    python benchmarks/hopper_decode.py                          # all of it (< 4 min on an H200)
    python benchmarks/hopper_decode.py --only correctness       # the checks alone
    python benchmarks/hopper_decode.py --only timing --shapes mla-b128-16k-lq1,gla2-b128-16k-lq2
    python benchmarks/hopper_decode.py --variants pipe          # only the pipelined fallback
    python benchmarks/hopper_decode.py --variants ws,duo,duo-p1-m256,ovl-s4   # schedules, knobs
    python benchmarks/hopper_decode.py --list                   # shapes, checks, variants

correctness: hostile paged caches (shuffled pages from a pool with spare pages, NaN in every
    slot no sequence owns, out-of-range table entries past each sequence) with lengths 1, 63,
    64, 65, prime and long, L_q 1-4, each through an unsplit and a 64-token split plan, against
    the fp64 reference; the Triton kernel's error on the same data is printed beside, and
    `ratio` is the error over the tests' bound (4 × the bf16 reference's error + 1 ulp): <= 1
    passes. Names ending in -fp8 run over an e4m3 cache (stored = value / 0.5).
peaks: copy GB/s (read + write) and bf16 matmul TFLOP/s, measured in the same process.
timing: median of `triton.testing.do_bench` over CUDA-graph replays (L2 flushed between calls)
    for Triton and each Hopper variant; GB/s and TFLOP/s on the layer's own byte and FLOP
    counts, % of the peaks, the roofline time and the speed-up over Triton; GTA-4 rows also time
    GQA-4 on the same batch. Shapes ending in -fp8 read an e4m3 cache (their bytes counted at
    one per cached element); beside the bf16 shape of the same name they give the fp8 speed-up.

Hopper variants (`--variants`): default (what the "hopper" backend launches for each call:
`hopper_decode.call_config`, schedule and plan knobs), ws (ring of slots, producer warp), pipe (ring, consumer-issued
copies), ovl (ring, producer warp, softmax overlapped with the products; states <= 256 wide),
duo (two warpgroups taking turns on blocks, each owning half the columns; MLA and GLA), pp
(128 rows, two warpgroups of 64 taking turns on the tensor cores; GLA at L_q >= 2). A name
may carry knobs: -s<N> ring slots (over an fp8 cache: the copied ring's), -c<N> resident
programs per SM, -p<N> programs per SM the split-KV plan aims for, -m<N> its shortest piece
in tokens (duo-p1-m256: the duo schedule with one-wave pieces of at least 256 tokens), -w<N>
over an fp8 cache, the slots the producer widens into (ovl-w5). A variant that does not take a shape, or whose
plan knobs change nothing there (no sequence is split either way), is reported as n/a.

Every task runs in a worker process the parent watches: a kernel that fails to compile or is
wrong is reported and the run goes on; a crash or a hang (past --task-timeout) kills the
worker, the task is reported, and a fresh worker continues with the rest (a Hopper variant that
crashed or hung in the correctness phase is dropped from the timings). The human table comes
first, then one line of JSON; the JSON also goes to $OUT/hopper_decode.json (or --out).

This file holds the variants, the tasks and the command line; the shapes, checks and their
paged data are in `hopper_cases.py`, the watched worker processes in `hopper_workers.py`, the
tables in `hopper_report.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout (workers too)

from hopper_cases import CHECKS, DEVICE, Paged, errors, layer_of, shapes
from hopper_report import format_pivot, format_table
from hopper_workers import crashed, kernel_of, run_parallel, run_tasks, start_worker

# Hopper schedules: name -> HopperConfig fields on top of the shape's default programs per SM.
VARIANTS = {"ws": {}, "pipe": dict(specialize=False), "ovl": dict(overlap=True),
            "duo": dict(schedule="duo", ctas_per_sm=1), "pp": dict(schedule="pingpong")}
KNOBS = {"s": "num_stages", "c": "ctas_per_sm", "p": "programs_per_sm", "m": "min_piece",
         "w": "widened_stages"}
PLAN_KNOBS = ("programs_per_sm", "min_piece")
OVERRIDES: dict = {}  # HopperConfig fields forced from the command line (--stages, --ctas-per-sm)
CHECK_LIMIT = 2e-2  # relative L2 error against the Triton kernel in the timing phase


def _sync(torch) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def parse_variant(spec: str) -> dict:
    """HopperConfig fields of a variant name with knobs, e.g. 'duo-p1-m256'; ValueError if bad.
    "default" (no fields here) is `hopper_decode.call_config`'s choice for each call."""
    if spec == "default":
        return {}
    base, *knobs = spec.split("-")
    if base not in VARIANTS:
        raise ValueError(f"unknown Hopper variant {base!r} in {spec!r} (one of {list(VARIANTS)})")
    fields = dict(VARIANTS[base])
    for knob in knobs:
        if knob[:1] not in KNOBS or not knob[1:].isdigit():
            raise ValueError(f"bad knob {knob!r} in {spec!r}: -s/-c/-p/-m/-w followed by a number")
        fields[KNOBS[knob[:1]]] = int(knob[1:])
    return fields


class NotApplicable(Exception):
    """The variant does not take this shape, or its plan knobs change nothing here."""


def _hopper_config(spec: str, d_nope, d_v, d_rope, group, h_kv, l_q, lengths=None, fp8=False):
    """The HopperConfig of a variant for a shape (fp8: over an e4m3 cache); NotApplicable where
    it does not take it, or (given the lengths) where its plan knobs change nothing because no
    plan splits."""
    from hwattn.ops import hopper_decode
    from hwattn.ops.hopper_decode import HopperConfig

    default = hopper_decode.choose_config(d_nope, d_v, d_rope, group, l_q, fp8_cache=fp8)
    if spec == "default":
        return default

    def config_of(name):
        fields = dict(ctas_per_sm=default.ctas_per_sm)
        fields.update(parse_variant(name))
        fields.update(OVERRIDES)
        return HopperConfig(**fields)

    try:
        config = config_of(spec)
        launch = hopper_decode.plan_launch(d_nope, d_v, d_rope, group, l_q, config, fp8_cache=fp8)
    except ValueError as err:
        raise NotApplicable(str(err)) from None
    base_name = spec.split("-")[0]
    if spec != base_name:
        import dataclasses

        base = config_of(base_name)
        try:
            same = (dataclasses.replace(config, num_stages=None) == base and launch
                    == hopper_decode.plan_launch(d_nope, d_v, d_rope, group, l_q, base,
                                                 fp8_cache=fp8))
        except ValueError:
            same = False
        if same:
            raise NotApplicable(f"the knobs leave {base_name} as it is here")
    if lengths is not None and any(k in parse_variant(spec) for k in PLAN_KNOBS):
        import dataclasses

        import torch

        # The plans on the host: meta tensors carry the shapes the planner reads.
        meta = dict(device="meta", dtype=torch.bfloat16)
        cache = dict(meta, dtype=torch.float8_e4m3fn) if fp8 else meta
        q_nope = torch.empty(len(lengths), l_q, group * h_kv, d_nope, **meta)
        kv_cache = torch.empty(1, 64, h_kv, d_v, **cache)
        rope_cache = torch.empty(1, 64, d_rope, **cache)
        seqlens = torch.tensor(lengths, dtype=torch.int32)

        def pieces(cfg):
            plan = hopper_decode.make_plan(q_nope, kv_cache, rope_cache, seqlens, cfg)
            return plan.items.tolist(), plan.may_split

        base = dataclasses.replace(config, programs_per_sm=None, min_piece=None)
        if pieces(config) == pieces(base):
            raise NotApplicable("the plan knobs leave the plan as it is")
    return config


def _hopper_call(torch, kernel: str, data, lengths=None):
    """(launch description, fn(plan) -> (out, lse), config) of a Hopper variant."""
    from hwattn.ops import hopper_decode
    from hwattn.ops.hopper_decode import TiedShape

    args = data.tied_args()
    d_nope, d_v, d_rope = data.q_nope.shape[-1], data.kv_cache.shape[-1], data.q_rope.shape[-1]
    group, l_q = data.q_nope.shape[2] // data.kv_cache.shape[2], data.q_nope.shape[1]
    fp8 = data.kv_scale is not None
    config = _hopper_config(kernel, d_nope, d_v, d_rope, group, data.kv_cache.shape[2], l_q,
                            lengths, fp8)
    if kernel == "default":  # the backend's choice for this call: batch and SMs included
        config = hopper_decode.call_config(data.q_nope, data.kv_cache, data.rope_cache)
    page = data.kv_cache.shape[1]
    text = hopper_decode.describe(TiedShape(d_nope, d_v, d_rope, group, l_q, page,
                                            cache="fp8" if fp8 else None), config)

    def fn(plan):
        return hopper_decode.decode_tied(*args, softmax_scale=data.scale, plan=plan,
                                         kv_scale=data.kv_scale, config=config)
    return text, fn, config


def _widths(layer, tp):
    """(D_nope, D_v, D_R, group, H_kv) of a tied-state layer's decode call at a TP degree."""
    h_q, h_kv = layer.local_heads(tp)
    layout = layer.cache_layout(tp)
    d_qk, d_v = layer.decode_widths()
    d_rope = layout["rope"][0]
    return d_qk - d_rope, d_v, d_rope, h_q // h_kv, h_kv


def task_check(torch, name: str, kernel: str) -> dict:
    """One CHECKS case through one kernel, unsplit and split, against the fp64 reference."""
    from hwattn import ops
    from hwattn.ops import hopper_decode, triton_decode
    from hwattn.ops.reference import decode_tied_reference

    _, variant, heads, tp, lengths, l_q, page = next(c for c in CHECKS if c[0] == name)
    fp8 = name.endswith("-fp8")
    layer = layer_of(variant, heads)
    _, h_kv = layer.local_heads(tp)
    row = dict(task=f"check:{name}:{kernel}", check=name, kernel=kernel)
    if kernel != "triton":
        try:
            _hopper_config(kernel, *_widths(layer, tp), l_q, fp8=fp8)
        except NotApplicable as why:
            return dict(row, not_applicable=str(why))
    data = Paged(torch, layer, tp, lengths, l_q, page, hostile=True, fp8=fp8)
    args = data.tied_args()
    scale = dict(softmax_scale=data.scale, kv_scale=data.kv_scale)
    wide = [t.double() if t.is_floating_point() else t for t in args]
    truth = decode_tied_reference(*wide, **scale)
    base = decode_tied_reference(*args, **scale)  # the same maths in bf16
    if kernel == "triton":
        def fn(plan):
            return triton_decode.decode_tied(*args, plan=plan, **scale)
    else:
        row["unsupported"] = hopper_decode.why_unsupported(*args[:4], kv_scale=data.kv_scale)
        row["launch"], fn, _ = _hopper_call(torch, kernel, data)
    # unsplit: the kernel's own plan (its knobs: pieces of a long sequence); split: 64 tokens.
    plans = {"unsplit": None, "split": ops.plan_decode(data.seqlens, num_heads_kv=h_kv, query_len=l_q,
                                                       page_size=page, split_tokens=64)}
    for pname, plan in plans.items():
        try:
            out, lse = fn(plan)
            _sync(torch)
        except Exception as err:  # a compile error is a result, not the end of the run
            row[pname] = dict(error=f"{type(err).__name__}: {str(err)[:300]}")
            continue
        out_err, out_ratio = errors(torch, out, truth[0], base[0])
        lse_err, lse_ratio = errors(torch, lse, truth[1], base[1])
        row[pname] = dict(out_err=out_err, lse_err=lse_err, ratio=max(out_ratio, lse_ratio),
                          ok=max(out_ratio, lse_ratio) <= 1.0)
    return row


def task_peaks(torch) -> dict:
    from triton.testing import do_bench

    from hwattn.bench.decode import measure_peaks

    copy_gbps, mm_tflops = measure_peaks(torch, do_bench)
    return dict(task="peaks", copy_GBps=copy_gbps, mm_TFLOPs=mm_tflops,
                device=torch.cuda.get_device_name(), torch=torch.__version__)


def _prepare(torch, name: str, kernel: str, peaks):
    """(row, fn, plan, reference or None) of one shape through one kernel (triton, a Hopper
    variant, or gqa beside a GTA shape); (row, None, None, None) where the variant is n/a."""
    from hwattn.ops import hopper_decode, plan_decode, triton_decode

    shape = shapes()[name]
    variant = shape["variant"].replace("gta", "gqa") if kernel == "gqa" else shape["variant"]
    layer = layer_of(variant, shape["heads"])
    h_q, h_kv = layer.local_heads(shape["tp"])
    lengths, l_q, page = shape["lengths"], shape["query_len"], shape["page"]
    fp8 = shape.get("cache") == "fp8" and kernel != "gqa"  # (GQA-4 beside it: bf16)
    nbytes = sum(layer.decode_bytes(n, l_q, shape["tp"]) for n in lengths)
    if fp8:  # the cache at one byte per element; queries and outputs stay bf16
        nbytes -= sum(lengths) * (layer.kv_bytes_per_token(shape["tp"], torch.bfloat16)
                                  - layer.kv_bytes_per_token(shape["tp"], torch.float8_e4m3fn))
    flops = sum(layer.decode_flops(n, l_q, shape["tp"]) for n in lengths)
    copy_gbps, mm_tflops = peaks or (float("nan"), float("nan"))
    row = dict(task=f"time:{name}:{kernel}", shape=name, kernel=kernel, variant=variant, h_q=h_q,
               h_kv=h_kv, batch=len(lengths), max_len=max(lengths), query_len=l_q, bytes=nbytes,
               flops=flops, roofline_us=max(nbytes / copy_gbps / 1e3, flops / mm_tflops / 1e6))
    if fp8:
        row["cache"] = "fp8"
    if kernel not in ("triton", "gqa"):
        try:
            _hopper_config(kernel, *_widths(layer, shape["tp"]), l_q, lengths, fp8)
        except NotApplicable as why:
            return dict(row, not_applicable=str(why)), None, None, None
    data = Paged(torch, layer, shape["tp"], lengths, l_q, page, fp8=fp8)
    if kernel == "gqa":
        plan = plan_decode(data.seqlens, num_heads_kv=h_kv, query_len=l_q, page_size=page,
                           min_piece=triton_decode.min_piece(data.q, data.k_cache, data.v_cache, None, False))

        def fn(plan):
            return triton_decode.decode(data.q, data.k_cache, data.v_cache, data.block_table,
                                        data.seqlens, softmax_scale=data.scale, plan=plan)
        return row, fn, plan, None
    args = data.tied_args()
    group = h_q // h_kv
    min_piece = triton_decode.min_piece(data.q_nope, data.kv_cache, data.kv_cache, data.rope_cache, True)

    def tri(plan):
        return triton_decode.decode_tied(*args, softmax_scale=data.scale, plan=plan,
                                         kv_scale=data.kv_scale)

    tri_config = triton_decode.choose_config(max(16, 1 << (data.kv_cache.shape[-1] - 1).bit_length()),
                                             l_q, group, True)
    _, tri_blocks, _ = triton_decode.head_layout(group, l_q, tri_config.max_rows)
    tri_plan = plan_decode(data.seqlens, num_heads_kv=h_kv, query_len=l_q, page_size=page,
                           head_blocks=tri_blocks, min_piece=min_piece)
    if kernel == "triton":
        return row, tri, tri_plan, None
    row["unsupported"] = hopper_decode.why_unsupported(*args[:4], kv_scale=data.kv_scale)
    row["launch"], fn, config = _hopper_call(torch, kernel, data)
    plan = hopper_decode.make_plan(data.q_nope, data.kv_cache, data.rope_cache, data.seqlens,
                                   config)
    return row, fn, plan, (lambda: tri(tri_plan)[0].float())


def task_time(torch, name: str, kernel: str, peaks: tuple[float, float], rep_ms: int) -> dict:
    """Time one shape through one kernel (triton, a Hopper variant, or gqa beside GTA)."""
    from triton.testing import do_bench

    row, fn, plan, reference = _prepare(torch, name, kernel, peaks)
    if fn is None:
        return row
    return _timed(torch, do_bench, row, fn, plan, reference() if reference else None, rep_ms,
                  peaks)


def task_warm(torch, name: str, kernel: str) -> dict:
    """Compile one timing task's kernels (one call on its data), untimed: run several of these
    side by side and the timing phase finds every kernel in Triton's cache."""
    row, fn, plan, _ = _prepare(torch, name, kernel, None)
    row = dict(task=f"warm:{name}:{kernel}", **({"not_applicable": row["not_applicable"]}
                                                 if fn is None else {}))
    if fn is not None:
        try:
            fn(plan)
            _sync(torch)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return row


def _timed(torch, do_bench, row, fn, plan, reference, rep_ms, peaks) -> dict:
    copy_gbps, mm_tflops = peaks
    try:
        out = fn(plan)[0]
        _sync(torch)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        return row
    if reference is not None:
        rel = ((out.float() - reference).norm() / reference.norm()).item()
        row.update(rel_err_vs_triton=rel, wrong=not rel <= CHECK_LIMIT)
    from hwattn.bench.timing import graphed

    timed, how = graphed(lambda: fn(plan), DEVICE)
    us = do_bench(timed, warmup=10, rep=rep_ms, return_mode="median") * 1e3
    row.update(us=us, GBps=row["bytes"] / us / 1e3, TFLOPs=row["flops"] / us / 1e6,
               pct_copy=100 * row["bytes"] / us / 1e3 / copy_gbps,
               pct_mm=100 * row["flops"] / us / 1e6 / mm_tflops, items=plan.capacity, timing=how)
    return row


def worker(args) -> None:
    """Run tasks in order, one JSON line each on stdout."""
    import torch

    torch.manual_seed(0)
    if args.stages:
        OVERRIDES["num_stages"] = args.stages
    if args.ctas_per_sm:
        OVERRIDES["ctas_per_sm"] = args.ctas_per_sm
    peaks = tuple(float(x) for x in args.peaks.split(",")) if args.peaks else None
    for task in args.tasks.split(","):
        kind, _, rest = task.partition(":")
        name, _, kernel = rest.partition(":")
        start = time.perf_counter()
        try:
            if kind == "check":
                row = task_check(torch, name, kernel)
            elif kind == "peaks":
                row = task_peaks(torch)
                peaks = (row["copy_GBps"], row["mm_TFLOPs"])
            elif kind == "warm":
                row = task_warm(torch, name, kernel)
            else:
                row = task_time(torch, name, kernel, peaks, args.rep_ms)
        except Exception as err:
            row = dict(task=task, error=f"{type(err).__name__}: {str(err)[:400]}")
        row["wall_s"] = round(time.perf_counter() - start, 1)
        print("RESULT " + json.dumps(row), flush=True)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--only", choices=("correctness", "timing"),
                        help="run only the correctness checks, or only the peaks and timings "
                             "(default: both)")
    parser.add_argument("--shapes", help="comma-separated shape names (default: all; see --list)")
    parser.add_argument("--checks", help="comma-separated check names (default: all)")
    parser.add_argument("--variants", default="ws,pipe",
                        help="Hopper variants with optional knobs (see above), e.g. ws,duo-p1")
    parser.add_argument("--no-triton", action="store_true", help="time only the Hopper variants")
    parser.add_argument("--stages", type=int, help="force the Hopper ring depth (default: fill)")
    parser.add_argument("--ctas-per-sm", type=int, choices=(1, 2),
                        help="force programs per SM the Hopper launch is sized for")
    parser.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition window")
    parser.add_argument("--task-timeout", type=float, default=90.0, help="seconds per task")
    parser.add_argument("--budget", type=float, default=230.0, help="seconds for the whole run")
    parser.add_argument("--jobs", type=int, default=1,
                        help="workers that run the checks and compile every timed kernel side by "
                             "side before the timings, which always run one at a time")
    parser.add_argument("--out", help="JSON file (default $OUT/hopper_decode.json when $OUT is set)")
    parser.add_argument("--list", action="store_true", help="print the shapes, checks, variants")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    parser.add_argument("--peaks", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0
    all_shapes = shapes()
    if args.list:
        print("shapes:", ", ".join(all_shapes))
        print("checks:", ", ".join(c[0] for c in CHECKS))
        print("variants:", ", ".join(VARIANTS), "(knobs: -s<slots> -c<per SM> -p<plan per SM> "
              "-m<min piece>)")
        return 0
    variants = [v for v in args.variants.split(",") if v]
    names = (args.shapes or ",".join(all_shapes)).split(",")
    checks = (args.checks or ",".join(c[0] for c in CHECKS)).split(",")
    unknown = [s for s in names if s not in all_shapes] + \
        [c for c in checks if c not in {c[0] for c in CHECKS}]
    for spec in variants:
        try:
            parse_variant(spec)
        except ValueError as err:
            unknown.append(str(err))
    if unknown:
        print(f"unknown variants/shapes/checks: {unknown}; see --list", file=sys.stderr)
        return 2
    kernels = ([] if args.no_triton else ["triton"]) + variants
    check_tasks = [f"check:{c}:{k}" for c in checks for k in kernels] if args.only != "timing" else []
    time_tasks = []
    if args.only != "correctness":
        for name in names:
            time_tasks += [f"time:{name}:{k}" for k in kernels]
            if all_shapes[name]["variant"].startswith("gta") and not args.no_triton:
                time_tasks.append(f"time:{name}:gqa")
    deadline = time.time() + args.budget

    def spawn(tasks, peaks):
        """A worker of this script for `tasks`, with the command line's knobs and the peaks."""
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--tasks", ",".join(tasks),
               "--rep-ms", str(args.rep_ms)]
        for flag, value in (("--stages", args.stages), ("--ctas-per-sm", args.ctas_per_sm)):
            if value:
                cmd += [flag, str(value)]
        if peaks:
            cmd += ["--peaks", f"{peaks[0]},{peaks[1]}"]
        return start_worker(cmd, dict(os.environ, TRITON_INTERPRET="1" if DEVICE == "cpu" else "0"))
    if args.jobs > 1:
        early = check_tasks + [t.replace("time:", "warm:", 1) for t in time_tasks]
        rows = run_parallel([early[i::args.jobs] for i in range(args.jobs)], spawn,
                            args.task_timeout, deadline)
        dead = crashed(rows)
        rows += [dict(task=t, error=f"skipped: {kernel_of(t)} crashed or hung before")
                 for t in time_tasks if kernel_of(t) in dead]
        time_tasks = [t for t in time_tasks if kernel_of(t) not in dead]
        if time_tasks:
            rows += run_tasks(["peaks"] + time_tasks, spawn, args.task_timeout, deadline)
    else:
        rows = run_tasks(check_tasks + (["peaks"] + time_tasks if time_tasks else []), spawn,
                         args.task_timeout, deadline)
    peak_row = next((r for r in rows if r.get("task") == "peaks" and "copy_GBps" in r), None)
    peaks = (peak_row["copy_GBps"], peak_row["mm_TFLOPs"]) if peak_row else None
    if args.only != "correctness":
        print(format_table(rows, peaks))
        print(format_pivot(rows, kernels))
    doc = dict(kernels=kernels, peaks=peaks, rows=rows)
    print(json.dumps(doc))
    out = args.out or (os.path.join(os.environ["OUT"], "hopper_decode.json") if os.environ.get("OUT") else None)
    if out:
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    bad = [r for r in rows if "error" in r or r.get("wrong")
           or any(isinstance(v, dict) and (v.get("error") or v.get("ok") is False) for v in r.values())]
    print(f"{len(rows) - len(bad)}/{len(rows)} tasks clean", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
