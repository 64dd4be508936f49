"""Data parallelism: the router never loses or duplicates a request, and the engine over
in-process replicas generates what one engine does, failing a request a replica refuses alone.
(Replicas in processes, their faults and lifecycle: test_data_parallel_replicas.py.)"""

import random
import re
import time
from collections import Counter, deque

import pytest

from hwattn.data.tokenizer import load_tokenizer
from hwattn.engine import SamplingParams, create_engine
from hwattn.engine.data_parallel import DataParallelEngine, LeastOutstandingTokens
from hwattn.engine.engine_core import EngineCore
from hwattn.engine.loader import model_config

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
        dp.check_books()  # the router's books balance after every step
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
        def validate(prompt, *rest):
            if prompt[0] == 13:
                raise ValueError("thirteen")
            return check(prompt, *rest)
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
    assert bad.first_scheduled_time is None  # never admitted anywhere
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


def test_outputs_carry_when_the_replica_first_scheduled_the_request():
    """Each output carries its replica's first_scheduled_time (the queue time's end): the
    replica's own value, between the arrival here and the first token, on every output from
    the first one that has it. With one sequence per replica, requests queue behind others."""
    dp = _in_process(max_num_seqs=1)
    scheduled = {}  # replica-side key -> the replica's first_scheduled_time
    for core in dp.replicas.cores:
        def step(real=core.engine.step):
            outs = real()
            for o in outs:
                assert scheduled.setdefault(o.request_id, o.first_scheduled_time) \
                    == o.first_scheduled_time
            return outs
        core.engine.step = step
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = dp.add_requests([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11], [12]], [params] * 5)
    keys = {rid: dp.requests[rid].key for rid in ids}
    finals, seen = {}, {}
    deadline = time.monotonic() + 60
    while dp.has_unfinished():
        assert time.monotonic() < deadline
        for out in dp.step():
            assert out.first_scheduled_time is not None  # an output comes with a token
            assert seen.setdefault(out.request_id, out.first_scheduled_time) \
                == out.first_scheduled_time
            if out.finished:
                finals[out.request_id] = out
    for rid in ids:
        out = finals[rid]
        assert out.first_scheduled_time == scheduled[keys[rid]], rid
        assert out.arrival_time <= out.first_scheduled_time <= out.first_token_time, rid
    # Five requests on two replicas of one sequence each: some waited for a slot.
    waits = sorted(o.first_scheduled_time - o.arrival_time for o in finals.values())
    assert waits[-1] > waits[0]


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
    import hwattn.engine.output_processor as output_processor

    dp = _in_process()
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    ids = dp.add_requests([[1, 2, 3], [4, 5, 6]], [params] * 2)
    bad_params = params
    if fault.startswith("TypeError"):
        bad_params = Unqueueable(max_tokens=6, temperature=0, ignore_eos=True)
    else:
        real = output_processor.incremental_detokenizer

        def detokenizer(tokenizer, skip_special_tokens=None):
            raise KeyError("no decoding table")

        monkeypatch.setattr(output_processor, "incremental_detokenizer", detokenizer)
    bad = dp.add_request([7, 8, 9], bad_params)
    if not fault.startswith("TypeError"):
        monkeypatch.setattr(output_processor, "incremental_detokenizer", real)
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


def test_aborting_a_request_whose_final_output_waits_drops_it_and_frees_its_id():
    """Observed: a request whose replica had finished it, its final output waiting for the
    next `step`, could not be aborted: `abort_request` returned None (as for a request long
    done), yet the next `step` still delivered the output, and the id stayed in use until
    then (a new request under it refused). As LLMEngine drops an output it holds back when
    its request is aborted, the output is now dropped and the id free at once."""
    dp = _in_process()
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    dp.add_request([1, 2, 3], params, request_id="x")
    deadline = time.monotonic() + 30
    while "x" in dp.requests:
        assert time.monotonic() < deadline
        dp.check_workers()
    assert dp.pending["x"].finished
    assert dp.abort_request("x") is None
    assert not dp.has_unfinished() and dp.step() == []
    again = _finish(dp, [dp.add_request([9, 9, 9, 9], params, request_id="x")])["x"]
    assert again.prompt_token_ids == [9, 9, 9, 9] and again.finish_reason == "length"


def test_a_request_aborted_while_its_final_output_is_on_the_way_counts_as_aborted():
    """Observed (the router test above, in some runs while it asked every replica for its
    invariants after each step): a request aborted here after its replica had finished it,
    its final output still on the way, was counted finished (by the replica) and not
    aborted, though its caller got "abort": `stats()` said 30 finished for 29 delivered.
    Requests' ends are now counted as this engine delivered them."""
    dp = _in_process()
    fake = dp.replicas
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    x, y = dp.add_request([1, 2, 3], params), dp.add_request([4, 5, 6], params)
    replica = dp.requests[x].replica
    key, core, in_flight = dp.requests[x].key, fake.cores[replica], []
    while not any(d[0] == key and d[4] == "length" for m in in_flight for d in m[1]):
        in_flight += core.step()  # the replica finishes x; the news is not here yet
    assert dp.abort_request(x).finish_reason == "abort"
    fake.queues[replica].extend(in_flight)
    outs = _finish(dp, [y])
    assert outs[y].finish_reason == "length"
    assert fake.cores[replica].engine.stats()["finished"] >= 1  # the replica's own view
    stats = dp.stats()
    assert (stats["finished"], stats["aborted"], stats["failed"]) == (1, 1, 0)
    dp.check_invariants()


def test_counters_name_what_a_single_engine_counts():
    """Observed: the engine's `counters` left out `mixed_steps`, which LLMEngine counts (the
    replicas' stats carry it): code reading it from a data-parallel engine got a KeyError."""
    dp = _in_process()
    single = create_engine(**TINY)
    assert dp.counters.keys() == single.counters.keys()


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


def test_replica_steps_that_launched_nothing_are_not_timed_as_decode_steps():
    """A replica's step() that only read back its last overlapped step launched nothing: it is
    reported as "readback", so the benchmark's inter-token latency leaves it out as the
    single-process path does. Observed: such steps were reported as decode steps of ~0.1 ms
    (8 ITL samples against 6 decode steps)."""
    dp = _in_process()
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    ids = [dp.add_request([3 + i, 4, 5, 6], params) for i in range(4)]
    _finish(dp, ids)
    kinds = [kind for kind, _ in dp.take_step_times()]
    launched = sum(core.engine.counters["steps"] for core in dp.replicas.cores)
    prefills = sum(core.engine.counters["prefill_steps"] for core in dp.replicas.cores)
    assert set(kinds) <= {"prefill", "decode", "readback"}
    assert kinds.count("prefill") == prefills
    assert kinds.count("prefill") + kinds.count("decode") == launched
    assert "readback" in kinds  # the engines overlap their steps here
    dp.check_invariants()
