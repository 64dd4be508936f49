"""Worker processes that cannot hang the process that starts them.

`WorkerGroup` starts N workers as `python -m MODULE` subprocesses, so the parent's `__main__`
is never imported again: a script fed on standard input, a notebook or an interactive session
can start workers. Each worker reads a short bootstrap record on its standard input (where to
connect and a one-time token), connects back over a Unix socket in a directory only this user
can enter, opens with the token (plain bytes: nothing is unpickled from a connection that has
not shown it), and from then on parent and worker exchange pickled messages framed by their
length. The build spec travels this way, never on a command line or in a file.

The parent never joins a `torch.distributed` process group. When the workers need one (tensor
parallelism) the parent only hosts the rendezvous store and the workers form the group among
themselves. So the parent holds no process group to tear down, can run any number of groups
one after another or side by side, and can always kill a group that is stuck in a collective.

How failures surface:
- A worker that raises reports `("error", {phase, traceback, ...})` and exits; the parent
  raises `WorkerError` with that traceback the next time it waits on or sends to the group.
- A worker that dies without a word (killed, out of memory) closes its socket; the parent
  raises `WorkerError` naming its exit signal or code and the last lines it printed.
- When several workers fail together (one raises, its peers then lose a collective), the
  report that came first in time is the cause; the others are listed after it.
- Every wait has a deadline (set-up, each reply); once a failure is seen, every worker of the
  group is killed, and later calls raise the same error.
- A worker that is alive but frozen (SIGSTOP, a debugger holding it, a deadlock with the
  interpreter lock held) is caught by its heartbeat: a thread of its own in every worker
  stamps the time into the worker's slot of a small file both sides map, twice a second,
  while the main thread computes (a long prefill, a first CUDA-graph capture, a compile all
  leave that thread running). The parent reads the stamps whenever it waits on or polls the
  group (`check` between steps); a worker whose stamp is older than the heartbeat timeout
  (HWATTN_HEARTBEAT_TIMEOUT_S, default 5 s; 0 turns the check off) and which meanwhile used
  no CPU time and waited on no disk is stuck: the group fails with a `WorkerError` naming it
  and is killed. The CPU and disk test keeps a worker inside one long native call that holds
  the interpreter lock (the heartbeat thread cannot run then) from being taken for a stuck
  one; such a worker is bounded by the caller's reply deadline instead.
- `shutdown` sends `("stop",)`, waits at most `grace` seconds for the workers to exit, then
  terminates and kills what is left: a dead or stuck peer never blocks it.
- Workers ignore SIGINT (the parent decides when they stop) and exit by themselves within a
  second when their parent process is gone, however it went.
- The socket folder (`hwattn-PID-*` in the temporary directory) lives only until every worker
  has connected, so a parent killed later leaves nothing behind; the folder of a parent killed
  during start-up is removed by the next group started on the machine (its PID is gone).

NVLink multicast stays off in every worker (NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1).

The parts: `WorkerGroup` (the parent's side) is here; `errors` (`WorkerError`), `wire` (the
hello and the message frames), `heartbeat`, `folders` (the socket folder) and `worker` (the
worker's side: `ParentLink`, the process group, fault injection for tests with HWATTN_FAULT)
are beside it.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path

from hwattn.parallel.errors import WorkerError, check_seconds, describe_exit, env_seconds
from hwattn.parallel.folders import make_socket_folder
from hwattn.parallel.heartbeat import HeartbeatMonitor, beat_interval
from hwattn.parallel.wire import HELLO_MAX_RANK, Conn, MessageError, pack

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
# hwattn's own location, so a worker imports the same hwattn as its parent.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def _summary(report: dict) -> str:
    """A worker's error report in one line: `summarize` of its exception, as the worker
    (`ParentLink.fail`) wrote it, else the last line of its traceback."""
    return report.get("summary") or report["traceback"].strip().splitlines()[-1]


def _forward_output(stream, prefix: str, tail: deque) -> None:
    """Copy a worker's output to our stderr line by line, keeping its last lines."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        tail.append(line)
        try:
            sys.stderr.write(f"{prefix}{line}")
        except (ValueError, OSError):  # our stderr is gone (interpreter exiting)
            pass
    stream.close()


