"""`TensorParallelExecutor` (`hwattn.engine.tp_executor`): its arguments are checked before any
rank starts, and a call that raises on a rank leaves the ranks serving. The ranks themselves
are exercised in tests/parallel."""

from __future__ import annotations

import math

import pytest
import torch

import hwattn.engine.tp_executor as tp_executor
from hwattn.engine.tp_executor import TensorParallelExecutor


class Started(Exception):
    """Raised by the stand-in `WorkerGroup`: the executor got as far as starting ranks."""


@pytest.fixture
def no_ranks(monkeypatch):
    """No process starts: the stand-in records the group's keywords and stops the executor."""
    seen = {}

    def group(module, world, **kwargs):
        seen.update(kwargs)
        raise Started

    monkeypatch.setattr(tp_executor, "WorkerGroup", group)
    monkeypatch.delenv("HWATTN_SETUP_TIMEOUT_S", raising=False)
    monkeypatch.delenv("HWATTN_STEP_TIMEOUT_S", raising=False)
    return seen


def executor(**timeouts):
    return TensorParallelExecutor(2, dict(device="cpu"), {}, None, 64, **timeouts)


@pytest.mark.parametrize("name", ["setup_timeout", "step_timeout"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -600.0, math.nan, math.inf, True, "600"])
def test_a_timeout_that_is_not_a_positive_number_is_refused_by_name(no_ranks, name, value):
    """Observed: `setup_timeout or env_seconds(...)` took 0 for "the default" (600 s), and a
    negative timeout was kept: every wait then failed at once ("sent no page plan within
    -1 s"), after the ranks had started."""
    with pytest.raises(ValueError, match=rf"^{name} must be a "):
        executor(**{name: value})


def test_none_keeps_meaning_the_default_or_the_environment(no_ranks, monkeypatch):
    with pytest.raises(Started):
        executor()
    assert no_ranks["connect_timeout"] == 600.0
    monkeypatch.setenv("HWATTN_SETUP_TIMEOUT_S", "42.5")
    with pytest.raises(Started):
        executor(step_timeout=3)
    assert no_ranks["connect_timeout"] == 42.5
    with pytest.raises(Started):
        executor(setup_timeout=7)  # an argument wins over the environment
    assert no_ranks["connect_timeout"] == 7.0


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf", "soon"])
def test_a_bad_timeout_in_the_environment_is_refused_by_name(no_ranks, monkeypatch, value):
    monkeypatch.setenv("HWATTN_STEP_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="HWATTN_STEP_TIMEOUT_S must be "):
        executor()


def test_a_device_index_is_refused_not_ignored(no_ranks, monkeypatch):
    """Observed: device 'cuda:1' with two ranks put them on cuda:0 and cuda:1 (rank r takes
    cuda:r of the visible devices), the index dropped without a word."""
    monkeypatch.setattr(tp_executor.torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ValueError, match=r"device 'cuda:1' with tensor_parallel_size 2: .*"
                                         r"CUDA_VISIBLE_DEVICES"):
        TensorParallelExecutor(2, dict(device="cuda:1"), {}, None, 64)
    for device in ("cuda", "cuda:0"):  # from the first visible GPU, as the ranks are placed
        with pytest.raises(Started):
            TensorParallelExecutor(2, dict(device=device), {}, None, 64)


@pytest.mark.timeout(60)
def test_the_setup_timeout_bounds_the_whole_start_of_the_ranks(monkeypatch):
    """Observed: `setup_timeout` bounded each of the set-up's three waits (the ranks
    connecting, their page plans, their builds) on its own: ranks that took 2 s to connect
    and then never planned were given up after 2 + 3 s, not the 3 s asked (up to three times
    HWATTN_SETUP_TIMEOUT_S in all). One deadline now covers the whole set-up."""
    import time

    from hwattn.parallel.errors import WorkerError
    from hwattn.parallel.launch import WorkerGroup

    def slow_ranks(module, world, **kwargs):
        return WorkerGroup("tests.parallel.slow_start_worker", world,
                           **dict(kwargs, heartbeat_timeout=0))

    monkeypatch.setattr(tp_executor, "WorkerGroup", slow_ranks)
    monkeypatch.setenv("HWATTN_TEST_CONNECT_DELAY_S", "2")
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"^tensor-parallel rank 0, 1 sent no page plan "
                                          r"within 3 s"):
        TensorParallelExecutor(2, dict(device="cpu"), {}, None, 64, setup_timeout=3)
    assert 2 < time.monotonic() - t0 < 3 + 1.5


