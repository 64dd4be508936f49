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


def test_messages_flooding_both_ways_at_once_cannot_deadlock():
    """The worker echoes each 1 MiB message at once, while the parent sends eight in a row
    without reading: both socket buffers (about 200 KiB) fill, the worker blocks writing its
    reply and the parent blocks writing the next message. The parent reads what comes while
    it writes (`WorkerGroup._send`), so everything goes through, in order and whole."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        blobs = [bytes([i]) * (1 << 20) for i in range(8)]
        t0 = time.monotonic()
        for blob in blobs:
            group.send(0, ("echo", blob), timeout=20)
        assert [group.recv(0, timeout=20) for _ in blobs] == [("result", b) for b in blobs]
        assert time.monotonic() - t0 < 10
    finally:
        group.shutdown()


def test_a_missing_reply_is_named_in_plain_words():
    """Observed: the default `what` was "a reply", so the timeout read "echo worker 0 sent no
    a reply within 0 s" (and a timeout under a second was printed as 0 s)."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        with pytest.raises(WorkerError, match=r"^echo worker 0 sent no reply within 0\.5 s; "):
            group.recv(0, timeout=0.5)
    finally:
        group.kill()
    group = WorkerGroup("tests.parallel.echo_worker", 2, label="echo worker", first_rank=3)
    try:
        group.send(0, ("echo", 1))
        with pytest.raises(WorkerError, match=r"^echo worker 4 sent no ready signal within "
                                              r"0\.5 s; "):
            group.gather(0.5, "ready signal")
    finally:
        group.kill()


def test_a_corrupted_length_header_fails_the_group_at_once_naming_the_length():
    """Observed: a frame header announcing 2**40 bytes left the parent waiting for bytes that
    never came, until the caller's deadline."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        group.send(0, ("corrupt", 1 << 40))
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=r"echo worker 0 sent a message this process "
                                              r"cannot read: .*1099511627776 bytes"):
            group.recv(0, timeout=60)
        assert time.monotonic() - t0 < 10
        assert not wait_gone(group.pids, 10.0)
    finally:
        group.kill()


@pytest.mark.parametrize("kwargs, needle", [
    (dict(first_rank=-1), "first_rank must be a whole number >= 0, got -1"),  # was struct.error
    (dict(first_rank=1.5), "first_rank must be a whole number"),
    (dict(first_rank=True), "first_rank must be a whole number"),
    (dict(first_rank=(1 << 32) - 1, world=2),
     r"first_rank \+ world - 1 must be at most 4294967295"),
    (dict(world=0), "world must be a whole number >= 1, got 0"),
    (dict(world=2.0), "world must be a whole number"),
    (dict(world="2"), "world must be a whole number"),
    (dict(module=""), "module must be"),
    (dict(label=""), "label must be"),
    (dict(world=2, env=[{}]), r"env must be None or one dict per worker \(2\), got 1 entries"),
    (dict(env=[{"X": 1}]), r"env\[0\] must be a dict"),        # was a TypeError from Popen
    (dict(env=[{"A=B": "1"}]), r"env\[0\] must be a dict"),
    (dict(connect_timeout=0), "connect_timeout must be a finite number of seconds > 0"),
    (dict(connect_timeout=-5), "connect_timeout must be"),
    (dict(connect_timeout=float("nan")), "connect_timeout must be"),
    (dict(heartbeat_timeout=-1), "heartbeat_timeout must be a finite number of seconds >= 0"),
    (dict(heartbeat_timeout=float("nan")), "heartbeat_timeout must be"),  # was accepted
])
def test_nonsensical_arguments_are_refused_before_a_worker_starts(kwargs, needle):
    import os

    from tests.parallel.procs import children

    before = set(children(os.getpid()))
    args = dict(module="tests.parallel.echo_worker", world=1, label="echo worker") | kwargs
    with pytest.raises(ValueError, match=needle):
        WorkerGroup(**args)
    assert set(children(os.getpid())) == before
