"""Tensor-parallel execution in worker processes: every rank, rank 0 included, runs in a
`python -m hwattn.engine.tp_worker` process; this process keeps the scheduler, the page
table and no weights.

Each step the engine's `StepInput` (plain lists) and the sampling settings of its rows go to
every rank; all ranks run the sharded forward (all-reduces among themselves: gloo on CPU,
NCCL on GPUs), rank 0 samples and sends back only the token ids. Because this process never
joins the process group, it can create and shut down any number of tensor-parallel engines,
and a failed or stuck rank is killed rather than waited on (`hwattn.parallel.launch`).
"""

from __future__ import annotations

import time

import torch

from hwattn.device import check_from_first_gpu
from hwattn.parallel.errors import seconds_or_env
from hwattn.parallel.launch import WorkerGroup


class TensorParallelCallError(RuntimeError):
    """A function run on the ranks by `TensorParallelExecutor.call` raised there; the ranks
    serve on. `rank` is the lowest rank it failed on, `traceback` that rank's."""

    def __init__(self, message: str, rank: int, traceback: str = ""):
        super().__init__(message)
        self.rank = rank
        self.traceback = traceback


class TensorParallelExecutor:
    """The engine's runner when `tensor_parallel_size > 1`.

    world: ranks (processes). build: keyword arguments of `loader.build_model` (device "cuda"
    puts rank r on cuda:r of the visible devices; an index other than 0 is refused, naming
    the device). runner_kwargs: of `ModelRunner` but num_pages. engine_config,
    max_model_len: size the page pool on every rank (the smallest plan wins, so every rank
    holds the same pages).

    setup_timeout (None: HWATTN_SETUP_TIMEOUT_S, default 600 s) bounds start-up: processes,
    process group, weights, cache and CUDA graphs. step_timeout (None: HWATTN_STEP_TIMEOUT_S,
    default 600 s) bounds each step's reply and each collective among the ranks. Either, when
    given, must be a finite number of seconds > 0 (ValueError naming it before any process
    starts; 0 is not "the default"). A rank that dies, or stops (its heartbeat stands still for
    HWATTN_HEARTBEAT_TIMEOUT_S, default 5 s: see `hwattn.parallel.launch`), fails the step
    within seconds, whatever the step timeout. Any failure raises `WorkerError` with the
    rank's traceback, and every rank is killed; a function given to `call` that raises is
    the caller's error alone (`TensorParallelCallError`), and the ranks serve on.
    """

    def __init__(self, world: int, build: dict, runner_kwargs: dict, engine_config,
                 max_model_len: int, setup_timeout: float | None = None,
                 step_timeout: float | None = None):
        if world < 2:
            raise ValueError(f"tensor_parallel_size must be >= 2 for worker processes, got {world}")
        device = torch.device(build.get("device") or "cpu")
        check_from_first_gpu(device, f"tensor_parallel_size {world}",
                             "rank r runs on cuda:r of the visible GPUs")
        if device.type == "cuda" and torch.cuda.device_count() < world:
            raise ValueError(f"tensor_parallel_size {world} needs {world} GPUs, "
                             f"found {torch.cuda.device_count()}")
        self.world = world
        self._sent = 0  # the number of the last step message sent to the serving ranks
        self.setup_timeout = seconds_or_env("setup_timeout", setup_timeout,
                                            "HWATTN_SETUP_TIMEOUT_S", 600.0)
        self.step_timeout = seconds_or_env("step_timeout", step_timeout,
                                           "HWATTN_STEP_TIMEOUT_S", 600.0)
        spec = dict(build=build, runner=runner_kwargs, engine_config=engine_config,
                    max_model_len=max_model_len, threads=max(1, torch.get_num_threads() // world),
                    setup_timeout=self.setup_timeout, collective_timeout=self.step_timeout)
        # One deadline for the whole set-up (starting, the page plan, the build), as
        # documented: not `setup_timeout` for each of the three waits.
        deadline = time.monotonic() + self.setup_timeout

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        self.group = WorkerGroup("hwattn.engine.tp_worker", world, label="tensor-parallel rank",
                                 rendezvous=True, connect_timeout=self.setup_timeout)
        try:
            self.group.broadcast(("build", spec))
            planned = [m[1] for m in self.group.gather(left(), "page plan", self.setup_timeout)]
            self.num_pages = min(planned)
            self.group.broadcast(("pages", self.num_pages))
            ready = [m[1] for m in self.group.gather(left(), "ready signal", self.setup_timeout)]
        except BaseException:
            self.group.kill()
            raise
        info = ready[0]
        self.device = torch.device(info["device"])
        self.kv_bytes_per_token: int = info["kv_bytes_per_token"]
        self.cuda_graphs: bool = info["cuda_graphs"]
        self.graph_error: str | None = info["graph_error"]

    @property
    def pids(self) -> list[int]:
        """Process ids of the ranks, rank 0 first."""
        return self.group.pids

    def _run(self, message, ranks=(0,)):
        """Send `message` to every rank; the results of `ranks` (those that answer it)."""
        # Each message carries its number and each reply repeats it: a reply to an exchange
        # cut short here (a KeyboardInterrupt while waiting) is dropped, not taken for this
        # one's. (Numbered before it is sent: an interrupt between the two skips a number.)
        self._sent += 1
        number = self._sent
        self.group.broadcast((*message, number))
        deadline = time.monotonic() + self.step_timeout
        results = []
        for rank in ranks:
            while True:
                left = max(0.0, deadline - time.monotonic())
                kind, result, answered = self.group.recv(rank, left, "step result",
                                                         budget=self.step_timeout)
                if answered == number:
                    results.append(result)
                    break
        return results

    def sample_step(self, step, sampling) -> list[int | str]:
        """`ModelRunner.sample_step` on every rank; rank 0's tokens (a row whose sampling
        failed on rank 0 gets its error, a str, as there)."""
        return self._run(("sample", step, sampling))[0]

    def verify_step(self, step, sampling, draft_probs=None):
        """`ModelRunner.verify_step` on every rank, for a deterministic drafter only; rank 0's
        per-row results."""
        if draft_probs is not None:
            raise ValueError("tensor-parallel workers verify deterministic drafts only "
                             "(speculative='ngram')")
        return self._run(("verify", step, sampling))[0]

    def call(self, fn, *args):
        """Run `fn(runner, *args)` on every rank (each with its own `ModelRunner`, so any
        collective inside lines up) and return rank 0's result. `fn` must be importable.

        `TensorParallelCallError` (the lowest failing rank's error and traceback) if `fn`
        raises on any rank; every rank has then finished `fn`, and an all-reduce checks that
        they are still in step before the group serves the next step. A rank that raises
        before a collective its peers wait in leaves them there: that fails the group
        (`WorkerError`, every rank killed) within `step_timeout`, as a stuck step does."""
        replies = self._run(("call", fn, args), range(self.world))
        failed = [(rank, value) for rank, (ok, value) in enumerate(replies) if not ok]
        if not failed:
            return replies[0][1]
        self._run(("sync",), range(self.world))
        rank, (happened, remote) = failed[0]
        what = getattr(fn, "__name__", fn)
        ranks = ", ".join(str(r) for r, _ in failed)
        raise TensorParallelCallError(f"{what} raised {happened} on tensor-parallel rank "
                                      f"{ranks}; the ranks serve on\n{remote.rstrip()}",
                                      rank, remote)

    def check(self) -> None:
        """Raise `WorkerError` if a rank has died or is stuck; for an engine between steps."""
        self.group.check()

    def shutdown(self) -> None:
        """Stop the ranks: bounded, never waits on a dead one; raises a rank's shutdown error."""
        self.group.shutdown()
