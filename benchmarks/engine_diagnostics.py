"""Engine diagnostics on one GPU, each part optional (first argument, comma-separated):

- host: `xl` B=64 L=1024 GTA-4 and GQA-4 on compiled, graph-captured runners: the engine's
  median decode step (`engine_roofline.engine_steady`) beside the captured forward's device
  time (`time_decode_step`), then the same engine loop under cProfile (host_<variant>.txt).
- gemm: one eager decode step of `xl` GQA-4 and GLA-2 (B=64, L=1024) under the PyTorch
  profiler: every matmul op with its shapes and device time, and the 25 kernels costing the
  most per step.
- prefill: the paged prefill op on a 2048-token chunk over a 6144-token prefix (B=1, 16
  heads) for GQA-4, GLA-2, MLA and GTA-4 (DIAG_VARIANTS) under 9 tile shapes (`PrefillConfig`),
  each checked against the PyTorch reference (`hwattn.bench.prefill.bench_case`).
- skinny: the decode GEMMs of `xl` (QKV, O, gate+up, down, GLA-2's input projections, LM head)
  at M = 64, 16, 128 rows: cuBLAS against the Triton skinny GEMM (hwattn/ops/skinny_gemm.py)
  under its chosen tiles, then up to 7 other tiles per shape while SKINNY_SECONDS (default 85)
  last; weights cold, CUDA graphs, each Triton output checked (`hwattn.bench.skinny`).
- blas: the same decode GEMMs through cuBLAS asked four ways (`F.linear`, as under cuBLASLt,
  W stored transposed for `torch.mm`, `addmm` with a zero bias; `hwattn.bench.skinny.run_blas`),
  weights cold, CUDA graphs, each output checked: does another entry point reach the small
  weights (QKV, O, down) faster than the third to half of the copy rate `F.linear` gets?
- gemmtune: the same decode GEMMs at 64 rows under cuBLASLt (`F.linear`, the decode step's
  choice) and through Inductor's Triton GEMM templates autotuned for each shape alone
  (`hwattn.bench.skinny.TEMPLATE_VARIANT`): does a template read the small weights faster?
- prefillprof: one 8192-token prompt of `xl` prefilled whole and in chunks of 2048 (as
  `engine_roofline.py --parts prefill` does) for MLA, GLA-2 and GQA-4 under the PyTorch
  profiler: device time by kind (attention, GEMM, gather/copy, other) and the 15 costliest
  kernels, beside the wall time of the same steps: where chunked latent prefill loses its MFU.
- normops: `hwattn.layers.norm.RMSNorm` against `F.rms_norm` on a 2048-token chunk of `xl`
  (bf16, 2048 wide; GLA-2's per-latent-head (2, 256) norm): bitwise equal?, host µs per call
  (200 calls queued, no synchronisation inside), device µs and launches per call (the
  profiler's kernels; the F.rms_norm side keeps our fp32 round trip): does torch's own
  RMSNorm cut the eager launches that make chunked prefill host-bound?
- prefillhost: the same chunked prefill (GLA-2, GQA-4) under cProfile, the host's side of it
  (prefillhost_<variant>.txt, walls in diag.jsonl): run 2026-12-07 as a script of its own, the
  chunked steps' wall time was 1.5-3.5x their device time.

- mixedstep: what a mixed step costs against its halves (GLA-2 `xl`, compiled prefill and
  its graphs, compiled decode with CUDA graphs): a 2048-token chunk over 6144 cached tokens
  alone; a decode step of MIXED_ROWS (default 32) sequences at 8K alone; the two as one
  mixed step (decode rows through the decode op, `AttentionMetadata.split_decode_rows`); the
  same step with every row through the prefill op (as before the split). Median wall of 7
  (synchronised), then each under the PyTorch profiler: device time by kind.

prefillprof and prefillhost run the eager prefill blocks, or the compiled ones with
COMPILE_PREFILL=1 (EngineConfig.compile_prefill), over PREFILL_DIAG_VARIANTS (default: each
part's own list).

    python3 benchmarks/engine_diagnostics.py host,gemm,prefill   # writes $OUT/diag.jsonl
    OUT=/tmp/skinny python3 benchmarks/engine_diagnostics.py skinny   # about 2 minutes
    OUT=/tmp/blas python3 benchmarks/engine_diagnostics.py blas       # under a minute
    OUT=/tmp/tune python3 benchmarks/engine_diagnostics.py gemmtune   # autotuning: minutes

Results of 2026-12-04: benchmarks/results/prefill_tiles_h200_2026-12-04/.
"""
import cProfile, io, json, os, pstats, statistics, sys, time, types
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch
OUT = os.environ.get("OUT", "/tmp")
T0 = time.time()
def log(m): print(f"[{time.time()-T0:6.1f}s] {m}", flush=True)
def save(name, obj):
    with open(os.path.join(OUT, name), "a") as f: f.write(json.dumps(obj) + "\n")
