"""Stuck and killed workers under a live engine (gloo, loopback, tiny model): a stopped
tensor-parallel rank fails the step within seconds (not after the step timeout) while a long
step never counts as stuck; a stopped or killed data-parallel replica fails its own requests
alone, within seconds, the other replica's requests finish, and the replica is restarted
(or, past its restart budget, left down until no replica is left)."""

import os
import re
import signal
import time

import pytest

from hwattn.engine import LLM, SamplingParams
from hwattn.parallel.errors import WorkerError
from tests.parallel.procs import alive, children, wait_exited, wait_gone

TP_TINY = dict(model="tiny", attention="gqa-4", device="cpu", dtype="fp32", page_size=8,
               num_pages=32, max_model_len=64, model_overrides=dict(n_layers=1, max_seq_len=64))
DP_TINY = dict(model="tiny", attention="gla-2", device="cpu", dtype="fp32", page_size=8,
               num_pages=200, max_model_len=512, model_overrides=dict(n_layers=1, max_seq_len=512))
SHORT = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
HEARTBEAT_S = 2.0

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]  # worker processes stopped and killed


@pytest.fixture
def heartbeat(monkeypatch):
    """A 2 s heartbeat timeout and the default 600 s step timeout: a stuck worker can only be
    caught by its heartbeat in time."""
    monkeypatch.setenv("HWATTN_HEARTBEAT_TIMEOUT_S", str(HEARTBEAT_S))
    monkeypatch.delenv("HWATTN_STEP_TIMEOUT_S", raising=False)
    monkeypatch.delenv("HWATTN_FAULT", raising=False)


@pytest.fixture
def stopped():
    """Signal processes; every one stopped here is continued and killed at teardown."""
    pids = []

    def send(pid, sig=signal.SIGSTOP):
        if sig == signal.SIGSTOP:
            pids.append(pid)
        os.kill(pid, sig)
        return time.monotonic()

    yield send
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def sleep_in(runner, seconds: float) -> float:
    """A step that waits (the interpreter lock free): the heartbeat thread runs on."""
    time.sleep(seconds)
    return seconds


def hold_interpreter_lock(runner, seconds: float) -> float:
    """A step that computes for at least `seconds` inside one native call holding the
    interpreter lock (a backtracking regular expression), so no other thread of the process,
    the heartbeat's included, runs meanwhile. Returns the longest such call."""
    n = 16
    while True:
        t0 = time.perf_counter()
        re.match(r"(x+x+)+y", "x" * n)
        took = time.perf_counter() - t0
        if took >= seconds:
            return took
        n += 1


@pytest.mark.parametrize("rank", [0, 1])
def test_a_stopped_rank_fails_the_step_within_seconds(heartbeat, stopped, rank):
    llm = LLM(tensor_parallel_size=2, **TP_TINY)
    pids = llm.engine.runner.pids
    assert len(llm.generate([[1, 2, 3]], SHORT)[0].token_ids) == 4
    t0 = stopped(pids[rank])
    with pytest.raises(WorkerError) as info:
        llm.generate([[1, 2, 3]], SHORT)
    took = time.monotonic() - t0
    assert HEARTBEAT_S <= took < HEARTBEAT_S + 5, took
    err = info.value
    assert re.fullmatch(rf"tensor-parallel rank {rank} \(pid {pids[rank]}\) is stuck: no "
                        rf"heartbeat for [0-9.]+ s \(stopped or frozen\)", err.reason), err.reason
    assert err.rank == rank
    assert not wait_gone(pids, 3.0)  # the stopped rank too
    llm.shutdown()


def test_long_steps_are_not_a_stuck_rank(monkeypatch):
    """Heartbeat timeout 1 s: a step that waits 3 s, and one that holds the interpreter lock
    (the heartbeat thread cannot run) for 2.5 s, both finish, and the engine serves on."""
    monkeypatch.setenv("HWATTN_HEARTBEAT_TIMEOUT_S", "1")
    with LLM(tensor_parallel_size=2, **TP_TINY) as llm:
        runner = llm.engine.runner
        want = llm.generate([[1, 2, 3]], SHORT)[0].token_ids
        assert runner.call(sleep_in, 3.0) == 3.0
        assert runner.call(hold_interpreter_lock, 2.5) >= 2.5
        llm.engine.check_workers()
        assert llm.generate([[1, 2, 3]], SHORT)[0].token_ids == want
        assert all(alive(p) for p in runner.pids)


