"""A request that fails alone stays alone across processes: when its sampling fails on the
tensor-parallel rank 0 or inside a data-parallel replica, it finishes with finish_reason
"error" while its batch mates produce what they would have without it, the workers live on,
and batches are still checked all or nothing before anything is routed."""

import asyncio
import re

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.sampler import SamplingInput
from hwattn.server.async_engine import AsyncEngine, EngineError
from tests.parallel.procs import alive

TINY = dict(model="tiny", attention="gla-2", device="cpu", dtype="fp32", page_size=8,
            num_pages=96, max_model_len=96, model_overrides=dict(n_layers=1, max_seq_len=96))
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [9] * 12]
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=3,
                         ignore_eos=True)
MARK = 37  # a victim is a request asking for exactly this many tokens

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]  # slow: tensor-parallel ranks and replicas


def poison_marked(engine, max_tokens: int = MARK) -> None:
    """Wherever `engine` lives: once a request asking for `max_tokens` tokens is queued, its
    top_k is changed behind the engine's back to a value no int64 holds, so building its
    sampling tensors fails where the sampler runs (the runner, on rank 0 under TP)."""
    add = engine.add_requests

    def poisoned(prompts, params, request_ids=None, **kw):
        rids = add(prompts, params, request_ids, **kw)
        for rid in rids:
            if engine.requests[rid][0].params.max_tokens == max_tokens:
                engine.requests[rid][0].params.top_k = 1 << 64
        return rids

    engine.add_requests = poisoned


class Hostile(SamplingParams):
    """Valid settings whose `greedy` flag cannot be read: the engine's sampling build raises
    (inside the replica that holds the request)."""

    @property
    def greedy(self):
        raise RuntimeError("hostile settings")


class Unqueueable(SamplingParams):
    """Valid settings whose `plain` flag cannot be read: the data-parallel front end never
    reads it; the replica's engine raises TypeError while queueing the request."""

    @property
    def plain(self):
        raise TypeError("unqueueable settings")


@pytest.fixture(scope="module")
def clean():
    with LLM(**TINY) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)]


def victim(**kw) -> SamplingParams:
    return SamplingParams(**dict(dict(max_tokens=MARK, temperature=0.9, seed=3, ignore_eos=True),
                                 **kw))


def test_sampling_failing_on_tensor_parallel_rank_0_fails_that_request_alone(clean, monkeypatch):
    """TP=2 under gloo: the victim's sampling fails on rank 0 (this process never builds a
    sampling tensor: if it did, every request here would fail), the others complete exactly
    as in one process, and the ranks serve the next call."""
    def not_here(self, device):
        raise AssertionError("the engine process sampled")

    monkeypatch.setattr(SamplingInput, "tensors", not_here)
    with LLM(tensor_parallel_size=2, **TINY) as llm:
        engine = llm.engine
        poison_marked(engine)
        outs = llm.generate(PROMPTS, [SAMPLED, victim(), SAMPLED])
        bad = outs[1]
        assert bad.finish_reason == "error" and "Overflow" in bad.error, bad.error
        assert len(bad.token_ids) < MARK
        assert [outs[0].token_ids, outs[2].token_ids] == [clean[0], clean[2]]
        assert all(o.finish_reason == "length" for o in (outs[0], outs[2]))
        stats = engine.stats()
        assert stats["failed"] == 1 and stats["finished"] == 2
        assert stats["running"] == stats["waiting"] == stats["pages_used"] == 0
        assert all(alive(p) for p in engine.runner.pids)
        assert [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)] == clean


@pytest.fixture(scope="module")
def dp():
    llm = LLM(data_parallel_size=2, **TINY)
    for replica in range(2):
        llm.engine.call_replica(replica, poison_marked, MARK)
    yield llm
    llm.shutdown()