import engine_roofline as er
from hwattn.bench.timing import DeviceTimer, device_peaks
peaks = device_peaks("cuda"); log(f"peaks {peaks}"); save("diag.jsonl", dict(peaks=peaks))
setup = er.Setup(types.SimpleNamespace(tiny=False))
COMPILE_PREFILL = os.environ.get("COMPILE_PREFILL", "0") == "1"
def prefill_variants(default):
    return os.environ.get("PREFILL_DIAG_VARIANTS", default).split(",")
parts = sys.argv[1].split(",")

if "host" in parts:
    for variant in ["gta-4", "gqa-4"]:
        net = er.build(setup, "xl", variant, 1024 + 64)
        runner = er.runner_for(setup, net, 64, 1024 + 64, compiled=True)
        plain = er.engine_steady(setup, runner, net, 64, 1024)
        fwd = er.decode_step(setup, runner, net, 64, 1024); fwd.pop("logits", None)
        pr = cProfile.Profile(); pr.enable()
        prof = er.engine_steady(setup, runner, net, 64, 1024)
        pr.disable()
        s = io.StringIO(); st = pstats.Stats(pr, stream=s)
        st.sort_stats("tottime").print_stats(35); st.sort_stats("cumulative").print_stats(60)
        open(os.path.join(OUT, f"host_{variant}.txt"), "w").write(s.getvalue())
        save("diag.jsonl", dict(part="host", variant=variant, plain=plain, profiled=prof, step={k: v for k, v in fwd.items() if not isinstance(v, (list, dict)) or k in ("breakdown",)}))
        log(f"host {variant}: engine step {plain['engine_step_s']*1e3:.2f} ms; step keys {list(fwd)}")
        er.free(runner, net)

if "gemm" in parts:
    from torch.profiler import profile, ProfilerActivity
    for variant in ["gqa-4", "gla-2"]:
        net = er.build(setup, "xl", variant, 1024 + 64)
        runner = er.runner_for(setup, net, 64, 1024 + 64, compiled=False)
        ctx = 1024; per = ctx // 64
        pages = (torch.randperm(64 * per) + 1).view(64, per).tolist()
        from hwattn.engine.model_runner import StepInput
        step = StepInput("decode", [[1]] * 64, [ctx - 1] * 64, pages)
        with runner.eager():
            for _ in range(3): runner.execute(step)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as p:
                for _ in range(5): runner.execute(step)
                torch.cuda.synchronize()
        rows = []
        for e in p.key_averages(group_by_input_shape=True):
            if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul") and e.device_time_total > 0:
                rows.append(dict(op=e.key, shapes=str(e.input_shapes), count=e.count, us=e.device_time_total / e.count))
        save("diag.jsonl", dict(part="gemm_ops", variant=variant, rows=rows))
        ker = {}
        for e in p.events():
            if e.device_type.name == "CUDA":
                ker.setdefault(e.name, []).append(e.device_time)
        top = sorted(((k, len(v) / 5, statistics.median(v), sum(v) / 5) for k, v in ker.items()), key=lambda r: -r[3])[:25]
        save("diag.jsonl", dict(part="gemm_kernels", variant=variant, top=[dict(name=k[:120], per_step=n, median_us=m, step_us=t) for k, n, m, t in top]))
        log(f"gemm {variant} done")
        er.free(runner, net)

