"""Data parallelism: the router never loses or duplicates a request, replicas in processes
(each tensor-parallel itself) generate what one engine does, and a failing replica fails the
engine with its traceback, leaving no process behind."""

import os
import pickle
import random
import re
import signal
import time
from collections import Counter, deque

import pytest
import torch

from hwattn.data.tokenizer import load_tokenizer
from hwattn.engine import LLM, SamplingParams, create_engine
from hwattn.engine.data_parallel import DataParallelEngine, LeastOutstandingTokens
from hwattn.engine.engine_core import EngineCore
from hwattn.engine.loader import model_config
from hwattn.models import Transformer
from hwattn.parallel.errors import WorkerError
from tests.parallel.procs import alive, children, fault_age, wait_exited, wait_gone

pytestmark = pytest.mark.slow  # data-parallel replica processes

TINY = dict(model="tiny", attention="gla-2", device="cpu", dtype="fp32", page_size=8,
            num_pages=96, max_model_len=96, model_overrides=dict(n_layers=1, max_seq_len=96))


def test_least_outstanding_tokens_router():
    router = LeastOutstandingTokens(3)
    picks = [router.pick() for _ in range(3)]
    assert sorted(picks) == [0, 1, 2]  # equal loads: round robin
    router.add(0, 100)
    router.add(1, 10)
    router.add(2, 50)
    assert router.pick() == 1
    router.add(1, 60)
    assert router.pick() == 2


class InProcessReplicas:
    """`ReplicaProcesses`' methods over `EngineCore`s in this process. Each call to `recv_any`
    steps a random subset of the busy replicas and hands over a random part of what they
    sent (seeded), so replicas run at uneven speeds and outputs trail behind aborts."""

    def __init__(self, size: int, seed: int = 0):
        self.size = size
        self.cores: list[EngineCore] = []
        self.queues = [deque() for _ in range(size)]
        self.added = Counter()  # replica-side key -> times it was sent to any replica
        self.rng = random.Random(seed)
        self.pids = []

    def start(self, spec) -> list[dict]:
        self.cores = [EngineCore(create_engine(**spec["engine"])) for _ in range(self.size)]
        return [core.info() for core in self.cores]

    def send(self, replica: int, message) -> None:
        if message[0] == "add":
            self.added[message[1]] += 1
        self.queues[replica].extend(self.cores[replica].handle(message))

    def recv_any(self, timeout: float):
        for i, core in enumerate(self.cores):
            if core.engine.has_unfinished() and self.rng.random() < 0.6:
                self.queues[i].extend(core.step())
        out = []  # messages arrive late: a random part of each replica's queue, in order
        for i, q in enumerate(self.queues):
            for _ in range(self.rng.randint(0, len(q))):
                out.append((i, q.popleft()))
        return out

    def kill(self) -> None:
        pass

    def shutdown(self, grace=None) -> None:
        pass


