"""The tensor-parallel lifecycle under injected failures (gloo, two ranks): every failure
surfaces in the parent as `WorkerError` with the worker's traceback within 10 s of the fault,
and no worker process outlives it."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hwattn.engine import LLM, SamplingParams
from hwattn.parallel.errors import WorkerError
from tests.parallel.procs import alive, children, fault_age, wait_gone

TINY = dict(model="tiny", attention="gqa-4", device="cpu", dtype="fp32", page_size=8,
            num_pages=32, max_model_len=64, model_overrides=dict(n_layers=1, max_seq_len=64))
PARAMS = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # slow: processes started and killed


@pytest.fixture
def fault(monkeypatch):
    return lambda spec: monkeypatch.setenv("HWATTN_FAULT", spec)


def test_failure_while_building_raises_the_ranks_traceback(fault):
    fault("rank:build:1")
    before = set(children(os.getpid()))
    with pytest.raises(WorkerError) as info:
        LLM(tensor_parallel_size=2, **TINY)
    msg = str(info.value)
    assert msg.startswith("tensor-parallel rank 1 failed during build:")
    assert "Traceback" in msg and "InjectedFault: injected fault: rank 1 in build" in msg
    assert fault_age(msg) < 10
    assert not wait_gone(set(children(os.getpid())) - before, 1.0)


def test_a_rank_that_never_joins_the_group_fails_set_up_in_time(fault, monkeypatch):
    """Rank 1 hangs before the rendezvous: set-up gives up after its timeout, and rank 0,
    left waiting in the rendezvous, is killed with it."""
    fault("rank:build:1:hang")
    monkeypatch.setenv("HWATTN_SETUP_TIMEOUT_S", "20")
    before = set(children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"tensor-parallel rank 0, 1 sent no page plan within 20 s"):
        LLM(tensor_parallel_size=2, **TINY)
    assert time.monotonic() - t0 < 20 + 10
    assert not wait_gone(set(children(os.getpid())) - before, 1.0)


@pytest.mark.parametrize("rank", [0, 1])
def test_failure_in_a_step_raises_and_stops_every_rank(fault, rank):
    """Rank 1 failing leaves rank 0 in an all-reduce that then fails too: the report names
    the rank that failed first."""
    fault(f"rank:step:{rank}:2")
    llm = LLM(tensor_parallel_size=2, **TINY)
    pids = llm.engine.runner.pids
    with pytest.raises(WorkerError) as info:
        llm.generate([[1, 2, 3]], PARAMS)
    msg = str(info.value)
    assert msg.startswith(f"tensor-parallel rank {rank} failed during step:")
    assert f"InjectedFault: injected fault: rank {rank} in step (step 2)" in msg
    assert fault_age(msg) < 10
    assert not wait_gone(pids, 1.0)
    t0 = time.monotonic()
    with pytest.raises(WorkerError):  # the engine stays failed, and says so at once
        llm.generate([[4, 5]], PARAMS)
    assert time.monotonic() - t0 < 1.0
    llm.shutdown()


def test_failure_at_shutdown_is_raised_by_shutdown(fault):
    fault("rank:shutdown:1")
    llm = LLM(tensor_parallel_size=2, **TINY)
    assert len(llm.generate([[1, 2, 3]], PARAMS)[0].token_ids) == 4
    pids = llm.engine.runner.pids
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:
        llm.shutdown()
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert msg.startswith("tensor-parallel rank 1 failed during shutdown:")
    assert "InjectedFault" in msg and fault_age(msg) < 10
    assert not wait_gone(pids, 1.0)


def test_a_killed_rank_fails_the_next_step():
    llm = LLM(tensor_parallel_size=2, **TINY)
    pids = llm.engine.runner.pids
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"tensor-parallel rank 1 \(pid \d+\) died with signal SIGKILL"):
        llm.generate([[1, 2, 3]], PARAMS)
    assert time.monotonic() - t0 < 10
    assert not wait_gone(pids, 1.0)


def test_a_stuck_rank_times_out_and_is_killed(monkeypatch):
    """A rank that stops answering (SIGSTOP) is given up on after the step timeout, and the
    group is killed, stopped process included."""
    monkeypatch.setenv("HWATTN_STEP_TIMEOUT_S", "3")
    llm = LLM(tensor_parallel_size=2, **TINY)
    pids = llm.engine.runner.pids
    os.kill(pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    with pytest.raises(WorkerError):
        llm.generate([[1, 2, 3]], PARAMS)
    assert time.monotonic() - t0 < 10
    assert not wait_gone(pids, 3.0)


def test_engines_come_and_go_in_one_process():
    """Shut down by garbage collection, created again, then shut down with a dead rank."""
    llm = LLM(tensor_parallel_size=2, **TINY)
    want = llm.generate([[1, 2, 3]], PARAMS)[0].token_ids
    pids = llm.engine.runner.pids
    del llm
    gc.collect()
    assert not wait_gone(pids, 5.0)
    llm = LLM(tensor_parallel_size=2, **TINY)
    assert llm.generate([[1, 2, 3]], PARAMS)[0].token_ids == want
    pids = llm.engine.runner.pids
    os.kill(pids[0], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match="rank 0 .* died with signal SIGKILL"):
        llm.shutdown()
    assert time.monotonic() - t0 < 10
    assert not wait_gone(pids, 1.0)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_script_on_stdin_starts_ranks_and_a_signal_stops_them(sig):
    """`python - < script.py` (no __main__ file to import again) runs a TP engine; SIGINT or
    SIGTERM to the script ends it and its ranks."""
    script = textwrap.dedent(f"""
        import time
        from hwattn.engine import LLM, SamplingParams
        llm = LLM(tensor_parallel_size=2, **{TINY!r})
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
        print(len(out[0].token_ids), *llm.engine.runner.pids, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("HWATTN_FAULT", None)
    proc = subprocess.Popen([sys.executable, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, text=True)
    try:
        proc.stdin.write(script)
        proc.stdin.close()
        line = proc.stdout.readline().split()
        assert line, proc.stderr.read()
        assert line[0] == "4"
        pids = [int(p) for p in line[1:]]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.send_signal(sig)
        proc.wait(timeout=10)
        assert not wait_gone(pids, 5.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_step_cut_short_by_ctrl_c_leaves_no_stale_reply_for_the_next(monkeypatch):
    """Observed: a KeyboardInterrupt while the parent waited for a step's reply left that
    reply on the link; every later step then took the reply of the step before it, so the
    next `generate` returned other requests' tokens ([[43, 3, 43, 3], ...]) without an error."""
    from hwattn.parallel.launch import WorkerGroup

    spec = dict(TINY, dtype="fp64")
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9]]
    want = [o.token_ids for o in LLM(**spec).generate(prompts, PARAMS)]
    with LLM(tensor_parallel_size=2, **spec) as llm:
        real = WorkerGroup.recv

        def interrupted(self, *args, **kwargs):  # Ctrl-C once the step has been sent
            raise KeyboardInterrupt

        monkeypatch.setattr(WorkerGroup, "recv", interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.generate([[40, 41, 42, 43], [50, 51]], PARAMS)
        monkeypatch.setattr(WorkerGroup, "recv", real)
        assert [o.token_ids for o in llm.generate(prompts, PARAMS)] == want
        llm.engine.check_invariants()
