"""`WorkerGroup` (`hwattn.parallel.launch`) with a minimal worker
(`tests.parallel.echo_worker`)."""

from __future__ import annotations

import time

import pytest

from hwattn.parallel.errors import WorkerError
from hwattn.parallel.launch import WorkerGroup
from tests.parallel.procs import wait_gone

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]  # slow: processes started and killed


def test_a_reply_the_parent_cannot_unpickle_fails_the_group_by_name():
    """Observed: pickle's AttributeError escaped `recv` (not a `WorkerError`, so callers that
    handle a failed worker did not), the group kept running, and the unreadable frame stayed
    queued: the next reply from that worker raised it again."""
    group = WorkerGroup("tests.parallel.echo_worker", 2, label="echo worker")
    try:
        group.send(1, ("echo", 5))
        assert group.recv(1, timeout=30) == ("result", 5)
        group.send(1, ("unreadable",))
        with pytest.raises(WorkerError, match="echo worker 1 sent a message this process "
                                              "cannot read") as info:
            group.recv(1, timeout=30)
        assert info.value.rank == 1
        assert not wait_gone(group.pids, 10.0)  # the group was stopped
        with pytest.raises(WorkerError, match="cannot read"):
            group.recv(0, timeout=30)  # later calls raise the same error
    finally:
        group.kill()


def test_a_group_used_after_shutdown_says_so_and_does_not_wait():
    """Observed: every call after `shutdown` raised "echo worker 0 has not read its messages
    for 600 s" at once (no worker had been sent anything), and `recv` without a timeout
    waited for good on the closed links."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    group.shutdown()
    calls = [lambda: group.recv(0), lambda: group.send(0, ("echo", 1)),
             lambda: group.gather(30), lambda: group.recv_any(30)]
    for call in calls:
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="echo worker group was shut down"):
            call()
        assert time.monotonic() - t0 < 1.0