def test_sampling_failing_inside_a_replica_fails_that_request_alone(dp, clean):
    """DP=2: one victim fails in its replica's runner (top_k), one in its replica's engine
    (settings that cannot be read); both come back with their errors, the others complete
    as in one engine, and `failed` counts both."""
    engine = dp.engine
    before = engine.stats()
    outs = dp.generate(PROMPTS + PROMPTS[:1],
                       [SAMPLED, victim(), SAMPLED, Hostile(max_tokens=10, seed=3)])
    assert outs[1].finish_reason == "error" and "Overflow" in outs[1].error, outs[1].error
    assert outs[3].finish_reason == "error" and "hostile settings" in outs[3].error
    assert [outs[0].token_ids, outs[2].token_ids] == [clean[0], clean[2]]
    stats = engine.stats()
    assert stats["failed"] - before["failed"] == 2
    assert stats["finished"] - before["finished"] == 2
    assert not engine.has_unfinished() and engine.router.load == [0, 0]
    engine.check_invariants()
    assert all(alive(p) for p in engine.pids)


def test_a_request_failing_while_its_replica_queues_it_fails_alone(dp, clean):
    """DP=2: a request whose replica raises TypeError queueing it (not the ValueError of a
    refusal). Observed: the error ended the replica process, failing the requests it held.
    Now it comes back alone with its error; the others complete as in one engine, and both
    replicas live on."""
    engine = dp.engine
    pids = list(engine.pids)
    before = engine.stats()
    outs = dp.generate(PROMPTS + PROMPTS[:1], [SAMPLED, SAMPLED, SAMPLED,
                                                Unqueueable(max_tokens=10, seed=3)])
    bad = outs[3]
    assert bad.finish_reason == "error" and not bad.worker_failed, bad.error
    assert re.match(r"data-parallel replica [01] refused it: TypeError: unqueueable settings",
                    bad.error), bad.error
    assert [o.token_ids for o in outs[:3]] == clean
    assert all(o.finish_reason == "length" for o in outs[:3])
    stats = engine.stats()
    assert stats["failed"] - before["failed"] == 1
    assert stats["finished"] - before["finished"] == 3
    assert engine.pids == pids and engine.health() == (True, None)
    assert not engine.has_unfinished() and engine.router.load == [0, 0]
    engine.check_invariants()


def test_data_parallel_batches_are_checked_before_any_is_routed(dp):
    engine = dp.engine
    before = engine.stats()
    greedy = SamplingParams(max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match=r"prompts\[2\].*empty"):
        dp.generate(["good", "good", ""], greedy)
    with pytest.raises(ValueError, match=r"prompts\[1\].*not valid Unicode"):
        dp.generate(["good", "ok \ud800"], greedy)
    with pytest.raises(ValueError, match=r"prompts\[1\].*1-D integer tensor"):
        dp.generate([torch.tensor([1, 2]), torch.tensor([1.0, 2.0])], greedy)
    assert not engine.has_unfinished() and not engine.requests
    outs = dp.generate(["next"], greedy)
    assert len(outs) == 1 and outs[0].finish_reason == "length"
    stats = engine.stats()
    assert stats["finished"] - before["finished"] == 1 and stats["failed"] == before["failed"]


def test_the_server_loop_fails_only_the_failing_request_of_a_replica(dp, clean):
    """AsyncEngine over DP=2: the victim's stream raises EngineError, the others stream to
    the end, and the snapshot /metrics reads counts the failure."""
    engine = AsyncEngine(dp.engine)
    before = dp.engine.stats()["failed"]

    async def one(i, ids, params):
        outs = []
        try:
            async for out in engine.generate(ids, params, f"srv-{i}"):
                outs.append(out)
        except EngineError as err:
            return err
        return outs[-1]

    async def main():
        jobs = [(PROMPTS[0], SAMPLED), (PROMPTS[1], victim()), (PROMPTS[2], SAMPLED)]
        return await asyncio.gather(*(one(i, ids, sp) for i, (ids, sp) in enumerate(jobs)))

    engine.start()
    try:
        first, bad, last = asyncio.run(main())
    finally:
        engine.shutdown()
    assert isinstance(bad, EngineError) and "Overflow" in str(bad)
    assert [first.token_ids, last.token_ids] == [clean[0], clean[2]]
    assert engine.snapshot["failed"] == before + 1
