"""Data parallelism: the router never loses or duplicates a request, replicas in processes
(each tensor-parallel itself) generate what one engine does, and a failing replica fails the
engine with its traceback, leaving no process behind."""

import os
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
