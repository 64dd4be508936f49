"""Fault injection: a flood of concurrent requests against a live server, good ones (streamed and
not, completions and chat), bad ones, clients that hang up, and requests made to fail inside the
engine. Every good request must get exactly what it gets alone, every bad one its 4xx, every
poisoned one its own error, and afterwards no request may run or wait and no page may be held."""

import asyncio
import json
import random

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import SamplingParams  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.async_engine import EngineError  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.server.metrics import read_metrics  # noqa: E402
from tests.server.conftest import POISON, poisoned_engine, serving, wait_idle  # noqa: E402

NAME = "tiny-gla-2"
C, H = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def server():
    engine = poisoned_engine(max_num_seqs=6)  # few slots: requests queue and interleave
    async_engine = AsyncEngine(engine)
    with serving(build_app(async_engine, NAME)) as base:
        yield base, engine, async_engine


def goods():
    """(path, body) of requests that must succeed, with outputs fixed by greedy or a seed."""
    rng = random.Random(0)
    out = []
    for i in range(24):
        prompt = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 30)))
        sampling = {"temperature": 0} if i % 2 else {"temperature": 0.8, "top_p": 0.9, "seed": i}
        n = rng.randint(1, 12)
        if i % 4 < 2:
            out.append((C, {"model": NAME, "prompt": prompt, "max_tokens": n, "ignore_eos": True,
                            "stream": i % 3 == 0, **sampling}))
        else:
            out.append((H, {"model": NAME, "max_tokens": n, "stream": i % 3 == 0, **sampling,
                            "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": prompt}]}))
    out.append((C, {"model": NAME, "prompt": ["ab", "cde"], "max_tokens": 5, "temperature": 0}))
    out.append((C, {"model": NAME, "prompt": "stream with usage", "max_tokens": 7, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}}))
    return out


