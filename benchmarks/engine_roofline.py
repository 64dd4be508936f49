"""The engine against its roofline on one GPU, from one command.

Three parts (`--parts`, default all), every number from this run on this GPU, and the copy
rate and bf16 matmul rate measured first in the same process:

- decode: `xl` random weights, bf16, page 64, CUDA graphs, B = `--batch` sequences at each
  context of `--contexts`, for each variant of `--variants`; each step is timed twice, with
  the eager decoder blocks and with `torch.compile`d ones (`compile_decode`), through
  `hwattn.bench.engine.time_decode_step`: the step as the host sees it, the captured forward,
  the kernels of that forward from the profiler's trace (attention, cache write, GEMMs, other,
  gaps between kernels when forwards are queued back to back), the launch latency of a
  forward started on an idle device, host time beyond the forward, and the step's floor
  (weights + KV cache at the copy rate, FLOPs at the matmul rate) with the step's ratio to it;
  then the runner's whole launch loop queued one step ahead (inputs, plan, forward, argmax,
  copy back: the engine's step without its own Python), the engine's own step, and how far
  it is beyond the queued forward (`--threaded`: also with launches from a thread).
- serving: the `serving` preset (h_q = 128), GLA-2 against MLA, compiled, at B in
  `--serving-batches` and L in `--serving-contexts`: decode tokens/s (B / step), the
  attention kernels' time inside the step, and MLA's step and kernel time over GLA-2's.
- prefill: `xl`, prompts of `--prefill-len` tokens through the runner's prefill path, whole
  and in chunks of `--chunk`, with eager and compiled prefill blocks, the latter with or
  without their CUDA graphs (`--prefill-modes` eager, compiled, pieces):
  seconds, tokens/s and MFU (forward FLOPs, causal attention
  counted in full as is the convention, over the matmul rate). Then one step of whole prompts
  of unequal lengths (`--unequal`: B × mean length pairs; lengths spread evenly over
  [mean / 4, 7 · mean / 4]) attended both ways `Attention._attends_densely` chooses between:
  the dense loop (SDPA per prompt) and one call of the paged prefill op.

Results: `engine_roofline.json` and `engine_roofline.md` under `--out` (default `$OUT`, else
the current directory); the tables are printed, then one line of JSON. `--tiny` runs the
same code on the CPU with the tiny preset in seconds (no peaks, hence no floors).

`--plot FILE.png` also draws the compiled decode rows (`hwattn.bench.plot.plot_engine_step`:
per context, each variant's engine step split into its kernels, gaps and the engine's time
beyond the queued forward, against its floor). `--replot JSON --plot FILE.png` draws the
figure from an earlier run's `engine_roofline.json`, without a GPU and without timing anything.

    PYTHONUNBUFFERED=1 python benchmarks/engine_roofline.py --out $OUT --plot $OUT/engine_step.png
    python benchmarks/engine_roofline.py --replot engine_roofline.json --plot engine_step.png
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch  # noqa: E402

from hwattn.bench.engine import time_decode_step  # noqa: E402
from hwattn.bench.timing import device_peaks  # noqa: E402
from hwattn.engine.loader import build_model  # noqa: E402
from hwattn.engine.model_runner import ModelRunner, StepInput  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Setup:
    """Device, dtype and sizes: the xl/serving GPU study, or the tiny CPU smoke run."""

    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.dtype = torch.float32 if args.tiny else torch.bfloat16
        self.page = 16 if args.tiny else 64
        self.preset = "tiny" if args.tiny else "xl"
        self.serving_preset = "tiny" if args.tiny else "serving"
        self.iters = 3 if args.tiny else 20


def runner_for(setup: Setup, net, batch: int, max_len: int, compiled: bool,
               compile_prefill: bool = False, prefill_graphs: bool = True) -> ModelRunner:
    """A runner whose pool holds `batch` sequences of `max_len` tokens, its cache filled with
    random values (never zeros, never uninitialised memory); `compiled`: compiled decode
    blocks, `compile_prefill`: compiled prefill blocks (`prefill_graphs`: replayed from CUDA
    graphs, as ModelRunner's prefill_graphs)."""
    per_seq = -(-max_len // setup.page)
    runner = ModelRunner(net, num_pages=batch * per_seq + 1, page_size=setup.page,
                         max_model_len=max_len, max_num_seqs=batch, cache_dtype=setup.dtype,
                         cuda_graphs=setup.device.type == "cuda", compile_decode=compiled,
                         compile_prefill=compile_prefill, prefill_graphs=prefill_graphs)
    g = torch.Generator(device=setup.device).manual_seed(0)  # the same cache in every runner
    for layer in runner.kv_caches:
        for t in layer:
            t.normal_(generator=g)
    return runner


def prefill_runner(setup: Setup, net, batch: int, max_len: int, compiled: bool,
                   mode: str) -> ModelRunner:
    """`runner_for` with prefill `mode` eager, compiled, or pieces (compiled, its prefill
    graphs dropped: the pieces launched one by one)."""
    return runner_for(setup, net, batch, max_len, compiled, compile_prefill=mode != "eager",
                      prefill_graphs=mode == "compiled")


def decode_step(setup: Setup, runner: ModelRunner, net, batch: int, context: int) -> dict:
    """`time_decode_step` for B sequences holding `context` tokens, pages in shuffled order."""
    per_seq = -(-context // setup.page)
    g = torch.Generator().manual_seed(batch * 7919 + context)
    pages = (torch.randperm(batch * per_seq, generator=g) + 1).view(batch, per_seq).tolist()
    tokens = torch.randint(0, net.config.vocab_size, (batch, 1), generator=g).tolist()
    step = StepInput("decode", tokens, [context - 1] * batch, pages)
    out = time_decode_step(runner, step, context, setup.iters)
    with torch.inference_mode():
        out["logits"] = runner.execute(step)[:, -1].float()  # (B, V), dropped before saving
    return out


def engine_steady(setup: Setup, runner: ModelRunner, net, batch: int, context: int,
                  steps: int = 32, launch_thread: bool = False) -> dict:
    """The serving engine on `runner` (overlapped scheduling, its default): `batch` prompts
    prefilled in one step, then `steps` decode steps of all of them around `context` tokens.
    Returns the median decode step as the engine's loop sees it (`run_offline`'s ITL) and the
    median host µs per phase of those steps (`hwattn.engine.step_timer`). launch_thread:
    the engine's launches from a thread of their own (`EngineConfig.launch_thread`)."""
    from hwattn.bench.engine import random_prompts, run_offline
    from hwattn.data.tokenizer import load_tokenizer
    from hwattn.engine.config import EngineConfig
    from hwattn.engine.llm_engine import LLMEngine

    prompt_len = context - steps // 2
    config = EngineConfig(page_size=setup.page, max_num_seqs=batch,
                          max_num_batched_tokens=batch * prompt_len,
                          max_model_len=runner.max_model_len, enable_prefix_caching=False,
                          launch_thread=launch_thread,
                          enable_mixed_batches=False)  # decode steps timed as in runs 1-15
    engine = LLMEngine(runner, load_tokenizer(None, net.config.vocab_size), net.config, config,
                       runner.num_pages, kv_bytes_per_token=net.kv_bytes_per_token(1, setup.dtype))
    try:
        res = run_offline(engine, random_prompts(batch, prompt_len, net.config.vocab_size, seed=5),
                          steps + 1)
    finally:
        engine.shutdown()
    return dict(engine_step_s=res.itl_s["median"], engine_steps=res.itl_s["n"],
                host_phases_us={k: v["median"] for k, v in res.host_phases_us.items() if k != "n"})


def build(setup: Setup, preset: str, variant: str, max_len: int):
    return build_model(preset, attention=variant, dtype=setup.dtype, device=setup.device,
                       seed=0, overrides=dict(max_seq_len=max_len + 64))


def free(*objs) -> None:
    del objs
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def part_decode(setup: Setup, args, rows: list) -> list[dict]:
    contexts = [int(c) for c in args.contexts.split(",")]
    for variant in args.variants.split(","):
        net = build(setup, setup.preset, variant, max(contexts))
        eager_logits = {}
        for compiled in [mode == "compiled" for mode in args.decode_modes.split(",")]:
            t0 = time.perf_counter()
            runner = runner_for(setup, net, args.batch, max(contexts) + 8, compiled)
            build_s = time.perf_counter() - t0
            measured = {}
            for context in contexts:
                r = decode_step(setup, runner, net, args.batch, context)
                logits = r.pop("logits")
                if not compiled:
                    eager_logits[context] = logits
                elif context in eager_logits:  # the compiled step against the eager one, on the same cache
                    ref = eager_logits.pop(context)
                    r["vs_eager"] = dict(
                        argmax_agreement=(logits.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                        rel_max_diff=((logits - ref).abs().max() / ref.abs().max()).item())
                measured[context] = dict(part="decode", variant=variant, batch=args.batch,
                                         context=context, runner_build_s=build_s, **r)
                log(f"decode {variant} compiled={compiled} L={context}: step "
                    f"{r['step_wall_s'] * 1e3:.3f} ms, x{r['floor'].get('floor_ratio', 0):.2f} floor")
            # The engine writes its prompts into the cache: only after every step above has
            # been compared with the eager runner's on the same cache.
            for context, r in measured.items():
                if compiled:
                    r.update(engine_steady(setup, runner, net, args.batch, context,
                                           steps=args.engine_steps))
                    # Against the forward queued back to back: the engine launches ahead too.
                    r["engine_beyond_forward"] = 1 - r["forward_queued_s"] / r["engine_step_s"]
                    if args.threaded:
                        threaded = engine_steady(setup, runner, net, args.batch, context,
                                                 steps=args.engine_steps, launch_thread=True)
                        r["threaded"] = dict(
                            engine_step_s=threaded["engine_step_s"],
                            beyond_forward=1 - r["forward_queued_s"] / threaded["engine_step_s"],
                            host_phases_us=threaded["host_phases_us"])
                    if "floor_s" in r["floor"]:
                        r["engine_floor_ratio"] = r["engine_step_s"] / r["floor"]["floor_s"]
                rows.append(r)
            free(runner)
        free(net)
    return rows


def part_serving(setup: Setup, args, rows: list) -> list[dict]:
    batches = [int(b) for b in args.serving_batches.split(",")]
    contexts = [int(c) for c in args.serving_contexts.split(",")]
    for variant in ("gla-2", "mla"):
        net = build(setup, setup.serving_preset, variant, max(contexts))
        runner = runner_for(setup, net, max(batches), max(contexts) + 8, True)
        for batch in batches:
            for context in contexts:
                r = decode_step(setup, runner, net, batch, context)
                r.pop("logits")
                rows.append(dict(part="serving", variant=variant, batch=batch, context=context,
                                 tokens_per_s=batch / r["step_wall_s"], **r))
                log(f"serving {variant} B={batch} L={context}: {batch / r['step_wall_s']:.0f} tok/s")
        free(runner, net)
    return rows


def part_prefill(setup: Setup, args, peaks, rows: list) -> list[dict]:
    for variant in args.variants.split(","):
        logits = {}
        for mode in args.prefill_modes.split(","):
            part_prefill_whole(setup, args, peaks, rows, variant, mode, logits)
        part_prefill_unequal(setup, args, peaks, rows, variant)
    return rows


def part_prefill_whole(setup: Setup, args, peaks, rows: list, variant: str,
                       mode: str, logits: dict) -> None:
    """`--prefill-batch` prompts of `--prefill-len` tokens, in one step and in chunks of
    `--chunk`, through the eager or the compiled prefill blocks (`mode`: eager, compiled, or
    pieces: compiled without the prefill graphs, `ModelRunner.prefill_graphs`). `logits` keeps
    each chunk size's last logits (on the host) from the mode that ran first; the other mode's
    rows report how far theirs are from them (`logits_max_diff`, `argmax_agree`)."""
    n = args.prefill_len
    net = build(setup, setup.preset, variant, n)
    runner = prefill_runner(setup, net, args.prefill_batch, n + 8, False, mode)
    per_seq = -(-(n + 8) // setup.page)
    tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq))
              for i in range(args.prefill_batch)]
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, net.config.vocab_size, (args.prefill_batch, n),
                            generator=g).tolist()
    flops = prefill_flops(net, [n] * args.prefill_batch)
    for chunk in sorted({n, args.chunk}, reverse=True):
        def run(prompts=prompts, chunk=chunk):
            done, out = 0, None
            while done < n:
                size = min(chunk, n - done)
                out = runner.execute(StepInput(
                    "prefill", [p[done:done + size] for p in prompts], [done] * len(prompts),
                    tables, need_logits=[done + size == n] * len(prompts)))
                done += size
            return out
        last = run().float().cpu()  # (B, V)
        seconds = _time(setup, run, 2 if setup.tiny else 5)
        row = dict(part="prefill", variant=variant, batch=args.prefill_batch, prompt_len=n,
                   chunk=chunk, compiled=mode != "eager", mode=mode, seconds=seconds,
                   tokens_per_s=n * args.prefill_batch / seconds, flops=flops)
        if chunk in logits:
            row["logits_max_diff"] = (last - logits[chunk]).abs().max().item()
            row["argmax_agree"] = (last.argmax(-1) == logits[chunk].argmax(-1)).float().mean().item()
        else:
            logits[chunk] = last
        if peaks:
            row["mfu"] = flops / seconds / (peaks[1] * 1e12)
        rows.append(row)
        log(f"prefill {variant} chunk {chunk} {mode}: {seconds * 1e3:.1f} ms, "
            f"{row['tokens_per_s']:.0f} tok/s, MFU {row.get('mfu', 0):.1%}"
            + (f", logits within {row['logits_max_diff']:.3g} of the other mode's, argmax "
               f"agree {row['argmax_agree']:.0%}" if "argmax_agree" in row else ""))
    free(runner, net)


def prefill_flops(net, lengths: list[int]) -> float:
    """Forward FLOPs of prefilling whole prompts of `lengths` tokens: a third of the training
    count per token (2 per matmul weight, attention over the full context of n as is the
    convention), less the output head on every token but the last of each prompt (the
    runner computes the logits of that token only). `flops_per_token` already leaves out an
    untied input embedding (a lookup, no matmul)."""
    head = 2 * net.output.weight.numel()
    return sum(net.flops_per_token(n) / 3 * n - head * (n - 1) for n in lengths)


def unequal_lengths(batch: int, mean: int) -> list[int]:
    """`batch` prompt lengths spread evenly over [mean / 4, 7 mean / 4], averaging `mean`."""
    if batch == 1:
        return [mean]
    lo, hi = mean // 4, 7 * mean // 4
    return [lo + (hi - lo) * i // (batch - 1) for i in range(batch)]


def part_prefill_unequal(setup: Setup, args, peaks, rows: list, variant: str) -> None:
    """One prefill step of whole prompts of unequal lengths, for each `--unequal` B x mean,
    attended by the dense loop and by the paged prefill op (`DENSE_LOOP_MIN_MEAN_LEN` set
    past or below the mean)."""
    from hwattn.layers import base

    shapes = [tuple(int(v) for v in item.split("x")) for item in args.unequal.split(",") if item]
    for batch, mean in shapes:
        lens = unequal_lengths(batch, mean)
        net = build(setup, setup.preset, variant, max(lens))
        runner = runner_for(setup, net, batch, max(lens) + 8, False)
        per_seq = -(-(max(lens) + 8) // setup.page)
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(batch)]
        g = torch.Generator().manual_seed(2)
        prompts = [torch.randint(0, net.config.vocab_size, (n,), generator=g).tolist()
                   for n in lens]
        flops = prefill_flops(net, lens)
        saved = base.DENSE_LOOP_MIN_MEAN_LEN
        try:
            routes = [("dense loop", 0), ("paged op", 1 << 62)]
            if not runner.backend.varlen_prefill:  # its prefill op loops too: one route
                routes = routes[:1]
            for route, threshold in routes:
                # 0: every step dense; past any mean: every unequal step through the paged op.
                base.DENSE_LOOP_MIN_MEAN_LEN = threshold

                def run():
                    runner.execute(StepInput("prefill", prompts, [0] * batch, tables,
                                             need_logits=[True] * batch))
                seconds = _time(setup, run, 2 if setup.tiny else 5)
                row = dict(part="prefill_unequal", variant=variant, batch=batch, mean_len=mean,
                           lengths=lens, route=route, seconds=seconds,
                           tokens_per_s=sum(lens) / seconds, flops=flops)
                if peaks:
                    row["mfu"] = flops / seconds / (peaks[1] * 1e12)
                rows.append(row)
                log(f"prefill {variant} {batch} prompts averaging {mean}, {route}: "
                    f"{seconds * 1e3:.1f} ms, MFU {row.get('mfu', 0):.1%}")
        finally:
            base.DENSE_LOOP_MIN_MEAN_LEN = saved
        free(runner, net)


def part_ttft(setup: Setup, args, rows: list) -> None:
    """Poisson arrivals of `--ttft-requests` prompts of `--prefill-len` tokens at `--rate`
    requests/s, `--ttft-output` greedy tokens each, on the serving engine (compiled decode,
    CUDA graphs, overlapped scheduling; eager or compiled prefill blocks, `--ttft-prefill-modes`),
    for each prefill budget of `--ttft-chunks`:
    TTFT and inter-token latency percentiles (`benchmarks/engine_speed.py`'s loop)."""
    from benchmarks.engine_speed import serve_poisson
    from hwattn.bench.engine import random_prompts
    from hwattn.data.tokenizer import load_tokenizer
    from hwattn.engine.config import EngineConfig
    from hwattn.engine.llm_engine import LLMEngine

    n, out_len = args.prefill_len, args.ttft_output
    for variant, mode in itertools.product(args.ttft_variants.split(","),
                                           args.ttft_prefill_modes.split(",")):
        net = build(setup, setup.preset, variant, n + out_len)
        runner = prefill_runner(setup, net, args.batch, n + out_len + 8, True, mode)
        prompts = random_prompts(args.ttft_requests, n, net.config.vocab_size, seed=11)
        for spec in args.ttft_chunks.split(","):
            chunk, mixed = int(spec.rstrip("m")), spec.endswith("m")
            config = EngineConfig(page_size=setup.page, max_num_seqs=args.batch,
                                  max_num_batched_tokens=chunk, max_model_len=runner.max_model_len,
                                  enable_prefix_caching=False, enable_mixed_batches=mixed)
            engine = LLMEngine(runner, load_tokenizer(None, net.config.vocab_size), net.config,
                               config, runner.num_pages,
                               kv_bytes_per_token=net.kv_bytes_per_token(1, setup.dtype))
            serve_poisson(engine, prompts[:2], 2, rate=1e6)  # warm-up
            log(f"ttft {variant} chunk {spec} prefill {mode}: the timed arrivals start")
            r = serve_poisson(engine, prompts, out_len, args.rate)
            rows.append(dict(part="ttft", variant=variant, chunk=chunk, mixed=mixed, prompt_len=n,
                             rate=args.rate, compiled_prefill=mode != "eager", prefill_mode=mode,
                             **r))
            log(f"ttft {variant} chunk {chunk} mixed={mixed} prefill {mode}: TTFT p50 {r['ttft_p50_s']:.2f} s, "
                f"ITL p50 {r['itl_p50_s'] * 1e3:.1f} ms, p99 {r['itl_p99_s'] * 1e3:.1f} ms; slowest of "
                f"{r['steps']} steps (s, at s, first tokens, later tokens): "
                + ", ".join(f"({d:.3f}, {at:.2f}, {first}, {later})"
                           for d, at, first, later in r["slowest_steps"]))
        free(runner, net)


def _time(setup: Setup, fn, iters: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(iters):
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class SavedRows(list):
    """The result rows, rewritten to `path` (with `doc`) as each one arrives, so a run cut
    short keeps what it measured."""

    def __init__(self, doc: dict, path: Path):
        super().__init__()
        self.doc, self.path = doc, path
        doc["rows"] = self

    def append(self, row: dict) -> None:
        super().append(row)
        self.path.write_text(json.dumps(self.doc, indent=1))


def tables(doc: dict) -> str:
    ms = 1e3
    out = [f"# Engine roofline on {doc['device_name']}", ""]
    if doc["peaks"]:
        out += [f"Copy {doc['peaks'][0]:.0f} GB/s (read + write), bf16 matmul "
                f"{doc['peaks'][1]:.0f} TFLOP/s, measured in this run.", ""]
    if "skinny_gemm" in doc:
        blas = next((r["blas"] for r in doc["rows"] if r.get("blas")), None)
        blas = {"cublaslt": "cuBLASLt preferred", "cublas": "cuBLAS preferred",
                "default": "PyTorch's BLAS choice"}.get(blas, "cuBLAS")
        out += ["Linear layers at decode's few rows: "
                + ("the skinny Triton kernel (`hwattn/ops/linear.py`)." if doc["skinny_gemm"]
                   else f"`F.linear` ({blas} on a GPU)."), ""]
    dec = [r for r in doc["rows"] if r["part"] == "decode"]
    if dec:
        out += ["## Decode step (xl, random weights, CUDA graphs)", "",
                "| variant | L | compiled | step ms | floor ms | step / floor | host | launch latency "
                "| attention | cache write | GEMM | other | gaps | kernels/step | queued forward ms "
                "| launch loop ms | engine step ms | engine / floor | engine beyond queued forward |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in dec:
            k, f, w = r.get("kernels") or {}, r["floor"], r["step_wall_s"]

            def share(key, k=k, w=w):
                return f"{k[key] / w:.0%}" if key in k else "-"
            out.append(f"| {r['variant']} | {r['context']} | {'yes' if r['compiled'] else 'no'} | "
                       f"{w * ms:.3f} | {f.get('floor_s', 0) * ms:.3f} | "
                       f"{f.get('floor_ratio', float('nan')):.2f} | {r['host_s'] / w:.0%} | "
                       f"{r['launch_latency_s'] / w:.0%} | "
                       f"{share('attention_s')} | {share('cache_write_s')} | {share('gemm_s')} | "
                       f"{share('other_s')} | {share('launch_gaps_s')} | "
                       f"{k.get('kernels_per_step', 0):.0f} | {r['forward_queued_s'] * ms:.3f} | "
                       + (f"{r['launch_queued_s'] * ms:.3f} | " if r.get("launch_queued_s") else "- | ")
                       + (f"{r['engine_step_s'] * ms:.3f} | {r.get('engine_floor_ratio', float('nan')):.2f}"
                          f" | {r['engine_beyond_forward']:.1%} |" if "engine_step_s" in r else "- | - | - |"))
        out.append("")
        threaded = [r for r in dec if r.get("threaded")]
        if threaded:
            out += ["Engine step with its launches made from a thread of their own "
                    "(`EngineConfig.launch_thread`) beside the same engine without:", "",
                    "| variant | L | engine step µs | threaded µs | beyond queued forward | threaded "
                    "beyond queued forward | threaded host µs (all but wait) |", "|---|---|---|---|---|---|---|"]
            for r in threaded:
                t = r["threaded"]
                out.append(f"| {r['variant']} | {r['context']} | {r['engine_step_s'] * 1e6:.0f} | "
                           f"{t['engine_step_s'] * 1e6:.0f} | {r['engine_beyond_forward']:.1%} | "
                           f"{t['beyond_forward']:.1%} | {t['host_phases_us'].get('host', 0):.0f} |")
            out.append("")
        phased = [r for r in dec if r.get("host_phases_us")]
        if phased:
            names = ("schedule", "launch", "inputs", "forward", "sampling", "copy_out", "wait",
                     "resolve", "output", "gc", "host")
            out += ["Host per engine decode step (median µs; `host` is every phase but `wait`, "
                    "`gc` the garbage collections inside them; inputs, forward, sampling and "
                    "copy_out are parts of `launch`, `hwattn/engine/step_timer.py`):", "",
                    "`graph launch` is one `replay()` call's host time with the device idle.", "",
                    "| variant | L | compiled | " + " | ".join(names)
                    + " | graph launch | kernels/step | engine step µs |",
                    "|---|---|---|" + "---|" * (len(names) + 3)]
            for r in phased:
                h = r["host_phases_us"]
                call = r.get("replay_call_s")
                nodes = (r.get("kernels") or {}).get("kernels_per_step")
                out.append(f"| {r['variant']} | {r['context']} | {'yes' if r['compiled'] else 'no'} | "
                           + " | ".join(f"{h.get(n, 0):.0f}" for n in names)
                           + f" | {'-' if call is None else f'{call * 1e6:.0f}'}"
                           + f" | {'-' if nodes is None else f'{nodes:.0f}'}"
                           + f" | {r['engine_step_s'] * 1e6:.0f} |")
            out.append("")
    srv = [r for r in doc["rows"] if r["part"] == "serving"]
    if srv:
        out += ["## serving preset (h_q 128), GLA-2 vs MLA, compiled", "",
                "| B | L | GLA-2 tok/s | MLA tok/s | step MLA / GLA-2 | attention MLA / GLA-2 | "
                "step ratio / kernel ratio |", "|---|---|---|---|---|---|---|"]
        by = {(r["variant"], r["batch"], r["context"]): r for r in srv}
        for (v, b, c), g in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            m = by.get(("mla", b, c))
            if v != "gla-2" or m is None:
                continue
            step_ratio = m["step_wall_s"] / g["step_wall_s"]
            kern_ratio = m["attention_s"] / g["attention_s"]
            out.append(f"| {b} | {c} | {g['tokens_per_s']:.0f} | {m['tokens_per_s']:.0f} | "
                       f"{step_ratio:.2f} | {kern_ratio:.2f} | {step_ratio / kern_ratio:.2f} |")
        out.append("")
    ttft = [r for r in doc["rows"] if r["part"] == "ttft"]
    if ttft:
        out += ["## Serving: Poisson arrivals (xl, compiled decode, CUDA graphs)", "",
                "| variant | requests x prompt @ rate | prefill budget (m: mixed steps) | prefill blocks | TTFT p50 s | TTFT p99 s | "
                "ITL p50 ms | ITL p99 ms | out tok/s |", "|---|---|---|---|---|---|---|---|---|"]
        for r in ttft:
            out.append(f"| {r['variant']} | {r['requests']} x {r['prompt_len']} @ {r['rate']:g}/s | "
                       f"{r['chunk']}{'m' if r.get('mixed') else ''} | "
                       f"{_prefill_mode(r, 'compiled_prefill')} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                       f"{r['itl_p50_s'] * ms:.1f} | {r['itl_p99_s'] * ms:.1f} | "
                       f"{r['output_tok_s']:.0f} |")
        out.append("")
    uneq = [r for r in doc["rows"] if r["part"] == "prefill_unequal"]
    if uneq:
        out += ["## One step of whole prompts of unequal lengths (xl)", "",
                "| variant | prompts x mean length | route | ms | tok/s | MFU |",
                "|---|---|---|---|---|---|"]
        for r in uneq:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            out.append(f"| {r['variant']} | {r['batch']} x {r['mean_len']} | {r['route']} | "
                       f"{r['seconds'] * 1e3:.1f} | {r['tokens_per_s']:.0f} | {mfu} |")
        out.append("")
    pre = [r for r in doc["rows"] if r["part"] == "prefill"]
    if pre:
        out += ["## Prefill (xl)", "", "| variant | B x prompt | chunk | blocks | ms | tok/s | MFU |",
                "|---|---|---|---|---|---|---|"]
        for r in pre:
            mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
            out.append(f"| {r['variant']} | {r['batch']} x {r['prompt_len']} | {r['chunk']} | "
                       f"{_prefill_mode(r, 'compiled')} | "
                       f"{r['seconds'] * ms:.1f} | {r['tokens_per_s']:.0f} | {mfu} |")
    return "\n".join(out)


def _prefill_mode(row: dict, compiled_key: str) -> str:
    """A prefill or ttft row's prefill blocks: its mode, or (rows written before modes were
    recorded) compiled / eager."""
    return row.get("mode") or row.get("prefill_mode") or (
        "compiled" if row.get(compiled_key) else "eager")


def draw(doc: dict, path: str, source: str | None = None) -> None:
    """The engine step figure of `doc`'s compiled decode rows, written to `path`."""
    from hwattn.bench.plot import plot_engine_step

    plot_engine_step(doc, path, source=source)
    log(f"figure of the decode step against its floor written to {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="decode,serving,prefill,ttft",
                   help="comma-separated parts to run, of decode, serving, prefill and ttft "
                        "(default: all four)")
    p.add_argument("--variants", default="gqa-4,gta-4,gla-2,mla,mha",
                   help="comma-separated attention variants of the decode and prefill parts "
                        "(default %(default)s)")
    p.add_argument("--batch", type=int, default=64,
                   help="decoding sequences B of the decode part, and the engine's max_num_seqs "
                        "in the ttft part (default %(default)s)")
    p.add_argument("--contexts", default="1024,8192",
                   help="comma-separated contexts L in tokens of the decode part (default "
                        "%(default)s)")
    p.add_argument("--decode-modes", default="eager,compiled",
                   help="decode steps to time: eager blocks, compiled blocks or both (the "
                        "compiled step is compared with the eager one when both run)")
    p.add_argument("--engine-steps", type=int, default=32,
                   help="decode steps of the serving engine's steady run; its step is their median")
    p.add_argument("--threaded", action="store_true",
                   help="also time every compiled decode row's engine with its launches made "
                        "from a thread of their own (EngineConfig.launch_thread)")
    p.add_argument("--serving-batches", default="32,64,128",
                   help="comma-separated batch sizes B of the serving part (default %(default)s)")
    p.add_argument("--serving-contexts", default="8192,16384,32768",
                   help="comma-separated contexts L in tokens of the serving part (default "
                        "%(default)s)")
    p.add_argument("--prefill-len", type=int, default=8192,
                   help="prompt length in tokens of the prefill and ttft parts (default "
                        "%(default)s)")
    p.add_argument("--prefill-batch", type=int, default=1,
                   help="prompts prefilled together in the prefill part (default %(default)s)")
    p.add_argument("--chunk", type=int, default=2048,
                   help="tokens per prefill chunk, timed beside the whole prompt in one step "
                        "(default %(default)s)")
    p.add_argument("--prefill-modes", default="eager,compiled",
                   help="prefill steps to time: through the eager blocks, the compiled prefill "
                        "blocks (EngineConfig.compile_prefill, their CUDA graphs included) and/or "
                        "pieces (compiled, without those graphs) (default %(default)s)")
    p.add_argument("--unequal", default="16x512,4x2048",
                   help="prefill steps of unequal whole prompts, B x mean length, comma-separated")
    p.add_argument("--ttft-variants", default="gla-2",
                   help="comma-separated attention variants of the ttft part (default %(default)s)")
    p.add_argument("--ttft-chunks", default="2048,8192,2048m",
                   help="prefill budgets per step; a trailing m turns mixed prefill+decode steps on")
    p.add_argument("--ttft-prefill-modes", default="compiled",
                   help="the ttft part's engine with eager, compiled and/or pieces prefill blocks "
                        "(as --prefill-modes; default %(default)s, as the engine's default on CUDA)")
    p.add_argument("--ttft-requests", type=int, default=64,
                   help="requests sent in the ttft part (default %(default)s)")
    p.add_argument("--ttft-output", type=int, default=128,
                   help="greedy tokens generated per request in the ttft part (default "
                        "%(default)s)")
    p.add_argument("--rate", type=float, default=16.0,
                   help="Poisson arrivals per second in the ttft part (default %(default)s)")
    p.add_argument("--tiny", action="store_true", help="tiny preset on the CPU (a smoke run)")
    p.add_argument("--out", default=os.environ.get("OUT", "."),
                   help="folder for engine_roofline.json and engine_roofline.md (default: $OUT, "
                        "else the current directory)")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the compiled decode rows' engine step against its floor "
                        "(hwattn.bench.plot) to this file")
    p.add_argument("--replot", metavar="JSON",
                   help="time nothing: draw --plot from this engine_roofline.json")
    args = p.parse_args(argv)
    if args.engine_steps < 1:
        p.error(f"--engine-steps must be >= 1, got {args.engine_steps}")
    if args.replot:
        if not args.plot:
            p.error("--replot needs --plot FILE.png")
        try:
            draw(json.loads(Path(args.replot).read_text()), args.plot, source=args.replot)
        except (OSError, ValueError) as err:
            p.error(str(err))
        return 0
    if args.tiny:
        args.contexts, args.serving_batches, args.serving_contexts = "24,40", "2,4", "24,40"
        args.batch, args.prefill_len, args.chunk, args.unequal = 4, 48, 16, "3x16"
        args.ttft_chunks, args.ttft_requests, args.ttft_output, args.rate = "16,64,16m", 4, 4, 200.0
        torch.set_num_threads(1)
    setup = Setup(args)
    for name in ("decode_modes", "prefill_modes", "ttft_prefill_modes"):
        value = getattr(args, name)
        allowed = {"eager", "compiled"} | ({"pieces"} if name != "decode_modes" else set())
        if not value or set(value.split(",")) - allowed:
            p.error(f"--{name.replace('_', '-')} takes {', '.join(sorted(allowed))} (one or "
                    f"more); got {value!r}")
    parts = args.parts.split(",")
    unknown = set(parts) - {"decode", "serving", "prefill", "ttft"}
    if unknown:
        p.error(f"--parts takes decode, serving, prefill, ttft; got {sorted(unknown)}")
    if args.plot and ("decode" not in parts or "compiled" not in args.decode_modes.split(",")):
        p.error("--plot draws compiled decode rows: --parts needs decode and --decode-modes "
                "compiled")
    peaks = device_peaks(setup.device)
    from hwattn.ops import linear as ops_linear

    doc = dict(device_name=torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu",
               torch=torch.__version__, peaks=peaks, args=vars(args),
               skinny_gemm=ops_linear.SKINNY_ENABLED
               and setup.device.type in ops_linear.SKINNY_DEVICES)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = SavedRows(doc, Path(args.out) / "engine_roofline.json")
    for part in parts:
        log(f"part {part}")
        if part == "decode":
            part_decode(setup, args, rows)
        elif part == "serving":
            part_serving(setup, args, rows)
        elif part == "prefill":
            part_prefill(setup, args, peaks, rows)
        else:
            part_ttft(setup, args, rows)
    text = tables(doc)
    (Path(args.out) / "engine_roofline.md").write_text(text + "\n")
    print(text)
    print(json.dumps(dict(peaks=peaks, rows=len(doc["rows"]))))
    if args.plot:  # after the results are saved: a row the figure cannot draw loses nothing
        try:
            draw(doc, args.plot)
        except ValueError as err:
            log(f"no figure: {err}")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
