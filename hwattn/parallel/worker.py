"""The worker's side of a `WorkerGroup` (`hwattn.parallel.launch`): `ParentLink`, its link to
the parent; joining and leaving the workers' `torch.distributed` process group through the
parent's store; and fault injection for tests.

A worker ignores SIGINT (the parent decides when it stops), beats its heartbeat from a thread
of its own, and exits by itself within a second when its parent process is gone, however it
went.

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
import select
import signal
import socket
import sys
import threading
import time
import traceback
from datetime import timedelta

from hwattn.parallel.errors import summarize
from hwattn.parallel.heartbeat import Beater
from hwattn.parallel.wire import HEADER, HELLO, check_length, pack


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
        self._beater = Beater(boot["beats"], boot["slot"])
        self._beat_s = boot["beat_s"]
        self._beater.beat()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(boot["address"])
        self.sock.sendall(HELLO.pack(boot["token"].encode("ascii"), self.rank))
        threading.Thread(target=self._watch_parent, daemon=True, name="hwattn-watchdog").start()

    def _watch_parent(self) -> None:
        # A thread of its own: it beats while the main thread computes, and stops only
        # when the whole process does.
        while os.getppid() == self.parent_pid:
            self._beater.beat()
            time.sleep(self._beat_s)
        os._exit(3)

    def send(self, message) -> None:
        self.sock.sendall(pack(message))

    def _exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            # At most 1 MiB a call: `recv(k)` allocates k bytes before it reads any.
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:  # the parent is gone: nothing left to do
                os._exit(0)
            buf += chunk
        return bytes(buf)

    def recv(self):
        """The next message from the parent (blocking); MessageError, naming the length, for
        a length header above `MAX_MESSAGE_BYTES` (a corrupted stream: raised inside a
        `phase`, it reaches the parent as this worker's error)."""
        (n,) = HEADER.unpack(self._exact(HEADER.size))
        check_length(n)
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
