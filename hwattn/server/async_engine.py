"""The engine loop in a background thread, fed and drained from asyncio.

The HTTP handlers never touch the `LLMEngine` directly while it steps: new requests and
aborts go into queues that the engine thread takes between steps, and each step's outputs
are handed back to the requests' asyncio queues with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import deque

from hwattn.engine.sampling_params import SamplingParams
from hwattn.parallel.errors import WorkerError
from hwattn.server.metrics import LatencyMetrics

log = logging.getLogger(__name__)


def public_reason(err: BaseException) -> str:
    """What a client may hear of a failure: the first line of its message (a `WorkerError`'s
    one-line reason), without process ids, at most 200 characters. The whole error (a worker's
    traceback and last output, with its file paths and ports) goes to the server's log only."""
    text = err.reason if isinstance(err, WorkerError) else str(err)
    first = next((line.strip() for line in text.splitlines() if line.strip()),
                 type(err).__name__)
    # A stuck worker's reason names its pid (for the operator: it is the process to look at).
    first = re.sub(r"\s*\(pid [0-9]+\)", "", first)
    return first.rstrip(":; ")[:200]


# How long `AsyncEngine.shutdown` waits for the engine thread beyond the engine's own step
# timeout (the engine then fails the step: kills its workers, fails the step's requests), or
# in all for an engine without a step timeout.
STOP_GRACE_S = 15.0
STOP_WAIT_S = 30.0


# Why a request is refused when no engine thread was ever started: an app served without its
# lifespan (uvicorn --lifespan off, starlette's TestClient outside `with`) would otherwise
# queue the request for a loop that never takes it.
NOT_STARTED = ("the engine is not running: the server's startup (its lifespan) never started "
               "it; serve the app with its lifespan on (starlette's TestClient: use it in a "
               "`with` block)")


def _step_timeout(engine) -> float | None:
    """The longest the engine lets one step take before it fails the step itself: its
    tensor-parallel runner's step timeout; None when it sets none."""
    return getattr(getattr(engine, "runner", None), "step_timeout", None)


def _seconds(t: float) -> str:
    """`t` for a message: "600", "1.5"."""
    return f"{t:.1f}".rstrip("0").rstrip(".")


def _put_all(pairs) -> None:
    for queue, item in pairs:
        queue.put_nowait(item)


class EngineError(RuntimeError):
    """The engine failed while running a request."""


class EngineDeadError(EngineError):
    """A worker process the request needed is gone or stuck: a tensor-parallel rank (the
    engine can serve no more requests: `AsyncEngine.dead` says why) or the data-parallel
    replica that ran it (the others serve on; it is restarted). The server answers 503 with
    the reason, and /health says why."""


