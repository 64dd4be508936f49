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
# hwattn's own location, so a worker imports the same hwattn as its parent.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class WorkerError(RuntimeError):
    """A worker process failed. `rank` and `phase` say which and when; the message carries the
    worker's traceback (or, for a worker that died without one, how it died)."""

    def __init__(self, message: str, rank: int | None = None, phase: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.phase = phase


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
        return True
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
    """

    def __init__(self, module: str, world: int, label: str = "worker", env: list[dict] | None = None,
                 rendezvous: bool = False, connect_timeout: float = 180.0):
        if world < 1:
            raise ValueError(f"world must be >= 1, got {world}")
        self.world = world
        self.label = label
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
        self._finalizer = weakref.finalize(self, _reap, self.procs, self.folder)
        self.store = None
        store_port = None
        if rendezvous:
            from torch.distributed import TCPStore

            self.store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
            store_port = self.store.port
        address = os.path.join(self.folder, "link")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(address)
        listener.listen(world)
        token = secrets.token_hex(16)
        base = dict(os.environ, **NO_MULTICAST)
        base["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, base.get("PYTHONPATH")) if p)
        try:
            for rank in range(world):
                child_env = dict(base, **(env[rank] if env else {}))
                proc = subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=child_env, close_fds=True)
                self.procs.append(proc)
                thread = threading.Thread(target=_forward_output, daemon=True, name=f"hwattn-log-{rank}",
                                          args=(proc.stdout, f"({label} {rank}) ", self.tails[rank]))
                thread.start()
                self.log_threads.append(thread)
                boot = dict(address=address, token=token, rank=rank, world=world,
                            parent_pid=os.getpid(), store_port=store_port, sys_path=sys.path)
                proc.stdin.write(json.dumps(boot).encode())
                proc.stdin.close()
            self._accept(listener, token, connect_timeout)
        except BaseException:
            self.kill()
            raise
        finally:
            listener.close()
            # Every worker is connected (or the group failed): the address is not needed again.
            shutil.rmtree(self.folder, ignore_errors=True)

    # Start-up.
    def _accept(self, listener: socket.socket, token: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending: list[_Conn] = []
        while any(c is None for c in self.conns):
            self._check_exits()
            if time.monotonic() > deadline:
                missing = [r for r, c in enumerate(self.conns) if c is None]
                self._fail(WorkerError(f"{self.label} {missing} did not connect within {timeout:.0f} s"))
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
                    if not secrets.compare_digest(got, token) or not 0 <= rank < self.world \
                            or self.conns[rank] is not None:
                        item.sock.close()
                        continue
                    item.rank = rank
                    self.conns[rank] = item

    # Failures.
    def _check_exits(self) -> None:
        for rank, p in enumerate(self.procs):
            if p.poll() is not None:
                self._died(rank)

    def _died(self, rank: int) -> None:
        self._fail(None, dead=rank)

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
        notes = [f"{self.label} {r['rank']} ({r['phase']}): "
                 f"{r['traceback'].strip().splitlines()[-1]}" for r in reports]
        if silent:  # a rank that died without a word is the cause; its peers' errors follow
            rank = silent[0]
            self.log_threads[rank].join(timeout=1.0)  # the output it printed before dying
            tail = "".join(self.tails[rank]).rstrip()
            msg = (f"{self.label} {rank} (pid {self.procs[rank].pid}) died with "
                   f"{describe_exit(self.procs[rank].poll())} without reporting an error"
                   + (f"; its last output:\n{tail}" if tail else ""))
            error = WorkerError(msg + ("\nthen: " + "; ".join(notes) if notes else ""), rank)
        elif reports:  # the first report in time is the cause
            first = reports[0]
            msg = (f"{self.label} {first['rank']} failed during {first['phase']}:\n"
                   f"{first['traceback'].rstrip()}")
            if notes[1:]:
                msg += "\nthen: " + "; ".join(notes[1:])
            error = WorkerError(msg, first["rank"], first["phase"])
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
                    self._fail(WorkerError(f"{self.label} {rank} has not read its messages for "
                                           f"{timeout:.0f} s", rank))
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
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                self._fail(WorkerError(f"{self.label} {rank} sent no {what} within "
                                       f"{timeout:.0f} s; the group was stopped", rank))
            self._pump(min(left, 1.0))
        return self.queues[rank].popleft()

    def gather(self, timeout: float, what: str = "a reply") -> list:
        """The next message of every worker, in rank order; WorkerError naming the ones that
        sent none within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not all(self.queues):
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r, q in enumerate(self.queues) if not q]
                self._fail(WorkerError(f"{self.label} {', '.join(map(str, missing))} sent no "
                                       f"{what} within {timeout:.0f} s; the group was stopped"))
            self._pump(min(left, 1.0))
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
        """Stop every worker now (terminate, then kill) and release the socket folder."""
        for c in self.conns:
            if c is not None:
                with contextlib.suppress(OSError):
                    c.sock.close()
        self.conns = [None] * self.world
        self._finalizer()
        self.store = None

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


class ParentLink:
    """A worker's end of its link to the `WorkerGroup` that started it.

    Reads the bootstrap record from standard input, connects, ignores SIGINT and watches the
    parent process (exiting within a second of its end). rank, world: this worker's place.
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
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(boot["address"])
        self.sock.sendall(_HELLO.pack(boot["token"].encode("ascii"), self.rank))
        threading.Thread(target=self._watch_parent, daemon=True, name="hwattn-watchdog").start()

    def _watch_parent(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(0.5)
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
                      pid=os.getpid())
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