def _reap(procs: list, folder: str, wait_s: float = 2.0) -> None:
    """Terminate, then kill, every process still running; remove the socket folder."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.terminate()
                p.send_signal(signal.SIGCONT)  # a stopped worker takes the SIGTERM now
    end = time.monotonic() + wait_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=5)
    shutil.rmtree(folder, ignore_errors=True)


def _seconds(t: float) -> str:
    """`t` for a message: "600", "0.5", "2.3"."""
    return f"{t:.1f}".rstrip("0").rstrip(".")


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(module, world, label, env, first_rank) -> None:
    """ValueError naming the first of `WorkerGroup`'s arguments that no worker could start
    with (see its docstring), before any process starts."""
    if not isinstance(module, str) or not module:
        raise ValueError(f"module must be a module name such as 'hwattn.engine.tp_worker', "
                         f"got {module!r}")
    if not _whole(world) or world < 1:
        raise ValueError(f"world must be a whole number >= 1, got {world!r}")
    if not isinstance(label, str) or not label:
        raise ValueError(f"label must be a non-empty string, got {label!r}")
    if not _whole(first_rank) or first_rank < 0:
        raise ValueError(f"first_rank must be a whole number >= 0, got {first_rank!r}")
    if first_rank + world - 1 > HELLO_MAX_RANK:
        raise ValueError(f"first_rank + world - 1 must be at most {HELLO_MAX_RANK}, got "
                         f"{first_rank} + {world} - 1")
    if env is not None:
        if not isinstance(env, (list, tuple)) or len(env) != world:
            got = f"{len(env)} entries" if isinstance(env, (list, tuple)) else repr(env)
            raise ValueError(f"env must be None or one dict per worker ({world}), got {got}")
        for i, extra in enumerate(env):
            if not isinstance(extra, dict) or not all(
                    isinstance(k, str) and k and "=" not in k and isinstance(v, str)
                    for k, v in extra.items()):
                raise ValueError(f"env[{i}] must be a dict of environment variable names to "
                                 f"strings, got {extra!r}")


class WorkerGroup:
    """`world` workers running `python -m module`, each connected to this process.

    module: the worker's module; it starts with `ParentLink()` and answers `("stop",)`.
    label: how errors name a worker ("tensor-parallel rank", "data-parallel replica").
    env: per-worker environment additions (e.g. CUDA_VISIBLE_DEVICES), or None.
    rendezvous: host a `torch.distributed` TCPStore here for the workers' process group.
    connect_timeout: seconds for every worker to start and connect.
    first_rank: the number of the first worker, in errors and in its `ParentLink.rank` (a
        group may be one of several: data-parallel replica i is a group of one numbered i).
        Methods take a worker's place in this group, 0..world-1.
    heartbeat_timeout: seconds without a heartbeat (and without CPU time used) after which a
        worker counts as stuck; None reads HWATTN_HEARTBEAT_TIMEOUT_S (default 5); 0: off.
    cancel: a `threading.Event` another thread may set to give up the start: the workers
        still connecting are killed within a fraction of a second and the constructor raises
        `WorkerError` (a worker imports for seconds before it connects; without this, a group
        started from a thread could be stopped only once they all had connected).

    Every argument is checked here, before a process starts (ValueError naming it): world a
    whole number >= 1, first_rank one >= 0 (with first_rank + world - 1 below 2**32, the
    largest rank the hello carries), env one dict of strings per worker, connect_timeout a
    finite number of seconds > 0, heartbeat_timeout one >= 0.
    """

    def __init__(self, module: str, world: int, label: str = "worker", env: list[dict] | None = None,
                 rendezvous: bool = False, connect_timeout: float = 180.0, first_rank: int = 0,
                 heartbeat_timeout: float | None = None, cancel: threading.Event | None = None):
        _check_arguments(module, world, label, env, first_rank)
        connect_timeout = check_seconds("connect_timeout", connect_timeout)
        if heartbeat_timeout is None:
            heartbeat_timeout = env_seconds("HWATTN_HEARTBEAT_TIMEOUT_S", 5.0, allow_zero=True)
        heartbeat_timeout = check_seconds("heartbeat_timeout", heartbeat_timeout,
                                          allow_zero=True)  # 0: off
        self.world = world
        self.label = label
        self.first_rank = first_rank
        self.heartbeat_timeout = heartbeat_timeout
        self.error: WorkerError | None = None
        self.stopping = False
        self.tails = [deque(maxlen=40) for _ in range(world)]
        self.queues = [deque() for _ in range(world)]
        self.said_bye = [False] * world
        self.log_threads: list[threading.Thread] = []
        self.conns: list[Conn | None] = [None] * world
        self.procs: list[subprocess.Popen] = []
        self.folder = make_socket_folder()
        # A safety net: the folder is removed at the end of this constructor, however it ends;
        # the finaliser (run by `kill`, or when the group is collected) removes it too.
        self._finalizer = weakref.finalize(self, _reap, self.procs, self.folder)
        self._heartbeat = HeartbeatMonitor(heartbeat_timeout, world)
        self._tick = min(1.0, heartbeat_timeout / 4) if heartbeat_timeout else 1.0  # wait slices
        self.store = None
        token = secrets.token_hex(16)
        base = dict(os.environ, **NO_MULTICAST)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        listener = None
        try:
            beats_path = os.path.join(self.folder, "beats")
            self._heartbeat.open(beats_path)
            store_port = None
            if rendezvous:
                from torch.distributed import TCPStore

                self.store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
                store_port = self.store.port
            address = os.path.join(self.folder, "link")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(address)
            listener.listen(world)
            for i in range(world):
                child_env = dict(base, **(env[i] if env else {}))
                proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=child_env, close_fds=True)
                self.procs.append(proc)
                thread = threading.Thread(target=_forward_output, daemon=True, name=f"hwattn-log-{i}",
                                          args=(proc.stdout, f"({self._name(i)}) ", self.tails[i]))
                thread.start()
                self.log_threads.append(thread)
                boot = dict(address=address, token=token, rank=first_rank + i, slot=i, world=world,
                            parent_pid=os.getpid(), store_port=store_port, sys_path=sys.path,
                            beats=beats_path, beat_s=beat_interval(heartbeat_timeout))
                proc.stdin.write(json.dumps(boot).encode())
                proc.stdin.close()
            self._accept(listener, token, connect_timeout, cancel)
        except BaseException:
            self.kill()
            raise
        finally:
            if listener is not None:
                listener.close()
            # Every worker is connected (or the group failed): the address and the beats file
            # (mapped by now, where it got that far) are not needed again.
            shutil.rmtree(self.folder, ignore_errors=True)

    def _name(self, i: int) -> str:
        return f"{self.label} {self.first_rank + i}"

    def _error(self, i: int | None, message: str, phase: str | None = None,
               reason: str | None = None) -> WorkerError:
        """A `WorkerError` about the worker in place `i` of this group (None: no one worker),
        carrying its rank among all groups (`first_rank` + i)."""
        return WorkerError(message, None if i is None else self.first_rank + i, phase, reason)

    # Start-up.
    def _accept(self, listener: socket.socket, token: str, timeout: float,
                cancel: threading.Event | None) -> None:
        deadline = time.monotonic() + timeout
        pending: list[Conn] = []
        while any(c is None for c in self.conns):
            if cancel is not None and cancel.is_set():
                last = self.first_rank + self.world - 1
                who = (self._name(0) if self.world == 1
                       else f"{self.label}s {self.first_rank}..{last}")
                self._fail(self._error(None, f"the start of {who} was cancelled"))
            self._check_exits()
            if time.monotonic() > deadline:
                missing = [self.first_rank + i for i, c in enumerate(self.conns) if c is None]
                self._fail(self._error(None, f"{self.label} {missing} did not connect within "
                                             f"{_seconds(timeout)} s"))
            ready, _, _ = select.select([listener] + pending, [], [], 0.2)
            for item in ready:
                if item is listener:
                    sock, _ = listener.accept()
                    pending.append(Conn(sock, -1))
                    continue
                try:
                    hello = item.hello()
                except EOFError:
                    pending.remove(item)
                    continue
                if hello is not None:
                    pending.remove(item)
                    got, rank = hello
                    i = rank - self.first_rank
                    # As bytes: a hello of non-ASCII bytes is refused like any wrong token
                    # (`compare_digest` raises TypeError on non-ASCII strings).
                    if not secrets.compare_digest(got.encode("utf-8", "replace"), token.encode()) \
                            or not 0 <= i < self.world \
                            or self.conns[i] is not None:
                        item.sock.close()
                        continue
                    item.rank = i
                    self.conns[i] = item
        self._heartbeat.watch_from_now()

    # Failures.
    def _check_exits(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self._died(i)

    def _check_beats(self) -> None:
        """Fail the group if a worker is stuck (`HeartbeatMonitor.stuck`)."""
        if self.stopping:
            return
        found = self._heartbeat.stuck([p.pid for p in self.procs])
        if found is not None:
            i, silent = found
            reason = (f"{self._name(i)} (pid {self.procs[i].pid}) is stuck: no heartbeat for "
                      f"{silent:.1f} s (stopped or frozen)")
            self._fail(self._error(i, f"{reason}; the group was stopped", reason=reason))

    def check(self) -> None:
        """Raise `WorkerError` if a worker has died or is stuck (reading no messages)."""
        if self.error is not None:
            raise self.error
        if self.stopping or not self._finalizer.alive:
            return
        self._check_exits()
        self._check_beats()

    def _died(self, i: int) -> None:
        self._fail(None, dead=i)

    def _fail(self, error: WorkerError | None, dead: int | None = None, report=None) -> None:
        """Gather what every worker says for a moment, kill them all, raise the first cause."""
        if self.error is not None:
            raise self.error
        reports = [report] if report is not None else []
        deaths = {dead} if dead is not None else set()
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            live = [c for c in self.conns if c is not None and not c.closed]
            if not live:
                break
            ready, _, _ = select.select(live, [], [], max(0.0, end - time.monotonic()))
            for conn in ready:
                try:
                    msgs = conn.read()
                except EOFError:
                    deaths.add(conn.rank)
                    conn.closed = True
                    continue
                except MessageError as err:  # dropped; the group is failing already
                    msgs = err.messages
                for m in msgs:
                    if isinstance(m, tuple) and m and m[0] == "error":
                        reports.append(m[1] | {"rank": conn.rank})
                    elif m == ("bye",):
                        self.said_bye[conn.rank] = True
                    else:  # kept, as `_pump` keeps what comes before a failure
                        self.queues[conn.rank].append(m)
        self.kill()
        reports.sort(key=lambda r: r["time"])
        reported = {r["rank"] for r in reports}
        silent = sorted(r for r in deaths - reported if not self.said_bye[r])
        notes = [f"{self._name(r['rank'])} ({r['phase']}): {_summary(r)}" for r in reports]
        if silent:  # a rank that died without a word is the cause; its peers' errors follow
            i = silent[0]
            self.log_threads[i].join(timeout=1.0)  # the output it printed before dying
            tail = "".join(self.tails[i]).rstrip()
            how = describe_exit(self.procs[i].poll())
            msg = (f"{self._name(i)} (pid {self.procs[i].pid}) died with {how} without "
                   f"reporting an error" + (f"; its last output:\n{tail}" if tail else ""))
            error = self._error(i, msg + ("\nthen: " + "; ".join(notes) if notes else ""),
                                reason=f"{self._name(i)} died with {how}")
        elif reports:  # the first report in time is the cause
            first = reports[0]
            name = self._name(first["rank"])
            msg = f"{name} failed during {first['phase']}:\n{first['traceback'].rstrip()}"
            if notes[1:]:
                msg += "\nthen: " + "; ".join(notes[1:])
            error = self._error(first["rank"], msg, first["phase"],
                                reason=f"{name} failed during {first['phase']}: {_summary(first)}")
        elif error is None:  # it said bye and ended, though this group had not asked it to
            i = min(deaths)
            how = describe_exit(self.procs[i].poll())
            reason = f"{self._name(i)} (pid {self.procs[i].pid}) stopped with {how}"
            error = self._error(i, f"{reason} before the group was shut down; the group was "
                                   "stopped", reason=reason)
        self.error = error
        raise error

    def _check_open(self) -> None:
        """Raise the group's error, or a `WorkerError` once it has been shut down or killed
        (its links are closed: nothing can come, and a wait would never end)."""
        if self.error is not None:
            raise self.error
        if not self._finalizer.alive:
            raise self._error(None, f"the {self.label} group was shut down; its workers are "
                                    "gone")

    def _pump(self, timeout: float) -> None:
        """Queue the messages that arrive within `timeout` seconds; raise on any failure."""
        self._check_open()
        live = [c for c in self.conns if c is not None]
        ready, _, _ = select.select(live, [], [], max(0.0, timeout))
        for conn in ready:
            try:
                msgs = conn.read()
            except EOFError:
                if self.said_bye[conn.rank]:  # it stopped as asked
                    self.conns[conn.rank] = None
                    continue
                self._died(conn.rank)
            except MessageError as err:  # a reply lost: the caller's exchange is out of step
                for m in err.messages:  # an error reported before it is the cause
                    if isinstance(m, tuple) and m and m[0] == "error":
                        self._fail(None, report=m[1] | {"rank": conn.rank})
                self._fail(self._error(conn.rank, f"{self._name(conn.rank)} sent a message this "
                                                  f"process cannot read: {err}; the group was "
                                                  "stopped"))
            for m in msgs:
                if isinstance(m, tuple) and m and m[0] == "error":
                    self._fail(None, report=m[1] | {"rank": conn.rank})
                if m == ("bye",):
                    self.said_bye[conn.rank] = True
                else:
                    self.queues[conn.rank].append(m)
        if not self.stopping:
            self._check_exits()
            self._check_beats()

    # Messages.
    def _place(self, rank) -> int:
        """`rank` (a worker's place in this group); ValueError naming it otherwise."""
        if not _whole(rank) or not 0 <= rank < self.world:
            raise ValueError(f"rank must be a worker's place in this group, 0..{self.world - 1}, "
                             f"got {rank!r}")
        return rank

    def send(self, rank: int, message, timeout: float = 600.0) -> None:
        self._send([self._place(rank)], pack(message), timeout)

    def broadcast(self, message, timeout: float = 600.0) -> None:
        self._send(range(self.world), pack(message), timeout)

    def _send(self, ranks, data: bytes, timeout: float) -> None:
        """Write `data` to each rank; reads whatever comes meanwhile, so a worker blocked on
        writing to us never deadlocks against us writing to it. Interrupted (KeyboardInterrupt)
        once a byte has gone, the group fails: a worker would read a cut frame, or the ranks
        would run different steps."""
        timeout = check_seconds("timeout", timeout, allow_zero=True)
        self._check_open()
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        begun = False
        try:
            for rank in ranks:
                conn, sent = self.conns[rank], 0
                while sent < len(data):
                    if conn is None:
                        self._fail(self._error(rank, f"{self._name(rank)} has stopped reading "
                                                     "its messages"))
                    try:
                        sent += conn.sock.send(view[sent:])
                        begun = True
                        continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        self._died(rank)
                    if time.monotonic() > deadline:
                        self._fail(self._error(rank, f"{self._name(rank)} has not read its "
                                                     f"messages for {_seconds(timeout)} s"))
                    _, writable, _ = select.select([], [conn], [], 0.05)
                    if not writable:
                        self._pump(0.0)
        except WorkerError:
            raise
        except BaseException as err:
            if begun and self.error is None and self._finalizer.alive:
                self.error = self._error(None, f"sending to the {self.label} group was "
                                               f"interrupted ({type(err).__name__}) part-way; "
                                               "the group was stopped")
                self.kill()
            raise

    def recv(self, rank: int, timeout: float | None = None, what: str = "reply",
             budget: float | None = None):
        """The next message from `rank`; WorkerError if any worker fails meanwhile or none
        comes within `timeout` seconds ("... sent no `what` within ..."; `what` is a noun
        without an article: "ready signal", "step result"). budget: the seconds the error
        names when this wait is the rest of a longer one (a set-up deadline that several
        waits share); default `timeout`. A message already sent counts however little time
        is left: the socket is read once more before giving up."""
        self._place(rank)
        if self.error is not None:  # what it queued before failing is the caller's no more
            raise self.error
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.queues[rank]:
            left = self._tick if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self._pump(0.0)
                if self.queues[rank]:
                    break
                named = timeout if budget is None else budget
                self._fail(self._error(rank, f"{self._name(rank)} sent no {what} within "
                                             f"{_seconds(named)} s; the group was stopped"))
            self._pump(min(left, self._tick))
        return self.queues[rank].popleft()

    def gather(self, timeout: float, what: str = "reply", budget: float | None = None) -> list:
        """The next message of every worker, in rank order; WorkerError naming the ones that
        sent none within `timeout` seconds (`what` and `budget` as for `recv`)."""
        if self.error is not None:
            raise self.error
        deadline = time.monotonic() + timeout
        while not all(self.queues):
            left = deadline - time.monotonic()
            if left <= 0:
                self._pump(0.0)
                if all(self.queues):
                    break
                missing = [self.first_rank + i for i, q in enumerate(self.queues) if not q]
                named = timeout if budget is None else budget
                self._fail(self._error(None, f"{self.label} {', '.join(map(str, missing))} sent "
                                             f"no {what} within {_seconds(named)} s; the group "
                                             f"was stopped"))
            self._pump(min(left, self._tick))
        return [q.popleft() for q in self.queues]

    def recv_any(self, timeout: float) -> list[tuple[int, object]]:
        """Every message that is or becomes available within `timeout` s, as (rank, message);
        the group's error once it has failed (what it had queued stays in `queues`)."""
        if self.error is not None:
            raise self.error
        if not any(self.queues):
            self._pump(timeout)
        out = []
        for rank, q in enumerate(self.queues):
            while q:
                out.append((rank, q.popleft()))
        return out

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # Stopping.
    def kill(self) -> None:
        """Stop every worker now (terminate, then kill), close the links and the heartbeat
        map, and drop the rendezvous store."""
        for c in self.conns:
            if c is not None:
                with contextlib.suppress(OSError):
                    c.sock.close()
        self.conns = [None] * self.world
        self._finalizer()
        self.store = None
        self._heartbeat.close()

    def shutdown(self, grace: float = 5.0) -> None:
        """Ask every worker to stop, wait at most `grace` s, kill the rest. Raises the first
        error a worker reports while stopping (after all of them are gone)."""
        grace = check_seconds("grace", grace, allow_zero=True)
        if not self._finalizer.alive:
            return
        if self.error is not None:
            self.kill()
            return
        self.stopping = True
        error = None
        try:
            self._send(range(self.world), pack(("stop",)), timeout=grace)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and not all(self.said_bye):
                self._pump(0.05)
            while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
                time.sleep(0.01)
        except WorkerError as err:
            error = err
        self.kill()
        if error is not None:
            raise error


def wait_readable(groups, timeout: float) -> None:
    """Wait up to `timeout` s until a message (or the end of a link) is waiting from a worker
    of any of `groups`; returns at once if one already is."""
    if any(any(g.queues) for g in groups):
        return
    live = [c for g in groups if g.error is None for c in g.conns if c is not None]
    if live:
        select.select(live, [], [], max(0.0, timeout))
    else:
        time.sleep(max(0.0, timeout))
