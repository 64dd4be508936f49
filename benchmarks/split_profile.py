"""Where the Hopper decode kernel's time goes at small and uneven batches (issue 22): for each
case, each split-KV plan setting is timed (CUDA graph replay, `do_bench` median) and its replays
profiled (torch.profiler: the attention kernel and the combine kernel apart, and `span`, a
call's first kernel's start to its last kernel's end, of which `idle` lies between kernels;
the timed median minus the span is spent before the first kernel starts and after the last
ends), so the gap to FlashMLA / FA3 can be told apart into the attention programs' balance,
the combine's cost and the time around the kernels.

    python3 benchmarks/split_profile.py --out /tmp/split.json
    python3 benchmarks/split_profile.py --cases mla:131072x1+1024x63 --plans default,p2

A case is VARIANT[@H_Q]:LENGTHS with LENGTHS as `hwattn bench decode --mixed` takes it
(131072x1+1024x63) or BxL (4x32768); h_q 128 unless given (gta-4@32:1x131072), page 64,
L_q 1, bf16, random page order. A variant with separate K and V (gqa-4@32:1x131072) runs the
Triton kernel under its backend's own plan (the `default` setting alone), to set the tied
kernels' timelines beside it.
A plan setting is `default` (the backend's own plan, as the engine makes it), `pN` (N programs
per SM), `mN` (shortest piece N tokens), `sN` (pieces of N tokens) or a combination joined by
`-` (p1-m512), with `narrow` or `strided` among them for another combine launch: `narrow`,
the one-row combine kernel's former launch (128-column blocks whatever the grid:
`combine.one_row_blocks` with no SM target); `strided`, programs striding over the split
sequences' rows (HWATTN_COMBINE=strided, `combine.combine_strided_kernel`).
Every setting's output is checked against the first setting's.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys

import torch

from hwattn.bench.decode import Inputs, layer_for
from hwattn.bench.timing import graphed

CASES = ("mla:131072x1+1024x63", "mla:4x32768", "mla:128x16384", "gla-2:131072x1+1024x63",
         "gla-2:4x32768")
PLANS = ("default", "p1", "p2", "p1-m512", "p1-m1024", "p2-m1024")


def parse_case(text: str) -> dict:
    variant, _, spec = text.partition(":")
    variant, _, heads = variant.partition("@")
    if heads and not heads.isdigit():
        raise ValueError(f"--cases entry {text!r}: the heads after @ must be a number")
    if re.fullmatch(r"\d+x\d+", spec):
        batch, context = (int(v) for v in spec.split("x"))
        lengths = [context] * batch
    elif re.fullmatch(r"\d+x\d+(\+\d+x\d+)*", spec):
        lengths = []
        for part in spec.split("+"):
            length, count = (int(v) for v in part.split("x"))
            lengths += [length] * count
    else:
        raise ValueError(f"--cases entry {text!r}: want VARIANT:BxL or VARIANT:LxN+LxN")
    return dict(variant=variant, heads=int(heads or 128), tp=1, batch=len(lengths), context=max(lengths),
                query_len=1, page=64, lengths=lengths, label=spec)


def parse_plan(text: str) -> tuple[dict, str | None]:
    """(plan_decode keywords, combine launch: None, "narrow" or "strided") of a --plans entry."""
    knobs, merge = {}, None
    for part in text.split("-"):
        if part in ("default", "narrow", "strided"):
            merge = None if part == "default" else part
            continue
        match = re.fullmatch(r"([pms])(\d+)", part)
        if not match:
            raise ValueError(f"--plans entry {text!r}: want default, narrow, strided or pN / mN "
                             "/ sN, joined by -")
        key = {"p": "programs_per_sm", "m": "min_piece", "s": "split_tokens"}[match[1]]
        knobs[key] = int(match[2])
    return knobs, merge


def kernel_times(fn, reps: int = 20) -> tuple[dict[str, float], dict[str, float | None]]:
    """(median µs per call of each CUDA kernel `fn` launches, the calls' timeline) from
    torch.profiler over `reps` calls of `fn` (the graph replay that is timed). The timeline:
    `span_us`, the median time from a call's first kernel's start to its last kernel's end,
    and `idle_us`, the part of that span no kernel covers (between the kernels); None where
    the calls' kernels cannot be told apart (a count of kernels that is not reps × one call's)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    launched = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    per_kernel: dict[str, list[float]] = {}
    for event in launched:
        per_kernel.setdefault(event.name, []).append(event.device_time)
    times = {name[:60]: statistics.median(ts) for name, ts in per_kernel.items() if len(ts) >= reps}
    intervals = [(e.time_range.start, e.time_range.end) for e in launched]
    return times, call_timeline(intervals, reps)


