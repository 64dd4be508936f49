"""Server test helpers: a tiny CPU engine and a real uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

TINY = dict(model="tiny", attention="gla-2", page_size=8, memory_budget=1 << 22,
            model_overrides=dict(max_seq_len=320, n_layers=2), device="cpu", seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the engine thread and the test's clients share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def serving(app):
    """Run `app` under uvicorn on a free loopback port; yields the base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive()


def wait_idle(engine, timeout: float = 20.0) -> dict:
    """The engine's stats once nothing runs, waits or holds a page (it steps in a thread)."""
    deadline = time.time() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["pages_used"] == 0:
            return stats
        assert time.time() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)
