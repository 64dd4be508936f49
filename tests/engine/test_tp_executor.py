"""`TensorParallelExecutor` (`hwattn.engine.tp_executor`): its arguments are checked before any
rank starts. The ranks themselves are exercised in tests/parallel."""

from __future__ import annotations

import math

import pytest

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
