"""The latency histograms' per-request timer and the engine's token counters behind /metrics."""

from __future__ import annotations

import torch

from hwattn.engine.sequence import CompletionOutput, RequestOutput
from hwattn.server import metrics as metrics_mod
from hwattn.server.metrics import LatencyMetrics, read_metrics, render, token_buckets
from tests.server.conftest import TINY


def _output(counts: list[int], finished=False, prompt=(1,), arrival: float = 0.0,
            scheduled: float | None = None) -> RequestOutput:
    """finished: all completions (a bool) or each one (a list of bools)."""
    done = finished if isinstance(finished, list) else [finished] * len(counts)
    outs = [CompletionOutput(index=i, text="", token_ids=list(range(c)),
                             finish_reason="length" if d else None)
            for i, (c, d) in enumerate(zip(counts, done))]
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=list(prompt), outputs=outs,
                         arrival_time=arrival, first_scheduled_time=scheduled)


def _histogram(metrics: LatencyMetrics, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram."""
    values = read_metrics(metrics.exposition())
    return values[f"{name}_count"], values[f"{name}_sum"]


def _timed(monkeypatch, steps, **output) -> LatencyMetrics:
    """Feed one request's outputs [(time, counts per completion, finished)] to a timer."""
    now = [0.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now[0])
    latency = LatencyMetrics()
    timer = latency.timer()
    for t, counts, finished in steps:
        now[0] = t
        timer.observe(_output(counts, finished, **output))
    return latency


def test_inter_token_latency_is_per_completion_with_n_choices(monkeypatch):
    # n = 2: both completions get a token every 0.1 s. Each completion's tokens are 0.1 s
    # apart; the request's two streams are not one stream of tokens 0.05 s apart.
    latency = _timed(monkeypatch, [(1.0, [1, 1], False), (1.1, [2, 2], False),
                                   (1.2, [3, 3], True)])
    count, total = _histogram(latency, "hwattn_inter_token_latency_seconds")
    assert count == 4 and abs(total / count - 0.1) < 1e-9, (count, total)
    assert _histogram(latency, "hwattn_time_to_first_token_seconds") == (1, 1.0)
    assert _histogram(latency, "hwattn_e2e_request_latency_seconds") == (1, 1.2)


def test_inter_token_latency_spreads_a_multi_token_step_over_its_tokens(monkeypatch):
    # A speculative step bringing 3 tokens of one completion in 0.3 s: 3 gaps of 0.1 s.
    latency = _timed(monkeypatch, [(0.5, [1], False), (0.8, [4], True)])
    count, total = _histogram(latency, "hwattn_inter_token_latency_seconds")
    assert count == 3 and abs(total - 0.3) < 1e-9
    # Completions advancing unevenly (one took 3 tokens, the other 1) keep their own gaps.
    latency = _timed(monkeypatch, [(0.5, [1, 1], False), (0.8, [4, 2], True)])
    count, total = _histogram(latency, "hwattn_inter_token_latency_seconds")
    assert count == 4 and abs(total - (0.3 + 0.3)) < 1e-9, (count, total)


def test_time_per_output_token_is_per_completion_from_its_first_token_to_its_last(
        monkeypatch):
    # n = 2: completion 0 has 3 tokens, the first at 1.0 and the last at 1.3: (1.3 - 1.0) / 2;
    # completion 1 ends at 1.1 with a single token: no time per output token.
    latency = _timed(monkeypatch, [(1.0, [1, 1], False), (1.1, [2, 1], [False, True]),
                                   (1.3, [3, 1], True)])
    count, total = _histogram(latency, "hwattn_request_time_per_output_token_seconds")
    assert count == 1 and abs(total - 0.15) < 1e-9, (count, total)
    # Completions ending at different steps are each observed once, when they end: the one
    # that ended at 1.2 is not observed again when the other ends at 1.5.
    latency = _timed(monkeypatch, [(1.0, [1, 1], False), (1.1, [1, 2], False),
                                   (1.2, [3, 2], [True, False]), (1.5, [3, 5], True)],
                     prompt=[4, 5, 6])
    count, total = _histogram(latency, "hwattn_request_time_per_output_token_seconds")
    assert count == 2 and abs(total - (0.2 / 2 + 0.5 / 4)) < 1e-9, (count, total)
    # Prompt and generation tokens: once per request, when it has finished (all n).
    assert _histogram(latency, "hwattn_request_prompt_tokens") == (1, 3)
    assert _histogram(latency, "hwattn_request_generation_tokens") == (1, 3 + 5)


def test_a_timer_of_delta_outputs_observes_what_cumulative_ones_make(monkeypatch):
    """The server reads "delta" outputs (each completion's new tokens alone, a finished one
    listed again with none): every histogram is the one its cumulative outputs make."""
    steps = [(1.0, [1, 0], False), (1.1, [2, 3], [False, True]), (1.3, [5, 3], False),
             (1.4, [6, 3], True)]
    def values(latency):  # every sample, buckets included, but the series' creation times
        return [line for line in latency.exposition().splitlines() if "_created" not in line]

    cumulative = values(_timed(monkeypatch, steps, prompt=[4, 5]))
    now = [0.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now[0])
    latency = LatencyMetrics()
    timer = latency.timer(delta=True)
    before = [0, 0]
    for t, counts, finished in steps:
        now[0] = t
        timer.observe(_output([c - b for c, b in zip(counts, before)], finished, prompt=[4, 5]))
        before = counts
    assert values(latency) == cumulative and len(cumulative) > 50
    assert _histogram(latency, "hwattn_request_generation_tokens") == (1, 9)


def test_queue_time_is_observed_once_from_the_engines_times():
    # Not yet admitted in the first output; admitted 0.25 s after arrival (engine's clock)
    # in every later one: one observation of 0.25.
    latency = LatencyMetrics()
    timer = latency.timer()
    timer.observe(_output([0], arrival=10.0))
    for counts, finished in (([1], False), ([2], False), ([3], True)):
        timer.observe(_output(counts, finished, arrival=10.0, scheduled=10.25))
    assert _histogram(latency, "hwattn_request_queue_time_seconds") == (1, 0.25)
    # A request never admitted (aborted while waiting) has no queue time.
    latency = LatencyMetrics()
    latency.timer().observe(_output([0], True, arrival=10.0))
    assert _histogram(latency, "hwattn_request_queue_time_seconds") == (0, 0)


def test_request_output_constructor_stays_positional_compatible():
    """`first_scheduled_time` is appended with a default: callers passing the earlier fields
    by position (as data_parallel and the engine did) are unchanged."""
    out = RequestOutput("r", None, [1], [], None, 0, 1.0, 2.0, 3.0, "e", True)
    assert (out.arrival_time, out.first_token_time, out.finish_time, out.error,
            out.worker_failed, out.first_scheduled_time) == (1.0, 2.0, 3.0, "e", True, None)


def test_every_sample_is_labelled_with_the_model_name_and_the_page_parses():
    from prometheus_client.parser import text_string_to_metric_families

    stats = dict(running=1, waiting=2, pages_used=3, pages_total=40, page_size=8,
                 prompt_tokens=5, generation_tokens=6, finished=7, aborted=8, failed=9,
                 preemptions=10, prefix_hit_pages=11, draft_tokens=12, accepted_tokens=13)
    latency = LatencyMetrics(max_model_len=300)
    latency.timer()  # series under the default name, replaced by the served one
    latency.set_model_name("my-model")
    latency.timer().observe(_output([2], True, scheduled=0.0))
    families = {f.name: f for f in text_string_to_metric_families(render(stats, 1.5, latency))}
    samples = [s for f in families.values() for s in f.samples]
    assert samples and all(s.labels.get("model_name") == "my-model" for s in samples)
    assert families["hwattn_kv_pages_capacity"].type == "gauge"
    assert "hwattn_kv_pages_total" not in {s.name for s in samples}
    assert families["hwattn_preemptions"].type == "counter"
    for name in ("hwattn_request_queue_time_seconds", "hwattn_request_prompt_tokens",
                 "hwattn_request_generation_tokens",
                 "hwattn_request_time_per_output_token_seconds"):
        assert families[name].type == "histogram", name
    values = read_metrics(render(stats, 1.5, latency))
    assert values["hwattn_kv_pages_capacity"] == 40 and values["hwattn_requests_failed_total"] == 9
    assert values["hwattn_request_generation_tokens_count"] == 1
    assert token_buckets(300) == (1, 2, 5, 10, 20, 50, 100, 200)


def _preempting_engine():
    from hwattn.engine import create_engine

    return create_engine(**{**TINY, "page_size": 4, "memory_budget": None, "num_pages": 41,
                            "max_num_seqs": 8, "max_num_batched_tokens": 16,
                            "max_model_len": 128, "enable_prefix_caching": False})


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (int(torch.randint(8, 33, (1,), generator=g)),),
                          generator=g).tolist() for _ in range(10)]