def raise_on(runner, rank: int, collective_first: bool = False):
    """Raises on `rank` (after an all-reduce with the others, if `collective_first`); returns
    the rank elsewhere. Run on the ranks by `TensorParallelExecutor.call`."""
    import torch.distributed as dist

    if collective_first:
        dist.all_reduce(torch.ones(1, device=runner.device))
    if dist.get_rank() == rank:
        raise ValueError(f"a bad request on rank {rank}")
    return dist.get_rank()


def raise_on_1_while_0_waits(runner):
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank 1 leaves before the all-reduce")
    dist.all_reduce(torch.ones(1, device=runner.device))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_call_that_raises_on_a_rank_fails_alone_and_the_ranks_serve_on():
    """Observed: a function given to `call` that raised on rank 0 (a bad request's error)
    ended that rank's process, so the call raised `WorkerError`, every rank was killed and
    each later call or step failed with the same error. Now the call raises the function's
    error, and the ranks go on: calls, and generation (all-reduces) as before the failure."""
    from hwattn.engine import LLM, SamplingParams
    from hwattn.engine.tp_executor import TensorParallelCallError
    from hwattn.parallel.errors import WorkerError

    tiny = dict(model="tiny", attention="gqa-4", device="cpu", dtype="fp32", page_size=8,
                num_pages=64, max_model_len=64, model_overrides=dict(n_layers=1, max_seq_len=64))
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    with LLM(tensor_parallel_size=2, **tiny) as llm:
        executor = llm.engine.runner
        pids = executor.pids
        want = llm.generate([[1, 2, 3]], greedy)[0].token_ids
        for rank, collective_first in ((0, False), (1, False), (0, True)):
            with pytest.raises(TensorParallelCallError,
                               match=rf"^raise_on raised ValueError: a bad request on rank "
                                     rf"{rank} on tensor-parallel rank {rank}; the ranks serve "
                                     r"on\n") as caught:
                executor.call(raise_on, rank, collective_first)
            assert caught.value.rank == rank and "raise_on" in caught.value.traceback
            assert executor.call(raise_on, -1) == 0
        assert llm.generate([[1, 2, 3]], greedy)[0].token_ids == want
        assert executor.pids == pids
        # A rank that raises before a collective its peer waits in leaves it there: that is a
        # stuck step, which fails the group within the step timeout (documented in `call`).
        executor.step_timeout = 2.0
        with pytest.raises(WorkerError, match="sent no step result within 2 s"):
            executor.call(raise_on_1_while_0_waits)


def rank_local_value(runner):
    """A value only rank 0's can be sent back: elsewhere an unpicklable rank-local object
    (as a handle, a generator or a CUDA tensor of that rank's device may be)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    return rank if rank == 0 else (lambda: rank)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_call_sends_back_rank_0s_value_alone():
    """Observed: since every rank answers a call (so that a failure on any is seen), every
    rank sent its whole return value, which the parent drops: a value that only rank 0's is
    meant to be sent (one that cannot be pickled elsewhere) killed the other rank, and every
    rank's large one crossed the link for nothing. The others now say only that they
    succeeded."""
    from hwattn.engine import LLM

    tiny = dict(model="tiny", attention="gqa-4", device="cpu", dtype="fp32", page_size=8,
                num_pages=64, max_model_len=64, model_overrides=dict(n_layers=1, max_seq_len=64))
    with LLM(tensor_parallel_size=2, **tiny) as llm:
        executor = llm.engine.runner
        pids = executor.pids
        assert executor.call(rank_local_value) == 0
        assert executor.call(rank_local_value) == 0
        assert executor.pids == pids