if "prefill" in parts:
    from hwattn import ops
    from hwattn.bench.prefill import PrefillCase, bench_case
    from hwattn.ops.triton_prefill import PrefillConfig
    timer = DeviceTimer("cuda")
    base = ops.get_backend("triton", "cuda")
    configs = [None, (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2), (64, 32, 4, 3), (128, 128, 8, 2), (64, 128, 8, 2)]
    from hwattn.bench.decode import layer_for
    for variant in os.environ.get("DIAG_VARIANTS", "gqa-4,gla-2,mla,gta-4").split(","):
        # One form at a time: a tile one form cannot launch must not hide the other's time.
        forms = [f.name for f in layer_for(variant, 16, 128, 64).prefill_forms()]
        for cfg in configs:
            if time.time() - T0 > float(os.environ.get("DEADLINE", "540")): break
            be = base if cfg is None else base.with_prefill_config(PrefillConfig(*cfg))
            for form in forms:
                try:
                    rows = bench_case(PrefillCase(variant, query_len=2048, prefix=6144), backend=be,
                                      forms=(form,), timer=lambda fn: timer(fn, iters=10, warmup=3) * 1e3,
                                      peak_tflops=peaks[1] if peaks else None)
                    for r in rows: r["config"] = cfg; save("diag.jsonl", dict(part="prefill", **r))
                    log(f"prefill {variant} {cfg}: " + ", ".join(f"{r['form']} {r['ms']:.3f} ms {r.get('pct_peak', 0):.0f}%" for r in rows))
                except Exception as err:
                    save("diag.jsonl", dict(part="prefill", variant=variant, form=form, config=cfg, error=f"{type(err).__name__}: {str(err)[:300]}"))
                    log(f"prefill {variant} {form} {cfg}: {type(err).__name__}: {str(err)[:150]}")

if "skinny" in parts:
    from hwattn.bench import skinny
    timer = DeviceTimer("cuda")
    rows, totals = skinny.run(timer=lambda fn: timer(fn, iters=20, warmup=3), copy_gbs=peaks[0],
                              seconds=float(os.environ.get("SKINNY_SECONDS", "85")))
    for r in rows: save("diag.jsonl", dict(part="skinny", **r))
    save("diag.jsonl", dict(part="skinny_totals", totals=totals, copy_gbs=peaks[0]))
    log(f"skinny: {len(rows)} rows, {sum(not r['ok'] for r in rows)} failed")

if "blas" in parts:
    from hwattn.bench import skinny
    timer = DeviceTimer("cuda")
    rows = skinny.run_blas(timer=lambda fn: timer(fn, iters=20, warmup=3), copy_gbs=peaks[0])
    for r in rows: save("diag.jsonl", dict(part="blas", **r))
    log(f"blas: {len(rows)} rows, {sum(not r['ok'] for r in rows)} failed")

if "gemmtune" in parts:
    from hwattn.bench import skinny
    timer = DeviceTimer("cuda")
    rows = skinny.run_blas(rows=(64,), variants=("linear_lt", skinny.TEMPLATE_VARIANT),
                           timer=lambda fn: timer(fn, iters=20, warmup=3), copy_gbs=peaks[0])
    for r in rows: save("diag.jsonl", dict(part="gemmtune", **r))
    log(f"gemmtune: {len(rows)} rows, {sum(not r['ok'] for r in rows)} failed")

