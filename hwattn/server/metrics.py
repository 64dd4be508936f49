"""What /metrics serves (Prometheus text format), every sample labelled with the served
model's name (`model_name`, as vLLM labels its `vllm:*` metrics): the engine's gauges and
counters, and per-request histograms kept with `prometheus_client`: time to first token,
inter-token latency and end-to-end latency (each measured from the moment the server hands
the request to the engine), queue time (arrival in the engine to the scheduler's first
admission, on the engine's clock), time per output token of each completion, and prompt and
generation tokens per request."""

from __future__ import annotations

import time
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# Seconds: from a fast decode step on a GPU to a long CPU prefill.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
# Seconds waiting for admission: none on an idle engine, minutes behind a long queue.
QUEUE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
TPOT_BUCKETS = ITL_BUCKETS  # a completion's mean inter-token latency
MAX_TOKEN_BUCKET = 1_000_000  # token histograms' last bucket when the context is not known

ENGINE_ROWS = (  # (name, kind, help, stats key)
    ("hwattn_requests_running", "gauge", "Requests being decoded or prefilled.", "running"),
    ("hwattn_requests_waiting", "gauge", "Requests queued for admission.", "waiting"),
    ("hwattn_kv_pages_used", "gauge", "KV-cache pages held by requests.", "pages_used"),
    ("hwattn_kv_pages_capacity", "gauge", "KV-cache pages in the pool.", "pages_total"),
    ("hwattn_kv_page_size_tokens", "gauge", "Tokens per KV-cache page.", "page_size"),
    ("hwattn_prompt_tokens_total", "counter", "Prompt tokens prefilled.", "prompt_tokens"),
    ("hwattn_generation_tokens_total", "counter", "Tokens generated.", "generation_tokens"),
    ("hwattn_requests_finished_total", "counter", "Requests finished.", "finished"),
    ("hwattn_requests_aborted_total", "counter", "Requests aborted.", "aborted"),
    ("hwattn_requests_failed_total", "counter", "Requests that failed alone in the engine.",
     "failed"),
    ("hwattn_preemptions_total", "counter", "Requests preempted for recompute.", "preemptions"),
    ("hwattn_prefix_cache_hit_pages_total", "counter", "Prompt pages found in the prefix cache.",
     "prefix_hit_pages"),
    ("hwattn_spec_draft_tokens_total", "counter", "Speculative draft tokens verified.",
     "draft_tokens"),
    ("hwattn_spec_accepted_tokens_total", "counter", "Speculative draft tokens accepted.",
     "accepted_tokens"),
)
LABELS = ("model_name",)