def test_prompt_tokens_count_each_prompt_once_through_preemptions():
    """hwattn_prompt_tokens_total: a preempted sequence is recomputed from its prompt and its
    generated tokens; neither is a new prompt token."""
    from hwattn.engine import SamplingParams

    engine = _preempting_engine()
    prompts = _prompts()
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, detokenize=False)
    for p in prompts:
        engine.add_request(p, params)
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    engine.shutdown()
    assert stats["preemptions"] > 0, stats
    assert stats["generation_tokens"] == 20 * len(prompts)
    assert stats["prompt_tokens"] == sum(len(p) for p in prompts), stats


def test_first_scheduled_time_is_the_first_admission_and_survives_preemption():
    """The queue time's end: set when the scheduler first admits a request, between its
    arrival and its first token, and kept when a preempted request is admitted again."""
    from hwattn.engine import SamplingParams

    engine = _preempting_engine()
    scheduler = engine.scheduler
    at_preemption, preempt = {}, scheduler._preempt

    def recording(seq):
        assert seq.first_scheduled_time is not None  # it was running, so admitted
        at_preemption.setdefault(seq.request_id, seq.first_scheduled_time)
        preempt(seq)

    scheduler._preempt = recording
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, detokenize=False)
    ids = [engine.add_request(p, params) for p in _prompts()]
    finals, first_seen = {}, {}
    while engine.has_unfinished():
        for out in engine.step():
            first_seen.setdefault(out.request_id, out.first_scheduled_time)
            if out.finished:
                finals[out.request_id] = out
    engine.shutdown()
    assert at_preemption, "the pool is small enough to preempt"
    for rid in ids:
        out = finals[rid]
        assert out.arrival_time <= out.first_scheduled_time <= out.first_token_time, rid
        assert first_seen[rid] == out.first_scheduled_time  # one value all along
    for rid, t in at_preemption.items():
        assert finals[rid].first_scheduled_time == t, rid
