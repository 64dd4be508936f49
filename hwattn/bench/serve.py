"""A bounded load generator for the server (`hwattn bench serve`).

Sends N completion requests with prompt lengths drawn from a seeded distribution, at most
`max_concurrency` in flight and/or arriving as a Poisson process of `request_rate` per second,
and records per request: time to first token, the gaps between streamed chunks (inter-token
latency; a chunk holds every token one engine step produced), time per output token and
end-to-end latency. Targets are loopback addresses only, and every run is bounded in count
and in time.

Two transports: HTTP streaming against a running server (`HttpTarget`), or the engine driven
in-process through `AsyncEngine` (`InProcessTarget`, no HTTP packages needed). `bench_serve`
puts it together: warm-up, the timed run, and (in process) the engine's server started and
stopped around it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

from hwattn.bench.engine import random_prompts, summary
from hwattn.engine import SamplingParams

MAX_REQUESTS = 10_000
API_KEY_ENV = "HWATTN_API_KEY"  # the variable `hwattn serve` takes its API key from


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"url must point at a loopback address (127.0.0.0/8, ::1, localhost), got {url!r}")


@dataclass
class RequestRecord:
    prompt_tokens: int
    output_tokens: int = 0
    start: float = 0.0
    first: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first is not None


class HttpTarget:
    """Streams /v1/completions of a running server with httpx. api_key: the server's bearer
    token (default: the HWATTN_API_KEY environment variable, if set)."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None):
        import httpx

        check_loopback(url)
        self.base = url.rstrip("/")
        if self.base.endswith("/v1"):
            self.base = self.base[:-3]
        key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        headers = {"Authorization": f"Bearer {key}"} if key else None
        self.client = httpx.AsyncClient(trust_env=False, timeout=None, headers=headers)
        self.model = model

    async def setup(self) -> None:
        if self.model is None:
            r = await self.client.get(f"{self.base}/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]

    async def request(self, prompt: list[int], max_tokens: int, rec: RequestRecord) -> None:
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with self.client.stream("POST", f"{self.base}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                doc = json.loads(line[5:])
                now = time.perf_counter()
                if "error" in doc:
                    rec.error = doc["error"]["message"]
                    return
                if doc.get("choices"):
                    if rec.first is None:
                        rec.first = now
                    rec.chunk_times.append(now)
                if doc.get("usage"):
                    rec.output_tokens = doc["usage"]["completion_tokens"]

    async def close(self) -> None:
        await self.client.aclose()


class InProcessTarget:
    """Drives an `AsyncEngine` directly: the same measurements without HTTP."""

    def __init__(self, async_engine):
        self.engine = async_engine
        self.n = 0

    async def setup(self) -> None:
        self.engine.start()

    async def request(self, prompt: list[int], max_tokens: int, rec: RequestRecord) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                                detokenize=False)
        self.n += 1
        seen = 0
        async for out in self.engine.generate(prompt, params, f"bench-{self.n}"):
            now = time.perf_counter()
            if len(out.token_ids) > seen:
                seen = len(out.token_ids)
                if rec.first is None:
                    rec.first = now
                rec.chunk_times.append(now)
        rec.output_tokens = seen

    async def close(self) -> None:
        pass


def prompt_lengths(n: int, mean: int, spread: float, seed: int, lo: int = 1,
                   hi: int | None = None) -> list[int]:
    """Seeded lengths, uniform in mean·(1 ± spread), clipped to [lo, hi]."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        m = round(rng.uniform(mean * (1 - spread), mean * (1 + spread)))
        out.append(max(lo, min(hi or m, m)))
    return out


async def run_load(target, prompts: list[list[int]], max_tokens: int, max_concurrency: int | None,
                   request_rate: float | None, seed: int = 0, max_duration_s: float = 600.0,
                   progress: bool = False) -> dict:
    """Send every prompt (bounded by `max_duration_s`); returns the metrics document."""
    if not prompts or len(prompts) > MAX_REQUESTS:
        raise ValueError(f"the number of prompts must be in [1, {MAX_REQUESTS}], got {len(prompts)}")
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    if request_rate is not None and not request_rate > 0:  # `not >`: NaN fails too
        raise ValueError(f"request_rate must be > 0, got {request_rate}")
    await target.setup()
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency or len(prompts))
    records = [RequestRecord(len(p)) for p in prompts]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc="requests", unit="req", leave=False)
        except ImportError:
            bar = None

    async def one(prompt, rec):
        async with sem:
            rec.start = time.perf_counter()
            try:
                await target.request(prompt, max_tokens, rec)
            except Exception as err:  # noqa: BLE001 - recorded, the run goes on
                rec.error = f"{type(err).__name__}: {err}"
            rec.end = time.perf_counter()
            if bar is not None:
                bar.update(1)

    start = time.perf_counter()
    tasks = []
    try:
        async with asyncio.timeout(max_duration_s):
            for i, (prompt, rec) in enumerate(zip(prompts, records)):
                tasks.append(asyncio.create_task(one(prompt, rec)))
                if request_rate and i + 1 < len(prompts):  # gaps between arrivals only
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
        timed_out = False
    except TimeoutError:
        timed_out = True
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - start
    await target.close()
    if bar is not None:
        bar.close()
    done = [r for r in records if r.ok and r.end is not None]
    itl = [b - a for r in done for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.end - r.first) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in done)
    return dict(requests=len(prompts), completed=len(done), failed=len(prompts) - len(done),
                timed_out=timed_out, wall_s=wall, max_concurrency=max_concurrency,
                request_rate=request_rate, prompt_tokens=sum(r.prompt_tokens for r in done),
                output_tokens=out_tokens, output_tokens_per_s=out_tokens / wall,
                requests_per_s=len(done) / wall,
                ttft_s=summary([r.first - r.start for r in done]), itl_s=summary(itl),
                tpot_s=summary(tpot), e2e_s=summary([r.end - r.start for r in done]),
                errors=sorted({r.error for r in records if r.error})[:5])


def format_report(doc: dict) -> str:
    lines = [f"requests {doc['completed']}/{doc['requests']} completed in {doc['wall_s']:.2f} s"
             f"{' (stopped at the time limit)' if doc['timed_out'] else ''}; "
             f"concurrency {doc['max_concurrency'] or 'unbounded'}, "
             + (f"rate {doc['request_rate']} req/s" if doc["request_rate"]
                else "all at once"),
             f"output throughput {doc['output_tokens_per_s']:.1f} tok/s, "
             f"{doc['requests_per_s']:.2f} req/s",
             f"{'':12}{'mean':>10}{'median':>10}{'p99':>10}  ms"]
    for name, key in (("TTFT", "ttft_s"), ("ITL", "itl_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        s = doc[key]
        lines.append(f"{name:12}{s['mean'] * 1e3:10.2f}{s['median'] * 1e3:10.2f}{s['p99'] * 1e3:10.2f}")
    if doc["errors"]:
        lines.append(f"errors: {doc['errors']}")
    return "\n".join(lines)


async def _measure(make_target, prompts, output_len, max_concurrency, request_rate, seed,
                   max_duration_s, warmup_requests, progress) -> dict:
    if warmup_requests:  # the first requests pay for allocation and kernel compilation
        await run_load(make_target(), prompts[:warmup_requests], 4, None, None, seed=seed,
                       max_duration_s=max_duration_s)
    return await run_load(make_target(), prompts, output_len, max_concurrency, request_rate,
                          seed=seed, max_duration_s=max_duration_s, progress=progress)


def bench_serve(lengths: list[int], output_len: int, *, url: str | None = None,
                served_model_name: str | None = None, engine=None, http: bool = False,
                max_concurrency: int | None = None, request_rate: float | None = None,
                seed: int = 0, max_duration_s: float = 600.0, warmup_requests: int = 2,
                progress: bool = False) -> dict:
    """Send one seeded random prompt of each length in `lengths` to a running server at `url`
    (loopback only), or to `engine` (an engine `create_engine` built) served in this process:
    driven through `AsyncEngine` directly, or with `http` through a real uvicorn on a loopback
    port. The first `warmup_requests` prompts are sent once untimed. Returns `run_load`'s
    document with the settings and the device ("cuda", "cpu"; None for a `url`). The engine
    itself is left running: its owner shuts it down."""
    if (url is None) == (engine is None):
        raise ValueError("give either url (a running server) or engine (in-process)")
    if warmup_requests < 0:
        raise ValueError(f"warmup_requests must be >= 0, got {warmup_requests}")
    server = async_engine = None
    try:
        if url is not None:
            def make_target():
                return HttpTarget(url, served_model_name)
            vocab = 256  # ids every model has; the server's vocabulary is not known here
        else:
            from hwattn.server.async_engine import AsyncEngine

            vocab = engine.model_config.vocab_size
            limit = engine.max_model_len - output_len
            lengths = [min(n, limit) for n in lengths]
            async_engine = AsyncEngine(engine)
            if http:
                server, served_url = _start_server(async_engine)

                def make_target():
                    return HttpTarget(served_url)
            else:
                direct = InProcessTarget(async_engine)

                def make_target():
                    return direct
        prompts = [random_prompts(1, n, vocab, seed=seed + i)[0] for i, n in enumerate(lengths)]
        doc = asyncio.run(_measure(make_target, prompts, output_len, max_concurrency,
                                   request_rate, seed, max_duration_s, warmup_requests, progress))
        # The settings and, in process, the device (a server at `url` does not say its own).
        doc.update(device=None if engine is None else str(engine.device), output_len=output_len,
                   seed=seed, warmup_requests=min(warmup_requests, len(prompts)),  # as sent
                   max_duration_s=max_duration_s)
        return doc
    finally:
        if server is not None:
            server.should_exit = True
            server.thread.join(timeout=30)
        elif async_engine is not None:
            async_engine.shutdown()


def _start_server(async_engine):
    """A uvicorn server of the app on a free loopback port, in a daemon thread: (server, url)."""
    import socket
    import threading

    import uvicorn

    from hwattn.server.app import build_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = build_app(async_engine, "bench")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    server.thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{sock.getsockname()[1]}"