def token_buckets(max_tokens: int | None) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_tokens` (the context length; MAX_TOKEN_BUCKET when
    it is not a positive int), as vLLM buckets its token histograms."""
    top = max_tokens if isinstance(max_tokens, int) and max_tokens >= 1 else MAX_TOKEN_BUCKET
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > top:
                return tuple(out)
            out.append(float(m * scale))
        scale *= 10


class _Series(NamedTuple):
    """The histograms' series of one model name (`Histogram.labels(model_name)` of each)."""

    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    queue: Histogram
    tpot: Histogram
    prompt_tokens: Histogram
    generation_tokens: Histogram


class LatencyMetrics:
    """The per-request histograms, labelled with `model_name`, in a registry of their own (so
    that several servers in one process never share them). model_name: the served model's
    name (`build_app` sets it with `set_model_name`). max_model_len: the last bucket of the
    token histograms (None: MAX_TOKEN_BUCKET)."""

    def __init__(self, model_name: str = "", max_model_len: int | None = None):
        self.registry = CollectorRegistry()
        tokens = token_buckets(max_model_len)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)

        self.ttft = histogram("hwattn_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.",
                              TTFT_BUCKETS)
        self.itl = histogram("hwattn_inter_token_latency_seconds",
                             "Seconds between consecutive generated tokens of a request.",
                             ITL_BUCKETS)
        self.e2e = histogram("hwattn_e2e_request_latency_seconds",
                             "Seconds from a request's arrival to its last output.", E2E_BUCKETS)
        self.queue = histogram("hwattn_request_queue_time_seconds",
                               "Seconds from a request's arrival in the engine to its first "
                               "admission by the scheduler.", QUEUE_BUCKETS)
        self.tpot = histogram("hwattn_request_time_per_output_token_seconds",
                              "Per completion of at least 2 tokens: seconds from its first "
                              "token to its last, over its tokens after the first.", TPOT_BUCKETS)
        self.prompt_tokens = histogram("hwattn_request_prompt_tokens",
                                       "Prompt tokens of each finished request.", tokens)
        self.generation_tokens = histogram("hwattn_request_generation_tokens",
                                           "Tokens generated for each finished request (all "
                                           "its n completions).", tokens)
        self._histograms = (self.ttft, self.itl, self.e2e, self.queue, self.tpot,
                            self.prompt_tokens, self.generation_tokens)
        self.model_name = model_name
        self._series: _Series | None = None  # created by `set_model_name` or the first timer

    def set_model_name(self, model_name: str) -> None:
        """Label the requests timed from now on with `model_name` (the series of an earlier
        name leave the page): its series are on the page, at zero, from now on, as vLLM's
        are from start-up."""
        if self._series is not None and model_name != self.model_name:
            for h in self._histograms:
                h.remove(self.model_name)
        self.model_name = model_name
        self._series = _Series(*(h.labels(model_name) for h in self._histograms))

    def timer(self, delta: bool = False) -> "RequestTimer":
        """A timer for one request, started now; `delta`: its outputs are "delta" ones."""
        if self._series is None:
            self.set_model_name(self.model_name)
        return RequestTimer(self._series, delta)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class RequestTimer:
    """Observes one request's outputs as they arrive: the first new token gives its time to
    first token, each later one an inter-token latency (a step that brings several tokens,
    as speculative decoding does, spreads its interval over them; each of the n completions
    is a stream of its own, timed from its own previous token, as vLLM times n > 1 requests),
    each completion of 2 tokens or more, once finished, its time per output token (seconds
    from its first token to its last, over its tokens after the first), the first output
    that says when the scheduler first admitted the request its queue time, and the last
    output the end-to-end latency and the request's prompt and generation tokens."""

    def __init__(self, series: _Series, delta: bool = False):
        self.series = series
        self.delta = delta  # outputs hold what is new (output_kind "delta"), not all so far
        self.start = time.perf_counter()
        self.seen: dict[int, tuple[int, float]] = {}  # completion -> (tokens, time of last)
        self.first: dict[int, float] = {}  # completion -> time of its first token
        self.done: set[int] = set()  # completions finished (their TPOT observed)
        self.queued = False  # queue time observed

    def observe(self, output) -> None:
        """`output`: the request's latest `RequestOutput` (with `delta`: what is new in it)."""
        now = time.perf_counter()
        series = self.series
        first = not self.seen
        for o in output.outputs:
            before, last = self.seen.get(o.index, (0, None))
            tokens = before + len(o.token_ids) if self.delta else len(o.token_ids)
            new = tokens - before
            if new > 0:
                if last is not None:  # a completion's first token is no inter-token gap
                    for _ in range(new):
                        series.itl.observe((now - last) / new)
                else:
                    self.first[o.index] = now
                self.seen[o.index] = (tokens, now)
            if o.finish_reason is not None and o.index not in self.done:
                self.done.add(o.index)
                if tokens >= 2:
                    series.tpot.observe((self.seen[o.index][1] - self.first[o.index])
                                        / (tokens - 1))
        if first and self.seen:
            series.ttft.observe(now - self.start)
        scheduled = output.first_scheduled_time
        if not self.queued and scheduled is not None:
            self.queued = True
            series.queue.observe(max(0.0, scheduled - output.arrival_time))
        if output.finished:
            series.e2e.observe(now - self.start)
            series.prompt_tokens.observe(len(output.prompt_token_ids))
            series.generation_tokens.observe(sum(self.seen.get(o.index, (0, None))[0]
                                                 for o in output.outputs))


class _EngineFamilies:
    """The engine's gauges and counters of one scrape, as `prometheus_client` metric
    families (a collector `generate_latest` reads)."""

    def __init__(self, stats: dict, tokens_per_second: float, model_name: str):
        self.stats, self.tokens_per_second, self.model_name = stats, tokens_per_second, model_name

    def collect(self):
        rows = [(name, kind, doc, self.stats[key]) for name, kind, doc, key in ENGINE_ROWS]
        rows.insert(5, ("hwattn_generation_tokens_per_second", "gauge",
                        "Generated tokens per second over the last 10 s.",
                        round(self.tokens_per_second, 3)))
        for name, kind, doc, value in rows:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, doc, labels=LABELS)
            family.add_metric([self.model_name], value)
            yield family


def render(stats: dict, tokens_per_second: float, latency: LatencyMetrics) -> str:
    """The whole /metrics page: engine gauges and counters from `stats`, then the histograms,
    all labelled with `latency`'s model name."""
    engine = _EngineFamilies(stats, tokens_per_second, latency.model_name)
    return generate_latest(engine).decode() + latency.exposition()


def read_metrics(text: str) -> dict[str, float]:
    """A /metrics page's samples by name, those that carry no label but `model_name` (the
    gauges, counters and histograms' `_count` and `_sum`; not the buckets): what a script
    reads the page for. Parsed with `prometheus_client`'s parser, so a page it cannot read
    raises."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if set(s.labels) <= {"model_name"}}
