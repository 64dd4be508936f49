"""Data parallelism: N engine replicas behind one engine interface, with a load-aware router.

Each replica is an `LLMEngine` in its own process (`hwattn.engine.engine_core`), tensor-
parallel itself when asked, on its own GPUs: replica i of N, each of M ranks, sees the
visible devices [i*M, (i+1)*M) as its cuda:0..M-1. One process per replica is what lets
several tensor-parallel groups serve side by side (a process joins one process group at most)
and keeps each replica's scheduling off the others' Python interpreter.

`DataParallelEngine` offers what `LLM` and the server's `AsyncEngine` use of an `LLMEngine`:
add_request, add_requests, validate_prompt, check_params, abort_request, has_unfinished, step, stats, counters,
unfinished_request_ids, check_invariants, shutdown. `step()` waits briefly for replica
outputs rather than running a model step; the replicas step on their own.

Routing: each request goes to the replica with the fewest outstanding tokens (prompt tokens
not yet prefilled plus output tokens not yet generated, no more than the context allows,
over its unfinished requests), ties broken round-robin. A request lives on exactly one
replica, under a key never used again, from `add_request` until its final output or its
abort; outputs for a key that is no longer live are dropped, so none is delivered twice or
to the wrong request.

A replica failing fails its own requests alone: its process died (killed, out of memory),
raised (its step failed, one of its tensor-parallel ranks failed) or stopped beating its
heartbeat (stopped, frozen: caught within HWATTN_HEARTBEAT_TIMEOUT_S, default 5 s). Its
requests finish with finish_reason "error", `worker_failed` set and the reason in `error`;
the other replicas' requests go on untouched. The failed replica is killed and restarted in
the background (same engine, same devices; `hwattn.engine.replicas` bounds the restarts),
and the router sends it requests again once it is built. Meanwhile new requests go to the
replicas that are up; with none up they fail at once the same way, and `health()` says why.
Once no replica is up and none is restarting, or once `shutdown` was called, the engine is
dead: `step` and `add_request` raise `WorkerError`.

Requests are checked here, all of a batch before any is routed, with the replicas' own checks
(`validate_prompt`, `check_params`), and pickled for their replica. A request that fails
alone inside its replica (the replica cannot unpickle it, or its sampling, detokenization or
stop handling raised) comes back finished with "error" and its `error`, as from an
`LLMEngine`; the other requests go on.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pickle
import random
import time

import torch

from hwattn.device import check_from_first_gpu
from hwattn.engine.requests import (check_owner, check_request_ids, check_requests,
                                    checked_params, fresh_request_ids, validate_prompt)
from hwattn.engine.replicas import ReplicaProcesses
from hwattn.engine.sampling_params import ParamError, SamplingParams
from hwattn.engine.sequence import CompletionOutput, RequestOutput
from hwattn.parallel.errors import WorkerError, check_seconds, seconds_or_env, summarize

COUNTERS = ("prompt_tokens", "generation_tokens", "steps", "prefill_steps", "decode_steps",
            "mixed_steps", "draft_tokens", "accepted_tokens", "finished", "aborted", "failed")
GAUGES = ("running", "waiting", "pages_total", "pages_used")  # of `stats`; the rest count up


class LeastOutstandingTokens:
    """Picks the replica with the least outstanding work, in tokens."""

    def __init__(self, size: int):
        self.load = [0] * size
        self._next = itertools.cycle(range(size))

    def pick(self, up: list[bool] | None = None) -> int | None:
        """The least-loaded replica among those `up` (all when None); None if none is."""
        start = next(self._next)
        order = [(start + i) % len(self.load) for i in range(len(self.load))]
        order = [r for r in order if up is None or up[r]]
        return min(order, key=lambda r: self.load[r]) if order else None

    def add(self, replica: int, tokens: int) -> None:
        self.load[replica] += tokens


class ReplicaCallError(RuntimeError):
    """A function run in a replica by `DataParallelEngine.call_replica` failed there (or its
    result could not come back); the replica serves on. The message names the replica and
    the function; `traceback` is the replica's (empty when the failure was here), and the
    function's own exception, when it could come back, is the `__cause__`."""

    def __init__(self, message: str, replica: int, traceback: str = ""):
        super().__init__(message)
        self.replica = replica
        self.traceback = traceback