def test_router_delivers_every_request_once_with_the_single_engine_outputs():
    """30 requests of mixed lengths over 3 replicas stepping at uneven speeds, some aborted
    along the way (one id then reused for a new request while outputs of the old one are in
    flight): every other one finishes exactly once with exactly what a single engine gives
    (greedy and seeded sampling alike), nothing is reported after it ends, each went to one
    replica, and the router's books balance to zero."""
    rng = random.Random(1)
    prompts = [[rng.randrange(2048) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    params = [SamplingParams(max_tokens=rng.randint(1, 12), ignore_eos=True,
                             temperature=0.0 if i % 3 else 0.9, seed=i if i % 2 else None)
              for i in range(30)]
    reused = ([7, 7, 8, 9, 10], SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    single = create_engine(**TINY)
    want = {}
    for p, sp in zip(prompts, params):
        single.add_request(p, sp)
    single.add_request(*reused, request_id="again")
    while single.has_unfinished():
        for out in single.step():
            if out.finished:
                want[out.request_id] = out.token_ids
    fake = InProcessReplicas(3)
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    dp = DataParallelEngine(3, dict(TINY), config, load_tokenizer(None, config.vocab_size),
                            workers=fake)
    ids = [dp.add_request(p, sp) for p, sp in zip(prompts, params)]
    assert ids == [f"req-{i}" for i in range(30)] and set(ids) | {"again"} == set(want)
    doomed = set(rng.sample(ids, 5))
    finished, ended = Counter(), set()
    outputs = {}
    steps = 0
    while dp.has_unfinished():
        steps += 1
        for out in dp.step():
            assert out.request_id not in ended, f"{out.request_id} reported after it ended"
            if out.finished:
                finished[out.request_id] += 1
                ended.add(out.request_id)
                outputs[out.request_id] = out
        if steps == 2:  # a long request, surely unfinished: abort it and reuse its id at once
            assert dp.abort_request("req-0") is not None
            dp.add_request(*reused, request_id="req-0")
            want["req-0"], outputs_of_reused = want.pop("again"), True
        if steps % 3 == 0 and doomed:
            rid = doomed.pop()
            if rid not in ended:
                assert dp.abort_request(rid).finish_reason == "abort"
                ended.add(rid)
        assert steps < 10_000
    aborted = ended - set(finished)
    assert outputs_of_reused and outputs["req-0"].prompt_token_ids == reused[0]
    assert all(n == 1 for n in finished.values())
    assert set(finished) | aborted == set(ids) and not set(finished) & aborted
    for rid, out in outputs.items():
        assert out.token_ids == want[rid], rid
        assert out.finish_reason == "length"
    assert len(fake.added) == len(ids) + 1 and set(fake.added.values()) == {1}
    assert dp.router.load == [0, 0, 0]
    assert all(core.engine.stats()["finished"] > 0 for core in fake.cores)
    dp.check_invariants()
    assert dp.stats()["finished"] == len(finished)


def test_final_only_requests_are_reported_once_while_replicas_report_every_step():
    """A request asking for its final output only gets one output from the data-parallel
    engine; its replica still reports each step (it is sent cumulative params), so the router
    counts its tokens down as they come and its first token is timed when it came."""
    fake = InProcessReplicas(2, seed=3)
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    dp = DataParallelEngine(2, dict(TINY), config, load_tokenizer(None, config.vocab_size),
                            workers=fake)
    final = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, output_kind="final_only")
    ids = [dp.add_request([5, 6, 7, 8], final), dp.add_request([9, 10], final),
           dp.add_request([11, 12, 13], SamplingParams(max_tokens=8, temperature=0,
                                                       ignore_eos=True))]
    seen = Counter()
    finals = {}
    loads = []
    while dp.has_unfinished():
        for out in dp.step():
            seen[out.request_id] += 1
            if out.finished:
                finals[out.request_id] = out
        loads.append(sum(dp.router.load))
    assert seen[ids[0]] == seen[ids[1]] == 1 and seen[ids[2]] > 1
    assert all(len(finals[i].token_ids) == 8 for i in ids)
    assert all(core.engine.requests == {} for core in fake.cores)
    assert len(set(loads)) > 2  # the router's books moved step by step, not only at the end
    out = finals[ids[0]]
    assert out.arrival_time <= out.first_token_time < out.finish_time
    assert dp.router.load == [0, 0]


def test_a_request_a_replica_refuses_fails_alone():
    """A replica refusing a request that passed the router's checks (they are the same checks,
    so this takes a replica that disagrees) finishes that request with "error"; the engine and
    the other requests go on, and `failed` counts it."""
    fake = InProcessReplicas(2)
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    dp = DataParallelEngine(2, dict(TINY), config, load_tokenizer(None, config.vocab_size),
                            workers=fake)

    def refusing_thirteen(check):
        def validate(prompt):
            if prompt[0] == 13:
                raise ValueError("thirteen")
            return check(prompt)
        return validate

    for core in fake.cores:
        core.engine.validate_prompt = refusing_thirteen(core.engine.validate_prompt)
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    ids = dp.add_requests([[1, 2, 3], [13, 14], [4, 5]], [params] * 3)
    outs = {}
    while dp.has_unfinished():
        for out in dp.step():
            if out.finished:
                outs[out.request_id] = out
    bad = outs[ids[1]]
    assert bad.finish_reason == "error" and "refused it: thirteen" in bad.error
    assert [outs[i].finish_reason for i in (ids[0], ids[2])] == ["length"] * 2
    assert dp.stats()["failed"] == 1 and dp.router.load == [0, 0]


def _in_process(size: int = 2, seed: int = 0, **overrides) -> DataParallelEngine:
    """A data-parallel engine over `InProcessReplicas`."""
    spec = dict(TINY, **overrides)
    config = model_config(spec["model"], spec["attention"], spec["model_overrides"])
    return DataParallelEngine(size, spec, config, load_tokenizer(None, config.vocab_size),
                              workers=InProcessReplicas(size, seed))


def _finish(engine, ids) -> dict:
    outs = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished():
        assert time.monotonic() < deadline
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    return {rid: outs[rid] for rid in ids}


class Unqueueable(SamplingParams):
    """Valid settings whose `plain` flag cannot be read: the data-parallel front end, which
    never reads it, lets it through; its replica's engine raises TypeError queueing it."""

    @property
    def plain(self):
        raise TypeError("unqueueable settings")


@pytest.mark.parametrize("fault", ["TypeError from the params", "KeyError from the detokenizer"])
def test_a_request_raising_anything_while_its_replica_queues_it_fails_alone(monkeypatch, fault):
    """Observed: a replica caught only ValueError while queueing a request; any other error
    (a TypeError from odd params, a KeyError from the tokenizer's set-up) escaped its message
    loop and ended the replica process, with every request it held. Now that request alone
    fails with the error, nothing of it stays in the replica, and the others finish."""
    import hwattn.engine.llm_engine as llm_engine

    dp = _in_process()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = dp.add_requests([[1, 2, 3], [4, 5, 6]], [params] * 2)
    bad_params = params
    if fault.startswith("TypeError"):
        bad_params = Unqueueable(max_tokens=6, temperature=0, ignore_eos=True)
    else:
        real = llm_engine.incremental_detokenizer

        def detokenizer(tokenizer, skip_special_tokens=None):
            raise KeyError("no decoding table")

        monkeypatch.setattr(llm_engine, "incremental_detokenizer", detokenizer)
    bad = dp.add_request([7, 8, 9], bad_params)
    if not fault.startswith("TypeError"):
        monkeypatch.setattr(llm_engine, "incremental_detokenizer", real)
    cores = dp.replicas.cores
    assert all(dp.requests[bad].key not in core.engine.requests for core in cores)
    outs = _finish(dp, ids + [bad])
    kind = fault.split()[0]
    assert outs[bad].finish_reason == "error" and not outs[bad].worker_failed
    assert re.match(rf"data-parallel replica [01] refused it: {kind}: ", outs[bad].error), \
        outs[bad].error
    assert [(outs[r].finish_reason, len(outs[r].token_ids)) for r in ids] == [("length", 6)] * 2
    assert dp.stats()["failed"] == 1 and dp.router.load == [0, 0]
    for core in cores:
        assert not core.engine.requests and not core.engine.detok
        assert not core.engine.has_unfinished()
    dp.check_invariants()
    again = dp.add_request([7, 8, 9], params)
    assert _finish(dp, [again])[again].finish_reason == "length"


def test_stop_reasons_and_prefix_hits_come_through_the_replicas():
    """Observed: every output of a data-parallel engine had stop_reason None (the replicas
    did not send it; the server's `stop_reason` then said null where one engine says the stop
    string or token id) and num_cached_prompt_tokens 0 (prefix-cache hits never shown)."""
    params = [SamplingParams(max_tokens=10, temperature=0, stop_token_ids=[8]),
              SamplingParams(max_tokens=10, temperature=0, stop=["FF"]),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    prompts = [[5, 6, 7, 8], [65, 66, 67, 68, 69, 70], [1, 2, 3]]
    single = create_engine(**TINY)
    want = [(o.finish_reason, o.outputs[0].stop_reason, o.text)
            for o in _finish(single, single.add_requests(prompts, params)).values()]
    assert want[0][1] == 8 and want[1][1] == "FF"  # the tiny model repeats its last token
    dp = _in_process()
    outs = _finish(dp, dp.add_requests(prompts, params))
    assert [(o.finish_reason, o.outputs[0].stop_reason, o.text) for o in outs.values()] == want
    # The same 20-token prompt three times, one after the other: one replica gets it twice
    # and reuses its first two pages (16 tokens), as one engine does.
    cached = []
    for _ in range(3):
        out, = _finish(dp, [dp.add_request(list(range(100, 120)), params[2])]).values()
        cached.append(out.num_cached_prompt_tokens)
    assert sorted(cached) == [0, 0, 16]


def test_a_request_id_stays_in_use_until_its_final_output_is_delivered():
    """Observed: once a replica's final output was taken in (waiting for the next `step`),
    its id was free again: a new request under that id was accepted, and its caller was then
    handed the old request's final output as its own (LLMEngine refuses such an id)."""
    dp = _in_process()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    dp.add_request([1, 2, 3], params, request_id="x")
    deadline = time.monotonic() + 30
    while "x" in dp.requests:  # as the server's loop does between steps
        assert time.monotonic() < deadline
        dp.check_workers()
    assert dp.pending["x"].finished
    with pytest.raises(ValueError, match="request_id 'x' is already in use"):
        dp.add_request([9, 9, 9, 9], params, request_id="x")
    out, = dp.step()
    assert out.request_id == "x" and out.prompt_token_ids == [1, 2, 3]
    again = _finish(dp, [dp.add_request([9, 9, 9, 9], params, request_id="x")])["x"]
    assert again.prompt_token_ids == [9, 9, 9, 9] and again.finish_reason == "length"


def test_a_request_counts_on_the_router_only_for_what_the_context_lets_it_generate():
    """Observed: a request's outstanding tokens were its prompt plus max_tokens, however far
    past the context that went: one request asking for 10**9 tokens made its replica look
    busy for good, and every later request went to the other replica meanwhile."""
    dp = _in_process()
    huge = SamplingParams(max_tokens=10**9, temperature=0, ignore_eos=True)
    rid = dp.add_request([1, 2, 3], huge)
    assert max(dp.router.load) == TINY["max_model_len"]  # its prompt and 93 tokens at most
    short = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    later = dp.add_requests([[4, 5, 6]] * 6, [short] * 6)
    assert {dp.requests[r].replica for r in later} == {0, 1}
    outs = _finish(dp, [rid] + later)
    assert len(outs[rid].token_ids) == TINY["max_model_len"] - 3
    assert dp.router.load == [0, 0]


def test_params_that_cannot_be_sent_to_a_replica_refuse_the_batch():
    """Observed: params that cannot be pickled (here of a class local to a function) raised
    pickle's own error out of `add_requests` after the requests before them had gone to
    replicas, where they ran with no caller knowing their ids. Now the batch is refused, all
    or nothing, with a ValueError naming the prompt."""

    class Local(SamplingParams):
        pass

    dp = _in_process()
    ok = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"prompts\[1\]: the request cannot be sent to a "
                                         r"data-parallel replica .*Local"):
        dp.add_requests([[1, 2], [3, 4], [5, 6]], [ok, Local(max_tokens=2), ok])
    assert not dp.has_unfinished() and dp.router.load == [0, 0]
    assert all(not core.engine.has_unfinished() for core in dp.replicas.cores)
    with pytest.raises(ValueError, match=r"^the request cannot be sent"):
        dp.add_request([3, 4], Local(max_tokens=2))
    rid = dp.add_request([3, 4], ok)
    assert _finish(dp, [rid])[rid].finish_reason == "length"


class NoReplicas:
    """Stands in for `ReplicaProcesses`: fails the test if any replica is started."""

    def start(self, spec):
        raise AssertionError("replicas started before the device was checked")


def test_a_device_index_with_replicas_is_refused_not_ignored(monkeypatch):
    """Observed: device='cuda:1' with data_parallel_size 2 put replica 0 on GPU 0 and
    replica 1 on GPU 1 (the index was dropped without a word)."""
    import hwattn.engine.data_parallel as data_parallel

    monkeypatch.setattr(data_parallel, "_visible_gpus", lambda: ["0", "1", "2", "3"])
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    tokenizer = load_tokenizer(None, config.vocab_size)
    with pytest.raises(ValueError, match=r"device 'cuda:1' with data_parallel_size 2: .*"
                                         r"CUDA_VISIBLE_DEVICES"):
        DataParallelEngine(2, dict(TINY, device="cuda:1"), config, tokenizer, workers=NoReplicas())
    with pytest.raises(AssertionError, match="replicas started"):  # cuda, cuda:0: from GPU 0
        DataParallelEngine(2, dict(TINY, device="cuda:0"), config, tokenizer, workers=NoReplicas())


def _tp_pids(engine):
    return engine.runner.pids


@pytest.mark.timeout(240)
def test_two_replicas_of_two_ranks_and_a_failing_rank_inside_one(monkeypatch):
    """--tp 2 --dp 2 on CPU (gloo): 2 replica processes, each with 2 rank processes. Greedy
    outputs equal one in-process engine's. Then rank 1 of each replica fails at its 40th step:
    every request fails with an error naming the replica and the rank and quoting the fault,
    all six processes are gone, and both replicas come back (new ranks) with the same
    outputs."""
    prompts = [[1, 2, 3], list(range(10, 40)), [7] * 9, [5, 6], [100, 200, 300, 400]]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(**TINY).generate(prompts, params)]
    monkeypatch.setenv("HWATTN_FAULT", "rank:step:1:40")
    llm = LLM(tensor_parallel_size=2, data_parallel_size=2, **TINY)
    engine = llm.engine
    pids = engine.pids + [p for i in range(2) for p in engine.call_replica(i, _tp_pids)]
    assert len(set(pids)) == 6 and all(alive(p) for p in pids)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    engine.check_invariants()
    stats = engine.stats()
    assert stats["finished"] == len(prompts) and stats["running"] == 0
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    assert engine.kv_bytes_per_token == Transformer(config).kv_bytes_per_token(2, torch.float32)
    outs = llm.generate([[9, 9, 9]] * 4,
                        SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    for out in outs:
        msg = out.error
        assert out.finish_reason == "error" and out.worker_failed, msg
        assert re.match(r"data-parallel replica [01] failed during step: WorkerError: "
                        r"tensor-parallel rank 1 failed during step: InjectedFault", msg), msg
        assert fault_age(msg) < 10
    assert not wait_gone(pids, 5.0)
    deadline = time.monotonic() + 120
    while not all(engine.up):
        assert time.monotonic() < deadline, engine.health()
        engine.check_workers()
        time.sleep(0.1)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    llm.shutdown()


@pytest.mark.timeout(120)
def test_a_replica_failing_in_a_step_fails_its_own_requests(monkeypatch):
    """Replica 1 raises in its 12th step (of about 16 for its requests): its requests fail with
    its error (the traceback's last line, in one line), replica 0's finish, and the engine
    takes requests on. (The fault comes late so that the four requests are routed before it:
    a fault in replica 1's 3rd step once landed while the later ones were still being sent,
    and they were then routed again, to replica 0.)"""
    monkeypatch.setenv("HWATTN_FAULT", "replica:step:1:12")
    before = set(children(os.getpid()))
    llm = LLM(data_parallel_size=2, **TINY)
    engine = llm.engine
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    ids = engine.add_requests([[1, 2, 3]] * 4, [params] * 4)
    placed = {rid: engine.requests[rid].replica for rid in ids}
    assert sorted(placed.values()) == [0, 0, 1, 1]
    outs = {}
    while engine.has_unfinished():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    for rid, replica in placed.items():
        out = outs[rid]
        if replica == 0:
            assert out.finish_reason == "length" and len(out.token_ids) == 16
        else:
            assert out.finish_reason == "error" and out.worker_failed
            assert out.error.startswith("data-parallel replica 1 failed during step: "
                                        "InjectedFault: injected fault: replica 1 in step (step 12)")
            assert "Traceback" not in out.error and fault_age(out.error) < 10
    assert all(o.finish_reason == "length" for o in llm.generate([[4, 5]] * 2, params))
    llm.shutdown()
    assert not wait_gone(set(children(os.getpid())) - before, 3.0)


@pytest.mark.timeout(120)
def test_a_killed_idle_replica_costs_no_request_and_shutdown_is_bounded():
    """Replica 0 killed between requests: the next requests go to replica 1 (one sent to the
    dead replica is routed again), all finish, and replica 0 is started anew."""
    llm = LLM(data_parallel_size=2, **TINY)
    engine = llm.engine
    pids = list(engine.pids)
    os.kill(pids[0], signal.SIGKILL)
    assert wait_exited(pids[0], 3.0)
    t0 = time.monotonic()
    outs = llm.generate([[1, 2, 3]] * 3, SamplingParams(max_tokens=4))
    assert [o.finish_reason for o in outs] == ["length"] * 3, [o.error for o in outs]
    assert time.monotonic() - t0 < 10
    serving, problem = engine.health()
    assert serving and (problem is None
                        or problem.startswith("data-parallel replica 0 died with signal SIGKILL"))
    t0 = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t0 < 20
    assert not wait_gone([p for p in pids + engine.pids if p is not None], 1.0)


@pytest.mark.timeout(120)
def test_a_replica_failing_to_build_fails_the_engine_with_its_traceback(monkeypatch):
    """The replica that failed is named (not the other one, stopped because of it), and no
    process is left."""
    monkeypatch.setenv("HWATTN_FAULT", "replica:build:1")
    before = set(children(os.getpid()))
    with pytest.raises(WorkerError) as info:
        LLM(data_parallel_size=2, **TINY)
    msg = str(info.value)
    assert msg.startswith("data-parallel replica 1 failed during build:"), msg
    assert "InjectedFault: injected fault: replica 1 in build" in msg and fault_age(msg) < 10
    assert not wait_gone(set(children(os.getpid())) - before, 3.0)


@pytest.mark.timeout(120)
def test_params_a_replica_cannot_read_fail_that_request_alone(monkeypatch):
    """A `SamplingParams` subclass defined in the caller's script (its `__main__`) cannot be
    unpickled in a replica process. Observed: the replica died reading it ("Can't get
    attribute 'ScriptParams' on <module 'hwattn.engine.engine_core'>"), failing every other
    request it held, and was restarted. Now that request alone is refused by its replica."""
    import sys

    class ScriptParams(SamplingParams):
        pass

    ScriptParams.__module__, ScriptParams.__qualname__ = "__main__", "ScriptParams"
    monkeypatch.setattr(sys.modules["__main__"], "ScriptParams", ScriptParams, raising=False)
    with LLM(data_parallel_size=2, **TINY) as llm:
        engine = llm.engine
        pids = list(engine.pids)
        long = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        ids = engine.add_requests([[1, 2, 3]] * 4, [long] * 4)
        bad = engine.add_request([4, 5, 6], ScriptParams(max_tokens=4))
        outs = {}
        deadline = time.monotonic() + 60
        while engine.has_unfinished():
            assert time.monotonic() < deadline
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
        out = outs[bad]
        assert out.finish_reason == "error" and not out.worker_failed, out.error
        assert re.match(r"data-parallel replica [01] refused it: .*ScriptParams", out.error), \
            out.error
        assert [(outs[r].finish_reason, len(outs[r].token_ids)) for r in ids] == [("length", 30)] * 4
        assert engine.pids == pids and engine.health() == (True, None)
        assert engine.stats()["failed"] == 1
        engine.check_invariants()


def _raise_key_error(engine, key):
    raise KeyError(key)


def _unpicklable(engine):
    return lambda: None


def _replica_only_object(engine):
    """An object of a class that only the replica's `__main__` (`engine_core`, run as a
    script) holds: it pickles there but does not unpickle here."""
    import sys

    return sys.modules["__main__"].EngineCore(None)


def _pages_total(engine):
    return engine.stats()["pages_total"]


def _answer(engine, value):
    return value


def test_a_call_cut_short_leaves_no_stale_result_for_the_next():
    """Observed: a KeyboardInterrupt while `call_replica` waited left that call's result to
    come; the replica's next call returned it ("first") instead of its own."""
    engine = _in_process(2)
    real = engine.replicas.recv_any

    def interrupted(timeout):
        raise KeyboardInterrupt

    engine.replicas.recv_any = interrupted
    with pytest.raises(KeyboardInterrupt):
        engine.call_replica(0, _answer, "first")
    engine.replicas.recv_any = real
    assert engine.call_replica(0, _answer, "second") == "second"
    assert engine.call_replica(0, _answer, "third") == "third"
    assert engine.call_replica(1, _answer, "fourth") == "fourth"


def test_call_replica_refuses_a_bad_replica_or_timeout_by_name():
    """Observed: `call_replica(-1, ...)` ran in the last replica, and a timeout of 0 or less
    gave up on the replica at once (`lose`: killed and restarted with its requests, though
    healthy); timeout=0 was taken for the default."""
    engine = _in_process(2)
    for replica in (-1, 2, True, 0.0):
        with pytest.raises(ValueError, match=r"replica must be a replica's index, 0\.\.1"):
            engine.call_replica(replica, _answer, 1)
    for timeout in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be a finite number of seconds > 0"):
            engine.call_replica(0, _answer, 1, timeout=timeout)
    assert engine.call_replica(1, _answer, 2, timeout=30) == 2
    assert engine.up == [True, True]


@pytest.mark.timeout(60)
def test_ctrl_c_while_replicas_start_leaves_no_replica_running(monkeypatch):
    """Observed: a KeyboardInterrupt while `ReplicaProcesses.start` waited for the replicas to
    build left them running: the one building went on to its set-up timeout, the one built
    stayed up, held by the start threads' results (until the process ended)."""
    import threading

    from hwattn.engine.replicas import ReplicaProcesses

    monkeypatch.setenv("HWATTN_FAULT", "replica:build:0:hang")
    before = set(children(os.getpid()))
    replicas = ReplicaProcesses(2, None, setup_timeout=60)
    started, stop = set(), threading.Event()

    def interrupt():  # once both replicas run (not after a fixed time: a busy machine is slow)
        deadline = time.monotonic() + 40
        while len(started) < 2 and time.monotonic() < deadline and not stop.is_set():
            started.update(set(children(os.getpid())) - before)
            time.sleep(0.1)
        if not stop.wait(1.0):  # replica 1 builds meanwhile; replica 0 hangs in its build
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            replicas.start(dict(engine=dict(TINY), threads=1))
    finally:
        stop.set()
        thread.join()
    assert len(started) == 2
    assert not wait_gone(started, 5.0)


@pytest.mark.timeout(120)
def test_a_function_failing_inside_a_replica_comes_back_and_the_replica_serves_on():
    """Observed: `call_replica` with a function that raised ended the replica process (so did
    a result that could not be pickled there, or not unpickled here): every request it held
    failed with it and it was restarted. Now the caller gets the error, naming the replica and
    the function (the function's own exception as its cause, the replica's traceback with
    it), and the replica serves on."""
    with LLM(data_parallel_size=2, **TINY) as llm:
        engine = llm.engine
        pids = list(engine.pids)
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
        ids = engine.add_requests([[1, 2, 3]] * 4, [params] * 4)
        assert sorted(engine.requests[r].replica for r in ids) == [0, 0, 1, 1]
        with pytest.raises(RuntimeError, match=r"^data-parallel replica 0: _raise_key_error "
                                               r"raised KeyError: 'no such key'") as info:
            engine.call_replica(0, _raise_key_error, "no such key")
        err = info.value
        assert not isinstance(err, WorkerError) and isinstance(err.__cause__, KeyError)
        assert "Traceback" in err.traceback and "_raise_key_error" in err.traceback
        with pytest.raises(RuntimeError, match=r"^data-parallel replica 1: _unpicklable "
                                               r"returned a value that cannot be pickled"):
            engine.call_replica(1, _unpicklable)
        with pytest.raises(RuntimeError, match=r"^data-parallel replica 0: "
                                               r"_replica_only_object returned a value this "
                                               r"process cannot unpickle: .*EngineCore"):
            engine.call_replica(0, _replica_only_object)
        outs = _finish(engine, ids)
        assert [(o.finish_reason, len(o.token_ids)) for o in outs.values()] == [("length", 40)] * 4
        assert engine.pids == pids and engine.health() == (True, None)
        assert engine.call_replica(1, _pages_total) == TINY["num_pages"] - 1
        assert engine.stats()["failed"] == 0
        engine.check_invariants()


def _unread(engine, replica: int) -> int:
    """Bytes replica `replica` has sent that this process has not read yet."""
    import fcntl
    import struct
    import termios

    sock = engine.replicas.groups[replica].conns[0].sock
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


@pytest.mark.timeout(120)
def test_a_large_prompt_goes_to_a_replica_blocked_sending_its_outputs():
    """Both replicas generate while this process reads nothing, until each is blocked writing
    its outputs (their unread bytes stand still). Then a prompt of 200,000 token ids (about
    600 KB pickled, more than a socket buffer holds) is sent to one of them, which cannot read
    it until its own write goes through: this process must read while it writes
    (`WorkerGroup._send`). The prompt goes through at once and the requests finish whole."""
    spec = dict(TINY, page_size=64, num_pages=4200, max_model_len=262144,
                max_num_batched_tokens=256, model_overrides=dict(n_layers=1, max_seq_len=262144))
    with LLM(data_parallel_size=2, **spec) as llm:
        engine = llm.engine
        pids = list(engine.pids)
        params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)
        ids = engine.add_requests([[1, 2, 3]] * 8, [params] * 8)
        last, still = [-1, -1], time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() - still < 0.5:  # until neither replica's output moves
            assert time.monotonic() < deadline, "the replicas' outputs never stood still"
            time.sleep(0.05)
            now = [_unread(engine, r) for r in range(2)]
            if now != last:
                last, still = now, time.monotonic()
        prompt = [300 + i % 1700 for i in range(200_000)]
        t0 = time.monotonic()
        big = engine.add_request(prompt, SamplingParams(max_tokens=1))
        assert time.monotonic() - t0 < 10
        assert engine.abort_request(big).finish_reason == "abort"
        outs = _finish(engine, ids)
        assert [(o.finish_reason, len(o.token_ids)) for o in outs.values()] == \
            [("length", 1000)] * 8
        # A replica sends one output message per step, each at least its stats long: when
        # their output stood still, far less than all of it had come, so they were blocked.
        least = len(pickle.dumps(("outputs", [], ("decode", 0.0), engine.snapshots[0])))
        assert 0 < 2 * sum(last) < least * len(engine.take_step_times()), (last, least)
        assert engine.pids == pids and engine.health() == (True, None)
        engine.check_invariants()


@pytest.mark.timeout(120)
def test_a_shut_down_engine_says_so_at_once():
    """Observed: after `shutdown`, `generate` returned its requests failed with "no
    data-parallel replica is up: ... it is not restarted (it failed too often; see
    HWATTN_REPLICA_RESTARTS)", counted them as failed, and only the next call raised. Now
    every call raises `WorkerError` saying the engine was shut down; shutdown is idempotent."""
    before = set(children(os.getpid()))
    with LLM(data_parallel_size=2, **TINY) as llm:
        engine = llm.engine
        assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0].finish_reason == "length"
    llm.shutdown()  # again: nothing left to stop
    failed = engine.stats()["failed"]
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match="data-parallel engine was shut down"):
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2))
        assert time.monotonic() - t0 < 1
    with pytest.raises(WorkerError, match="shut down"):
        engine.step()
    assert engine.stats()["failed"] == failed and not engine.has_unfinished()
    assert engine.health()[0] is False
    assert not wait_gone(set(children(os.getpid())) - before, 3.0)


