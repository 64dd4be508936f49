"""An app whose lifespan never ran (starlette's TestClient outside `with`, uvicorn
--lifespan off) has no engine thread: a request gets a prompt 503 saying so instead of
waiting for a loop that never takes it. Each call runs under a deadline, so that a
regression fails here instead of hanging the run."""

import asyncio
import threading

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hwattn.engine import SamplingParams, create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.server.async_engine import EngineDeadError  # noqa: E402
from tests.server.conftest import TINY  # noqa: E402

NAME = "tiny-gla-2"
DEADLINE_S = 30


@pytest.fixture(scope="module")
def engine():
    return create_engine(**TINY)


def within_deadline(call):
    """`call()`'s result, failing the test if it takes longer than DEADLINE_S (the thread
    left behind is a daemon: it cannot hold the test run at exit)."""
    result = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(DEADLINE_S)
    assert not thread.is_alive(), f"no answer within {DEADLINE_S} s: the request hangs"
    return result[0]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                              "stream": True}),
], ids=["completions", "stream", "chat-stream"])
def test_a_request_without_a_started_engine_gets_503(engine, path, body):
    http = TestClient(build_app(AsyncEngine(engine), NAME))  # no `with`: no lifespan
    r = within_deadline(lambda: http.post(path, json={"model": NAME, **body}))
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "server_error" and "not running" in error["message"], error


def test_generate_before_start_raises_at_once(engine):
    """Straight to the `AsyncEngine`, as a library user would call it; once started, the
    same request runs."""
    async_engine = AsyncEngine(engine)

    async def first(request_id):
        async for out in async_engine.generate([1, 2, 3], SamplingParams(max_tokens=2),
                                               request_id):
            return out

    with pytest.raises(EngineDeadError, match="not running"):
        asyncio.run(asyncio.wait_for(first("early"), DEADLINE_S))
    assert async_engine.unavailable() is not None
    async_engine.start()
    try:
        assert async_engine.unavailable() is None
        assert asyncio.run(asyncio.wait_for(first("started"), DEADLINE_S)) is not None
    finally:
        assert async_engine.shutdown()
    assert "shutting down" in async_engine.unavailable()
