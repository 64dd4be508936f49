"""A stream that fails after it started still ends with `data: [DONE]` (as vLLM's do), and a
legal answer of millions of log-probabilities is built off the event loop: other requests
and /health are answered meanwhile."""

import asyncio
import gc
import json
import random
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import POISON, poisoned_engine, serving, wait_idle  # noqa: E402

NAME = "tiny-gla-2"
C, H = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    engine = poisoned_engine()
    with serving(build_app(AsyncEngine(engine), NAME)) as base:
        yield base, engine


@pytest.mark.parametrize("path", [C, H], ids=["completions", "chat"])
def test_a_stream_that_fails_midway_still_ends_with_done(server, path):
    base, engine = server
    body = {"model": NAME, "max_tokens": 10, "ignore_eos": True, "stop": [POISON],
            "stream": True}
    body |= {"prompt": "x"} if path == C else {"messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(base + path, json=body, trust_env=False, timeout=30)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "injected" in error["message"]
    wait_idle(engine)
    engine.check_invariants()


def test_a_huge_logprobs_answer_does_not_stall_other_requests(server):
    """128 echoed prompts of 300 tokens with 20 top log-probabilities each: an answer of
    about 17 MB of JSON, seconds of Python to build and encode. /health, polled meanwhile,
    keeps answering (it waited for the whole answer to be built on the event loop)."""
    base, engine = server
    rng = random.Random(0)
    prompts = [[rng.randrange(2048) for _ in range(300)] for _ in range(128)]
    big = {"model": NAME, "prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 20}

    async def main():
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=300) as http:
            task = asyncio.create_task(http.post(C, json=big))
            waits = []
            while not task.done():
                start = time.perf_counter()
                assert (await http.get("/health")).status_code == 200
                waits.append(time.perf_counter() - start)
                await asyncio.sleep(0.05)
            return await task, waits

    r, waits = asyncio.run(main())
    assert r.status_code == 200, r.text[:300]
    choices = r.json()["choices"]
    assert len(choices) == 128 and all(len(c["logprobs"]["tokens"]) == 300 for c in choices)
    assert max(waits) < 1.0, sorted(waits)[-5:]
    wait_idle(engine)


def test_the_server_serves_with_its_start_up_heap_frozen(server):
    """Start-up's objects are in the collector's permanent generation while the app serves
    (`build_app`'s lifespan), so a full collection during a big answer scans only what came
    after."""
    base, engine = server
    assert gc.get_freeze_count() > 0
    assert httpx.get(base + "/health", trust_env=False, timeout=30).status_code == 200
