"""Heartbeats: how a parent tells a worker that is alive but frozen (SIGSTOP, a debugger
holding it, a deadlock with the interpreter lock held) from one that is busy.

A thread of its own in every worker (`Beater`) stamps `time.monotonic()` (system-wide on
Linux) into the worker's slot of a small file both sides map, twice a second, while the main
thread computes. The parent (`HeartbeatMonitor`) reads the stamps whenever it waits on or
polls its workers; a worker whose stamp is older than the timeout and which meanwhile used no
CPU time and waited on no disk (`proc_activity`) is stuck. The CPU and disk test keeps a worker
inside one long native call that holds the interpreter lock (its heartbeat thread cannot run
then) from being taken for a stuck one.
"""

from __future__ import annotations

import mmap
import struct
import time

BEAT = struct.Struct("d")  # a worker's last heartbeat, time.monotonic()


def proc_activity(pid: int) -> tuple[str, int] | None:
    """(state, CPU clock ticks used) of process `pid` from /proc: state "R" running, "D" in
    the disk, "S" asleep, "T" stopped, ...; None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime
    except (OSError, IndexError, ValueError):
        return None


def beat_interval(timeout: float) -> float:
    """Seconds between a worker's beats under a heartbeat `timeout` (0: off)."""
    return min(0.5, timeout / 5) if timeout else 0.5


class HeartbeatMonitor:
    """The parent's side: the beats file of `world` workers and what it has seen of them.

    timeout: seconds without a heartbeat (and without CPU time used) after which a worker
    counts as stuck; 0 turns the check off. `open` makes and maps the file; `close` unmaps it.
    """

    def __init__(self, timeout: float, world: int):
        self.timeout = timeout
        self.world = world
        self.beats: mmap.mmap | None = None
        now = time.monotonic()
        self._watched_since = now  # heartbeats older than this were not watched for
        self._last_check = now
        self._sampled = 0.0  # when /proc was last read for the workers' activity
        self._busy = [(None, now)] * world  # (CPU ticks last seen, when last seen busy)

    def open(self, path: str) -> None:
        """Write the beats file at `path`, one zeroed slot per worker, and map it."""
        with open(path, "wb") as f:
            f.write(bytes(BEAT.size * self.world))
        with open(path, "r+b") as f:
            self.beats = mmap.mmap(f.fileno(), BEAT.size * self.world)

    def watch_from_now(self) -> None:
        """Count silence from now on (the workers have just connected)."""
        self._watched_since = time.monotonic()

    def stuck(self, pids: list[int]) -> tuple[int, float] | None:
        """(place, seconds without a heartbeat) of the first worker (`pids`, in place order)
        whose heartbeat has stood still for `timeout` seconds of our watching while it used no
        CPU and waited on no disk, or None. A gap in our own checks, as when this process was
        stopped along with its workers, restarts the count."""
        limit, beats = self.timeout, self.beats
        if not limit or beats is None:
            return None
        now = time.monotonic()
        if now - self._last_check > max(2.0, limit / 2):
            self._watched_since = now
        self._last_check = now
        since = self._watched_since
        sample = now - self._sampled >= 0.25
        if sample:
            self._sampled = now
        for i, pid in enumerate(pids):
            if sample:
                activity = proc_activity(pid)
                ticks = None if activity is None else activity[1]
                seen, busy = self._busy[i]
                if activity is not None and activity[0] in "RD":
                    busy = now  # computing or reading from disk: not frozen
                elif seen is not None and ticks != seen:
                    busy = now  # it used CPU time since the last look
                self._busy[i] = (ticks, busy)
            try:
                (beat,) = BEAT.unpack_from(beats, BEAT.size * i)
            except ValueError:  # closed from another thread (the group was killed)
                return None
            silent = now - max(beat, since)
            if silent <= limit:
                continue
            ticks, busy = self._busy[i]
            if ticks is not None and now - max(busy, since) <= limit:
                continue  # busy in a long native call that holds the interpreter lock
            return i, silent
        return None

    def close(self) -> None:
        beats, self.beats = self.beats, None
        if beats is not None:
            beats.close()


class Beater:
    """A worker's side: stamps the time into its `slot` of the beats file at `path`."""

    def __init__(self, path: str, slot: int):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), BEAT.size * (slot + 1))
        self._offset = BEAT.size * slot

    def beat(self) -> None:
        BEAT.pack_into(self._map, self._offset, time.monotonic())
