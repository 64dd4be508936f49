"""Measurements of the engine (`hwattn bench engine`, `benchmarks/serving_study.py`).

- `run_offline`: submit a batch of requests at once and run them to completion, timing every
  step: output throughput, TTFT, inter-token latency (per decode step), TPOT, end-to-end.
- `decode_breakdown`: one decode step of B sequences at context L (feeding one token each, or
  k + 1 for a speculative verify step): the step as the host sees it, the captured forward's
  device time, and (on a GPU, from the profiler's trace of the replay) its kernels split into
  attention, cache writes, GEMMs, other kernels and the gaps between them, plus host time,
  beside the step's floor (weights + KV cache at the copy rate, FLOPs at the matmul rate, both
  measured in the same process); on the CPU, the layers' attention calls timed alone.
- `bench_engine`: both on one engine, as one JSON-ready document; `format_engine_report` prints it.

Everything here goes through the engine's public API: pages are borrowed from the pool with
`BlockManager.borrow_pages`, the captured graph of a batch comes from `ModelRunner.graph_for`,
and `ModelRunner.eager()` runs a step without graphs.
"""

from __future__ import annotations

import collections
import contextlib
import statistics
import time
from dataclasses import dataclass, field, replace

import torch

from hwattn import ops
from hwattn.bench.timing import (GEMM_MARKERS, DeviceTimer, device_peaks, summarize_kernels,
                                 trace_kernels)
from hwattn.engine import ModelRunner, SamplingParams, StepInput
from hwattn.engine.sampler import SamplingInput
from hwattn.engine.step_timer import LAUNCH_PARTS, PHASES
from hwattn.engine.step_timer import summarize as summarize_phases


