"""What /metrics serves (Prometheus text format): the engine's gauges and counters, and
latency histograms kept with `prometheus_client`: time to first token, inter-token latency
and end-to-end request latency, each measured from the moment the server hands the request
to the engine."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Histogram, generate_latest

# Seconds: from a fast decode step on a GPU to a long CPU prefill.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)

ENGINE_ROWS = (  # (name, kind, help, stats key)
    ("hwattn_requests_running", "gauge", "Requests being decoded or prefilled.", "running"),
    ("hwattn_requests_waiting", "gauge", "Requests queued for admission.", "waiting"),
    ("hwattn_kv_pages_used", "gauge", "KV-cache pages held by requests.", "pages_used"),
    ("hwattn_kv_pages_total", "gauge", "KV-cache pages in the pool.", "pages_total"),
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


class LatencyMetrics:
    """The three latency histograms, in a registry of their own (so that several servers in
    one process never share them)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.ttft = Histogram("hwattn_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("hwattn_inter_token_latency_seconds",
                             "Seconds between consecutive generated tokens of a request.",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("hwattn_e2e_request_latency_seconds",
                             "Seconds from a request's arrival to its last output.",
                             buckets=E2E_BUCKETS, registry=self.registry)

    def timer(self) -> "RequestTimer":
        """A timer for one request, started now."""
        return RequestTimer(self)

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


class RequestTimer:
    """Observes one request's outputs as they arrive: the first new token gives its time to
    first token, each later one an inter-token latency (a step that brings several tokens,
    as speculative decoding does, spreads its interval over them; each of the n completions
    is a stream of its own, timed from its own previous token, as vLLM times n > 1 requests),
    the last output the end-to-end latency."""

    def __init__(self, metrics: LatencyMetrics):
        self.metrics = metrics
        self.start = time.perf_counter()
        self.seen: dict[int, tuple[int, float]] = {}  # completion -> (tokens, time of last)

    def observe(self, output) -> None:
        """`output`: the request's latest `RequestOutput`."""
        now = time.perf_counter()
        first = not self.seen
        for o in output.outputs:
            tokens = len(o.token_ids)
            before, last = self.seen.get(o.index, (0, None))
            new = tokens - before
            if new <= 0:
                continue
            if last is not None:  # a completion's first token is no inter-token gap
                for _ in range(new):
                    self.metrics.itl.observe((now - last) / new)
            self.seen[o.index] = (tokens, now)
        if first and self.seen:
            self.metrics.ttft.observe(now - self.start)
        if output.finished:
            self.metrics.e2e.observe(now - self.start)


def render(stats: dict, tokens_per_second: float, latency: LatencyMetrics) -> str:
    """The whole /metrics page: engine gauges and counters from `stats`, then the histograms."""
    lines = []
    rows = [(name, kind, doc, stats[key]) for name, kind, doc, key in ENGINE_ROWS]
    rows.insert(5, ("hwattn_generation_tokens_per_second", "gauge",
                    "Generated tokens per second over the last 10 s.", round(tokens_per_second, 3)))
    for name, kind, doc, value in rows:
        lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n" + latency.exposition()
