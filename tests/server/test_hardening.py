"""Fault injection against a live server, one hostile request at a time: every case gets a clear
status and message, a bystander request stays fast, nothing hangs and nothing is lost.

- /tokenize tokenizes off the event loop and is capped like the generation routes.
- One request may not queue more than `max_sequences` sequences, and a bystander is not
  queued behind the ones it does queue (fair scheduling between requests).
- A data-parallel engine's refusals (n > 1) come back as the same 400 streamed or not.
- `null` for a nullable OpenAI field means "not given".
- A failing worker's traceback is logged, never sent: 503 bodies carry a short reason.
- Shutting down waits as long as the engine lets a step take, and says so if its thread
  still runs.
"""

import asyncio
import logging
import statistics
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import create_engine  # noqa: E402
from hwattn.parallel.errors import WorkerError  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import TINY, serving, wait_idle  # noqa: E402

NAME = "tiny-gla-2"
C, H, T = "/v1/completions", "/v1/chat/completions", "/tokenize"
SMALL = {"model": NAME, "prompt": "hello", "max_tokens": 16, "ignore_eos": True, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    # Four slots: the batch a bystander joins costs about what it costs alone on a CPU, so
    # its latency measures the scheduling and not the size of the batch.
    engine = create_engine(**TINY, max_num_seqs=4)
    with serving(build_app(AsyncEngine(engine), NAME)) as base:
        yield base, engine


def client(base, **kw):
    return httpx.AsyncClient(base_url=base, trust_env=False, **{"timeout": 60, **kw})


async def timed(coro):
    start = time.perf_counter()
    out = await coro
    return out, time.perf_counter() - start


def test_tokenize_runs_off_the_event_loop(server, monkeypatch):
    """A slow tokenization (here 2 s, injected) holds its own request only: /health and a
    generation answer meanwhile."""
    base, engine = server
    encode = engine.tokenizer.encode

    def slow(text):
        if text.startswith("slow"):
            time.sleep(2.0)  # a tokenizer busy in native code, as a huge text keeps it
        return encode(text)

    monkeypatch.setattr(engine.tokenizer, "encode", slow)

    async def main():
        async with client(base) as http:
            pending = asyncio.create_task(http.post(T, json={"prompt": "slow text"}))
            await asyncio.sleep(0.2)
            health, health_s = await timed(http.get("/health"))
            gen, gen_s = await timed(http.post(C, json=SMALL))
            assert not pending.done()
            return await pending, health, health_s, gen, gen_s

    tokenized, health, health_s, gen, gen_s = asyncio.run(main())
    assert tokenized.status_code == 200 and tokenized.json()["tokens"] == encode("slow text")
    assert health.status_code == 200 and health_s < 0.5
    assert gen.status_code == 200 and gen_s < 1.5


def test_tokenize_is_capped_like_the_generation_routes(server, monkeypatch):
    base, engine = server
    seen = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode",
                        lambda text: seen.append(len(text)) or encode(text))
    huge = {"prompt": "x" * 15_000_000}
    too_many = {"messages": [{"role": "user", "content": "x"}] * 1025}

    async def main():
        async with client(base, limits=httpx.Limits(max_connections=20)) as http:
            floods = [asyncio.create_task(timed(http.post(T, json=huge))) for _ in range(8)]
            await asyncio.sleep(0.05)
            health, health_s = await timed(http.get("/health"))
            done = await asyncio.gather(*floods)
            return done, health, health_s, [
                await http.post(T, json=too_many),
                await http.post(T, json={"messages": [{"role": "user", "content": "x" * 400}]}),
                await http.post(T, json={"prompt": "x" * 320}),
                await http.post(T, json={"prompt": "x" * 321}),
                await http.post(T, content=b'{"prompt": "' + b"x" * (17 << 20) + b'"}'),
            ]

    floods, health, health_s, (many, long_chat, fits, over, body) = asyncio.run(main())
    assert health.status_code == 200 and health_s < 2.0
    for r, seconds in floods:
        assert r.status_code == 400 and seconds < 10, (r.status_code, seconds)
        err = r.json()["error"]
        assert err["param"] == "prompt" and err["code"] == "context_length_exceeded"
        assert "15000000 characters" in err["message"] and len(r.content) < 1000
    assert many.status_code == 400 and many.json()["error"]["param"] == "messages"
    assert "at most 1024" in many.json()["error"]["message"]
    assert long_chat.status_code == 400 and long_chat.json()["error"]["param"] == "messages"
    assert fits.status_code == 200 and fits.json()["count"] == 320
    assert over.status_code == 400 and over.json()["error"]["param"] == "prompt"
    assert body.status_code == 413
    assert max(seen) <= 320, "a text over the context was tokenized"