def summary(values: list[float]) -> dict:
    """mean / median / p99 / min / max of a list (empty -> zeros)."""
    if not values:
        return dict(mean=0.0, median=0.0, p99=0.0, min=0.0, max=0.0, n=0)
    s = sorted(values)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
    return dict(mean=statistics.fmean(s), median=statistics.median(s), p99=p99, min=s[0],
                max=s[-1], n=len(s))


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def random_prompts(n: int, length: int | tuple[int, int], vocab: int, seed: int = 0,
                   repetitive: bool = False) -> list[list[int]]:
    """`n` prompts of token ids, lengths fixed or uniform in [lo, hi]. `repetitive`: each is a
    short random phrase (16-48 tokens) repeated, the kind of text n-gram drafting exploits."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        m = length if isinstance(length, int) else int(torch.randint(length[0], length[1] + 1, (1,),
                                                                     generator=g))
        if repetitive:
            phrase = torch.randint(0, vocab, (int(torch.randint(16, 49, (1,), generator=g)),),
                                   generator=g).tolist()
            out.append((phrase * (m // len(phrase) + 1))[:m])
        else:
            out.append(torch.randint(0, vocab, (m,), generator=g).tolist())
    return out


@dataclass
class OfflineResult:
    requests: int
    prompt_tokens: int
    output_tokens: int
    wall_s: float
    prefill_s: float
    decode_s: float
    ttft_s: dict
    itl_s: dict
    tpot_s: dict
    e2e_s: dict
    decode_steps: int
    acceptance_rate: float  # accepted / proposed draft tokens (speculative decoding)
    # Host µs per phase of the decode steps (`hwattn.engine.step_timer.summarize`); empty
    # for engines without a step timer (data-parallel replicas).
    host_phases_us: dict = field(default_factory=dict)
    # The generated token ids of every request, in prompt order (left out of `as_dict`).
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def decode_tokens_per_s(self) -> float:
        return self.output_tokens / self.decode_s if self.decode_s else 0.0

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d.pop("outputs")
        d.update(output_tokens_per_s=self.output_tokens_per_s,
                 decode_tokens_per_s=self.decode_tokens_per_s)
        return d


def run_offline(engine, prompts: list[list[int]], output_len: int, temperature: float = 0.0,
                progress: bool = False) -> OfflineResult:
    """Submit every prompt at once (ignore_eos, no detokenization) and run to completion.

    ITL is the wall time of each decode step (every running request gets its next token(s)
    from it); TPOT is per request, (finish - first token) / (tokens - 1). With data-parallel
    replicas the steps are the replicas' own (they run side by side, so prefill_s and
    decode_s add up the replicas' time, not wall time). `host_phases_us`: where the host's
    time went in the decode steps, per phase of `LLMEngine.step` and in garbage collection
    (`hwattn.engine.step_timer`). `outputs`: the generated token ids, in prompt order.
    """
    params = SamplingParams(max_tokens=output_len, temperature=temperature, ignore_eos=True,
                            detokenize=False, seed=0, output_kind="final_only")
    counters0 = dict(engine.counters)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts) * output_len, desc="tokens", unit="tok", leave=False)
        except ImportError:
            bar = None
    replica_steps = getattr(engine, "take_step_times", None)  # data-parallel replicas
    if replica_steps is not None:
        replica_steps()
    timer = getattr(engine, "step_timer", None)  # absent on data-parallel replicas
    decode_phases = []
    with timer.collecting() if timer is not None else contextlib.nullcontext():
        start = time.perf_counter()
        ids = [engine.add_request(p, params) for p in prompts]
        step_times, prefill_s, decode_s = [], 0.0, 0.0
        finished = {}
        while engine.has_unfinished():
            kind_before = engine.counters["prefill_steps"]
            steps_before = engine.counters["steps"]
            t0 = time.perf_counter()
            outs = engine.step()
            dt = time.perf_counter() - t0
            if replica_steps is not None:
                for kind, seconds in replica_steps():
                    if kind == "prefill":
                        prefill_s += seconds
                    else:
                        decode_s += seconds
                        if kind == "decode":  # not a read-back that launched nothing
                            step_times.append(seconds)
            elif engine.counters["prefill_steps"] > kind_before:
                prefill_s += dt
            elif engine.counters["steps"] == steps_before:
                decode_s += dt  # read back the last overlapped step; launched none
            else:
                decode_s += dt
                step_times.append(dt)
                if timer is not None and timer.steps:
                    decode_phases.append(timer.steps[-1])
            for out in outs:
                if out.finished:
                    finished[out.request_id] = out
            if bar is not None:
                done = engine.counters["generation_tokens"] - counters0["generation_tokens"]
                bar.update(done - bar.n)
        wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    outs = [finished[i] for i in ids]
    ttft = [o.first_token_time - o.arrival_time for o in outs]
    e2e = [o.finish_time - o.arrival_time for o in outs]
    tpot = [(o.finish_time - o.first_token_time) / (len(o.token_ids) - 1) for o in outs
            if len(o.token_ids) > 1]
    steps = engine.counters["decode_steps"] - counters0["decode_steps"]
    accepted = engine.counters["accepted_tokens"] - counters0["accepted_tokens"]
    drafted = engine.counters["draft_tokens"] - counters0["draft_tokens"]
    return OfflineResult(len(prompts), sum(len(p) for p in prompts),
                         sum(len(o.token_ids) for o in outs), wall, prefill_s, decode_s,
                         summary(ttft), summary(step_times), summary(tpot), summary(e2e), steps,
                         accepted / drafted if drafted else 0.0,
                         outputs=[list(o.token_ids) for o in outs],
                         host_phases_us=summarize_phases(decode_phases))


def attention_calls(model, batch: int, query_len: int, caches, block_table, seqlens, plan,
                    backend: str | ops.AttentionBackend = "auto"):
    """A function that makes, for every layer, the paged decode-op call that layer makes at
    this shape (`Attention.kernel_call`), on random queries of the widths its kernel takes."""
    backend = ops.get_backend(backend, block_table.device)
    calls = []
    gen = torch.Generator(device=block_table.device).manual_seed(0)
    for blk, cache in zip(model.layers, caches):
        attn = blk.attn
        w = next(attn.parameters())
        queries = tuple(torch.randn(shape, device=w.device, dtype=w.dtype, generator=gen)
                        for shape in attn.decode_query_shapes(batch, query_len))
        calls.append(lambda a=attn, q=queries, c=cache: a.kernel_call(
            backend, q, c, block_table, seqlens, plan=plan))

    def run():
        for call in calls:
            call()
    return run


@torch.inference_mode()
def decode_breakdown(engine, batch: int, context_len: int, iters: int = 10,
                     query_len: int = 1) -> dict:
    """Time one decode step of `batch` sequences that feeds `query_len` tokens each (1: a
    plain step; k + 1: a speculative verify step of k drafts) and holds `context_len` tokens
    per sequence once those are written.

    Borrows pages from the pool (the engine must be idle) and gives them back. Returns the
    fields of `time_decode_step` plus shares of the step. Under tensor parallelism every rank
    runs the same timing (so the forward's all-reduces line up) and the numbers are rank 0's,
    taken inside its worker process; with data-parallel replicas, replica 0 is timed.
    """
    if hasattr(engine, "call_replica"):
        return engine.call_replica(0, decode_breakdown, batch, context_len, iters, query_len)
    bm = engine.block_manager
    if engine.has_unfinished():
        raise RuntimeError("decode_breakdown needs an idle engine")
    if not 1 <= query_len <= context_len:
        raise ValueError(f"query_len must be in [1, context_len={context_len}], got {query_len}")
    check_breakdown_fits(engine, batch, context_len)
    per_seq = -(-context_len // bm.page_size)
    with bm.borrow_pages(per_seq * batch) as pages:
        tables = [pages[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, engine.model_config.vocab_size, (batch, query_len),
                               generator=g).tolist()
        step = StepInput("decode", tokens, [context_len - query_len] * batch, tables)
        if hasattr(engine.runner, "call"):  # tensor-parallel workers
            times = engine.runner.call(time_decode_step, step, context_len, iters)
        else:
            times = time_decode_step(engine.runner, step, context_len, iters)
    wall, attention = times["step_wall_s"], times["attention_s"]
    return dict(batch=batch, context_len=context_len, query_len=query_len, **times,
                attention_share=attention / wall, outside_attention_share=1 - attention / wall,
                allreduce_share=times["allreduce_s"] / wall,
                host_overhead_share=max(0.0, times["host_s"] / wall))


def classify_kernel(name: str, backend) -> str:
    """The part of a decode step a GPU kernel belongs to: "attention" or "cache_write" (the
    kernels `backend.kernel_names` lists for its paged ops), "gemm" (cuBLAS / CUTLASS
    matrix products) or "other" (norms, RoPE, activations, copies, sampling, ...)."""
    for part in ("attention", "cache_write"):
        if any(k in name for k in backend.kernel_names.get(part, ())):
            return part
    low = name.lower()
    if any(m in low for m in GEMM_MARKERS):
        return "gemm"
    return "other"


def profile_kernels(fn, iters: int) -> list[tuple[str, float]]:
    """(kernel name, seconds) of every GPU kernel, copy and memset that `iters` calls of `fn`
    ran, read from the profiler's trace (CUPTI records the kernels inside a CUDA graph's
    replay as it records launched ones)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return trace_kernels(prof)


