"""Where the Hopper decode kernel's time goes at small and uneven batches (issue 22): for each
case, each split-KV plan setting is timed (CUDA graph replay, `do_bench` median) and profiled
(torch.profiler, the attention kernel and the combine kernel apart), so the gap to FlashMLA /
FA3 can be told apart into the attention programs' balance and the combine's cost.

    python3 benchmarks/split_profile.py --out /tmp/split.json
    python3 benchmarks/split_profile.py --cases mla:131072x1+1024x63 --plans default,p2

A case is VARIANT[@H_Q]:LENGTHS with LENGTHS as `hwattn bench decode --mixed` takes it
(131072x1+1024x63) or BxL (4x32768); h_q 128 unless given (gta-4@32:1x131072), page 64,
L_q 1, bf16, random page order.
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


def kernel_times(fn, reps: int = 20) -> dict[str, float]:
    """Median µs per call of each CUDA kernel `fn` launches, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel.setdefault(event.name, []).append(event.device_time)
    return {name[:60]: statistics.median(times) for name, times in per_kernel.items()
            if len(times) >= reps}


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
    from hwattn.ops.kernels import combine as combine_kernels
    from hwattn.ops.plan import plan_decode

    torch.manual_seed(0)
    print(torch.cuda.get_device_name())
    per_sm, schedule = combine_kernels.PROGRAMS_PER_SM, combine_kernels.COMBINE_SCHEDULE
    rows = []
    for case in cases:
        layer = layer_for(case["variant"], case["heads"], 128, 64)
        inputs = Inputs(torch, layer, case, torch.bfloat16)
        q_nope, q_rope = inputs.queries
        kv, rope = inputs.caches
        scale = layer.scale
        config = hopper_decode.call_config(q_nope, kv, rope)
        knobs = hopper_decode.plan_knobs(q_nope, kv, rope, config)
        reference = None
        for name, (change, merge) in plans:
            plan_args = {**knobs, **change}
            plan = plan_decode(inputs.seqlens.cpu(), num_heads_kv=kv.shape[2], query_len=1,
                               page_size=64, **plan_args).to(q_nope.device)

            def fn(plan=plan):
                return hopper_decode.decode_tied(q_nope, q_rope, kv, rope, inputs.block_table,
                                                 inputs.seqlens, softmax_scale=scale, plan=plan,
                                                 config=config)

            # `narrow`: no grid is small enough for wide column blocks (the former launch)
            combine_kernels.PROGRAMS_PER_SM = 10**9 if merge == "narrow" else per_sm
            combine_kernels.COMBINE_SCHEDULE = "strided" if merge == "strided" else schedule
            out = fn()[0]
            if reference is None:
                reference = out.float()
            err = (out.float() - reference).abs().max().item()
            timed, how = graphed(fn, q_nope.device)
            us = do_bench(timed, warmup=10, rep=args.rep_ms, return_mode="median") * 1e3
            kernels = kernel_times(fn)
            attend = sum(t for k, t in kernels.items() if "combine" not in k)
            combine = sum(t for k, t in kernels.items() if "combine" in k)
            row = dict(case=f"{case['variant']}@{case['heads']}:{case['label']}", plan=name, knobs=plan_args,
                       items=int((plan.items[:, 0] >= 0).sum()), capacity=plan.capacity,
                       max_pieces=plan.max_pieces, us=us, timing=how, attend_us=attend,
                       combine_us=combine, kernels=kernels, max_err_vs_default=err,
                       config=f"{config.schedule} {config.ctas_per_sm}/SM")
            rows.append(row)
            print(f"| {row['case']:<28} | {name:<9} | {row['items']:>4} items "
                  f"(max {plan.max_pieces:>3}) | {us:8.1f} us | attend {attend:7.1f} | "
                  f"combine {combine:6.1f} | err {err:.1e} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