def run_until_done(engine, ids, hit, when):
    """Step `engine` until every request in `ids` finished; `hit()` once every request has
    tokens (all in flight), if `when()`. Returns ({id: output}, {id: replica}, hit time)."""
    outs, placed, t_hit = {}, {}, None
    deadline = time.monotonic() + 60
    while len(outs) < len(ids):
        assert time.monotonic() < deadline, f"requests hang: {sorted(set(ids) - set(outs))}"
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = (out, time.monotonic())
        live = [engine.requests[r] for r in ids if r in engine.requests]
        if t_hit is None and len(live) == len(ids) and all(len(r.tokens) > 1 for r in live) \
                and when():
            placed = {r: engine.requests[r].replica for r in ids}
            t_hit = hit()
    assert t_hit is not None, "the requests finished before the fault"
    return outs, placed, t_hit


def wait_replica_back(engine, replica: int, timeout: float = 60.0) -> float:
    t0 = time.monotonic()
    while not engine.up[replica]:
        assert time.monotonic() - t0 < timeout, engine.health()
        engine.check_workers()
        time.sleep(0.05)
    return time.monotonic() - t0


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["SIGSTOP", "SIGKILL"])
def test_a_failed_replica_fails_its_own_requests_and_is_restarted(heartbeat, stopped, sig):
    """DP=2, six long requests spread over both replicas; replica 1 stopped (or killed) with
    all of them in flight. Its requests fail within seconds with the reason and
    `worker_failed`; replica 0's all finish in full; replica 1 comes back as a new process
    and serves again; the counters keep what the lost process had counted."""
    llm = LLM(data_parallel_size=2, **DP_TINY)
    engine = llm.engine
    try:
        old = list(engine.pids)
        long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        ids = engine.add_requests([[1, 2, 3], [4, 5], [6]] * 2, [long] * 6)
        outs, placed, t0 = run_until_done(engine, ids, lambda: stopped(old[1], sig), lambda: True)
        assert sorted(placed.values()) == [0, 0, 0, 1, 1, 1]
        how = "is stuck: no heartbeat" if sig == signal.SIGSTOP else "died with signal SIGKILL"
        for rid, replica in placed.items():
            out, done = outs[rid]
            if replica == 0:
                assert out.finish_reason == "length" and len(out.token_ids) == 400, out.error
                assert not out.worker_failed
            else:
                assert out.finish_reason == "error" and out.worker_failed
                assert out.error.startswith("data-parallel replica 1 ") and how in out.error
                assert out.error.endswith("restarting it") and "\n" not in out.error
                assert done - t0 < 10
        assert not wait_gone([old[1]], 3.0)
        serving, problem = engine.health()
        assert serving and (problem is None or "replica 1" in problem)
        wait_replica_back(engine, 1)
        assert engine.health() == (True, None)
        assert engine.pids[0] == old[0] and engine.pids[1] not in (None, old[1])
        stats = engine.stats()
        assert stats["finished"] == 3 and stats["failed"] == 3
        assert stats["generation_tokens"] >= 3 * 400
        later = llm.generate([[7, 8, 9]] * 4, SamplingParams(max_tokens=8, temperature=0))
        assert [o.finish_reason for o in later] == ["length"] * 4
        assert engine.snapshots[1]["finished"] >= 1  # the new process takes requests
        engine.check_invariants()
    finally:
        pids = [p for p in engine.pids if p is not None]
        llm.shutdown()
    assert not wait_gone(pids, 5.0)


def test_a_replica_past_its_restart_budget_stays_down(heartbeat, stopped, monkeypatch):
    """No restarts allowed: a killed replica stays down and the other serves every request;
    once both are gone, requests fail with the reason and then the engine raises."""
    monkeypatch.setenv("HWATTN_REPLICA_RESTARTS", "0")
    before = set(children(os.getpid()))
    llm = LLM(data_parallel_size=2, **DP_TINY)
    engine = llm.engine
    pids = list(engine.pids)
    stopped(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    while engine.up[1]:  # as the server does between requests
        assert time.monotonic() - t0 < 5
        engine.check_workers()
        time.sleep(0.05)
    outs = llm.generate([[1, 2, 3]] * 4, SHORT)
    assert [o.finish_reason for o in outs] == ["length"] * 4
    serving, problem = engine.health()
    assert serving and "replica 1 died with signal SIGKILL; it is not restarted" in problem
    assert engine.pids == [pids[0], None]
    stopped(pids[0], signal.SIGKILL)
    assert wait_exited(pids[0], 3.0)
    outs = llm.generate([[1, 2, 3]] * 2, SHORT)  # the first is sent to it, and fails
    assert all(o.finish_reason == "error" and o.worker_failed for o in outs)
    assert "no data-parallel replica is up" in outs[0].error
    assert engine.health()[0] is False
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="every data-parallel replica is down"):
        llm.generate([[1, 2, 3]], SHORT)
    assert time.monotonic() - t0 < 1
    llm.shutdown()
    assert not wait_gone(set(children(os.getpid())) - before, 3.0)