def kernel_breakdown(kernels: list[tuple[str, float]], iters: int, backend, top: int = 40) -> dict:
    """Per step (kernel times summed over `iters` steps, divided by `iters`): seconds in each
    part of `classify_kernel`, the kernel count, and the `top` kernels by time (40: every
    distinct kernel of an `xl` decode step, for the results files)."""
    return summarize_kernels(kernels, iters, lambda name: classify_kernel(name, backend),
                             ("attention", "cache_write", "gemm", "other"), top)


def decode_floor(model, batch: int, context_len: int, cache_dtype: torch.dtype,
                 peaks: tuple[float, float] | None, query_len: int = 1) -> dict:
    """The fewest bytes and FLOPs of one decode step of `batch` sequences at `context_len`,
    each feeding `query_len` tokens, on this (possibly sharded) model, and the time they
    take at `peaks`.

    Bytes: every weight once (the tied embedding counts once: the output head reads it all)
    plus the whole KV cache the step reads and the `query_len` tokens per sequence it writes.
    The model's own weights: composed absorptions (`Transformer.compose_absorptions`), which
    a step reads in place of `wq_b`, `wo`, W_UK and W_UV, are not counted, so a step through
    them is judged against the same floor as one through the separate products.
    FLOPs: 2 per weight per token (the embedding lookup is free) plus each layer's decode
    attention.
    """
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * (context_len + query_len) * model.kv_bytes_per_token(1, cache_dtype)
    # Untied, the input embedding is only looked up; tied, it is also the output head.
    untied = model.output.weight is not model.tok_embeddings.weight
    matmul_weights = model.num_params(non_embedding=untied)
    flops = 2 * batch * query_len * matmul_weights + batch * sum(
        blk.attn.decode_flops(context_len, query_len) for blk in model.layers)
    out = dict(weight_bytes=weight_bytes, kv_bytes=kv_bytes, flops=flops)
    if peaks is not None:
        copy_gbps, tflops = peaks
        out.update(copy_gb_s=copy_gbps, matmul_tflop_s=tflops,
                   bytes_s=(weight_bytes + kv_bytes) / (copy_gbps * 1e9),
                   flops_s=flops / (tflops * 1e12))
        out["floor_s"] = max(out["bytes_s"], out["flops_s"])
    return out