def test_one_request_cannot_ask_for_too_many_sequences(server):
    base, _ = server
    body = {"model": NAME, "prompt": ["p"] * 256, "n": 16, "max_tokens": 32}
    r = httpx.post(base + C, json=body, trust_env=False, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "n" and "4096 sequences" in err["message"] and "256" in err["message"]
    r = httpx.post(base + H, json={"model": NAME, "n": 17, "messages": [
        {"role": "user", "content": "hi"}]}, trust_env=False, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_a_bystander_is_not_queued_behind_a_huge_request(server):
    """256 sequences of 32 tokens (the most one request may ask for) take seconds on four
    slots; a 16-token request sent meanwhile is answered within about twice its time alone
    (first come first served, it waited for all 256), and the big request loses nothing."""
    base, engine = server
    big = {"model": NAME, "prompt": [f"big {i}" for i in range(64)], "n": 4, "max_tokens": 32,
           "ignore_eos": True, "temperature": 0}

    async def main():
        async with client(base, timeout=120) as http:
            alone = [(await timed(http.post(C, json=SMALL)))[1] for _ in range(5)]
            want = (await http.post(C, json=SMALL)).json()["choices"][0]["text"]
            task = asyncio.create_task(http.post(C, json=big))
            deadline = time.monotonic() + 30
            while engine.stats()["waiting"] < 200:  # the big request fills the queue
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            beside = []
            for _ in range(5):
                r, seconds = await timed(http.post(C, json=SMALL))
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == want
                beside.append(seconds)
            still_busy = not task.done()
            return alone, beside, still_busy, await task

    alone, beside, still_busy, big_out = asyncio.run(main())
    assert still_busy, "the big request ended before the bystanders were timed"
    assert statistics.median(beside) <= 2 * statistics.median(alone) + 0.05, (alone, beside)
    assert big_out.status_code == 200
    choices = big_out.json()["choices"]
    assert sorted(c["index"] for c in choices) == list(range(256))
    assert all(c["finish_reason"] == "length" for c in choices)
    assert big_out.json()["usage"]["completion_tokens"] == 256 * 32
    wait_idle(engine)
    engine.check_invariants()


NULLABLE = {  # OpenAI marks these nullable: null must mean "not given"
    C: ["n", "echo", "stream", "stream_options", "presence_penalty", "frequency_penalty",
        "logprobs", "max_tokens", "temperature", "top_p", "seed", "stop", "best_of", "user",
        "suffix", "logit_bias", "top_k", "min_p", "repetition_penalty", "min_tokens",
        "stop_token_ids", "ignore_eos", "include_stop_str_in_output", "prompt_logprobs"],
    H: ["n", "stream", "stream_options", "presence_penalty", "frequency_penalty", "logprobs",
        "top_logprobs", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
        "stop", "user", "logit_bias", "tools", "tool_choice", "add_generation_prompt"],
}


@pytest.mark.parametrize("path", [C, H], ids=["completions", "chat"])
def test_null_means_not_given(server, path):
    base, engine = server
    body = {"model": NAME, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    body |= {"prompt": "hi"} if path == C else {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        want = http.post(path, json=body).json()["choices"]
        for field in NULLABLE[path]:
            r = http.post(path, json={**body, field: None})
            assert r.status_code == 200, (field, r.text)
            if field not in ("max_tokens", "temperature", "ignore_eos"):
                assert r.json()["choices"] == want, field
        r = http.post(T, json={"prompt": "hi", "add_special_tokens": None,
                               "add_generation_prompt": None, "model": None})
        assert r.status_code == 200, r.text
        r = http.post(path, json={**body, "stream": True,
                                  "stream_options": {"include_usage": None}})
        assert r.status_code == 200 and "[DONE]" in r.text
    wait_idle(engine)


def test_a_dead_worker_is_told_in_a_short_reason_and_logged_in_full(caplog):
    """The engine's step fails with a worker's traceback (paths, a port): clients get 503 and
    a one-line reason, /health says the same, the log has the traceback."""
    engine = create_engine(**TINY)
    secret = ("tensor-parallel rank 1 (pid 4242) failed during step:\n"
              "Traceback (most recent call last):\n"
              '  File "/home/secret/site-packages/hwattn/x.py", line 3, in step\n'
              "RuntimeError: gloo: connection to 127.0.0.1:29513 closed")
    real_step = engine.step
    calls = []

    def step():
        calls.append(1)
        if len(calls) > 2:
            raise WorkerError(secret, rank=1, phase="step")
        return real_step()

    engine.step = step
    caplog.set_level(logging.ERROR, logger="hwattn.server.async_engine")
    with serving(build_app(AsyncEngine(engine), NAME)) as base, \
            httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        first = http.post(C, json={**SMALL, "max_tokens": 50})
        streamed = http.post(C, json={**SMALL, "stream": True})
        health = http.get("/health")
    assert first.status_code == 503, first.text
    for text in (first.text, streamed.text, health.text):
        assert "rank 1" in text
        for leak in ("Traceback", "/home/secret", "29513", "4242", "x.py"):
            assert leak not in text, (leak, text)
    assert streamed.status_code == 503
    assert health.status_code == 503 and health.json()["message"] == \
        "the engine is down: tensor-parallel rank 1 failed during step"
    assert "/home/secret" in caplog.text  # the operator still sees everything


@pytest.fixture(scope="module")
def dp_server():
    """A data-parallel engine of two replicas run in this process (as the router's tests do)."""
    from hwattn.data.tokenizer import load_tokenizer
    from hwattn.engine.data_parallel import DataParallelEngine
    from hwattn.engine.loader import model_config
    from tests.parallel.test_data_parallel import InProcessReplicas

    spec = dict(TINY, dtype="fp32")
    config = model_config(spec["model"], spec["attention"], spec["model_overrides"])
    dp = DataParallelEngine(2, spec, config, load_tokenizer(None, config.vocab_size),
                            workers=InProcessReplicas(2))
    with serving(build_app(AsyncEngine(dp), NAME)) as base:
        yield base, dp


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_data_parallel_answers_name_the_stop_that_ended_them(dp_server, stream):
    """Observed: through data-parallel replicas every choice's `stop_reason` was null (the
    replicas did not send it on), where one engine names the stop string or token id."""
    import json

    base, dp = dp_server
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        for extra, want in (({"stop": ["FF"]}, "FF"), ({"stop_token_ids": [70]}, 70)):
            body = {"model": NAME, "prompt": "ABCDEF", "max_tokens": 8, "temperature": 0,
                    "stream": stream, **extra}
            response = http.post(C, json=body)
            assert response.status_code == 200, response.text
            if stream:
                chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: {")]
                last = [c for ch in chunks for c in ch["choices"] if c["finish_reason"]][-1]
            else:
                last = response.json()["choices"][0]
            assert (last["finish_reason"], last["stop_reason"]) == ("stop", want), last
    wait_idle(dp)


@pytest.mark.parametrize("path, extra, param", [
    (C, {"n": 2}, "n"), (H, {"n": 2}, "n"), (C, {"logprobs": 1}, "logprobs"),
    (H, {"logprobs": True}, "logprobs"), (C, {"prompt_logprobs": 1}, "prompt_logprobs"),
], ids=["completions-n", "chat-n", "completions-logprobs", "chat-logprobs", "prompt_logprobs"])
def test_data_parallel_refusals_are_the_same_400_streamed_or_not(dp_server, path, extra, param):
    base, dp = dp_server
    body = {"model": NAME, "max_tokens": 3, **extra}
    body |= {"prompt": "hi"} if path == C else {"messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        plain = http.post(path, json=body)
        if param == "prompt_logprobs":  # not streamable anywhere: the protocol says so first
            assert plain.status_code == 400 and plain.json()["error"]["param"] == param
            return
        streamed = http.post(path, json={**body, "stream": True})
        assert plain.status_code == streamed.status_code == 400, (plain.text, streamed.text)
        assert plain.json() == streamed.json()
        assert plain.json()["error"]["param"] == param
        assert "data_parallel_size" in plain.json()["error"]["message"]
        ok = http.post(path, json={**body, **{k: None for k in extra}, "stream": True})
        assert ok.status_code == 200 and "[DONE]" in ok.text
    deadline = time.monotonic() + 10
    while dp.has_unfinished():
        assert time.monotonic() < deadline
        time.sleep(0.02)



class SlowEngine:
    """Stands in for an engine whose step runs long: `step` takes `step_s` seconds (None:
    until `release` is set). `runner.step_timeout` is the engine's own bound on a step (a
    tensor-parallel runner's), or absent with step_timeout None."""

    def __init__(self, step_timeout: float | None, step_s: float | None = None):
        if step_timeout is not None:
            self.runner = type("Runner", (), {"step_timeout": step_timeout})()
        self.step_s = step_s
        self.stepping = threading.Event()
        self.release = threading.Event()

    def stats(self) -> dict:
        return {"generation_tokens": 0}

    def has_unfinished(self) -> bool:
        return True

    def unfinished_request_ids(self) -> list:
        return []

    def step(self) -> list:
        self.stepping.set()
        self.release.wait(self.step_s)
        return []


def _stopping(engine: SlowEngine):
    """An `AsyncEngine` over `engine`, started and inside a step."""
    loop = AsyncEngine(engine)
    loop.start()
    assert engine.stepping.wait(10)
    return loop


def test_shutdown_says_so_when_the_engine_thread_outlives_its_step_timeout(monkeypatch, caplog):
    """Observed: `AsyncEngine.shutdown` gave its thread a fixed 30 s, whatever the engine's
    own step timeout (a tensor-parallel step may take HWATTN_STEP_TIMEOUT_S, 600 s by
    default), then returned in silence, the thread still inside the engine (which the caller
    then shut down under it). Now it waits for the step timeout plus a grace (by then the
    engine has failed the step itself), and if the thread still runs it says so: an error in
    the log, False, and a later call waits again."""
    import hwattn.server.async_engine as async_engine

    monkeypatch.setattr(async_engine, "STOP_GRACE_S", 0.5)
    caplog.set_level(logging.ERROR, logger="hwattn.server.async_engine")
    stuck = SlowEngine(step_timeout=1.0)  # a step past its timeout, which the engine misses
    loop = _stopping(stuck)
    t0 = time.monotonic()
    assert loop.shutdown() is False
    assert 1.4 < time.monotonic() - t0 < 5.0
    thread = loop._thread
    assert thread is not None and thread.is_alive()
    assert "the engine thread is still running after 1.5 s" in caplog.text
    assert "step timeout 1 s" in caplog.text
    stuck.release.set()  # the step ends: a second call finds the thread gone
    assert loop.shutdown() is True and not thread.is_alive()


def test_shutdown_waits_out_a_step_as_long_as_the_engine_allows(monkeypatch):
    import hwattn.server.async_engine as async_engine

    monkeypatch.setattr(async_engine, "STOP_GRACE_S", 0.5)
    monkeypatch.setattr(async_engine, "STOP_WAIT_S", 0.5)  # what an engine without one gets
    slow = SlowEngine(step_timeout=4.0, step_s=2.0)  # longer than that, within its own timeout
    loop = _stopping(slow)
    t0 = time.monotonic()
    assert loop.shutdown() is True
    assert 1.5 < time.monotonic() - t0 < 4.0 and loop._thread is None


def test_shutdown_of_an_engine_without_a_step_timeout_waits_the_fixed_bound(monkeypatch, caplog):
    import hwattn.server.async_engine as async_engine

    monkeypatch.setattr(async_engine, "STOP_WAIT_S", 1.0)
    caplog.set_level(logging.ERROR, logger="hwattn.server.async_engine")
    stuck = SlowEngine(step_timeout=None)
    loop = _stopping(stuck)
    t0 = time.monotonic()
    assert loop.shutdown() is False and 0.9 < time.monotonic() - t0 < 4.0
    assert "the engine thread is still running after 1 s" in caplog.text
    stuck.release.set()
    assert loop.shutdown(timeout=10) is True


def test_callers_waiting_when_the_engine_stops_hear_so():
    """Observed: after `AsyncEngine.shutdown` a `generate` still waiting for outputs waited
    for ever, and so did one called afterwards: nothing would ever answer them. Now each gets
    EngineDeadError (the server's 503), and `start` serves again."""
    from hwattn.engine import SamplingParams
    from hwattn.server.async_engine import EngineDeadError

    class Holding(SlowEngine):  # takes requests and never finishes them
        def add_request(self, *args, **kwargs):
            pass

        def abort_request(self, request_id):
            pass

    loop = AsyncEngine(Holding(step_timeout=None, step_s=0.01))
    loop.start()

    async def first_output(request_id):
        async for out in loop.generate([1, 2], SamplingParams(), request_id):
            return out

    async def scenario():
        waiting = asyncio.create_task(first_output("a"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert loop.shutdown() is True
        with pytest.raises(EngineDeadError, match="shutting down"):
            await asyncio.wait_for(waiting, 5)
        with pytest.raises(EngineDeadError, match="shutting down"):
            await asyncio.wait_for(first_output("b"), 5)
        loop.start()
        late = asyncio.create_task(first_output("c"))
        await asyncio.sleep(0.2)
        assert not late.done()  # taken again (and held, as this engine holds everything)
        assert loop.shutdown() is True
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(late, 5)

    asyncio.run(scenario())
