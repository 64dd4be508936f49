"""A server whose engine lost a worker process says so: every request then gets a 503 at once,
and /health answers 503 with the reason instead of "ok". A stopped (kill -STOP) rank is caught
by its heartbeat within seconds; a stopped or killed data-parallel replica costs only its own
requests and comes back."""

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

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


HEARTBEAT_S = 2.0


@pytest.fixture
def signals(monkeypatch):
    """A 2 s heartbeat timeout (the step timeout stays 600 s); `send(pid, sig)` signals a
    worker, and every process stopped that way is continued and killed at teardown."""
    monkeypatch.setenv("HWATTN_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_S))
    monkeypatch.delenv("HWATTN_STEP_TIMEOUT_S", raising=False)
    stopped = []

    def send(pid, sig=signal.SIGSTOP):
        if sig == signal.SIGSTOP:
            stopped.append(pid)
        os.kill(pid, sig)
        return time.monotonic()

    yield send
    for pid in stopped:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def post_all(base, bodies):
    """Post each body at once from its own thread; futures of (response, monotonic end)."""
    pool = ThreadPoolExecutor(len(bodies))

    def post(body):
        with httpx.Client(base_url=base, timeout=60) as client:
            return client.post("/v1/completions", json=body), time.monotonic()

    futures = [pool.submit(post, b) for b in bodies]
    pool.shutdown(wait=False)
    return futures


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def short_reason(response, *parts):
    """The 503 body names the failure in one line, without a traceback."""
    assert response.status_code == 503, response.text
    message = response.json()["error"]["message"]
    assert "\n" not in message and "Traceback" not in message and "File " not in message, message
    for part in parts:
        assert part in message, message
    return message


@pytest.mark.slow  # worker processes stopped and killed
@pytest.mark.timeout(120)
def test_a_stopped_rank_fails_requests_in_flight_with_503_within_seconds(signals, monkeypatch):
    """TP=2 with the default heartbeat timeout (5 s), four long requests decoding, rank 1
    stopped (kill -STOP): every request gets 503 naming the stuck rank within 10 s (not the
    600 s step timeout), /health answers 503 with the reason, and the ranks are gone."""
    monkeypatch.delenv("HWATTN_HEARTBEAT_TIMEOUT_S")
    engine = create_engine(**TINY, tensor_parallel_size=2)
    pids = engine.runner.pids
    body = {"model": "m", "prompt": "abc", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    try:
        with serving(build_app(AsyncEngine(engine), "m")) as base, httpx.Client(base_url=base,
                                                                              timeout=60) as client:
            futures = post_all(base, [body] * 4)
            wait_for(lambda: engine.stats()["running"] == 4 and engine.stats()["decode_steps"] > 2,
                     30, "the requests never ran together")
            t0 = signals(pids[1])
            for future in futures:
                response, done = future.result(timeout=30)
                short_reason(response, "tensor-parallel rank 1", "is stuck: no heartbeat")
                assert done - t0 < 10
            health = client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            assert "rank 1" in health.json()["message"] and "heartbeat" in health.json()["message"]
            t1 = time.monotonic()
            short_reason(client.post("/v1/completions", json=body), "rank 1")
            assert time.monotonic() - t1 < 2
    finally:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001 - the stopped rank's failure is reported again
            pass
    assert not wait_gone(pids, 5.0)


@pytest.mark.slow  # worker processes stopped and killed
@pytest.mark.timeout(120)
def test_a_rank_stopped_between_requests_turns_health_to_503(signals):
    """No request running: the server still notices the stopped rank within seconds."""
    engine = create_engine(**TINY, tensor_parallel_size=2)
    pids = engine.runner.pids
    body = {"model": "m", "prompt": "abc", "max_tokens": 4, "temperature": 0}
    try:
        with serving(build_app(AsyncEngine(engine), "m")) as base, httpx.Client(base_url=base,
                                                                              timeout=60) as client:
            assert client.post("/v1/completions", json=body).status_code == 200
            t0 = signals(pids[0])
            wait_for(lambda: client.get("/health").status_code == 503, 10, "/health stayed 200")
            assert time.monotonic() - t0 < HEARTBEAT_S + 5
            assert "rank 0" in client.get("/health").json()["message"]
            short_reason(client.post("/v1/completions", json=body), "rank 0", "heartbeat")
    finally:
        try:
            engine.shutdown()
        except Exception:  # noqa: BLE001
            pass
    assert not wait_gone(pids, 5.0)


@pytest.mark.slow  # worker processes stopped and killed
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_failed_replica_costs_only_its_own_requests(signals, sig):
    """DP=2, six long requests in flight on both replicas; replica 1 stopped or killed. Its
    requests get 503 with the reason within seconds, replica 0's all finish in full; /health
    stays 200 (degraded while replica 1 restarts, then ok), and the new replica 1 serves."""
    engine = create_engine(**TINY, data_parallel_size=2)
    old = list(engine.pids)
    body = {"model": "m", "prompt": "abc", "max_tokens": 300, "temperature": 0, "ignore_eos": True}

    def in_flight():
        try:
            live = list(engine.requests.values())
        except RuntimeError:  # changed while we read it: the engine thread runs
            return False
        # Each decoding (its `tokens`, with the server's "delta" outputs, are only those not
        # yet delivered).
        return len(live) == 6 and all(r.first_token_time is not None for r in live)

    try:
        with serving(build_app(AsyncEngine(engine), "m")) as base, httpx.Client(base_url=base,
                                                                              timeout=60) as client:
            futures = post_all(base, [body] * 6)
            wait_for(in_flight, 30, "the requests were never all in flight")
            victims = sum(r.replica == 1 for r in list(engine.requests.values()))
            t0 = signals(old[1], sig)
            results = [f.result(timeout=30) for f in futures]
            failed = [(r, done) for r, done in results if r.status_code != 200]
            assert victims == 3 and len(failed) == victims, [r.text for r, _ in failed]
            how = "is stuck: no heartbeat" if sig == signal.SIGSTOP else "died with signal SIGKILL"
            for response, done in failed:
                short_reason(response, "data-parallel replica 1", how, "restarting it")
                assert done - t0 < 10
            for response, _ in results:
                if response.status_code == 200:
                    choice = response.json()["choices"][0]
                    assert choice["finish_reason"] == "length"
                    assert response.json()["usage"]["completion_tokens"] == 300
            health = client.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "ok" or "replica 1" in health.json()["message"]
            wait_for(lambda: client.get("/health").json() == {"status": "ok"}, 60,
                     "replica 1 did not come back")
            assert engine.pids[0] == old[0] and engine.pids[1] not in (None, old[1])
            again = [f.result(timeout=30)[0] for f in post_all(base, [dict(body, max_tokens=8)] * 4)]
            assert [r.status_code for r in again] == [200] * 4
            assert engine.snapshots[1]["finished"] >= 1
    finally:
        pids = [p for p in engine.pids if p is not None]
        engine.shutdown()
    assert not wait_gone(pids + old, 5.0)