@torch.inference_mode()
def time_decode_step(runner, step: StepInput, context_len: int, iters: int = 10) -> dict:
    """The timings of `decode_breakdown` on one `ModelRunner` (one rank), in seconds; the
    step's rows all feed the same number of tokens (its query length).

    step_wall_s: the engine's step as the host sees it (inputs prepared and uploaded, the
        captured graph replayed or the forward run eagerly, synchronised), median.
    forward_device_s: the forward on the device alone (the captured graph replayed with its
        inputs in place; the eager forward where there is no graph), median of CUDA events
        around one call made with the device idle.
    forward_queued_s: the same forward's device time per call with calls queued back to back
        (`DeviceTimer.queued`): what the forward costs the device in a loop that launches
        ahead, as the engine's overlapped scheduling does; the floor of its step.
    launch_latency_s: forward_device_s - forward_queued_s, the device's wait for the start of
        a forward launched onto an idle device (the graph launch's own latency).
    launch_queued_s: with one token per row, the runner's whole launch of a greedy step that
        feeds each row the token it sampled last (staged inputs, plan, forward, argmax, copy
        back; `ModelRunner.launch_step`), made back to back and each step's tokens read one
        step later, as the engine's overlapped loop does: the engine's step without its own
        Python (scheduling, outputs). step_io_s = launch_queued_s - forward_queued_s is what
        the step's inputs and sampling add on the device. None for longer queries.
    host_s: step_wall_s - forward_device_s, the time the device waits for the host.
    replay_call_s: with captured graphs, the host's time inside one `replay()` call made with
        the device idle (the CUDA API's cost of launching the step's graph, which grows with
        its kernel nodes), median; None without graphs.
    kernels (CUDA): `kernel_breakdown` of the same forward, from the profiler's trace; its
        parts plus `launch_gaps_s` (forward_queued_s minus the kernels' time: the device idle
        between kernels) plus launch_latency_s plus host_s make up the step.
    attention_s: the paged attention kernels inside the step (CUDA: from the trace); on the
        CPU, the layers' decode-op calls timed alone (`attention_method` says which).
    floor: `decode_floor` at the peaks measured in this process (CUDA), and
        floor_ratio = step_wall_s / its floor_s.
    """
    batch = len(step.num_cached)
    query_len = len(step.tokens[0])
    device = runner.device
    timer = DeviceTimer(device)

    def wall():
        t0 = time.perf_counter()
        runner.execute(step)
        _sync(device)
        return time.perf_counter() - t0

    runner.execute(step)
    _sync(device)
    step_wall = statistics.median(wall() for _ in range(iters))
    replay = runner.graph_for(batch, query_len)
    forward = replay if replay is not None else (lambda: runner.execute(step))
    forward_device = timer(forward, iters)
    forward_queued = timer.queued(forward, calls=iters)
    launch_queued = None
    if query_len == 1:
        launch, drain = launch_loop(runner, step)
        launch_queued = timer.queued(launch, calls=iters)
        drain()

    def replay_call():
        _sync(device)
        t0 = time.perf_counter()
        replay()
        seconds = time.perf_counter() - t0
        _sync(device)
        return seconds

    out = dict(cuda_graphs=runner.cuda_graphs, graph_error=runner.graph_error,
               compiled=getattr(runner, "decode_blocks", None) is not None,
               composed_layers=getattr(runner, "composed_layers", 0),
               blas=getattr(runner, "blas", "default"),
               step_wall_s=step_wall, forward_device_s=forward_device,
               forward_queued_s=forward_queued, launch_latency_s=forward_device - forward_queued,
               launch_queued_s=launch_queued,
               step_io_s=None if launch_queued is None else launch_queued - forward_queued,
               host_s=step_wall - forward_device,
               replay_call_s=None if replay is None else statistics.median(
                   replay_call() for _ in range(iters)),
               allreduce_s=timer(allreduce_calls(runner.model, batch), iters))
    if torch.device(device).type == "cuda":
        kernels = kernel_breakdown(profile_kernels(forward, iters), iters, runner.backend)
        kernels["launch_gaps_s"] = forward_queued - kernels["kernels_s"]
        out.update(kernels=kernels, attention_s=kernels["attention_s"],
                   attention_method="profiler trace of the step's forward")
    else:
        table = runner.block_table(step.block_tables).to(device)
        seqlens_host = torch.full((batch,), context_len, dtype=torch.int32)
        plan = runner.plan(seqlens_host, query_len)
        out.update(kernels=None, attention_method="decode-op calls timed alone",
                   attention_s=timer(attention_calls(runner.model, batch, query_len,
                                                     runner.kv_caches, table,
                                                     seqlens_host.to(device), plan,
                                                     runner.backend), iters))
    cache_dtype = runner.kv_caches[0][0].dtype
    floor = decode_floor(runner.model, batch, context_len, cache_dtype, device_peaks(device),
                         query_len)
    if "floor_s" in floor:
        floor["floor_ratio"] = step_wall / floor["floor_s"]
    out["floor"] = floor
    return out


