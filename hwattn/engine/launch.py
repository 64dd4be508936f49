"""Launched decode steps: their tokens on the way back to the host (`PendingTokens`) and the
thread that can make the launches (`LaunchThread`, `EngineConfig.launch_thread`).

A launched step (`ModelRunner.launch_step`) is queued on the device and returns at once; its
sampled tokens start their copy to the host, and `PendingTokens.result()` is the step's one
synchronisation.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from hwattn.engine.model_runner import ModelRunner, StepInput
    from hwattn.engine.sampler import SamplingInput


class PendingTokens:
    """Tokens sampled by a launched step, on their way to the host: `result()` waits for
    them (the step's one synchronisation) and returns one int per sampled row, or a row's
    error (a str) where sampling it failed. `launch`: the future of a launch made by a
    `LaunchThread` (its `PendingTokens`), waited for first."""

    def __init__(self, host: Tensor | None = None, event=None, rows: list | None = None,
                 launch: Future | None = None, release=None):
        self._host, self._event, self._rows, self._launch = host, event, rows, launch
        self._release = release  # called once the host buffer is read (a `PinnedRing` slot)

    def result(self) -> list[int | str]:
        if self._launch is not None:  # the launch's own tokens (re-raises a failed launch)
            return self._launch.result().result()
        if self._rows is None:
            if self._event is not None:
                self._event.synchronize()
            self._rows = self._host.tolist()
            if self._release is not None:
                self._release()
                self._host = self._release = None
        return self._rows


class LaunchThread:
    """Makes a runner's `launch_step` calls from one thread of their own, in the order they
    are submitted, so that the CUDA API's time in each launch (the graph's replay, the input
    copies: calls that release the GIL) overlaps the engine's Python for other steps (reading
    tokens back, outputs, scheduling) instead of adding to it.

    Every other use of the runner must come after `drain()`. A launch that raises re-raises
    from its `PendingTokens.result()` (or from `drain`). The thread launches on the stream
    that was current where the step was submitted.
    """

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hwattn-launch")
        self._last: Future | None = None

    def submit(self, step: StepInput, sampling: SamplingInput | None) -> PendingTokens:
        cuda = self.runner.device.type == "cuda"
        stream = torch.cuda.current_stream(self.runner.device) if cuda else None

        def launch() -> PendingTokens:
            with torch.cuda.stream(stream) if cuda else nullcontext():
                return self.runner.launch_step(step, sampling)

        self._last = self._pool.submit(launch)
        return PendingTokens(launch=self._last)

    def drain(self) -> None:
        """Return once every submitted launch has been made (queued on the device)."""
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)
