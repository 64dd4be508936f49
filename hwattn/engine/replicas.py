"""The processes behind a `DataParallelEngine`: one `WorkerGroup` of one worker per replica, so
that a replica dying or getting stuck takes down itself alone, and a fresh process can take
its place while the others serve.

A replica fails when its process dies (killed, out of memory), raises (its engine's step
failed, a tensor-parallel rank of its own failed) or stops beating its heartbeat (stopped,
frozen: see `hwattn.parallel.launch`); its group is killed at once, and `recv_any` reports
the event beside the replicas' messages:

- ("down", WorkerError, restarting): the replica is gone; `restarting` says whether a new
  process is being started for it (in a background thread: the others keep serving).
- ("ready", info): a restarted replica is built (same engine, same devices) and takes
  requests again; `info` is its ready message, as from `start`.

Restarts are bounded: a replica is restarted unless it has failed more than `max_restarts`
times within the last `restart_window` seconds (HWATTN_REPLICA_RESTARTS, default 3, within 10
minutes; 0 never restarts). A restart that fails to build counts as another failure, so a
replica that cannot start gives up after a few tries instead of looping.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque

from hwattn.parallel.errors import WorkerError, summarize
from hwattn.parallel.launch import WorkerGroup, wait_readable

MODULE = "hwattn.engine.engine_core"
LABEL = "data-parallel replica"


def _side_by_side(fn, count: int, name: str, on_error=None) -> tuple[list, list[BaseException]]:
    """Run `fn(i)` for i in range(count), each in a thread of its own (named `name`-i), and
    wait for all. Returns (per i its result, or the exception it raised; the exceptions in the
    order they were raised). on_error(err) runs in the failing thread as soon as it fails."""
    results: list = [None] * count
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i):
        try:
            results[i] = fn(i)
        except BaseException as err:  # noqa: BLE001 - handed to the caller
            results[i] = err
            with lock:
                errors.append(err)
            if on_error is not None:
                on_error(err)

    threads = [threading.Thread(target=run, args=(i,), daemon=True, name=f"{name}-{i}")
               for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def restart_budget() -> int:
    """HWATTN_REPLICA_RESTARTS (default 3): restarts of one replica allowed per window."""
    value = os.environ.get("HWATTN_REPLICA_RESTARTS", "3")
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"HWATTN_REPLICA_RESTARTS must be a whole number >= 0, got {value!r}")
    return count


class ReplicaProcesses:
    """`size` replica processes running `hwattn.engine.engine_core`, restarted when they fail.

    env: per-replica environment additions (CUDA_VISIBLE_DEVICES), or None.
    setup_timeout: seconds for a replica to start and build its engine.
    max_restarts, restart_window: the restart budget (None: HWATTN_REPLICA_RESTARTS, 3 per
        600 s). heartbeat_timeout: `WorkerGroup`'s (None: HWATTN_HEARTBEAT_TIMEOUT_S).

    Not thread-safe: one thread (the engine's) calls the methods; restarts run in threads of
    their own and hand their result over through `recv_any`.
    """

    def __init__(self, size: int, env: list[dict] | None = None, setup_timeout: float = 600.0,
                 max_restarts: int | None = None, restart_window: float = 600.0,
                 heartbeat_timeout: float | None = None):
        self.size = size
        self.env = env
        self.setup_timeout = setup_timeout
        self.max_restarts = restart_budget() if max_restarts is None else max_restarts
        self.restart_window = restart_window
        self.heartbeat_timeout = heartbeat_timeout
        self.spec: dict | None = None
        self.groups: list[WorkerGroup | None] = [None] * size
        self.failures = [deque() for _ in range(size)]  # times each replica failed
        self._events: deque = deque()  # (replica, event) noticed on this thread
        self._built: queue.SimpleQueue = queue.SimpleQueue()  # from restart threads
        self._lock = threading.Lock()
        self._starting: dict[int, WorkerGroup] = {}  # groups being built, to kill on close
        self._cancel = threading.Event()  # set on close: groups still connecting give up
        self._threads: list[threading.Thread] = []
        self._closed = False

    # Starting.
    def start(self, spec: dict) -> list[dict]:
        """Start every replica with the build `spec` (side by side) and return their ready
        infos; on a failure, kill them all and raise the error that came first."""
        self.spec = spec
        made: list[WorkerGroup] = []  # built so far, to kill if this start is interrupted

        def launch(replica: int) -> tuple[WorkerGroup, dict]:
            group, info = self._launch(replica)
            with self._lock:
                made.append(group)
                closed = self._closed
            if closed:  # the start was interrupted meanwhile: nobody takes it over
                group.kill()
            return group, info

        try:
            # A failure closes at once, so that the others stop building.
            results, errors = _side_by_side(launch, self.size, "hwattn-replica",
                                           on_error=lambda err: self._close())
        except BaseException:  # interrupted (KeyboardInterrupt) while the replicas start
            self._close()  # kills those building; those still connecting see it and end
            with self._lock:
                built = list(made)
            for group in built:
                group.kill()
            raise
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    r[0].kill()
            raise errors[0]
        self.groups = [group for group, _ in results]
        return [info for _, info in results]

    def _launch(self, replica: int) -> tuple[WorkerGroup, dict]:
        """Start `replica`'s process and build its engine (blocking); (group, ready info).
        `setup_timeout` bounds the two together."""
        deadline = time.monotonic() + self.setup_timeout
        group = WorkerGroup(MODULE, 1, label=LABEL, env=[self.env[replica]] if self.env else None,
                            connect_timeout=self.setup_timeout, first_rank=replica,
                            heartbeat_timeout=self.heartbeat_timeout, cancel=self._cancel)
        try:
            with self._lock:
                if self._closed:
                    raise WorkerError(f"{LABEL} {replica}: the engine shut down while it started",
                                      replica)
                self._starting[replica] = group
            group.broadcast(("build", self.spec))
            _, info = group.recv(0, max(0.0, deadline - time.monotonic()), "ready signal",
                                 self.setup_timeout)
        except BaseException:
            group.kill()
            raise
        finally:
            with self._lock:
                self._starting.pop(replica, None)
        return group, info

    def _restart(self, replica: int) -> None:
        """A restart thread: build `replica` anew and hand the result to `recv_any`."""
        try:
            group, info = self._launch(replica)
        except BaseException as err:  # noqa: BLE001 - reported as the replica failing again
            if not isinstance(err, WorkerError):
                err = WorkerError(f"{LABEL} {replica} could not be restarted: {summarize(err)}",
                                  replica)
            self._built.put((replica, None, err))
            return
        with self._lock:
            if self._closed:  # nobody will take it over
                group.kill()
                return
            self._built.put((replica, group, info))

    # Failures.
    def lose(self, replica: int, error: WorkerError) -> None:
        """Take `replica` as failed with `error`: kill it, report ("down", ...) through the
        next `recv_any` and restart it if the budget allows."""
        group = self.groups[replica]
        if group is None:
            return
        self.groups[replica] = None
        group.kill()
        # What it sent before it failed (the outputs of its last steps, a call's result) is
        # real: handed over ahead of its "down" event, not lost with its group.
        self._events.extend((replica, m) for m in group.queues[0])
        group.queues[0].clear()
        self._failed(replica, error)

    def _failed(self, replica: int, error: WorkerError) -> None:
        """Count a failure of `replica`, restart it within the budget, queue its event."""
        now = time.monotonic()
        failures = self.failures[replica]
        failures.append(now)
        while failures and now - failures[0] > self.restart_window:
            failures.popleft()
        restarting = not self._closed and len(failures) <= self.max_restarts
        if restarting:
            self._spawn_restart(replica)
        self._events.append((replica, ("down", error, restarting)))

    def _spawn_restart(self, replica: int) -> None:
        thread = threading.Thread(target=self._restart, args=(replica,), daemon=True,
                                  name=f"hwattn-restart-{replica}")
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def _take_built(self) -> None:
        """Install the replicas the restart threads have built; a failed restart is a failure."""
        while True:
            try:
                replica, group, info = self._built.get_nowait()
            except queue.Empty:
                return
            if group is not None:
                self.groups[replica] = group
                self._events.append((replica, ("ready", info)))
                continue
            self._failed(replica, info)  # its restart failed: `info` is the error

    # Messages.
    def send(self, replica: int, message) -> None:
        """Send `message` to `replica`; WorkerError if it is down or fails now (its "down"
        event then comes with the next `recv_any`)."""
        group = self.groups[replica]
        if group is None:
            raise WorkerError(f"{LABEL} {replica} is down", replica)
        try:
            group.send(0, message)
        except WorkerError as err:
            self.lose(replica, err)
            raise

    def recv_any(self, timeout: float) -> list[tuple[int, object]]:
        """The replicas' messages and events that are or become available within `timeout`
        seconds, as (replica, message); every replica's liveness is checked on the way."""
        self._take_built()
        live = [g for g in self.groups if g is not None]
        if not self._events:
            wait_readable(live, timeout)
        out = []
        for replica, group in enumerate(self.groups):
            if group is None:
                continue
            try:
                out += [(replica, m) for _, m in group.recv_any(0.0)]
            except WorkerError as err:
                self.lose(replica, err)
        self._take_built()
        out += self._events
        self._events = deque()
        return out

    @property
    def pids(self) -> list[int | None]:
        """Each replica's process id; None while it is down."""
        return [g.pids[0] if g is not None else None for g in self.groups]

    # Stopping.
    def _close(self) -> list[WorkerGroup]:
        with self._lock:
            self._closed = True
            starting = list(self._starting.values())
        self._cancel.set()  # those still waiting for their process to connect
        for group in starting:  # a restart in progress: its thread sees the failure and ends
            group.kill()
        return [g for g in self.groups if g is not None]

    def _join_restarts(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        while True:  # built just before we closed
            try:
                _, group, _ = self._built.get_nowait()
            except queue.Empty:
                break
            if group is not None:
                group.kill()

    def kill(self) -> None:
        """Kill every replica now, restarts in progress included."""
        for group in self._close():
            group.kill()
        self._join_restarts(5.0)

    def shutdown(self, grace: float = 15.0) -> None:
        """Stop every replica (side by side, each given `grace` s), restarts in progress
        included; raises the first replica's shutdown error after all are gone."""
        groups = self._close()
        results, _ = _side_by_side(lambda i: groups[i].shutdown(grace=grace), len(groups),
                                  "hwattn-replica-stop")
        self._join_restarts(grace)
        first = next((r for r in results if isinstance(r, BaseException)), None)
        if first is not None:
            raise first