def launch_loop(runner, step: StepInput):
    """(launch, drain) for timing a runner's decode launches as the engine makes them:
    `launch()` launches the one-token decode `step` with greedy sampling, every row fed the
    token it sampled in the previous launch, and then reads the tokens of the launch before
    (the engine's one step in flight); `drain()` reads the rest. Each launch rewrites the
    same cache slots, so the cache's contents are what `step` left."""
    batch = len(step.num_cached)
    fed = replace(step, feed=list(range(batch)))
    greedy = SamplingInput.of([SamplingParams(temperature=0.0)] * batch, [0] * batch,
                              [0] * batch)
    runner.launch_step(step, greedy).result()  # the tokens the first fed launch reads
    pending: collections.deque = collections.deque()

    def launch():
        pending.append(runner.launch_step(fed, greedy))
        while len(pending) > 1:
            pending.popleft().result()

    def drain():
        while pending:
            pending.popleft().result()

    return launch, drain


def allreduce_calls(model, batch: int):
    """A callable making the tensor-parallel all-reduces of one decode step of `batch`
    tokens: one per row-parallel projection, each of its output shape and dtype (every rank
    must call it at once, as the step would). A model that is not sharded has none. Timed
    alone, each collective also waits for the slowest rank to arrive, so this is an upper
    bound on what the step's all-reduces cost."""
    import torch.distributed as dist

    from hwattn.parallel.tp import RowParallelLinear

    layers = [m for m in model.modules() if isinstance(m, RowParallelLinear) and m.group is not None]
    buffers = [(torch.zeros(batch, 1, m.out_features, dtype=m.weight.dtype, device=m.weight.device),
                m.group) for m in layers]

    def run():
        for buf, group in buffers:
            dist.all_reduce(buf, group=group)

    return run


