"""Where the host's time goes in each engine step.

`LLMEngine.step` runs in phases: schedule the batch, launch it (sampling settings, the step's
inputs, the forward and its sampling queued on the device), wait for the tokens of the step
in flight, resolve them (stop conditions, text, page registration) and build the outputs.
With overlapped scheduling the device runs one step while the host does all of this for the
next, so the step costs max(device, host - wait): a host whose phases other than `wait`
add up to more than the device step holds the device back.

`StepTimer` keeps, per finished step, the seconds spent in each phase and in Python's cyclic
garbage collector (timed through `gc.callbacks`, whichever phase it interrupted), over the
last `window` steps.

The launch phase is split further by the model runner (`ModelRunner.step_timer`), in
`LAUNCH_PARTS`: the step's inputs (tokens, block tables, lengths, split-KV plan, their
uploads), the forward (a CUDA graph's replay, or the eager forward's launches), sampling
(its settings uploaded, the sampling kernels queued) and copy_out (the tokens' copy to the
host queued), and in a speculative verify step draft (the drafter's proposals); the verify
step's sampling part also holds its one read-back, so on a GPU it waits there for the forward.
They are reported beside the phases and are not added to `host` again. A verify step's
acceptance bookkeeping (tokens appended, rejected slots trimmed, pages registered) is its
resolve phase.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections import deque
from contextlib import contextmanager

PHASES = ("schedule", "launch", "wait", "resolve", "output")
LAUNCH_PARTS = ("inputs", "forward", "sampling", "copy_out", "draft")
_NAMES = frozenset(PHASES + LAUNCH_PARTS)


class _Phase:
    """`StepTimer.phase`'s context manager: a class rather than a generator, since a step
    enters some twenty of them (about a microsecond less each)."""

    __slots__ = ("timer", "name", "start")

    def __init__(self, timer: StepTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> bool:
        self.timer._current[self.name] += time.perf_counter() - self.start
        return False


class StepTimer:
    """Host seconds per phase of each engine step (the last `window` steps).

    Use `timer.begin_step()`, then `with timer.phase("launch"): ...` inside the step and
    `timer.end_step()` after it;
    `summary()` gives the medians in µs. Garbage collection is timed only while the timer is
    `attached` (one `gc.callbacks` entry; `detach` removes it)."""

    def __init__(self, window: int = 4096):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.steps: deque[dict[str, float]] = deque(maxlen=window)
        self._current = self._empty()
        self._gc_start: float | None = None
        self.attached = False

    @staticmethod
    def _empty() -> dict[str, float]:
        return dict.fromkeys((*PHASES, *LAUNCH_PARTS, "gc"), 0.0)

    def phase(self, name: str) -> _Phase:
        """`with timer.phase(name):` adds the block's host seconds to `name` in this step."""
        if name not in _NAMES:
            raise ValueError(f"phase must be one of {PHASES + LAUNCH_PARTS}, got {name!r}")
        return _Phase(self, name)

    def begin_step(self) -> None:
        """Start a step afresh (what an interrupted step had timed is dropped)."""
        self._current = self._empty()

    def end_step(self) -> None:
        """Close the current step: its phase totals join the window."""
        self.steps.append(self._current)
        self._current = self._empty()

    def _on_gc(self, event: str, info: dict) -> None:
        if event == "start":
            self._gc_start = time.perf_counter()
        elif self._gc_start is not None:
            self._current["gc"] += time.perf_counter() - self._gc_start
            self._gc_start = None

    def attach(self) -> StepTimer:
        """Start timing garbage collections (returns self)."""
        if not self.attached:
            gc.callbacks.append(self._on_gc)
            self.attached = True
        return self

    def detach(self) -> None:
        if self.attached:
            gc.callbacks.remove(self._on_gc)
            self.attached = False

    def clear(self) -> None:
        self.steps.clear()
        self._current = self._empty()

    @contextmanager
    def collecting(self):
        """Inside the block: the window starts empty and garbage collections are timed."""
        self.clear()
        self.attach()
        try:
            yield self
        finally:
            self.detach()

    def summary(self, last: int | None = None) -> dict:
        """`summarize` of the last `last` steps kept (default: all)."""
        steps = list(self.steps)
        return summarize(steps[-last:] if last else steps)


def summarize(steps: list[dict[str, float]]) -> dict:
    """Per phase and launch part of `steps` (each a `StepTimer` record), plus "gc" and "host"
    (every phase but `wait`): the median, p90 and max in µs, and the number of steps `n`."""
    out: dict = dict(n=len(steps))
    if not steps:
        return out
    rows = [dict(s, host=sum(s[p] for p in PHASES if p != "wait")) for s in steps]
    for key in (*PHASES, *LAUNCH_PARTS, "gc", "host"):
        values = sorted(r.get(key, 0.0) * 1e6 for r in rows)
        out[key] = dict(median=statistics.median(values),
                        p90=values[(9 * len(values) + 9) // 10 - 1],  # nearest rank: ceil(0.9 n)
                        max=values[-1])
    return out