def _check_supported(params: SamplingParams) -> None:
    """`ParamError` naming the setting if replicas cannot honour `params`: they report the
    text and tokens of one completion, without log-probabilities."""
    for name, plain in (("n", 1), ("logprobs", None), ("prompt_logprobs", None)):
        if getattr(params, name) != plain:
            raise ParamError(name, f"{name}={getattr(params, name)!r} is not supported with "
                                   f"data_parallel_size > 1")


def _check_invariants(engine) -> None:
    """Run inside a replica: raises if its engine leaks pages."""
    engine.check_invariants()


@dataclasses.dataclass
class _Request:
    key: str  # the request's name on its replica: unique for the engine's life
    replica: int
    prompt: str | None
    prompt_ids: list[int]
    outstanding: int  # prompt tokens until the first token, plus output tokens still to come
    arrival: float
    # Its completion's token ids and text: all so far, or, for output_kind "delta", what has
    # not yet come out of `step` (emptied as its output does), its text from character
    # `base` on.
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    base: int = 0
    # A "delta" request's characters at the end of its text kept back while it runs (its
    # `SamplingParams.stop_holdback`): its replica reports everything so far, as for
    # "cumulative", so that an abort here still brings them.
    hold: int = 0
    first_token_time: float | None = None
    first_scheduled_time: float | None = None  # when its replica first admitted it
    error: str | None = None
    stop_reason: str | int | None = None
    num_cached: int = 0  # prompt tokens its replica found in its prefix cache
    output_kind: str = "cumulative"  # its params' ("final_only": an output once it has finished)


def _visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