class AsyncEngine:
    """Runs `engine.step()` in a thread; `generate` streams a request's outputs.

    engine: an `LLMEngine` or a `DataParallelEngine` (whose step waits briefly for its
    replicas' outputs).
    """

    def __init__(self, engine, rate_window_s: float = 10.0):
        self.engine = engine
        self._lock = threading.Lock()
        self._adds: deque = deque()
        self._aborts: deque[str] = deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._looping = False  # whether an engine thread runs `_loop` (and will go on)
        self._window = rate_window_s
        self._history: deque[tuple[float, int]] = deque()
        self.snapshot = engine.stats()
        # Labelled with the served model's name by `build_app`.
        self.latency = LatencyMetrics(max_model_len=getattr(engine, "max_model_len", None))
        self.dead: str | None = None  # why the engine can serve no more, once it cannot
        self._closed: str | None = None  # set by `shutdown`, until `start` again
        self._health: tuple[bool, str | None] = (True, None)

    def start(self) -> None:
        """Run the engine thread (again, after `shutdown`: an app's lifespan may start twice);
        a thread that outlived `shutdown` serves on instead of a new one."""
        with self._lock:
            self._closed = None
            self._stop.clear()
            if not self._looping:  # decided under the lock: `_loop` ends only with it held
                self._looping = True
                self._thread = threading.Thread(target=self._loop, name="hwattn-engine",
                                                daemon=True)
                self._thread.start()

    def shutdown(self, timeout: float | None = None) -> bool:
        """Stop the engine thread: it ends after the step it is in (the engine itself is left
        running: its owner shuts it down). Waits at most `timeout` s; None: as long as the
        engine lets a step take (a tensor-parallel step timeout, HWATTN_STEP_TIMEOUT_S, past
        which the engine fails the step itself) plus STOP_GRACE_S, or STOP_WAIT_S for an
        engine without a step timeout. Whether the thread has ended; if not, an error in the
        log says so, and a later call waits again.
        Callers still waiting in `generate`, and any that come after, get an EngineDeadError
        (the server's 503) instead of waiting for outputs that will not come."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            self._closed = "the server is shutting down"
            self._adds.clear()
            self._deliver([(rid, EngineDeadError(self._closed)) for rid in self._queues])
        thread = self._thread
        if thread is None:
            return True
        bound = ""
        if timeout is None:
            step_timeout = _step_timeout(self.engine)
            timeout = STOP_WAIT_S if step_timeout is None else step_timeout + STOP_GRACE_S
            if step_timeout is not None:
                bound = (f" (the engine's step timeout {_seconds(step_timeout)} s, "
                         f"HWATTN_STEP_TIMEOUT_S, and {_seconds(STOP_GRACE_S)} s more)")
        thread.join(timeout)
        if thread.is_alive():
            log.error("the engine thread is still running after %s s%s: it is inside the "
                      "engine, which it may still be using when the engine is shut down",
                      _seconds(timeout), bound)
            return False
        self._thread = None
        return True

    def unavailable(self) -> str | None:
        """Why no request can run now, in words a client may read: the engine is down, the
        server is shutting down, or the engine thread was never started (`NOT_STARTED`);
        None when requests are taken."""
        if self.dead is not None:
            return self.dead
        with self._lock:
            if self._closed is not None:
                return self._closed
            return None if self._looping else NOT_STARTED

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       owner: str | None = None):
        """Yield this request's `RequestOutput` after every step that advanced it, the last one
        finished (of `params.output_kind`: the server asks for "delta" outputs). Leaving the
        loop early (client gone, task cancelled) aborts the request.
        owner: whom the scheduler shares the batch fairly between (default: the request; the
        server passes one owner for all the prompts of an HTTP request).
        Raises ValueError if the engine refuses the request, EngineError if it fails, and
        EngineDeadError at once when no engine thread runs to take it (`unavailable`)."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        # Started before the engine can take it: no latency is missed.
        timer = self.latency.timer(delta=params.output_kind == "delta")
        with self._lock:
            if self._closed is not None:
                raise EngineDeadError(self._closed)
            if not self._looping:
                raise EngineDeadError(NOT_STARTED)
            self._queues[request_id] = (loop, queue)
            self._adds.append((request_id, prompt_ids, params, owner))
        self._wake.set()
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, Exception):
                    finished = True
                    raise out
                finished = out.finished
                if out.finish_reason == "error":
                    failure = EngineDeadError if out.worker_failed else EngineError
                    raise failure(f"the request failed: {out.error}")
                timer.observe(out)
                yield out
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            with self._lock:
                self._queues.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def health(self) -> tuple[bool, str | None]:
        """(serving, problem): whether requests can run now, and what is wrong, if anything
        (a worker gone: for good when not serving; a data-parallel replica down and
        restarting while the others serve)."""
        if self.dead is not None:
            return False, self.dead
        return self._health

    def tokens_per_second(self) -> float:
        """Generated tokens per second over the last `rate_window_s` seconds."""
        with self._lock:
            if len(self._history) < 2:
                return 0.0
            (t0, n0), (t1, n1) = self._history[0], self._history[-1]
        return (n1 - n0) / max(time.perf_counter() - t0, t1 - t0, 1e-9)

    def _send(self, request_id: str, item) -> None:
        self._deliver([(request_id, item)])

    def _deliver(self, items) -> None:
        """Hand (request_id, item) pairs to their requests' queues, waking each event loop
        once for all of them (a step's outputs are many; each wake-up costs). A request whose
        event loop is closed has nobody listening: it is forgotten and aborted. Call with
        `_lock` held."""
        by_loop: dict = {}
        for request_id, item in items:
            target = self._queues.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((request_id, target[1], item))
        for loop, entries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(queue, item) for _, queue, item in entries])
            except RuntimeError:  # that caller's event loop is closed: nobody is listening
                for request_id, _, _ in entries:
                    if self._queues.pop(request_id, None) is not None:
                        self._aborts.append(request_id)

    def _loop(self) -> None:
        while True:
            while not self._stop.is_set():
                try:
                    self._iteration()
                except Exception:  # noqa: BLE001 - keep serving; the requests in flight are lost
                    log.exception("engine loop failed")
                    try:
                        self._fail_all("engine loop failed")
                    except Exception:  # noqa: BLE001
                        log.exception("could not fail the requests in flight")
                    self._stop.wait(0.1)  # no hot loop if the failure repeats
            with self._lock:  # unless `start` came meanwhile: then this thread serves on
                if self._stop.is_set():
                    self._looping = False
                    return

    def _iteration(self) -> None:
        engine = self.engine
        with self._lock:
            adds, self._adds = list(self._adds), deque()
            aborts, self._aborts = list(self._aborts), deque()
        for request_id, ids, params, owner in adds:
            try:
                engine.add_request(ids, params, request_id=request_id, owner=owner)
            except ValueError as err:  # refused: only that request hears of it
                with self._lock:
                    self._send(request_id, err)
            except Exception as err:  # noqa: BLE001 - e.g. a failed worker: fail the request
                log.exception("engine refused a request")
                self._note_death(err)
                with self._lock:
                    self._send(request_id, self._error(f"the request could not be queued: "
                                                       f"{public_reason(err)}"))
        for request_id in aborts:
            try:
                engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - the engine is gone; nothing to stop
                log.exception("engine could not abort a request")
        if engine.has_unfinished():
            try:
                outputs = engine.step()  # a request failing alone comes back finished "error"
            except Exception as err:  # noqa: BLE001 - the step itself failed: fail its requests
                log.exception("engine step failed")
                self._note_death(err)
                self._fail_all(f"engine step failed: {public_reason(err)}")
                outputs = []
            with self._lock:
                self._deliver([(out.request_id, out) for out in outputs])
                self._record()
        else:
            self._check_workers()
            with self._lock:
                self._record()
            self._wake.wait(timeout=0.5)
            self._wake.clear()

    def _check_workers(self) -> None:
        """Between requests: notice a worker that died or got stuck (and a data-parallel
        replica that is back), so that /health tells before a request runs into it."""
        if self.dead is not None or not hasattr(self.engine, "check_workers"):
            return
        try:
            self.engine.check_workers()
        except Exception as err:  # noqa: BLE001 - the engine is down; say so from now on
            log.error("engine worker failed: %s", err)
            self._note_death(err)

    def _note_death(self, err: Exception) -> None:
        """A worker's failure leaves the engine unable to run any step: remember why (in
        words a client may read; the traceback was logged)."""
        if isinstance(err, WorkerError) and self.dead is None:
            self.dead = f"the engine is down: {public_reason(err)}"

    def _error(self, message: str) -> EngineError:
        return EngineError(message) if self.dead is None else EngineDeadError(self.dead)

    def _fail_all(self, message: str) -> None:
        """Abort every request the engine holds and tell each caller why."""
        engine = self.engine
        failed = []
        for request_id in engine.unfinished_request_ids():
            try:
                engine.abort_request(request_id)
            except Exception:  # noqa: BLE001 - a dead engine cannot abort
                pass
            failed.append((request_id, self._error(message)))
        with self._lock:
            self._deliver(failed)

    def _record(self) -> None:
        now = time.perf_counter()
        self.snapshot = self.engine.stats()
        if hasattr(self.engine, "health"):
            self._health = self.engine.health()
        self._history.append((now, self.snapshot["generation_tokens"]))
        while self._history and now - self._history[0][0] > self._window:
            self._history.popleft()
