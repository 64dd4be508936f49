"""A client that stops reading its stream holds the newest output of each of its prompts,
not every step's (each a copy of everything generated so far), and an app whose lifespan
ends can be served again."""

import asyncio
import gc
import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import create_engine  # noqa: E402
from hwattn.engine.sequence import RequestOutput  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import TINY, serving, wait_idle  # noqa: E402

NAME = "tiny-gla-2"


def _scope(path: str, body: bytes) -> dict:
    """An ASGI HTTP scope for a JSON POST to `path`, as uvicorn builds it (ASGI spec 2.3)."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}


def _outputs() -> int:
    """RequestOutputs alive in this process."""
    return sum(type(o) is RequestOutput for o in gc.get_objects())


def _texts(docs: list[dict], chat: bool) -> dict[int, str]:
    """Each choice's text, joined from the chunks of a stream."""
    texts: dict[int, str] = {}
    for doc in docs:
        for c in doc["choices"]:
            piece = c["delta"].get("content", "") if chat else c["text"]
            texts[c["index"]] = texts.get(c["index"], "") + piece
    return texts


@pytest.mark.parametrize("path, extra", [
    ("/v1/completions", {"prompt": ["ab", "cd"], "n": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ab"}]}),
], ids=["completions", "chat"])
def test_a_stalled_stream_holds_one_output_per_prompt(path, extra):
    """Observed: while a client read nothing (its socket full), the server queued every
    step's RequestOutput of its request, each with copies of all the tokens so far: memory
    quadratic in the answer's length (4 GB for one stalled 32K-token stream). Now only the
    newest output of each prompt waits, and the stream, once read, says what the same
    request says unstreamed."""
    engine = create_engine(**TINY)
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, NAME)
    async_engine.start()
    request = {"model": NAME, "max_tokens": 200, "ignore_eos": True, "temperature": 0, **extra}
    body = json.dumps({**request, "stream": True}).encode()
    prompts = len(extra.get("prompt", [None]))

    async def scenario():
        taken = []
        reading = asyncio.Event()
        chunks = []

        async def receive():
            if not taken:
                taken.append(body)
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never hangs up

        async def send(message):
            chunks.append(message)
            if message["type"] == "http.response.body" and len(chunks) >= 3:
                await reading.wait()  # the client stopped reading

        gc.collect()
        before = _outputs()  # held elsewhere in this process (other tests' leftovers)
        task = asyncio.create_task(app(_scope(path, body), receive, send))
        finished = engine.stats()["finished"]
        while engine.stats()["finished"] < finished + prompts:
            assert not task.done(), chunks
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        gc.collect()
        held = _outputs() - before
        reading.set()
        await asyncio.wait_for(task, 60)
        return held, chunks

    try:
        held, chunks = asyncio.run(scenario())
        assert held <= 2 * prompts, f"{held} outputs held for a stalled stream of {prompts} " \
                                    f"prompt(s)"
        with serving(app) as base:
            whole = httpx.post(base + path, json=request, trust_env=False, timeout=60).json()
    finally:
        async_engine.shutdown()
    text = b"".join(m.get("body", b"") for m in chunks if m["type"] == "http.response.body")
    events = [line[6:] for line in text.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chat = path.endswith("chat/completions")
    want = {c["index"]: c["message"]["content"] if chat else c["text"] for c in whole["choices"]}
    assert _texts([json.loads(e) for e in events[:-1]], chat) == want
    assert len(want) == prompts * extra.get("n", 1)
    wait_idle(engine)
    engine.check_invariants()


def test_an_app_served_again_after_its_lifespan_ended_answers():
    """Observed: `AsyncEngine.shutdown` (the end of the app's lifespan) left its stop flag
    set, so the engine thread `start` made again ended at once and every request of the
    second run waited for ever. Now the second run answers as the first did."""
    engine = create_engine(**TINY)
    app = build_app(AsyncEngine(engine), NAME)
    body = {"model": NAME, "prompt": "ab", "max_tokens": 4, "temperature": 0,
            "ignore_eos": True}
    texts = []
    for _ in range(2):
        with serving(app) as base:
            r = httpx.post(base + "/v1/completions", json=body, trust_env=False, timeout=30)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1]
    wait_idle(engine)
