"""`WorkerGroup` (`hwattn.parallel.launch`) with a minimal worker
(`tests.parallel.echo_worker`)."""

from __future__ import annotations

import os
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


def test_a_hello_of_non_ascii_bytes_is_refused_like_a_wrong_token(monkeypatch):
    """Observed: a connection opening with 32 non-ASCII bytes made the parent's start-up
    raise TypeError ("comparing strings with non-ASCII characters is not supported", from
    `secrets.compare_digest` on the decoded token) instead of refusing that connection."""
    import os
    import socket
    import threading

    from hwattn.parallel import launch
    from hwattn.parallel.wire import HELLO

    def stranger(folder):
        address = os.path.join(folder, "link")
        for _ in range(500):
            if os.path.exists(address):
                break
            time.sleep(0.01)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(address)
            sock.sendall(HELLO.pack(b"\xff" * 32, 0))
            time.sleep(1.0)

    real = launch.make_socket_folder

    def folder_with_a_stranger():
        folder = real()
        threading.Thread(target=stranger, args=(folder,), daemon=True).start()
        return folder

    monkeypatch.setattr(launch, "make_socket_folder", folder_with_a_stranger)
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        group.send(0, ("echo", 3))
        assert group.recv(0, timeout=30) == ("result", 3)
    finally:
        group.shutdown()


def test_a_worker_that_stopped_on_its_own_fails_the_group_by_name():
    """Observed: a worker that said bye and exited though the group had not been shut down
    (here it was sent ("stop",) directly) made `check` raise TypeError ("exceptions must
    derive from BaseException"): `_fail` found no cause and raised None."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        group.send(0, ("stop",))
        # Until the worker can be reaped: /proc shows its main thread a zombie (`wait_gone`)
        # while the kernel still holds it for threads of its own that are ending, and until
        # then `check` rightly sees it running (seen once in CI on a loaded machine).
        end = time.monotonic() + 10.0
        while group.procs[0].poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert group.procs[0].poll() is not None
        with pytest.raises(WorkerError, match=r"^echo worker 0 \(pid \d+\) stopped with exit "
                                              r"code 0 before the group was shut down"):
            group.check()
        assert not wait_gone(group.pids, 10.0)
    finally:
        group.kill()


def test_send_takes_a_place_in_the_group_and_a_zero_timeout():
    """Observed: `send(-1, ...)` went to the last worker (and `recv(-1)` read from it), and
    `send(..., timeout=0)` failed the group ("has not read its messages for 0 s") before
    trying the writable socket once; `shutdown(grace=0)` raised that error too."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        for call in (lambda: group.send(-1, ("echo", 1)), lambda: group.send(1, ("echo", 1)),
                     lambda: group.recv(-1, timeout=1), lambda: group.send(0.0, ("echo", 1))):
            with pytest.raises(ValueError, match=r"rank must be a worker's place in this "
                                                 r"group, 0\.\.0, got"):
                call()
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds >= 0"):
            group.send(0, ("echo", 1), timeout=float("nan"))
        with pytest.raises(ValueError, match="grace must be"):
            group.shutdown(grace=-1)
        group.send(0, ("echo", 4), timeout=0)
        assert group.recv(0, timeout=30) == ("result", 4)
        group.shutdown(grace=0)
    finally:
        group.kill()


def test_a_send_interrupted_part_way_fails_the_group_instead_of_cutting_a_frame():
    """Observed: a KeyboardInterrupt while a large message was being written left part of its
    frame in the worker's stream; the next message was read as the rest of it (the worker
    then waited for bytes that never came, until the caller's deadline)."""
    group = WorkerGroup("tests.parallel.echo_worker", 1, label="echo worker")
    try:
        class Cut:  # writes 1000 bytes of the frame, then Ctrl-C arrives
            def __init__(self, sock):
                self.sock, self.calls = sock, 0

            def send(self, data):
                self.calls += 1
                if self.calls > 1:
                    raise KeyboardInterrupt
                return self.sock.send(data[:1000])

            def __getattr__(self, name):
                return getattr(self.sock, name)

        conn = group.conns[0]
        conn.sock = Cut(conn.sock)
        with pytest.raises(KeyboardInterrupt):
            group.send(0, ("echo", b"x" * 5000))
        conn.sock = conn.sock.sock
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="interrupted"):
            group.send(0, ("echo", 1))
            group.recv(0, timeout=5)
        assert time.monotonic() - t0 < 1
        assert not wait_gone(group.pids, 10.0)
    finally:
        group.kill()


def test_a_start_cancelled_from_another_thread_kills_the_workers_still_connecting(monkeypatch):
    """Observed: a group started from a thread (data-parallel replicas start so) could not be
    stopped before all of its workers had connected, which takes seconds of importing torch
    on a busy machine, or the whole connect timeout for one that never connects: Ctrl-C while
    replicas started left them running that long. Setting `cancel` now ends the start within
    a fraction of a second, the workers killed."""
    import threading

    from tests.parallel.procs import children

    monkeypatch.setenv("HWATTN_TEST_CONNECT_DELAY_S", "60")  # never connects in this test
    cancel, raised = threading.Event(), []
    before = set(children(os.getpid()))

    def start():
        try:
            WorkerGroup("tests.parallel.slow_start_worker", 2, label="slow worker",
                        connect_timeout=60, heartbeat_timeout=0, cancel=cancel)
        except WorkerError as err:
            raised.append((time.monotonic(), err))

    thread = threading.Thread(target=start)
    thread.start()
    deadline = time.monotonic() + 30
    while len(set(children(os.getpid())) - before) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    workers = set(children(os.getpid())) - before
    t0 = time.monotonic()
    cancel.set()
    thread.join(10)
    assert not thread.is_alive()
    (when, error), = raised
    assert when - t0 < 1.0
    assert str(error) == "the start of slow workers 0..1 was cancelled"
    assert not wait_gone(workers, 3.0)