@pytest.mark.timeout(60)
def test_a_replica_hanging_while_it_builds_is_given_up_after_the_setup_timeout(monkeypatch):
    """Observed: HWATTN_SETUP_TIMEOUT_S bounded the set-up of tensor-parallel ranks but not
    of data-parallel replicas, which waited their fixed 600 s for a replica stuck building
    (its heartbeat beating on, so only the deadline can catch it)."""
    monkeypatch.setenv("HWATTN_FAULT", "replica:build:1:hang")
    # (15 s: long enough for a replica to start and connect on a busy 2-core machine, where
    # 5 s was not, so that the deadline is met in the build, where it hangs)
    monkeypatch.setenv("HWATTN_SETUP_TIMEOUT_S", "15")
    before = set(children(os.getpid()))
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"data-parallel replica 1 sent no ready signal within "
                                          r"15 s"):
        LLM(data_parallel_size=2, **TINY)
    assert time.monotonic() - t0 < 15 + 10
    assert not wait_gone(set(children(os.getpid())) - before, 3.0)
    monkeypatch.setenv("HWATTN_SETUP_TIMEOUT_S", "0")
    config = model_config(TINY["model"], TINY["attention"], TINY["model_overrides"])
    with pytest.raises(ValueError, match="HWATTN_SETUP_TIMEOUT_S must be a finite number"):
        DataParallelEngine(2, dict(TINY), config, load_tokenizer(None, config.vocab_size),
                           workers=NoReplicas())
