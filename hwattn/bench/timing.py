"""Timing shared by the benchmarks: the median device time of a callable, the GPU's two
ceilings (copy bandwidth and bf16 matmul rate) measured once per process with it, and the
kernels of a profiler's trace."""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

import torch


class DeviceTimer:
    """Device time of a callable in seconds: the median of CUDA-event timings on a GPU, of
    wall-clock timings elsewhere, after `warmup` untimed calls."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn, iters: int = 10, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        return statistics.median(self._span(fn) for _ in range(iters))

    def queued(self, fn, calls: int = 8, repeats: int = 3, warmup: int = 2) -> float:
        """Device time per call of `fn` with `calls` calls queued back to back, so that the
        device does not wait for the host between them (as in a serving loop that launches
        each step before the last one ends): the median over `repeats` spans, each timed from
        the end of an untimed first call. Off CUDA: wall-clock time per call."""
        for _ in range(warmup):
            fn()

        def run():
            for _ in range(calls):
                fn()
        times = []
        for _ in range(repeats):
            if self.cuda:
                torch.cuda.synchronize()
                fn()  # its own launch latency stays outside the span
            times.append(self._span(run) / calls)
        return statistics.median(times)

    def _span(self, run) -> float:
        """Seconds `run()` takes: between CUDA events recorded around it, or wall-clock."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0


_PEAKS: dict = {}


def device_peaks(device) -> tuple[float, float] | None:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) of this GPU, measured once per
    process on random data (`hwattn.bench.decode.measure_peaks`); None off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if device not in _PEAKS:
        from hwattn.bench.decode import measure_peaks

        timer = DeviceTimer(device)

        def median_ms(fn, warmup: int, rep: int, return_mode: str = "median") -> float:
            # `triton.testing.do_bench`'s signature, in call counts: serving needs no Triton.
            return timer(fn, iters=max(10, rep // 4), warmup=max(3, warmup // 5)) * 1e3

        with torch.cuda.device(device):
            _PEAKS[device] = measure_peaks(torch, median_ms)
    return _PEAKS[device]


def graphed(fn, device) -> tuple:
    """(callable, how): on CUDA, a CUDA-graph replay of `fn`, which keeps the host's launch
    cost out of the timed window (as the engine runs decode), or `fn` itself if capture fails
    ("eager"); elsewhere `fn` ("eager")."""
    if torch.device(device).type != "cuda":
        return fn, "eager"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up on a side stream, as capture requires
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        torch.cuda.synchronize()
        return graph.replay, "graph"
    except RuntimeError:
        torch.cuda.synchronize()
        return fn, "eager"


# Substrings of cuBLAS / CUTLASS matrix-multiply kernel names (Hopper, Ampere, split-K, GEMV).
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "nvjet", "gemv", "splitk", "matmul", "_mma_")


def trace_kernels(prof) -> list[tuple[str, float]]:
    """(kernel name, seconds) of every GPU kernel, copy and memset in a finished
    `torch.profiler.profile`'s trace, in the trace's order."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [(e["name"], e["dur"] / 1e6) for e in events
            if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]


def summarize_kernels(kernels: list[tuple[str, float]], iters: int, classify, parts: tuple[str, ...],
                      top: int = 12) -> dict:
    """Per iteration (times summed over `iters` iterations, divided by `iters`): seconds in
    each of `parts` (`<part>_s`, by `classify(name)`, which returns one of them), all kernels'
    seconds (`kernels_s`), the kernel count (`kernels_per_step`) and the `top` kernels by time
    (name, part, µs and calls per iteration)."""
    totals = dict.fromkeys(parts, 0.0)
    by_name: dict[str, list] = {}
    for name, seconds in kernels:
        totals[classify(name)] += seconds
        entry = by_name.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]
    return dict(**{f"{k}_s": v / iters for k, v in totals.items()},
                kernels_s=sum(totals.values()) / iters, kernels_per_step=len(kernels) / iters,
                top=[dict(name=n[:120], part=classify(n), us=t / iters * 1e6, per_step=c / iters)
                     for n, (t, c) in ranked])