@torch.inference_mode()
def graph_consistency(engine, batch: int = 4, context: int = 96) -> dict | None:
    """Logits of one decode step through the captured CUDA graph against the same step run
    eagerly (None without graphs): max |difference| relative to max |logit|, and the share of
    rows whose argmax agrees. Borrows pages from the pool (the engine must be idle)."""
    runner = engine.runner
    if not isinstance(runner, ModelRunner) or not runner.cuda_graphs:  # eager, or TP workers
        return None
    bm = engine.block_manager
    per_seq = -(-(context + 1) // bm.page_size)
    with bm.borrow_pages(per_seq * batch) as pages:
        tables = [pages[i * per_seq:(i + 1) * per_seq] for i in range(batch)]
        prompts = random_prompts(batch, context, engine.model_config.vocab_size, seed=1)
        runner.execute(StepInput("prefill", prompts, [0] * batch, tables))
        step = StepInput("decode", [[p[-1]] for p in prompts], [context] * batch, tables)
        with_graph = runner.execute(step).float().clone()
        with runner.eager():
            eager = runner.execute(step).float()
    diff = (with_graph - eager).abs().max().item() / max(eager.abs().max().item(), 1e-30)
    agree = (with_graph.argmax(-1) == eager.argmax(-1)).float().mean().item()
    return dict(rel_max_diff=diff, argmax_agreement=agree)


def rank_attention_time(label: str, tp: int, batch: int, context: int, preset: str = "xl",
                        page_size: int = 64, dtype=torch.bfloat16, device="cuda",
                        iters: int = 20) -> dict:
    """Time one layer's paged decode call at the shape one rank of a `tp`-way split runs.

    Returns the local (query, cached) heads, KV bytes per token per layer on the rank, the
    kernel time and the bandwidth it reaches on the bytes the cache holds.
    """
    from hwattn.config import ModelConfig, parse_variant
    from hwattn.layers import build_attention

    cfg = ModelConfig.from_preset(preset, **parse_variant(label))
    layer = build_attention(cfg, device=torch.device("meta"))
    n_q, n_c = layer.local_heads(tp)
    pages_per_seq = -(-context // page_size)
    n_pages = batch * pages_per_seq + 1
    g = torch.Generator(device=device).manual_seed(0)
    kw = dict(dtype=dtype, device=device)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, **kw)

    table = torch.arange(1, n_pages, dtype=torch.int32, device=device).view(batch, pages_per_seq)
    backend = ops.get_backend("auto", device)
    seqlens = torch.full((batch,), context, dtype=torch.int32)
    plan = backend.plan(seqlens, num_heads_kv=n_c, query_len=1, page_size=page_size, device=device)
    seqlens = seqlens.to(device)
    queries = tuple(rnd(*shape) for shape in layer.decode_query_shapes(batch, 1, tp))
    cache = tuple(rnd(n_pages, page_size, *shape) for shape in layer.cache_layout(tp).values())

    def call():
        return layer.kernel_call(backend, queries, cache, table, seqlens, plan=plan)

    seconds = DeviceTimer(device)(call, iters)
    per_token = layer.kv_bytes_per_token(tp, dtype)
    return dict(variant=label, tp=tp, batch=batch, context=context, query_heads=n_q,
                cached_heads=n_c, kv_bytes_per_token_layer=per_token, seconds=seconds,
                gb_per_s=batch * context * per_token / seconds / 1e9)


def bench_engine(engine, num_prompts: int, prompt_len: int, output_len: int,
                 temperature: float = 0.0, repetitive: bool = False, seed: int = 0,
                 breakdown_batch: int | None = None, breakdown_context: int | None = None,
                 progress: bool = False) -> dict:
    """`run_offline` on `num_prompts` random prompts (after a short warm-up), then the
    `decode_breakdown` of one step at B = breakdown_batch (default: the prompts that fit one
    batch) and L = breakdown_context (default prompt + output length). Returns the document
    `hwattn bench engine` prints: the engine's shape, `offline` and `decode_step`."""
    for name, value in (("num_prompts", num_prompts), ("prompt_len", prompt_len),
                        ("output_len", output_len)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    batch = breakdown_batch or min(num_prompts, engine.config.max_num_seqs)
    context = breakdown_context or prompt_len + output_len
    check_breakdown_fits(engine, batch, context)  # before the offline run, not after it
    prompts = random_prompts(num_prompts, prompt_len, engine.model_config.vocab_size, seed=seed,
                             repetitive=repetitive)
    run_offline(engine, prompts[:2], 4)  # warm-up (kernel compilation, allocator)
    res = run_offline(engine, prompts, output_len, temperature, progress=progress)
    brk = decode_breakdown(engine, batch, context)
    return dict(variant=engine.model_config.label, tp=engine.tensor_parallel_size,
                dp=getattr(engine, "data_parallel_size", 1), device=str(engine.device),
                dtype=str(engine.dtype).replace("torch.", ""),
                speculative=engine.config.speculative, prompt_len=prompt_len,
                output_len=output_len, kv_bytes_per_token_per_rank=engine.kv_bytes_per_token,
                offline=res.as_dict(), decode_step=brk)


def check_breakdown_fits(engine, batch: int, context_len: int) -> None:
    """ValueError unless the idle engine's page pool holds the `batch` sequences of
    `context_len` tokens that `decode_breakdown` borrows (it checks too, inside replica 0 of
    a data-parallel engine, whose pool is not here)."""
    bm = getattr(engine, "block_manager", None)
    if bm is None or hasattr(engine, "call_replica"):
        return
    need = -(-context_len // bm.page_size) * batch
    if need > bm.num_free_pages:
        raise ValueError(f"the decode-step breakdown of {batch} sequences of {context_len} "
                         f"tokens needs {need} pages of {bm.page_size} tokens; the pool has "
                         f"{bm.num_free_pages}: lower its batch or context (--breakdown-batch, "
                         f"--breakdown-context) or give the pool more memory (--memory-budget)")


def format_engine_report(doc: dict) -> str:
    """The human table of a `bench_engine` document."""
    ms = 1e3
    off, brk = doc["offline"], doc["decode_step"]
    dp = doc["dp"]
    lines = [f"{doc['variant']} on {doc['device']} ({doc['dtype']}, TP={doc['tp']}, DP={dp}), "
             f"{off['requests']} requests x {doc['prompt_len']} prompt + {doc['output_len']} "
             f"output tokens",
             f"  output throughput   {off['output_tokens_per_s']:10.1f} tok/s "
             f"(decode phase {off['decode_tokens_per_s']:.1f} tok/s"
             f"{' per replica' if dp > 1 else ''})",
             f"  {'':18}{'mean':>10}{'median':>10}{'p99':>10}  ms"]
    for name, s in (("TTFT", off["ttft_s"]), ("ITL (step)", off["itl_s"]),
                    ("TPOT", off["tpot_s"]), ("end-to-end", off["e2e_s"])):
        lines.append(f"  {name:18}{s['mean'] * ms:10.2f}{s['median'] * ms:10.2f}"
                     f"{s['p99'] * ms:10.2f}")
    if doc["speculative"]:
        lines.append(f"  draft tokens accepted            {off['acceptance_rate']:.0%}")
    phases = off.get("host_phases_us") or {}
    if phases.get("n"):
        lines.append("  host per decode step (median µs): " + ", ".join(
            f"{name} {phases[name]['median']:.0f}" for name in (*PHASES, "gc"))
            + f"; all but wait {phases['host']['median']:.0f}; launch = "
            + ", ".join(f"{name} {phases[name]['median']:.0f}" for name in LAUNCH_PARTS
                        if name in phases) + " + the rest")
    lines += [f"  decode step, B={brk['batch']} L={brk['context_len']} "
              f"(CUDA graphs: {'on' if brk['cuda_graphs'] else 'off'}, compiled: "
              f"{'yes' if brk.get('compiled') else 'no'}{', replica 0' if dp > 1 else ''}):",
              f"    step wall {brk['step_wall_s'] * ms:.3f} ms = forward on device "
              f"{brk['forward_device_s'] * ms:.3f} ms + host beyond the forward "
              f"{brk['host_s'] * ms:.3f} ms ({brk['host_overhead_share']:.0%})"]
    kern = brk.get("kernels")
    if kern:
        wall = brk["step_wall_s"]
        parts = [(name, kern[f"{name}_s"]) for name in
                 ("attention", "cache_write", "gemm", "other", "launch_gaps")]
        parts.append(("launch_latency", brk["launch_latency_s"]))
        lines.append("    forward = " + " + ".join(
            f"{name.replace('_', ' ')} {t * ms:.3f} ms ({t / wall:.0%})" for name, t in parts)
            + f"; {kern['kernels_per_step']:.0f} kernels a step")
    else:
        lines.append(f"    attention {brk['attention_s'] * ms:.3f} ms "
                     f"({brk['attention_share']:.0%} of the step; {brk['attention_method']})")
    # On the CPU nothing is queued: every "device" time is the wall clock, and the differences
    # the launch loop's line reads (step I/O, launch latency) are timing noise, negative as
    # often as not; the JSON keeps the numbers.
    if brk.get("launch_queued_s") is not None and doc["device"].startswith("cuda"):
        lines.append(f"    launch loop {brk['launch_queued_s'] * ms:.3f} ms a step (inputs, plan, "
                     f"forward, argmax, copy back, queued one step ahead): the step's I/O adds "
                     f"{brk['step_io_s'] * ms:.3f} ms to the queued forward "
                     f"{brk['forward_queued_s'] * ms:.3f} ms on the device")
    if brk.get("replay_call_s") is not None:
        lines.append(f"    one graph launch holds the host {brk['replay_call_s'] * ms:.3f} ms "
                     "(replay() with the device idle)")
    lines.append(f"    tensor-parallel all-reduces {brk['allreduce_s'] * ms:.3f} ms "
                 f"({brk['allreduce_share']:.0%}, timed alone)")
    floor = brk.get("floor") or {}
    if "floor_s" in floor:
        lines.append(f"    floor {floor['floor_s'] * ms:.3f} ms (weights {floor['weight_bytes'] / 1e9:.2f}"
                     f" GB + KV {floor['kv_bytes'] / 1e9:.2f} GB at {floor['copy_gb_s']:.0f} GB/s;"
                     f" {floor['flops'] / 1e12:.2f} TFLOP at {floor['matmul_tflop_s']:.0f} TFLOP/s)"
                     f": step = {floor['floor_ratio']:.2f}x its floor")
    return "\n".join(lines)