if "prefillprof" in parts:
    from torch.profiler import profile, ProfilerActivity
    from hwattn.engine.model_runner import StepInput
    KINDS = [("attention", ("prefill_kernel", "flash", "fmha", "attention", "sdpa", "attn")),
             ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "wgmma")),
             ("copy", ("copy", "gather", "index", "cat", "memcpy", "fill"))]
    def kind(name):
        low = name.lower()
        return next((k for k, keys in KINDS if any(w in low for w in keys)), "other")
    n = 8192
    for variant in prefill_variants("mla,gla-2,gqa-4"):
        net = er.build(setup, "xl", variant, n)
        runner = er.runner_for(setup, net, 1, n + 8, compiled=False, compile_prefill=COMPILE_PREFILL)
        table = [list(range(1, 2 + n // setup.page))]
        prompt = torch.randint(0, net.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
        for chunk in (n, 2048):
            def run():
                for done in range(0, n, chunk):
                    runner.execute(StepInput("prefill", [prompt[done:done + chunk]], [done], table,
                                             need_logits=[done + chunk >= n]))
            run(); torch.cuda.synchronize()
            walls = []
            for _ in range(5):
                t0 = time.perf_counter(); run(); torch.cuda.synchronize(); walls.append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3): run()
                torch.cuda.synchronize()
            ker = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    ker.setdefault(e.name, []).append(e.device_time)
            by_kind = {}
            for name, v in ker.items():
                by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + sum(v) / 3 / 1e3
            top = sorted(((name, len(v) / 3, sum(v) / 3 / 1e3) for name, v in ker.items()), key=lambda r: -r[2])[:15]
            rec = dict(part="prefillprof", variant=variant, chunk=chunk, compiled=COMPILE_PREFILL, wall_ms=statistics.median(walls) * 1e3,
                       device_ms=sum(by_kind.values()), by_kind_ms=by_kind,
                       top=[dict(name=k[:140], per_run=c, ms=t) for k, c, t in top])
            save("diag.jsonl", rec)
            log(f"prefillprof {variant} chunk {chunk}: wall {rec['wall_ms']:.1f} ms, device {rec['device_ms']:.1f} ms, "
                + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])))
            for k, c, t in top[:8]:
                log(f"    {t:7.2f} ms  x{c:5.0f}  {k[:110]}")
        er.free(runner, net)

if "mixedstep" in parts:
    from torch.profiler import profile, ProfilerActivity
    from hwattn.engine.model_runner import StepInput
    rows, n, cached = int(os.environ.get("MIXED_ROWS", "32")), 2048, 6144
    for variant in prefill_variants("gla-2"):
        net = er.build(setup, "xl", variant, 8192)
        runner = er.prefill_runner(setup, net, rows + 1, 8192 + 64, True, "compiled")
        per_seq = -(-(8192 + 64) // setup.page)
        tables = [list(range(1 + i * per_seq, 1 + (i + 1) * per_seq)) for i in range(rows + 1)]
        g = torch.Generator().manual_seed(2)
        chunk = torch.randint(0, net.config.vocab_size, (n,), generator=g).tolist()
        dec = torch.randint(0, net.config.vocab_size, (rows, 1), generator=g).tolist()
        steps = {
            "chunk": StepInput("prefill", [chunk], [cached], tables[-1:], need_logits=[True]),
            "decode": StepInput("decode", dec, [8191] * rows, tables[:rows]),
            "mixed": StepInput("mixed", dec + [chunk[rows:]], [8191] * rows + [cached + rows],
                               tables, need_logits=[True] * (rows + 1), num_decode=rows),
            "mixed, all rows prefill": StepInput("prefill", dec + [chunk[rows:]],
                                                 [8191] * rows + [cached + rows], tables,
                                                 need_logits=[True] * (rows + 1)),
        }
        for name, step in steps.items():
            with torch.inference_mode():
                for _ in range(2): runner.execute(step)
                torch.cuda.synchronize(); walls = []
                for _ in range(7):
                    t0 = time.perf_counter(); runner.execute(step); torch.cuda.synchronize()
                    walls.append(time.perf_counter() - t0)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3): runner.execute(step)
                    torch.cuda.synchronize()
            ker = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    ker[e.name] = ker.get(e.name, 0.0) + e.device_time / 3 / 1e3
            top = sorted(ker.items(), key=lambda kv: -kv[1])[:6]
            rec = dict(part="mixedstep", variant=variant, step=name, rows=rows,
                       wall_ms=statistics.median(walls) * 1e3, device_ms=sum(ker.values()),
                       top=[dict(name=k[:120], ms=v) for k, v in top])
            save("diag.jsonl", rec)
            log(f"mixedstep {variant} {name}: wall {rec['wall_ms']:.2f} ms, device {rec['device_ms']:.2f} ms; "
                + "; ".join(f"{k[:50]} {v:.2f}" for k, v in top[:4]))
        er.free(runner, net)