def call_timeline(intervals: list[tuple[float, float]], reps: int) -> dict[str, float | None]:
    """{span_us, idle_us} of `reps` calls from their kernels' (start, end) µs sorted by start,
    each call the same number of kernels: the median of a call's first start to its last end,
    and of the part of that span no kernel of the call covers (kernels may overlap). None
    where the count of kernels is not a multiple of `reps`."""
    per_call, rest = divmod(len(intervals), reps)
    if not per_call or rest:
        return dict(span_us=None, idle_us=None)
    spans, idles = [], []
    for i in range(reps):
        call = intervals[i * per_call:(i + 1) * per_call]
        start, end = call[0][0], max(e for _, e in call)
        covered, reach = 0.0, start
        for s, e in call:  # the union of the kernels' intervals, swept in start order
            covered += max(0.0, e - max(s, reach))
            reach = max(reach, e)
        spans.append(end - start)
        idles.append(end - start - covered)
    return dict(span_us=statistics.median(spans), idle_us=statistics.median(idles))


def _timeline(timeline: dict) -> str:
    if timeline["span_us"] is None:
        return "span      -  idle     -"
    return f"span {timeline['span_us']:6.1f}  idle {timeline['idle_us']:5.1f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated VARIANT[@H_Q]:LENGTHS cases (see above)")
    parser.add_argument("--plans", default=",".join(PLANS),
                        help="comma-separated plan settings: default, narrow, strided, pN, mN, "
                             "sN, joined by - (see above)")
    parser.add_argument("--rep-ms", type=int, default=40,
                        help="do_bench's timing budget per setting, ms (default 40)")
    parser.add_argument("--out", default=None, metavar="FILE.json",
                        help="also write every row, its kernels included, here")
    args = parser.parse_args(argv)
    cases = [parse_case(c) for c in args.cases.split(",") if c]
    plans = [(p, parse_plan(p)) for p in args.plans.split(",") if p]
    if not torch.cuda.is_available():
        print("split_profile: needs a CUDA GPU", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from hwattn.ops import hopper_decode
    from hwattn.ops.backends.triton_backend import TritonBackend
    from hwattn.ops.kernels import combine as combine_kernels
    from hwattn.ops.plan import plan_decode

    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    per_sm, schedule = combine_kernels.PROGRAMS_PER_SM, combine_kernels.COMBINE_SCHEDULE
    rows = []
    for case in cases:
        layer = layer_for(case["variant"], case["heads"], 128, 64)
        inputs = Inputs(torch, layer, case, torch.bfloat16)
        reference = None
        if not inputs.tied:  # separate K/V (GQA): the Triton kernel under its backend's plan
            config = None
            plans_here = [(name, plan) for name, plan in plans if plan == ({}, None)]
            if len(plans_here) < len(plans):
                print(f"| {case['variant']}: separate K/V, the default plan alone", flush=True)
        else:
            q_nope, q_rope = inputs.queries
            kv, rope = inputs.caches
            config = hopper_decode.call_config(q_nope, kv, rope)
            knobs = hopper_decode.plan_knobs(q_nope, kv, rope, config)
            plans_here = plans
        for name, (change, merge) in plans_here:
            if not inputs.tied:
                fn, plan = inputs.hopper(TritonBackend(), case)
                plan_args = {}
            else:
                plan_args = {**knobs, **change}
                plan = plan_decode(inputs.seqlens.cpu(), num_heads_kv=kv.shape[2], query_len=1,
                                   page_size=64, **plan_args).to(q_nope.device)

                def fn(plan=plan):
                    return hopper_decode.decode_tied(q_nope, q_rope, kv, rope, inputs.block_table,
                                                     inputs.seqlens, softmax_scale=layer.scale,
                                                     plan=plan, config=config)

            # `narrow`: no grid is small enough for wide column blocks (the former launch)
            combine_kernels.PROGRAMS_PER_SM = 10**9 if merge == "narrow" else per_sm
            combine_kernels.COMBINE_SCHEDULE = "strided" if merge == "strided" else schedule
            out = fn()
            out = out[0] if isinstance(out, tuple) else out  # decode_tied returns (out, lse)
            if reference is None:
                reference = out.float()
            err = (out.float() - reference).abs().max().item()
            timed, how = graphed(fn, inputs.queries[0].device)
            us = do_bench(timed, warmup=10, rep=args.rep_ms, return_mode="median") * 1e3
            kernels, timeline = kernel_times(timed)
            if not kernels:  # no kernel seen inside the replays: profile the eager calls
                kernels, timeline = kernel_times(fn)
            attend = sum(t for k, t in kernels.items() if "combine" not in k)
            combine = sum(t for k, t in kernels.items() if "combine" in k)
            row = dict(case=f"{case['variant']}@{case['heads']}:{case['label']}", plan=name, knobs=plan_args,
                       items=int((plan.items[:, 0] >= 0).sum()), capacity=plan.capacity,
                       max_pieces=plan.max_pieces, us=us, timing=how, attend_us=attend,
                       combine_us=combine, kernels=kernels, **timeline, max_err_vs_default=err,
                       config="triton" if config is None else
                       f"{config.schedule} {config.ctas_per_sm}/SM")
            rows.append(row)
            print(f"| {row['case']:<28} | {name:<9} | {row['items']:>4} items "
                  f"(max {plan.max_pieces:>3}) | {us:8.1f} us | attend {attend:7.1f} | "
                  f"combine {combine:6.1f} | {_timeline(timeline)} | err {err:.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
