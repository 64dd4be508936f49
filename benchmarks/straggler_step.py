"""A captured decode step with one very long sequence among short ones, at a batch bucket
that fills the GPU one piece per sequence: the engine's plans with room for split pieces
(`reserve_pieces`, the default since 2026-12-06) against plans captured without it.

For each variant of `--variants` (`xl` random weights, bf16, page 64, CUDA graphs, eager
decoder blocks), two `ModelRunner`s share the model: one as the engine builds it, one whose
captured plans are made without room (`NoRoom`). Each times two steps of `--batch`
sequences, pages in shuffled order, replayed from the captured graph: every sequence at
`--short` tokens ("even"), and the first at `--long` tokens with the rest at `--short`
("straggler"). Each time is the median of CUDA-event timings of the forward with its inputs
in place (`DeviceTimer.queued`: calls back to back, as the engine's overlapped loop runs
them); both runners are timed in this process, so the result is their ratio.

    PYTHONUNBUFFERED=1 python benchmarks/straggler_step.py --out $OUT
    python benchmarks/straggler_step.py --tiny   # the same code on the CPU (no graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from hwattn.bench.timing import DeviceTimer  # noqa: E402
from hwattn.cli import positive, variant_list  # noqa: E402
from hwattn.engine.loader import build_model  # noqa: E402
from hwattn.engine.model_runner import ModelRunner, StepInput  # noqa: E402


class NoRoom(ModelRunner):
    """The runner as it was before `reserve_pieces`: captured plans sized for the even
    placeholder lengths only, so a bucket that fills the GPU keeps every sequence whole."""

    def plan(self, seqlens, query_len, out=None, **knobs):
        knobs.pop("reserve_pieces", None)
        return super().plan(seqlens, query_len, out=out, **knobs)


def step_of(lengths: list[int], page: int, vocab: int, seed: int) -> StepInput:
    """A one-token decode step of sequences holding `lengths` tokens (the new one included),
    pages drawn in shuffled order from one pool (page 0 is the runner's null page)."""
    g = torch.Generator().manual_seed(seed)
    counts = [-(-n // page) for n in lengths]
    pool = (torch.randperm(sum(counts), generator=g) + 1).tolist()
    pages, used = [], 0
    for c in counts:
        pages.append(pool[used:used + c])
        used += c
    tokens = torch.randint(0, vocab, (len(lengths), 1), generator=g).tolist()
    return StepInput("decode", tokens, [n - 1 for n in lengths], pages)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="gta-4,gqa-4",
                   help="attention variants, comma-separated (default gta-4,gqa-4: at B 128 their "
                        "plans fill an H100 or H200 one piece a sequence; MLA's one latent head "
                        "needs B >= 132)")
    p.add_argument("--batch", type=int, default=128, help="sequences in the step (default 128)")
    p.add_argument("--short", type=int, default=1024, help="tokens of the short sequences")
    p.add_argument("--long", type=int, default=32768, help="tokens of the long sequence")
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (a smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for straggler_step.json")
    args = p.parse_args(argv)
    try:
        positive(args, "batch", "short", "long")
        variants = variant_list(args.variants)
    except ValueError as err:
        p.error(str(err))
    if args.long < args.short:
        p.error(f"--long ({args.long}) must be at least --short ({args.short})")
    if not args.tiny and not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --tiny for the CPU smoke run)")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    page, preset, iters = (16, "tiny", 3) if args.tiny else (64, "xl", 20)
    timer = DeviceTimer(device)
    lengths = {"even": [args.short] * args.batch,
               "straggler": [args.long] + [args.short] * (args.batch - 1)}
    pages = sum(-(-n // page) for n in lengths["straggler"]) + 1
    rows = []
    for variant in variants:
        net = build_model(preset, attention=variant, dtype=dtype, device=device, seed=0,
                          overrides=dict(max_seq_len=args.long + 64))
        times = {}
        for kind, cls in (("room", ModelRunner), ("no_room", NoRoom)):
            t0 = time.perf_counter()
            runner = cls(net, num_pages=pages, page_size=page, max_model_len=args.long + 8,
                         max_num_seqs=args.batch, cache_dtype=dtype,
                         cuda_graphs=device.type == "cuda")
            build_s = time.perf_counter() - t0
            if runner.graph_error is not None:
                raise SystemExit(f"{variant} {kind}: capture failed: {runner.graph_error}")
            g = torch.Generator(device=device).manual_seed(0)
            for layer in runner.kv_caches:
                for t in layer:
                    t.normal_(generator=g)
            with torch.inference_mode():
                for shape, lens in lengths.items():
                    step = step_of(lens, page, net.config.vocab_size, seed=len(lens))
                    runner.execute(step)
                    captured = getattr(runner, "plans", {}).get((args.batch, 1))  # no graphs: None
                    plan_pieces = None if captured is None else max(
                        q.max_pieces for q in runner.backend.plan_parts(captured))
                    times[(kind, shape)] = timer.queued(lambda: runner.execute(step),
                                                        calls=iters // 4 or 1, repeats=5)
                    capacity = None if captured is None else sum(
                        q.capacity for q in runner.backend.plan_parts(captured))
                    rows.append(dict(variant=variant, runner=kind, shape=shape,
                                     batch=args.batch, longest=max(lens),
                                     step_s=times[(kind, shape)], captured_max_pieces=plan_pieces,
                                     captured_capacity=capacity,
                                     build_s=build_s, device=str(torch.cuda.get_device_name())
                                     if device.type == "cuda" else "cpu"))
                    print(f"{variant:6s} {kind:8s} {shape:9s} {times[(kind, shape)] * 1e3:8.3f} ms"
                          f"  (most pieces of a sequence in the captured plan: {plan_pieces})",
                          flush=True)
            del runner
            if device.type == "cuda":
                torch.cuda.empty_cache()
        caps = {r["runner"]: r["captured_capacity"] for r in rows if r["variant"] == variant}
        if caps.get("room") is not None and caps.get("room") == caps.get("no_room"):
            print(f"{variant:6s} B={args.batch} does not fill the GPU one piece a sequence: both "
                  "runners captured the same plan, so their ratio measures nothing", flush=True)
            continue
        for shape in lengths:
            print(f"{variant:6s} {shape:9s} room / no room: "
                  f"{times[('room', shape)] / times[('no_room', shape)]:.3f}", flush=True)
        del net
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "straggler_step.json").write_text(json.dumps(dict(argv=sys.argv[1:], rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
