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
    lengths = prompt_lengths(100, 50, 0.5, seed=1)
    assert lengths == prompt_lengths(100, 50, 0.5, seed=1)
    assert min(lengths) >= 25 and max(lengths) <= 75 and len(set(lengths)) > 10
