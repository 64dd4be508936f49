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

Fault injection for tests: `HWATTN_FAULT=ROLE:PHASE:INDEX[:N]` makes worker INDEX of that role
("rank" for tensor-parallel ranks, "replica" for data-parallel engine cores) raise in PHASE
("build", "step", "shutdown"), at its N-th step when N is given, or hang there when N is
"hang" (see `fault_point`).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import pickle
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from datetime import timedelta
from pathlib import Path

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                "NVSHMEM_DISABLE_NVLS": "1"}
_HEADER = struct.Struct("!Q")
_HELLO = struct.Struct("!32sI")  # one-time token (hex), rank
_BEAT = struct.Struct("d")  # a worker's last heartbeat, time.monotonic() (system-wide on Linux)
# hwattn's own location, so a worker imports the same hwattn as its parent.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
    """A worker process failed. `rank` and `phase` say which and when; the message carries the
    worker's traceback (or, for a worker that died without one, how it died). `reason` is the
    same in one line without the traceback, for logs' summaries and for clients."""

    def __init__(self, message: str, rank: int | None = None, phase: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        lines = message.strip().splitlines()
        self.reason = reason or (lines[0] if lines else "a worker process failed")


def env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """The number of seconds in environment variable `name` (`default` when unset);
    ValueError naming it when it is not a positive number (or zero, where allowed)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not (seconds >= 0 if allow_zero else seconds > 0):  # NaN fails both
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else 'positive'}, got {value!r}")
    return seconds


def summarize(exc: BaseException) -> str:
    """`Type: first line of the message` (a `WorkerError`'s reason), without the traceback."""
    text = getattr(exc, "reason", None) or (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _summary(report: dict) -> str:
    """A worker's error report in one line: `summarize` of its exception, as the worker
    (`ParentLink.fail`) wrote it, else the last line of its traceback."""
    return report.get("summary") or report["traceback"].strip().splitlines()[-1]


def proc_activity(pid: int) -> tuple[str, int] | None:
    """(state, CPU clock ticks used) of process `pid` from /proc: state "R" running, "D" in
    the disk, "S" asleep, "T" stopped, ...; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime
    except (OSError, IndexError, ValueError):
        return None


def pack(obj) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(data)) + data


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


class _Conn:
    """The parent's end of one worker's socket: non-blocking, frames reassembled."""

    def __init__(self, sock: socket.socket, rank: int):
        sock.setblocking(False)
        self.sock = sock
        self.rank = rank
        self.buf = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list:
        """Messages completed by what the socket holds now; EOFError once it is closed."""
        self._fill()
        out = []
        while len(self.buf) >= _HEADER.size:
            (n,) = _HEADER.unpack_from(self.buf)
            if len(self.buf) < _HEADER.size + n:
                break
            out.append(pickle.loads(bytes(self.buf[_HEADER.size:_HEADER.size + n])))
            del self.buf[:_HEADER.size + n]
        if self.closed and not out:
            raise EOFError("socket closed")
        return out

    def hello(self) -> tuple[str, int] | None:
        """The (token, rank) a new worker opens with (plain bytes, read before any message
        is unpickled), once all of it has arrived; EOFError if the socket closes first."""
        self._fill()
        if len(self.buf) < _HELLO.size:
            if self.closed:
                raise EOFError("socket closed")
            return None
        token, rank = _HELLO.unpack_from(self.buf)
        del self.buf[:_HELLO.size]
        return token.decode("ascii", errors="replace"), rank

    def _fill(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as err:
                raise EOFError(str(err)) from None
            if not chunk:
                self.closed = True
                break
            self.buf += chunk


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def sweep_stale_folders(root: str | None = None) -> list[str]:
    """Remove this user's socket folders (`hwattn-PID-*` under `root`, default the temporary
    directory) whose process is gone: what a parent killed during start-up left. Returns them."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        entries = list(os.scandir(root))
    except OSError:
        return removed
    for entry in entries:
        match = re.fullmatch(r"hwattn-([0-9]+)-[^/]+", entry.name)
        try:
            if match is None or not entry.is_dir(follow_symlinks=False) \
                    or entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(entry.path)
    return removed


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
    """

    def __init__(self, module: str, world: int, label: str = "worker", env: list[dict] | None = None,
                 rendezvous: bool = False, connect_timeout: float = 180.0, first_rank: int = 0,
                 heartbeat_timeout: float | None = None):
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        if heartbeat_timeout is None:
            heartbeat_timeout = env_seconds("HWATTN_HEARTBEAT_TIMEOUT_S", 5.0, allow_zero=True)
        if heartbeat_timeout < 0:
            raise ValueError(f"heartbeat_timeout must be >= 0 (0: off), got {heartbeat_timeout}")
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
        self.conns: list[_Conn | None] = [None] * world
        self.procs: list[subprocess.Popen] = []
        sweep_stale_folders()
        # mode 0700: only we can connect. Named after this process, so that a later group can
        # tell a folder whose owner was killed before removing it.
        self.folder = tempfile.mkdtemp(prefix=f"hwattn-{os.getpid()}-")
        # A safety net: the folder is removed at the end of this constructor, however it ends;
        # the finaliser (run by `kill`, or when the group is collected) removes it too.
        self._finalizer = weakref.finalize(self, _reap, self.procs, self.folder)
        self._beats: mmap.mmap | None = None
        now = time.monotonic()
        self._watched_since = now  # heartbeats older than this were not watched for
        self._last_check = now
        self._sampled = 0.0  # when /proc was last read for the workers' activity
        self._tick = min(1.0, heartbeat_timeout / 4) if heartbeat_timeout else 1.0  # wait slices
        self._busy = [(None, now)] * world  # (CPU ticks last seen, when last seen busy)
        self.store = None
        token = secrets.token_hex(16)
        base = dict(os.environ, **NO_MULTICAST)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        beat_s = min(0.5, heartbeat_timeout / 5) if heartbeat_timeout else 0.5
        listener = None
        try:
            beats_path = os.path.join(self.folder, "beats")
            with open(beats_path, "wb") as f:
                f.write(bytes(_BEAT.size * world))
            with open(beats_path, "r+b") as f:
                self._beats = mmap.mmap(f.fileno(), _BEAT.size * world)
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
                            beats=beats_path, beat_s=beat_s)
                proc.stdin.write(json.dumps(boot).encode())
                proc.stdin.close()
            self._accept(listener, token, connect_timeout)
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
    def _accept(self, listener: socket.socket, token: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending: list[_Conn] = []
        while any(c is None for c in self.conns):
            self._check_exits()
            if time.monotonic() > deadline:
                missing = [self.first_rank + i for i, c in enumerate(self.conns) if c is None]
                self._fail(self._error(None, f"{self.label} {missing} did not connect within "
                                             f"{timeout:.0f} s"))
            ready, _, _ = select.select([listener] + pending, [], [], 0.2)
            for item in ready:
                if item is listener:
                    sock, _ = listener.accept()
                    pending.append(_Conn(sock, -1))
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
                    if not secrets.compare_digest(got, token) or not 0 <= i < self.world \
                            or self.conns[i] is not None:
                        item.sock.close()
                        continue
                    item.rank = i
                    self.conns[i] = item
        self._watched_since = time.monotonic()

    # Failures.
    def _check_exits(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is not None:
                self._died(i)

    def _check_beats(self) -> None:
        """Fail the group if a worker's heartbeat has stood still for `heartbeat_timeout`
        seconds of our watching while it used no CPU and waited on no disk (a gap in our own
        checks, as when this process was stopped along with its workers, restarts the count)."""
        limit, beats = self.heartbeat_timeout, self._beats
        if not limit or self.stopping or beats is None:
            return
        now = time.monotonic()
        if now - self._last_check > max(2.0, limit / 2):
            self._watched_since = now
        self._last_check = now
        since = self._watched_since
        sample = now - self._sampled >= 0.25
        if sample:
            self._sampled = now
        for i, p in enumerate(self.procs):
            if sample:
                activity = proc_activity(p.pid)
                ticks = None if activity is None else activity[1]
                seen, busy = self._busy[i]
                if activity is not None and activity[0] in "RD":
                    busy = now  # computing or reading from disk: not frozen
                elif seen is not None and ticks != seen:
                    busy = now  # it used CPU time since the last look
                self._busy[i] = (ticks, busy)
            try:
                (beat,) = _BEAT.unpack_from(beats, _BEAT.size * i)
            except ValueError:  # the group was killed from another thread: its map is closed
                return
            silent = now - max(beat, since)
            if silent <= limit:
                continue
            ticks, busy = self._busy[i]
            if ticks is not None and now - max(busy, since) <= limit:
                continue  # busy in a long native call that holds the interpreter lock
            reason = (f"{self._name(i)} (pid {p.pid}) is stuck: no heartbeat for {silent:.1f} s "
                      f"(stopped or frozen)")
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
                    for m in conn.read():
                        if isinstance(m, tuple) and m and m[0] == "error":
                            reports.append(m[1] | {"rank": conn.rank})
                        elif m == ("bye",):
                            self.said_bye[conn.rank] = True
                except EOFError:
                    deaths.add(conn.rank)
                    conn.closed = True
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
        self.error = error
        raise error

    def _pump(self, timeout: float) -> None:
        """Queue the messages that arrive within `timeout` seconds; raise on any failure."""
        if self.error is not None:
            raise self.error
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
    def send(self, rank: int, message, timeout: float = 600.0) -> None:
        self._send([rank], pack(message), timeout)

    def broadcast(self, message, timeout: float = 600.0) -> None:
        self._send(range(self.world), pack(message), timeout)

    def _send(self, ranks, data: bytes, timeout: float) -> None:
        """Write `data` to each rank; reads whatever comes meanwhile, so a worker blocked on
        writing to us never deadlocks against us writing to it."""
        if self.error is not None:
            raise self.error
        deadline = time.monotonic() + timeout
        view = memoryview(data)
        for rank in ranks:
            conn, sent = self.conns[rank], 0
            while sent < len(data):
                if conn is None or time.monotonic() > deadline:
                    self._fail(self._error(rank, f"{self._name(rank)} has not read its messages "
                                                 f"for {timeout:.0f} s"))
                try:
                    sent += conn.sock.send(view[sent:])
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    self._died(rank)
                _, writable, _ = select.select([], [conn], [], 0.05)
                if not writable:
                    self._pump(0.0)

    def recv(self, rank: int, timeout: float | None = None, what: str = "a reply"):
        """The next message from `rank`; WorkerError if any worker fails meanwhile or none
        comes within `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.queues[rank]:
            left = self._tick if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self._fail(self._error(rank, f"{self._name(rank)} sent no {what} within "
                                             f"{timeout:.0f} s; the group was stopped"))
            self._pump(min(left, self._tick))
        return self.queues[rank].popleft()

    def gather(self, timeout: float, what: str = "a reply") -> list:
        """The next message of every worker, in rank order; WorkerError naming the ones that
        sent none within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not all(self.queues):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [self.first_rank + i for i, q in enumerate(self.queues) if not q]
                self._fail(self._error(None, f"{self.label} {', '.join(map(str, missing))} sent "
                                             f"no {what} within {timeout:.0f} s; the group was "
                                             f"stopped"))
            self._pump(min(left, self._tick))
        return [q.popleft() for q in self.queues]

    def recv_any(self, timeout: float) -> list[tuple[int, object]]:
        """Every message that is or becomes available within `timeout` s, as (rank, message)."""
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
        beats, self._beats = self._beats, None
        if beats is not None:
            beats.close()

    def shutdown(self, grace: float = 5.0) -> None:
        """Ask every worker to stop, wait at most `grace` s, kill the rest. Raises the first
        error a worker reports while stopping (after all of them are gone)."""
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


class ParentLink:
    """A worker's end of its link to the `WorkerGroup` that started it.

    Reads the bootstrap record from standard input, connects, ignores SIGINT, and starts a
    thread that beats the heartbeat and watches the parent process (exiting within a second
    of its end). rank, world: this worker's place.
    """

    def __init__(self):
        boot = json.loads(sys.stdin.read())
        # What the parent can import, the worker can (as multiprocessing's spawn does): a
        # plugin on a path the parent added at run time still resolves here.
        sys.path.extend(p for p in boot.get("sys_path", ()) if p and p not in sys.path)
        self.rank: int = boot["rank"]
        self.world: int = boot["world"]
        self.store_port: int | None = boot["store_port"]
        self.parent_pid: int = boot["parent_pid"]
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with open(boot["beats"], "r+b") as f:
            self._beats = mmap.mmap(f.fileno(), _BEAT.size * (boot["slot"] + 1))
        self._slot, self._beat_s = boot["slot"], boot["beat_s"]
        self._beat()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(boot["address"])
        self.sock.sendall(_HELLO.pack(boot["token"].encode("ascii"), self.rank))
        threading.Thread(target=self._watch_parent, daemon=True, name="hwattn-watchdog").start()

    def _beat(self) -> None:
        _BEAT.pack_into(self._beats, _BEAT.size * self._slot, time.monotonic())

    def _watch_parent(self) -> None:
        # A thread of its own: it beats while the main thread computes, and stops only
        # when the whole process does.
        while os.getppid() == self.parent_pid:
            self._beat()
            time.sleep(self._beat_s)
        os._exit(3)

    def send(self, message) -> None:
        self.sock.sendall(pack(message))

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:  # the parent is gone: nothing left to do
                os._exit(0)
            buf += chunk
        return bytes(buf)

    def recv(self):
        (n,) = _HEADER.unpack(self._exact(_HEADER.size))
        return pickle.loads(self._exact(n))

    def poll(self, timeout: float) -> bool:
        """Whether a message (or the end of the link) is waiting, after up to `timeout` s."""
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return bool(ready)

    @contextlib.contextmanager
    def phase(self, name: str):
        """Run a phase of the worker's life; any exception is reported to the parent with its
        traceback, and the worker exits."""
        try:
            yield
        except BaseException:  # noqa: BLE001 - everything goes to the parent
            self.fail(name)

    def fail(self, phase: str) -> None:
        report = dict(phase=phase, traceback=traceback.format_exc(), time=time.time(),
                      pid=os.getpid(), summary=summarize(sys.exc_info()[1]))
        with contextlib.suppress(OSError):
            self.send(("error", report))
        self.exit(1)

    def exit(self, code: int = 0) -> None:
        """Leave at once (no interpreter teardown, which could wait on peers)."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        with contextlib.suppress(OSError):
            self.sock.close()
        os._exit(code)


def init_process_group(link: ParentLink, backend: str, setup_timeout: float = 120.0,
                       timeout: float = 600.0) -> None:
    """Join the group of `link`'s siblings through the parent's store. setup_timeout bounds the
    rendezvous; timeout bounds each collective."""
    import torch.distributed as dist

    if link.store_port is None:
        raise RuntimeError("this worker group was started without a rendezvous store")
    store = dist.TCPStore("127.0.0.1", link.store_port, None, False,
                          timeout=timedelta(seconds=setup_timeout))
    dist.init_process_group(backend, store=store, rank=link.rank, world_size=link.world,
                            timeout=timedelta(seconds=timeout))


def destroy_process_group(wait_s: float = 3.0) -> None:
    """Tear the process group down, giving up after `wait_s` s (a peer may be gone)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, daemon=True).start()
    done.wait(wait_s)


class InjectedFault(RuntimeError):
    """Raised by `fault_point` where HWATTN_FAULT asks for it (tests only)."""


def fault_point(role: str, phase: str, index: int, count: int | None = None) -> None:
    """Raise InjectedFault if HWATTN_FAULT is `role:phase:index` or `role:phase:index:count`;
    hang for good if it is `role:phase:index:hang`."""
    spec = os.environ.get("HWATTN_FAULT")
    if not spec:
        return
    parts = spec.split(":")
    if parts[:3] != [role, phase, str(index)]:
        return
    if parts[3:] == ["hang"]:  # stop answering instead of failing
        while True:
            time.sleep(3600)
    if len(parts) > 3 and count is not None and int(parts[3]) != count:
        return
    raise InjectedFault(f"injected fault: {role} {index} in {phase}"
                        + (f" (step {count})" if count is not None else "")
                        + f" at unix time {time.time():.3f}")
