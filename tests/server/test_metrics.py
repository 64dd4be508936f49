"""The latency histograms' per-request timer and the engine's token counters behind /metrics."""

from __future__ import annotations

import torch

from hwattn.engine.sequence import CompletionOutput, RequestOutput
from hwattn.server import metrics as metrics_mod
from hwattn.server.metrics import LatencyMetrics
from tests.server.conftest import TINY


def _output(counts: list[int], finished: bool = False) -> RequestOutput:
    outs = [CompletionOutput(index=i, text="", token_ids=list(range(c)),
                             finish_reason="length" if finished else None)
            for i, c in enumerate(counts)]
    return RequestOutput(request_id="r", prompt=None, prompt_token_ids=[1], outputs=outs)


def _histogram(metrics: LatencyMetrics, name: str) -> tuple[float, float]:
    """(count, sum) of a histogram."""
    text = metrics.exposition()
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    return values[f"{name}_count"], values[f"{name}_sum"]


def _timed(monkeypatch, steps) -> LatencyMetrics:
    """Feed one request's outputs [(time, counts per completion, finished)] to a timer."""
    now = [0.0]
    monkeypatch.setattr(metrics_mod.time, "perf_counter", lambda: now[0])
    latency = LatencyMetrics()
    timer = latency.timer()
    for t, counts, finished in steps:
        now[0] = t
        timer.observe(_output(counts, finished))
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


def test_prompt_tokens_count_each_prompt_once_through_preemptions():
    """hwattn_prompt_tokens_total: a preempted sequence is recomputed from its prompt and its
    generated tokens; neither is a new prompt token."""
    from hwattn.engine import SamplingParams, create_engine

    engine = create_engine(**{**TINY, "page_size": 4, "memory_budget": None, "num_pages": 41,
                              "max_num_seqs": 8, "max_num_batched_tokens": 16,
                              "max_model_len": 128, "enable_prefix_caching": False})
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 200, (int(torch.randint(8, 33, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(10)]
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