BADS = [  # (status, path, body)
    (400, C, {"model": NAME, "prompt": "x", "top_k": 1 << 63}),
    (400, C, b'{"model": "tiny-gla-2", "prompt": "x", "temperature": Infinity}'),
    (400, C, b"[" * 50_000 + b"]" * 50_000),
    (400, C, b"{not json"),
    (400, C, {"model": NAME, "prompt": "x", "stream": True, "stream_options": "yes"}),
    (400, C, {"model": NAME, "prompt": "x", "min_p": 1.5}),
    (400, C, {"model": NAME, "prompt": "x", "logit_bias": {"5": 1e9}}),
    (400, C, {"model": NAME, "prompt": "x", "stop": ["s"] * 10_000}),
    (400, C, {"model": NAME, "prompt": "x" * 400}),
    (400, C, {"model": NAME, "prompt": [1, 1 << 40]}),
    (400, H, {"model": NAME, "messages": [{"role": "hacker", "content": "x"}]}),
    (400, H, {"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    (400, H, {"model": NAME, "messages": [{"role": "user", "content": "x" * 500}]}),
    (400, H, b'{"model": "tiny-gla-2", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    (404, C, {"model": "other", "prompt": "x"}),
    (413, C, b'{"model": "tiny-gla-2", "prompt": "' + b"x" * (17 << 20) + b'"}'),
]


def encode(body) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def call(http, path, body):
    """('json', status, doc) or ('stream', status, text, finish_reason, usage, error)."""
    data = encode(body)
    if not (isinstance(body, dict) and body.get("stream")):
        r = await http.post(path, content=data, headers={"content-type": "application/json"})
        return "json", r.status_code, r.json()
    text, reason, usage, error = "", None, None, None
    async with http.stream("POST", path, content=data,
                           headers={"content-type": "application/json"}) as r:
        if r.status_code != 200:
            await r.aread()
            return "json", r.status_code, r.json()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            doc = json.loads(line[6:])
            if "error" in doc:
                error = doc["error"]
                continue
            for c in doc["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
                reason = c["finish_reason"] or reason
            usage = doc.get("usage") or usage
    return "stream", r.status_code, text, reason, usage, error


def result(kind, *rest):
    """What a good request produced, comparable between a lone run and the flood."""
    if kind == "stream":
        status, text, reason, usage, error = rest
        assert status == 200 and error is None, error
        return text, reason, usage and usage["completion_tokens"]
    status, doc = rest
    assert status == 200, doc
    texts = [c.get("text", (c.get("message") or {}).get("content")) for c in doc["choices"]]
    return texts, [c["finish_reason"] for c in doc["choices"]], doc["usage"]["completion_tokens"]


async def hang_up_streaming(http):
    body = {"model": NAME, "prompt": "going away", "max_tokens": 300, "ignore_eos": True,
            "stream": True}
    async with http.stream("POST", C, json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                return "hung up"


async def hang_up_waiting(http):
    body = {"model": NAME, "prompt": "impatient", "max_tokens": 300, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        await http.post(C, json=body, timeout=httpx.Timeout(60, read=0.2))
    return "hung up"


async def poisoned(http, stream):
    body = {"model": NAME, "prompt": "poison", "max_tokens": 20, "ignore_eos": True,
            "stop": [POISON], "stream": stream}
    out = await call(http, C, body)
    if stream:
        _, status, _, reason, _, error = out
        assert status == 200 and reason is None and error["type"] == "server_error"
        assert "injected" in error["message"]
    else:
        _, status, doc = out
        assert status == 500 and doc["error"]["type"] == "server_error"
        assert "injected" in doc["error"]["message"]
    return "failed alone"


def test_a_flood_of_good_bad_hung_up_and_poisoned_requests(server):
    base, engine, _ = server
    requests = goods()

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60,
                                     limits=limits) as http:
            alone = [result(*await call(http, p, b)) for p, b in requests]
            before = engine.stats()
            jobs = [call(http, p, b) for p, b in requests]
            jobs += [call(http, p, b) for _, p, b in BADS]
            jobs += [hang_up_streaming(http) for _ in range(3)]
            jobs += [hang_up_waiting(http) for _ in range(3)]
            jobs += [poisoned(http, stream) for stream in (False, True, False, True)]
            order = list(range(len(jobs)))
            random.Random(1).shuffle(order)
            done = await asyncio.gather(*(jobs[i] for i in order))
            outs = [None] * len(jobs)
            for i, out in zip(order, done):
                outs[i] = out
            return alone, before, outs

    alone, before, outs = asyncio.run(main())
    n = len(requests)
    assert [result(*o) for o in outs[:n]] == alone
    for (status, _, _), out in zip(BADS, outs[n:n + len(BADS)]):
        assert out[1] == status, out
        assert out[2]["error"]["message"] and out[2]["error"]["type"] == "invalid_request_error"
    assert outs[n + len(BADS):] == ["hung up"] * 6 + ["failed alone"] * 4

    after = wait_idle(engine)
    engine.check_invariants()
    delta = {k: after[k] - before[k] for k in ("finished", "aborted", "failed")}
    accepted = n + 1 + 6 + 4  # the two-prompt request is two engine requests
    assert delta["failed"] == 4
    assert sum(delta.values()) == accepted, delta  # every accepted request ended exactly once
    assert 1 <= delta["aborted"] <= 6
    metrics = read_metrics(httpx.get(f"{base}/metrics", trust_env=False).text)
    assert metrics["hwattn_requests_running"] == 0 and metrics["hwattn_kv_pages_used"] == 0
    assert metrics["hwattn_requests_failed_total"] == after["failed"]


class Hostile(SamplingParams):
    """Valid settings whose `greedy` flag cannot be read: sampling them raises in the step."""

    @property
    def greedy(self):
        raise RuntimeError("hostile settings")


def test_the_engine_thread_fails_a_request_alone(server):
    """Straight to the `AsyncEngine`: a request whose settings were broken after they were
    checked is refused, one whose sampling raises fails, and the others are not touched."""
    _, engine, async_engine = server
    good = SamplingParams(max_tokens=8, temperature=0.7, seed=4, ignore_eos=True)
    broken = SamplingParams(max_tokens=8)
    broken.top_k = 1 << 64

    async def run(jobs):
        async def one(i, ids, params):
            try:
                outs = [o async for o in async_engine.generate(ids, params, f"iso-{id(jobs)}-{i}")]
                return outs[-1].token_ids, outs[-1].finish_reason
            except (ValueError, EngineError) as err:
                return type(err).__name__, str(err)

        return await asyncio.gather(*(one(i, *job) for i, job in enumerate(jobs)))

    alone = asyncio.run(run([([5, 6, 7], good), ([8, 9], good)]))
    mixed = asyncio.run(run([([5, 6, 7], good), ([1, 2], broken), ([3, 4], Hostile(max_tokens=8)),
                             ([8, 9], good)]))
    assert [mixed[0], mixed[3]] == alone
    assert mixed[1][0] == "ValueError" and "top_k" in mixed[1][1]
    assert mixed[2][0] == "EngineError" and "hostile" in mixed[2][1]
    wait_idle(engine)
    engine.check_invariants()
