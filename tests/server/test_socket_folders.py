"""A server killed with SIGKILL leaves no `hwattn-*` folder in the temporary directory: the
worker group's socket folder is removed as soon as its workers have connected, and a folder
left by a process killed during start-up (its PID gone) is swept by the next group."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from hwattn.parallel.folders import sweep_stale_folders  # noqa: E402
from tests.parallel.procs import children, wait_gone  # noqa: E402


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sweep_removes_only_folders_of_processes_that_are_gone(tmp_path):
    stale = tmp_path / f"hwattn-{dead_pid()}-abc"
    live = tmp_path / f"hwattn-{os.getpid()}-def"
    parent = tmp_path / f"hwattn-{os.getppid()}-ghi"
    other = tmp_path / "hwattn-data"
    for folder in (stale, live, parent, other):
        folder.mkdir()
    (stale / "link").write_text("")
    assert sweep_stale_folders(str(tmp_path)) == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, parent, other))


def test_a_killed_tensor_parallel_server_leaves_no_socket_folder(tmp_path):
    stale = tmp_path / f"hwattn-{dead_pid()}-left"  # as a server killed while starting leaves
    stale.mkdir()
    port = free_port()
    env = dict(os.environ, TMPDIR=str(tmp_path))
    cmd = [sys.executable, "-m", "hwattn", "serve", "tiny", "--attention", "gla-2", "--device",
           "cpu", "--tp", "2", "--page-size", "8", "--memory-budget", "4e6", "--max-seq-len",
           "128", "--port", str(port), "--cpu-threads", "1"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False,
                             timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", trust_env=False, timeout=60,
                       json={"model": "tiny-gla-2", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200, r.text
        workers = children(server.pid)
        assert len(workers) == 2
        assert not list(tmp_path.glob("hwattn-*")), list(tmp_path.iterdir())
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=10)
        assert not wait_gone(workers, 10.0)  # the ranks see their parent gone and exit
        assert not list(tmp_path.glob("hwattn-*")), list(tmp_path.iterdir())
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
