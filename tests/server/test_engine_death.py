"""A server whose engine lost a worker process says so: every request then gets a 503 at once,
and /health answers 503 with the reason instead of "ok"."""

import os
import signal
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.parallel.procs import wait_gone  # noqa: E402
from tests.server.conftest import TINY, serving  # noqa: E402


def test_a_killed_rank_turns_health_to_503():
    engine = create_engine(**TINY, tensor_parallel_size=2)
    pids = engine.runner.pids
    body = {"model": "m", "prompt": "abc", "max_tokens": 4, "temperature": 0}
    try:
        with serving(build_app(AsyncEngine(engine), "m")) as base, httpx.Client(base_url=base,
                                                                              timeout=60) as client:
            assert client.get("/health").json() == {"status": "ok"}
            assert client.post("/v1/completions", json=body).status_code == 200
            os.kill(pids[1], signal.SIGKILL)
            first = client.post("/v1/completions", json=body)
            assert first.status_code == 503, first.text
            assert "tensor-parallel rank 1" in first.json()["error"]["message"]
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert "rank 1" in health.json()["message"]
            t0 = time.monotonic()
            again = client.post("/v1/completions", json=body)
            assert again.status_code == 503 and time.monotonic() - t0 < 2
    finally:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - the killed rank's failure is reported again
            pass
    assert not wait_gone(pids, 5.0)
