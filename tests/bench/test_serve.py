"""`hwattn bench serve`: the load generator in-process and over HTTP, loopback only."""

import asyncio
import json

import pytest

from hwattn.cli import main
from hwattn.bench.serve import check_loopback, prompt_lengths, run_load


@pytest.mark.parametrize("mode", [[], ["--http"]])
def test_bench_serve_in_process(capsys, mode):
    pytest.importorskip("httpx")
    if mode:
        pytest.importorskip("uvicorn")
    rc = main(["bench", "serve", "tiny", "--attention", "gta-4", "--num-prompts", "6",
               "--prompt-len", "16", "--output-len", "5", "--max-concurrency", "3",
               "--page-size", "8", "--cpu-threads", "1", "--memory-budget", "2e6",
               "--max-seq-len", "128", "--json", *mode])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["completed"] == 6 and doc["failed"] == 0
    assert doc["output_tokens"] == 30
    # The settings and the device are in the document.
    assert doc["device"] == "cpu" and doc["output_len"] == 5 and doc["prompt_len"] == 16
    assert doc["seed"] == 0 and doc["num_prompts"] == 6 and doc["prompt_spread"] == 0.5
    assert doc["warmup_requests"] == 2 and doc["max_duration_s"] == 600.0
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        assert doc[key]["median"] > 0 and doc[key]["p99"] >= doc[key]["median"]


def test_only_loopback_targets_and_bounds():
    for ok in ("http://127.0.0.1:8000", "http://localhost:1/v1", "http://[::1]:9"):
        check_loopback(ok)
    for bad in ("http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"):
        with pytest.raises(ValueError, match="loopback"):
            check_loopback(bad)
    with pytest.raises(ValueError, match="prompts"):
        asyncio.run(run_load(None, [], 4, None, None))
    for rate in (0.0, -1.0, float("nan")):  # NaN was taken: every request sent at once
        with pytest.raises(ValueError, match="request_rate"):
            asyncio.run(run_load(None, [[1]], 4, None, rate))
    lengths = prompt_lengths(100, 50, 0.5, seed=1)
    assert lengths == prompt_lengths(100, 50, 0.5, seed=1)
    assert min(lengths) >= 25 and max(lengths) <= 75 and len(set(lengths)) > 10


class _Instant:
    """A target answering every request at once with one token; records send times."""

    def __init__(self):
        self.sent, self.done = [], []

    async def setup(self):
        pass

    async def request(self, prompt, max_tokens, rec):
        import time

        self.sent.append(time.perf_counter())
        rec.first = time.perf_counter()
        rec.chunk_times.append(rec.first)
        rec.output_tokens = 1
        self.done.append(time.perf_counter())

    async def close(self):
        pass


def test_poisson_run_is_timed_from_first_send_to_last_completion():
    # Seed 0 at 5 req/s draws gaps of 0.37 s and 0.28 s: the second is after the last
    # request and must not be in the throughput's window.
    target = _Instant()
    doc = asyncio.run(run_load(target, [[1, 2]] * 2, 1, None, 5.0, seed=0))
    assert doc["completed"] == 2
    window = target.done[-1] - target.sent[0]
    assert 0.3 < window < doc["wall_s"] + 1e-3 and doc["wall_s"] < window + 0.1, \
        (doc["wall_s"], window)