if "normops" in parts:
    import torch.nn.functional as F
    from torch.profiler import profile, ProfilerActivity
    from hwattn.layers.norm import RMSNorm
    for shape, wshape in [((2048, 2048), (2048,)), ((2048, 2, 256), (2, 256))]:
        x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16)
        norm = RMSNorm(*wshape, device="cuda", dtype=torch.bfloat16)
        norm.weight.data.normal_()
        def fused(x=x, norm=norm):
            w = norm.weight.float()
            if w.dim() == 1:
                return F.rms_norm(x.float(), w.shape, w, norm.eps).to(x.dtype)
            return (F.rms_norm(x.float(), w.shape[-1:], None, norm.eps) * w).to(x.dtype)
        with torch.no_grad():
            a, b = norm(x), fused()
            rec = dict(part="normops", shape=list(shape), equal=bool(torch.equal(a, b)),
                       max_diff=float((a.float() - b.float()).abs().max()))
            for name, fn in (("ours", lambda: norm(x)), ("F.rms_norm", fused)):
                torch.cuda.synchronize(); t0 = time.perf_counter()
                for _ in range(200): fn()
                rec[f"{name}_host_us"] = (time.perf_counter() - t0) / 200 * 1e6
                torch.cuda.synchronize()
                # Device time as the kernels' own (events around one call would count the
                # launch gaps of a host-bound op); launches per call beside it.
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(20): fn()
                    torch.cuda.synchronize()
                kernels = [e.device_time for e in prof.events() if e.device_type.name == "CUDA"]
                rec[f"{name}_device_us"] = sum(kernels) / 20
                rec[f"{name}_launches"] = len(kernels) / 20
        save("diag.jsonl", rec)
        log(f"normops {rec}")

if "prefillhost" in parts:
    from hwattn.engine.model_runner import StepInput
    n = 8192
    for variant in prefill_variants("gla-2,gqa-4"):
        net = er.build(setup, "xl", variant, n)
        runner = er.runner_for(setup, net, 1, n + 8, compiled=False, compile_prefill=COMPILE_PREFILL)
        table = [list(range(1, 2 + n // setup.page))]
        prompt = torch.randint(0, net.config.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
        def run(chunk=2048):
            for done in range(0, n, chunk):
                runner.execute(StepInput("prefill", [prompt[done:done + chunk]], [done], table,
                                         need_logits=[done + chunk >= n]))
        run(); torch.cuda.synchronize()
        for _ in range(2):
            t0 = time.perf_counter(); run(); queued = time.perf_counter(); torch.cuda.synchronize()
            wall_ms, queued_ms = (time.perf_counter() - t0) * 1e3, (queued - t0) * 1e3
            # (one chunk alone, the device idle before it: the host's time to queue it)
            torch.cuda.synchronize(); t1 = time.perf_counter()
            runner.execute(StepInput("prefill", [prompt[4096:6144]], [4096], table,
                                     need_logits=[False]))
            chunk_ms = (time.perf_counter() - t1) * 1e3; torch.cuda.synchronize()
            chunk_wall_ms = (time.perf_counter() - t1) * 1e3
            save("diag.jsonl", dict(part="prefillhost", variant=variant, chunk=2048,
                                    compiled=COMPILE_PREFILL, wall_ms=wall_ms, queued_ms=queued_ms,
                                    third_chunk_queued_ms=chunk_ms, third_chunk_wall_ms=chunk_wall_ms))
            log(f"prefillhost {variant}: wall {wall_ms:.1f} ms, queued after {queued_ms:.1f} ms; "
                f"the third chunk alone: queued after {chunk_ms:.1f} ms of {chunk_wall_ms:.1f}")
        pr = cProfile.Profile(); pr.enable(); run(); torch.cuda.synchronize(); pr.disable()
        s = io.StringIO(); st = pstats.Stats(pr, stream=s)
        st.sort_stats("tottime").print_stats(25); st.sort_stats("cumulative").print_stats(45)
        suffix = "_compiled" if COMPILE_PREFILL else ""
        open(os.path.join(OUT, f"prefillhost_{variant}{suffix}.txt"), "w").write(s.getvalue())
        er.free(runner, net)

log("done")
