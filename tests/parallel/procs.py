"""Helpers to check that worker processes are gone."""

from __future__ import annotations

import os
import re
import time


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pids, timeout: float = 10.0) -> list[int]:
    """Wait up to `timeout` s for every pid to end; the ones still running."""
    end = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() > end:
            return left
        time.sleep(0.1)


def fault_age(message: str) -> float:
    """Seconds since the injected fault quoted in `message` was raised."""
    stamp = float(re.search(r"at unix time ([0-9.]+)", message).group(1))
    return time.time() - stamp


def children(pid: int) -> list[int]:
    """Direct children of `pid`."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, ValueError):
                pass
    return out


def wait_exited(pid: int, timeout: float = 10.0) -> bool:
    """Wait up to `timeout` s until `pid` has exited with all its threads, so its files
    (sockets) are closed: a killed process shows as a zombie as soon as its main thread
    ends, while its other threads may still hold the sockets open for a moment. Whether it
    did."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if not alive(pid) and os.listdir(f"/proc/{pid}/task") == [str(pid)]:
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.02)
    return False