class DataParallelEngine:
    """`size` replicas of `create_engine(**engine_kwargs)`, each in its own process.

    engine_kwargs: `create_engine`'s keywords (tensor_parallel_size included) with `model`,
    a resolved `device` and `dtype`. model_config, tokenizer: the served model's, for prompt
    validation here. poll_s: how long `step()` waits for outputs before returning none.
    setup_timeout: seconds for a replica to start and build its engine (None:
    HWATTN_SETUP_TIMEOUT_S, default 600 s; when given, a finite number > 0).
    workers: a stand-in for the replica processes with `ReplicaProcesses`' methods (tests run
    replicas in this process); None starts the processes.
    """

    def __init__(self, size: int, engine_kwargs: dict, model_config, tokenizer,
                 poll_s: float = 0.02, setup_timeout: float | None = None, workers=None):
        if size < 2:
            raise ValueError(f"data_parallel_size must be >= 2 for replica processes, got {size}")
        setup_timeout = seconds_or_env("setup_timeout", setup_timeout, "HWATTN_SETUP_TIMEOUT_S",
                                       600.0)
        tp = engine_kwargs.get("tensor_parallel_size", 1)
        device = torch.device(engine_kwargs["device"])
        env = None
        check_from_first_gpu(device, f"data_parallel_size {size}",
                             f"replica i runs on the visible GPUs [i*{tp}, (i+1)*{tp})")
        if device.type == "cuda":
            gpus = _visible_gpus()
            if len(gpus) < size * tp:
                raise ValueError(f"data_parallel_size {size} x tensor_parallel_size {tp} needs "
                                 f"{size * tp} GPUs, found {len(gpus)}")
            env = [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * tp:(i + 1) * tp])} for i in range(size)]
            engine_kwargs = dict(engine_kwargs, device="cuda")
        self.size = size
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.tensor_parallel_size = tp
        self.data_parallel_size = size
        self.model = None  # the weights live in the replicas
        self.poll_s = poll_s
        self.setup_timeout = setup_timeout
        self.router = LeastOutstandingTokens(size)
        self.requests: dict[str, _Request] = {}
        self.keys: dict[str, str] = {}  # replica-side key -> request id
        self.results: list[list] = [[] for _ in range(size)]
        # Per replica, the results of calls cut short (a KeyboardInterrupt while waiting) still
        # to come: dropped when they come, so that a later call gets its own result.
        self.owed = [0] * size
        self.pending: dict[str, RequestOutput] = {}
        self.step_times: list[tuple[str, float]] = []
        # Requests' ends as delivered here (`stats`): a request aborted here while its
        # replica finished it is aborted, one failed with its replica or refused by it failed.
        self.outcomes = dict(finished=0, aborted=0, failed=0)
        self.up = [True] * size
        self.down: dict[int, str] = {}  # replica -> why it is down, while it is
        self.restarting = [False] * size
        self.generation = [0] * size  # replica -> processes it has lost
        self.retired: dict[str, int] = {}  # counters of replicas' lost processes
        self.error: WorkerError | None = None  # set once no replica is up or restarting
        self._ids = itertools.count()
        self._keys = itertools.count()
        self._rng = random.Random(engine_kwargs.get("seed", 0))
        threads = max(1, torch.get_num_threads() // size)
        self.replicas = workers or ReplicaProcesses(size, env, setup_timeout)
        infos = self.replicas.start(dict(engine=engine_kwargs, threads=threads))
        info = infos[0]
        self.replica_info = infos
        self.snapshots = [i["stats"] for i in infos]
        self.kv_bytes_per_token: int = info["kv_bytes_per_token"]
        self.max_model_len: int = info["max_model_len"]
        self.config = info["config"]
        self.device = info["device"]
        self.dtype = getattr(torch, info["dtype"])

    @property
    def pids(self) -> list[int | None]:
        """Process ids of the replicas, None for one that is down (their tensor-parallel ranks
        are their children)."""
        return self.replicas.pids

    # Requests.
    def validate_prompt(self, prompt: str | list[int] | torch.Tensor,
                        truncate_prompt_tokens: int | None = None) -> list[int]:
        """`requests.validate_prompt` against the served model (what every replica checks)."""
        return validate_prompt(prompt, self.tokenizer, self.model_config.vocab_size,
                               self.max_model_len, truncate_prompt_tokens)

    def add_request(self, prompt: str | list[int] | torch.Tensor,
                    params: SamplingParams | None = None, request_id: str | None = None,
                    owner: str | None = None) -> str:
        """Queue a request on the least-loaded replica; returns its id. owner: whom the
        replica's scheduler shares its batch fairly between (`LLMEngine.add_request`).
        ValueError for an invalid prompt or params, or a request id in use."""
        return self.add_requests([prompt], [params], [request_id], owner=owner)[0]

    def check_params(self, params: SamplingParams | None) -> SamplingParams:
        """What `add_request` checks of `params` (`validate_prompt` checks the prompt), without
        queueing anything: a checked copy, or the ValueError (a `ParamError` for a setting the
        replicas cannot honour) `add_request` would raise."""
        params = checked_params(params, self.model_config.vocab_size, self.tokenizer,
                                self.max_model_len)
        _check_supported(params)
        return params

    def add_requests(self, prompts: list, params: list[SamplingParams | None],
                     request_ids: list[str | None] | None = None,
                     owner: str | None = None) -> list[str]:
        """Queue several requests, all or none: every prompt, params and id is checked (and
        each request pickled for its replica) before any request goes to a replica, so a
        ValueError (naming the bad prompt's index) leaves the engine as it was. An id is in
        use from here until its final output has come out of `step` (or it was aborted).
        WorkerError once the engine is dead (no replica left, or shut down)."""
        if self.error is not None:
            raise self.error
        check_owner(owner)
        checked = check_requests(prompts, params, self.validate_prompt, self.check_params,
                                 self.max_model_len)
        request_ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        # An id is in use until its final output is delivered, as in `LLMEngine`.
        in_use = self.requests.keys() | self.pending.keys()
        rids = fresh_request_ids(request_ids, self._ids, in_use)
        check_request_ids(rids, in_use, len(prompts))
        rng, sends = self._rng.getstate(), []
        for i, (ids, sp) in enumerate(checked):
            try:
                sends.append(self._prepare(ids, sp, owner))
            except ValueError as err:
                self._rng.setstate(rng)  # no seed drawn for a batch refused
                if len(prompts) == 1:
                    raise
                raise ValueError(f"prompts[{i}]: {err}") from None
        for prompt, rid, (ids, sp), payload in zip(prompts, rids, checked, sends):
            hold = sp.stop_holdback if sp.output_kind == "delta" else 0
            self._route(rid, prompt, ids, sp.max_tokens, sp.output_kind, hold, payload)
        return rids

    def _prepare(self, ids: list[int], params: SamplingParams, owner: str | None) -> bytes:
        """The replica's "add" payload; a ValueError if the request cannot be pickled for a
        replica. A "delta" request's replica reports deltas (`EngineCore`), but for one with
        stop strings whose text is held back (`SamplingParams.stop_holdback`): its replica
        reports everything so far, as a "cumulative" one's, and the text is held back here
        (`_output`), where an abort still finds it (a replica drops its abort output)."""
        if params.seed is None:  # drawn here, so a request's samples do not depend on routing
            params = dataclasses.replace(params, seed=self._rng.getrandbits(63))
        if params.output_kind == "final_only" or (params.output_kind == "delta"
                                                  and params.stop_holdback):
            # Its replica reports every step: the router and TTFT read them.
            params = dataclasses.replace(params, output_kind="cumulative")
        try:
            # Pickled apart from the message (`engine_core`): a replica that cannot read it
            # refuses this request alone.
            return pickle.dumps((ids, params, owner), pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001 - pickle raises several kinds
            raise ValueError(f"the request cannot be sent to a data-parallel replica (its "
                             f"sampling_params and owner must pickle): {summarize(err)}") from None

    def _route(self, request_id: str, prompt, ids: list[int], max_tokens: int,
               output_kind: str, hold: int, payload: bytes) -> None:
        # What the context lets it generate, however many tokens it asks for.
        outstanding = len(ids) + min(max_tokens, self.max_model_len - len(ids))
        # A fresh key per request: outputs still in flight for an aborted request can never
        # be taken for a later request that reuses its id.
        key = str(next(self._keys))
        req = _Request(key, -1, prompt if isinstance(prompt, str) else None, ids, outstanding,
                       time.perf_counter(), output_kind=output_kind, hold=hold)
        while True:
            replica = self.router.pick(self.up)
            if replica is None:  # fails at once, as the requests of a failed replica do
                req.error = "no data-parallel replica is up: " + self._down_reasons()
                self.outcomes["failed"] += 1
                self.pending[request_id] = self._output(request_id, req, "error",
                                                        time.perf_counter(), worker_failed=True)
                return
            try:
                self.replicas.send(replica, ("add", key, payload))
                break
            except WorkerError:  # it failed just now: take the news in, route elsewhere
                self._take(self.replicas.recv_any(0.0))
        req.replica = replica
        self.requests[request_id] = req
        self.keys[key] = request_id
        self.router.add(replica, outstanding)

    def abort_request(self, request_id: str | list[str]
                      ) -> RequestOutput | None | list[RequestOutput | None]:
        """Stop a request on its replica; its output with finish_reason "abort" (of its
        output_kind: a "delta" one holds what no output from `step` has held), or None if
        it is unknown or already done. An output of it still waiting for `step` is dropped
        (its final one too, as LLMEngine drops an output it holds back), so its id is free
        at once. A list of ids (as `LLMEngine.abort_request`; a list is never an id) stops
        each of them and returns their results in a list."""
        if isinstance(request_id, list):
            return [self.abort_request(r) for r in request_id]
        self.pending.pop(request_id, None)
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        del self.keys[req.key]
        self.router.add(req.replica, -req.outstanding)
        self.outcomes["aborted"] += 1
        try:
            self.replicas.send(req.replica, ("abort", req.key))
        except WorkerError:  # its replica is gone, and the request with it
            pass
        return self._output(request_id, req, "abort", time.perf_counter())

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.pending)

    def unfinished_request_ids(self) -> list[str]:
        return list(self.requests)

    # Outputs.
    def step(self) -> list[RequestOutput]:
        """The outputs of requests that advanced since the last call (waits up to poll_s for
        some), the requests of a replica that failed among them. Raises WorkerError once no
        replica is left and every output is delivered."""
        self._poll(self.poll_s)
        out, self.pending = list(self.pending.values()), {}
        for o in out:  # a live "delta" request's next output holds what comes after these
            req = self.requests.get(o.request_id)
            if req is not None and req.output_kind == "delta":
                given = len(o.outputs[0].text)
                req.tokens, req.text, req.base = [], req.text[given:], req.base + given
        return out

    def check_workers(self) -> None:
        """Between steps: take in replicas that failed or came back (a failed one's requests
        are then in the next `step`'s outputs). Raises WorkerError once no replica is left."""
        self._poll(0.0)

    def _poll(self, timeout: float) -> None:
        """Unless outputs are waiting to be delivered: raise the engine's error once it is
        dead, else take in what the replicas send within `timeout` s."""
        if not self.pending:
            if self.error is not None:
                raise self.error
            self._take(self.replicas.recv_any(timeout))

    def health(self) -> tuple[bool, str | None]:
        """(whether a replica takes requests now, why replicas are down or None)."""
        return any(self.up), self._down_reasons() or (self.error and self.error.reason)

    def _down_reasons(self) -> str:
        """Why each replica that is down is, in replica order ("" when none is)."""
        return "; ".join(self.down[r] for r in sorted(self.down))

    def _take(self, messages) -> None:
        now = time.perf_counter()
        for replica, message in messages:
            kind = message[0]
            if kind == "outputs":
                _, deltas, step_time, stats = message
                self.snapshots[replica] = stats
                self.step_times.append(step_time)
                for delta in deltas:
                    self._apply(replica, delta, now)
            elif kind == "stats":
                self.snapshots[replica] = message[1]
            elif kind == "result":
                self.results[replica].append(message[1:])
            elif kind == "rejected":  # checked here first, so rare; it fails that request alone
                _, key, reason = message
                self._apply(replica, (key, [], 0, "", "error", None,
                                      f"data-parallel replica {replica} refused it: {reason}", 0,
                                      None), now)
            elif kind == "down":
                self._replica_down(replica, message[1], message[2], now)
            elif kind == "ready":
                self._replica_up(replica, message[1])
            else:
                raise WorkerError(f"data-parallel replica {replica} sent an unknown message "
                                  f"{kind!r}", replica)

    def _apply(self, replica: int, delta, now: float) -> None:
        (key, new_tokens, start, text, finish_reason, stop_reason, error, num_cached,
         scheduled) = delta
        request_id = self.keys.get(key)
        if request_id is None:  # aborted meanwhile
            return
        req = self.requests[request_id]
        if req.first_scheduled_time is None and scheduled is not None:
            # The replica's clock: the same monotonic clock as this process's on Linux. Kept
            # between arrival here and now wherever it is not.
            req.first_scheduled_time = min(max(scheduled, req.arrival), now)
        done = len(new_tokens)
        if req.first_token_time is None and new_tokens:
            req.first_token_time = now
            done += len(req.prompt_ids)
        done = min(done, req.outstanding)
        req.outstanding -= done
        self.router.add(replica, -done)
        req.tokens.extend(new_tokens)
        # The replica's text from character `start` on (where a stop string cut it, or where
        # it left off); a cut never reaches into what a "delta" output gave (`hold`).
        base = req.base
        req.text = req.text[:start - base] + text if start >= base else text[base - start:]
        req.error, req.stop_reason, req.num_cached = error, stop_reason, num_cached
        if finish_reason is not None:
            del self.requests[request_id], self.keys[key]
            self.router.add(replica, -req.outstanding)
            self.outcomes["aborted" if finish_reason == "abort" else
                          "failed" if error is not None else "finished"] += 1
        elif req.output_kind == "final_only":
            return
        self.pending[request_id] = self._output(request_id, req, finish_reason,
                                                now if finish_reason else None)

    def _replica_down(self, replica: int, error: WorkerError, restarting: bool, now: float) -> None:
        """`replica` is gone: fail its requests (alone), stop routing to it, keep its counts."""
        self.up[replica] = False
        self.restarting[replica] = restarting
        self.generation[replica] += 1
        self.results[replica].clear()
        self.owed[replica] = 0
        why = error.reason + ("; restarting it" if restarting else "; it is not restarted (it "
                              "failed too often; see HWATTN_REPLICA_RESTARTS)")
        self.down[replica] = why
        snapshot = self.snapshots[replica]
        for name, value in snapshot.items():
            if name not in GAUGES and name != "page_size":
                self.retired[name] = self.retired.get(name, 0) + value
        self.snapshots[replica] = {k: (v if k == "page_size" else 0) for k, v in snapshot.items()}
        for request_id, req in list(self.requests.items()):
            if req.replica == replica:
                del self.requests[request_id], self.keys[req.key]
                req.error = why
                self.outcomes["failed"] += 1
                self.pending[request_id] = self._output(request_id, req, "error", now,
                                                        worker_failed=True)
        self.router.load[replica] = 0
        if not any(self.up) and not any(self.restarting):
            self.error = WorkerError("every data-parallel replica is down: "
                                     + self._down_reasons())

    def _replica_up(self, replica: int, info: dict) -> None:
        self.up[replica], self.restarting[replica] = True, False
        self.down.pop(replica, None)
        self.snapshots[replica] = info["stats"]

    @staticmethod
    def _output(request_id: str, req: _Request, finish_reason, finish_time,
                worker_failed: bool = False) -> RequestOutput:
        text = req.text
        if req.hold and finish_reason is None:  # what a stop string may still cut stays here
            text = text[:max(0, len(text) - req.hold)]
        completion = CompletionOutput(0, text, list(req.tokens), finish_reason=finish_reason,
                                      stop_reason=req.stop_reason)
        return RequestOutput(request_id, req.prompt, req.prompt_ids, [completion], None,
                             req.num_cached,
                             req.arrival, req.first_token_time, finish_time, req.error,
                             worker_failed=worker_failed,
                             first_scheduled_time=req.first_scheduled_time)

    def take_step_times(self) -> list[tuple[str, float]]:
        """(kind, seconds) of every replica step reported since the last call; kind is
        "prefill", "decode" or "readback" (read back the last overlapped step, launched none)."""
        out, self.step_times = self.step_times, []
        return out

    # Replicas.
    def call_replica(self, replica: int, fn, *args, timeout: float | None = None):
        """`fn(engine, *args)` inside replica `replica`'s process; its result. `fn` must be
        importable. Outputs that arrive meanwhile are kept for the next `step()`.
        `ReplicaCallError` if `fn` raises there, or its result cannot be pickled there or
        unpickled here: the caller's error alone, the replica serves on. WorkerError if the
        replica is down or fails meanwhile; one that does not answer within `timeout` s
        (default: the set-up timeout) is taken as failed."""
        if isinstance(replica, bool) or not isinstance(replica, int) \
                or not 0 <= replica < self.size:
            raise ValueError(f"replica must be a replica's index, 0..{self.size - 1}, got "
                             f"{replica!r}")
        if timeout is not None:  # not 0 or less: that would give up on a healthy replica
            timeout = check_seconds("timeout", timeout)
        what = getattr(fn, "__name__", fn)
        generation = self.generation[replica]
        try:
            if not self.up[replica]:
                raise WorkerError(f"data-parallel replica {replica} is down", replica)
            self.replicas.send(replica, ("call", fn, args))
        except WorkerError as err:
            self._take(self.replicas.recv_any(0.0))
            raise WorkerError(f"data-parallel replica {replica} could not run {what}: "
                              f"{self.down.get(replica, err.reason)}", replica) from None
        stale = self.owed[replica]
        self.owed[replica] += 1
        deadline = time.monotonic() + (timeout or self.setup_timeout)
        while len(self.results[replica]) <= stale:
            if self.generation[replica] != generation:
                raise WorkerError(f"data-parallel replica {replica} failed while running "
                                  f"{what}: {self.down.get(replica, '')}", replica)
            if time.monotonic() > deadline:
                error = WorkerError(f"data-parallel replica {replica} did not answer {what} "
                                    f"in time", replica)
                self.replicas.lose(replica, error)
                self._take(self.replicas.recv_any(0.0))
                raise error
            self._take(self.replicas.recv_any(0.1))
        del self.results[replica][:stale]
        self.owed[replica] -= stale + 1
        ok, payload = self.results[replica].pop(0)
        where = f"data-parallel replica {replica}: {what}"
        if ok:
            try:
                return pickle.loads(payload)
            except Exception as err:  # noqa: BLE001 - unpickling raises several kinds
                raise ReplicaCallError(f"{where} returned a value this process cannot "
                                       f"unpickle: {summarize(err)}", replica) from err
        happened, remote, exception = payload
        cause = None
        if exception is not None:
            try:
                cause = pickle.loads(exception)
            except Exception:  # noqa: BLE001 - the message and the traceback say it
                pass
        raise ReplicaCallError(f"{where} {happened}\n{remote.rstrip()}", replica,
                               remote) from cause

    def check_invariants(self) -> None:
        """Raise (AssertionError) if this engine's books disagree (`check_books`), or if a
        replica that is up leaks pages."""
        self.check_books()
        for replica in range(self.size):
            if self.up[replica]:
                self.call_replica(replica, _check_invariants)

    def check_books(self) -> None:
        """Raise (AssertionError) unless every live request is known by its key, on a
        replica that is up, and each replica's load is the outstanding tokens of its
        requests. Here alone (no replica is asked)."""
        load = [0] * self.size
        for request_id, req in self.requests.items():
            if self.keys.get(req.key) != request_id or (self.error is None
                                                        and not self.up[req.replica]):
                raise AssertionError(f"request {request_id!r} (key {req.key}) is not on the "
                                     f"books of a replica that is up (replica {req.replica})")
            load[req.replica] += req.outstanding
        if len(self.keys) != len(self.requests):
            raise AssertionError(f"{len(self.keys)} replica keys for {len(self.requests)} "
                                 f"live requests")
        if load != self.router.load:
            raise AssertionError(f"the router counts {self.router.load} outstanding tokens "
                                 f"per replica, the requests {load}")

    # Introspection.
    def stats(self) -> dict:
        """The replicas' latest stats, summed (page_size is each replica's), counters
        including the replicas' earlier processes; a replica that is down holds no pages.
        "finished", "aborted" and "failed" count requests as they ended here: a request
        aborted here while its replica finished it (its final output on the way) is aborted,
        as its caller saw (its replica counted it finished), and one that failed with its
        replica, or that a replica refused, failed."""
        total = dict(self.retired)
        for snap in self.snapshots:
            for key, value in snap.items():
                total[key] = value if key == "page_size" else total.get(key, 0) + value
        total.update(self.outcomes)
        return total

    @property
    def counters(self) -> dict:
        stats = self.stats()
        return {k: stats.get(k, 0) for k in COUNTERS}

    def shutdown(self) -> None:
        """Stop every replica (and its ranks), restarts in progress included: bounded; raises
        a replica's shutdown error. From then on `add_request` and `step` raise WorkerError
        saying so (a second call stops nothing)."""
        self.error = WorkerError("the data-parallel engine was shut down; its replicas are gone")
        self.up = [False] * self.size
        self.replicas.shutdown(grace=15.0)
