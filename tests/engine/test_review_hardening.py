"""A hostile user's review of the engine: each test names what was observed before its fix.

Steps that fail where the engine had already counted on them (a launch made on the launch
thread fails when its tokens are read back; a draft model has counted its drafts before the
verify step fails; a draft prefill failing after the target's launch), ids whose final
output is still held back, prefix pages named by a hash that can be made to collide, allowed
tokens that are all banned, and vLLM's list form of `abort_request`; and a random load with
failing steps and aborts that must end with every page free and no request stuck."""

from __future__ import annotations

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from tests.conftest import failing_on_call
from tests.engine.conftest import drain

PROMPT = [5, 17, 300, 42, 42, 7, 1000, 3, 9, 11, 250, 77]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    from tests.conftest import make_checkpoint

    torch.set_num_threads(1)
    return make_checkpoint(tmp_path_factory.mktemp("review") / "gqa", "gqa-2")


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, **kw)


def _step_through_one_failure(engine, message: str) -> dict:
    """Step `engine` until it has nothing left, checking its invariants after every step;
    exactly one step must raise RuntimeError(`message`). Returns the finished outputs by id."""
    done, raised = {}, 0
    for _ in range(60):
        if not engine.has_unfinished():
            break
        try:
            outs = engine.step()
        except RuntimeError as err:
            assert message in str(err)
            raised += 1
            continue
        done.update({o.request_id: o for o in outs if o.finished})
        engine.check_invariants()
    assert raised == 1
    return done


@pytest.mark.parametrize("fail_at", [1, 3], ids=["prefill launch", "decode launch"])
def test_a_launch_failing_on_the_launch_thread_does_not_wedge_the_engine(path, fail_at):
    """Observed: with launch_thread=True a launch that raised in the thread surfaced one step
    later, while that step's tokens were read back, after the engine had already counted
    them as cached and left placeholders for them; every later step then raised "request
    ... waits on a token no step in flight sampled", forever. (Without the thread the same
    failure raises from the launch itself and the next step goes on.) Now the step raises
    once and the engine recomputes; a prompt whose prefill was lost is not found in the
    prefix cache (its pages were registered before being written)."""
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48,
              overlap_scheduling=True, launch_thread=True, enable_prefix_caching=True)
    engine = llm.engine
    other = [9, 8, 7, 6, 5]
    want = [o.token_ids for o in llm.generate([PROMPT, other], greedy(6))]
    engine.block_manager.reset_prefix_cache()  # the failed prefill must not find these
    real = engine.runner.launch_step
    engine.runner.launch_step = failing_on_call(real, fail_at, RuntimeError("lost launch"))
    ids = engine.add_requests([PROMPT, other], [greedy(6), greedy(6)])
    done = _step_through_one_failure(engine, "lost launch")
    assert [done[i].token_ids for i in ids] == want
    engine.runner.launch_step = real
    again = llm.generate([PROMPT, PROMPT], greedy(6))  # through the prefix cache
    assert [o.token_ids for o in again] == [want[0], want[0]]
    assert engine.block_manager.num_used_pages == 0
    llm.shutdown()


def test_an_id_whose_final_output_is_still_held_back_is_in_use(path, monkeypatch):
    """Observed: after a step failed once it had read tokens back, the requests it finished
    were held for the next `step()` (`_unreported`) but their ids were already free: a new
    request could take one, and the next `step()` then returned the old request's final
    output under it, before the new request had run at all. An id is now in use until its
    final output has come out of `step`, as `DataParallelEngine` already has it."""
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48,
              overlap_scheduling=True)
    engine = llm.engine
    engine.add_request(PROMPT, greedy(1), request_id="a")
    assert engine.step() == []  # the prompt's step is in flight (overlapped)
    # Sampled on the host: the step in flight is read back first ("a" finishes there).
    engine.add_request([1, 2, 3], greedy(2, logprobs=1), request_id="b")
    real = engine.runner.sample_step
    monkeypatch.setattr(engine.runner, "sample_step",
                        failing_on_call(real, 1, RuntimeError("lost")))
    with pytest.raises(RuntimeError, match="lost"):
        engine.step()
    with pytest.raises(ValueError, match="'a' is already in use"):
        engine.add_request([4, 5, 6], greedy(3), request_id="a")
    assert engine.add_request([4, 5, 6], greedy(3)) != "a"  # nor is it handed out
    done = drain(engine)
    assert len(done["a"].token_ids) == 1 and done["a"].prompt_token_ids == PROMPT
    engine.add_request([4, 5, 6], greedy(3), request_id="a")  # free once delivered
    assert len(drain(engine)["a"].token_ids) == 3


def test_a_failed_verify_step_leaves_the_draft_models_cache_count_as_it_was(path, tmp_path):
    """Observed: with a draft model, a verify step whose forward raised left every sequence's
    `draft_cached` at its drafts' end (the drafter counts them, for the verification to cut
    back); every later verify step then raised "draft cache lags by [-1, ...], expected 1 or
    2", forever. Now the failed step raises alone and decoding goes on to the same tokens."""
    from tests.conftest import make_draft

    draft = make_draft(path, tmp_path / "draft")
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48,
              speculative=draft, num_speculative_tokens=3)
    engine = llm.engine
    prompts = [PROMPT, [9, 8, 7, 6, 5]]
    want = [o.token_ids for o in llm.generate(prompts, greedy(10))]
    real = engine.runner.verify_step
    engine.runner.verify_step = failing_on_call(real, 2, RuntimeError("lost verify"))
    ids = engine.add_requests(prompts, [greedy(10), greedy(10)])
    done = _step_through_one_failure(engine, "lost verify")
    assert [done[i].token_ids for i in ids] == want
    assert engine.block_manager.num_used_pages == 0


def _flaky(real, rng, p: float):
    """`real`, raising `InjectedFailure` on a random `p` of its calls."""
    def call(*args, **kwargs):
        if rng.random() < p:
            raise InjectedFailure("injected")
        return real(*args, **kwargs)

    return call


class InjectedFailure(RuntimeError):
    pass


# launch_thread: a failed launch surfaces at the next read-back (the wedge above); draft: the
# draft model's cache count across a failed verify step.
@pytest.mark.parametrize("seed, mode", [
    (0, dict(overlap_scheduling=True)),
    (5, dict(overlap_scheduling=True, launch_thread=True)),
    (5, dict(overlap_scheduling=True, launch_thread=True, enable_mixed_batches=True)),
    (3, dict(speculative="ngram", num_speculative_tokens=2, launch_thread=True,
             speculative_disable_batch_size=3)),
    (4, dict(speculative="draft", num_speculative_tokens=2))],
    ids=["overlap", "thread", "thread+mixed", "ngram+thread", "draft"])
def test_random_load_with_failing_steps_and_aborts_ends_clean(path, tmp_path, seed, mode):
    """Requests with a shared prefix arrive, some are aborted at random steps, the pool is
    tight enough to preempt, and 3% of the runner's (and drafter's) calls raise. Every step
    either raises that failure or keeps the pages adding up; at the end every request has
    finished exactly once or was aborted, no page is held, and each greedy request that
    finished holds the tokens it gets alone (no page the prefix cache shared was left
    unwritten)."""
    import random

    from tests.conftest import make_draft

    rng = random.Random(seed)
    if mode.get("speculative") == "draft":
        mode = dict(mode, speculative=make_draft(path, tmp_path / "draft"))
    llm = LLM(path, page_size=4, num_pages=18, max_num_seqs=6, max_model_len=48,
              max_num_batched_tokens=16, enable_prefix_caching=True, **mode)
    engine = llm.engine
    # Each failing call draws from a generator of its own: with launch_thread the runner's
    # calls come from another thread, and sharing `rng` made the requests depend on how the
    # two threads interleaved (a run could then see no preemption or no failure at all).
    for i, name in enumerate(("launch_step", "sample_step", "verify_step")):
        setattr(engine.runner, name, _flaky(getattr(engine.runner, name),
                                            random.Random(1000 * seed + i), 0.03))
    if engine.drafter is not None:
        engine.drafter.propose = _flaky(engine.drafter.propose, random.Random(1000 * seed + 9),
                                        0.03)
    shared = [rng.randrange(2048) for _ in range(16)]
    requests, finished, aborted, raised = {}, {}, set(), 0
    for step in range(2000):
        if step < 100 and rng.random() < 0.4:
            prompt = [rng.randrange(2048) for _ in range(rng.randint(1, 24))]
            if rng.random() < 0.5:
                prompt = shared[:rng.randint(4, 16)] + prompt[:4]
            params = SamplingParams(max_tokens=rng.randint(1, 10), n=rng.choice([1, 1, 2]),
                                    temperature=rng.choice([0.0, 0.7]), seed=rng.randrange(999),
                                    ignore_eos=True, logprobs=rng.choice([None, None, 1]))
            requests[engine.add_request(prompt, params)] = (prompt, params)
        live = [r for r in requests if r not in finished and r not in aborted]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            assert engine.abort_request(victim).finished
            aborted.add(victim)
        if step >= 100 and not engine.has_unfinished():
            break
        try:
            outputs = engine.step()
        except InjectedFailure:
            raised += 1
            outputs = []
        for out in outputs:
            if out.finished:
                assert out.request_id not in finished and out.request_id not in aborted
                assert all(c.finish_reason == "length" for c in out.outputs), out
                finished[out.request_id] = out
        engine.check_invariants()
    assert raised > 0 and engine.stats()["preemptions"] > 0
    assert not engine.has_unfinished() and set(finished) | aborted == set(requests)
    assert engine.block_manager.num_used_pages == 0 and not engine.detok
    engine.shutdown()
    alone = LLM(path, page_size=4, num_pages=60, max_num_seqs=1, max_model_len=48,
                enable_prefix_caching=False)
    greedy_ids = [r for r in finished if requests[r][1].temperature == 0]
    want = alone.generate([requests[r][0] for r in greedy_ids],
                          [requests[r][1] for r in greedy_ids])
    assert [[c.token_ids for c in finished[r].outputs] for r in greedy_ids] == \
        [[c.token_ids for c in o.outputs] for o in want]


def test_prefix_pages_are_identified_by_a_collision_resistant_digest():
    """Observed: a page's chain hash was Python's `hash((previous, tokens))`, 64 bits that
    treat parent values congruent mod 2**61 - 1 as one (hash(h) == hash(h + 2**61 - 1)), so
    prompts can be searched for whose chain collides with another prompt's prefix and would
    then be served its cache (vLLM moved to SHA-256 for this, its default since 0.10.2).
    A page is now named by SHA-256 of its parent's digest and its token ids."""
    import hashlib
    from array import array

    from hwattn.engine.block_manager import BlockManager

    first = BlockManager.chain_hash(None, (1, 2, 3, 4))
    assert first == hashlib.sha256(b"\x00" + array("q", (1, 2, 3, 4)).tobytes()).digest()
    second = BlockManager.chain_hash(first, (5, 6, 7, 8))
    assert second == hashlib.sha256(b"\x01" + first + array("q", (5, 6, 7, 8)).tobytes()).digest()
    assert len({first, second, BlockManager.chain_hash(second, (5, 6, 7, 8)),
                BlockManager.chain_hash(None, (5, 6, 7, 8))}) == 4


def test_abort_takes_vllms_list_of_ids(path):
    """Observed: `abort_request(["a", "b"])`, as vLLM's engine takes it, raised "unhashable
    type: 'list'" while any request was queued, and returned None (aborting nothing) while
    none was. A list now aborts each id in it."""
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48)
    engine = llm.engine
    assert engine.abort_request(["nothing"]) == [None]
    a = engine.add_request(PROMPT, greedy(5))
    b = engine.add_request([1, 2, 3], greedy(5))
    c = engine.add_request([4, 5, 6], greedy(2))
    engine.step()
    outs = engine.abort_request([a, "unknown", b])
    assert [o and (o.request_id, o.finish_reason) for o in outs] == \
        [(a, "abort"), None, (b, "abort")]
    assert list(drain(engine)) == [c]
    assert engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("settings", [
    dict(min_tokens=2, allowed_token_ids=["eos"]),
    dict(min_tokens=1, stop_token_ids=[7, 9], allowed_token_ids=[9, 7], ignore_eos=True),
    dict(min_tokens=1, stop_token_ids=[7], allowed_token_ids=["eos", 7]),
    dict(bad_words=["a"], allowed_token_ids=["a"])], ids=["eos", "stop ids", "both", "bad word"])
def test_allowed_tokens_that_are_all_banned_are_refused_by_name(path, settings):
    """Observed: allowed_token_ids=[eos] with min_tokens=2 (or only stop ids, or only a
    one-token bad word) left the sampler every logit at -inf, and it emitted token 0, which
    was never allowed ([0, 0, eos]). Such a request is now refused, naming
    allowed_token_ids; one with an allowed token left runs."""
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48)
    tok = llm.get_tokenizer()
    named = {"eos": tok.eos_token_id, "a": tok.encode("a")[0]}
    settings = dict(settings, allowed_token_ids=[named.get(t, t) for t in
                                                 settings["allowed_token_ids"]])
    with pytest.raises(ValueError, match="allowed_token_ids") as err:
        llm.engine.add_request([1, 2, 3], SamplingParams(max_tokens=3, **settings))
    assert getattr(err.value, "param", None) == "allowed_token_ids"
    assert not llm.engine.has_unfinished()
    settings["allowed_token_ids"] = settings["allowed_token_ids"] + [42]
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0, **settings))[0]
    assert set(out.token_ids) <= set(settings["allowed_token_ids"]) and 42 in out.token_ids


def test_a_failed_draft_prefill_does_not_feed_a_bystander_the_wrong_token(path, tmp_path):
    """Observed: a draft-model engine decoding plainly and overlapped launched a prefill step,
    then the draft model's prefill of the same chunk raised. The launched step was lost, but
    the runner's last sampled tokens (which the next step's decode rows read on the device)
    were already its tokens; once the new request was aborted, the next decode step fed the
    running request the lost prefill's token in place of its own, and it went on silently
    with other tokens. The draft prefill now runs before the target's launch."""
    from tests.conftest import make_draft

    draft = make_draft(path, tmp_path / "draft")
    llm = LLM(path, page_size=4, num_pages=60, max_num_seqs=4, max_model_len=48,
              speculative=draft, num_speculative_tokens=2, speculative_disable_batch_size=1)
    engine = llm.engine
    want = llm.generate([PROMPT], greedy(8))[0].token_ids
    a = engine.add_request(PROMPT, greedy(8))
    for _ in range(3):
        engine.step()
    assert engine._inflight is not None  # a decode step of `a` is in flight
    b = engine.add_request([9, 9, 9, 9, 9, 9], greedy(8))
    real = engine.drafter.prefill
    engine.drafter.prefill = failing_on_call(real, 1, RuntimeError("draft prefill"))
    with pytest.raises(RuntimeError, match="draft prefill"):
        engine.step()
    engine.abort_request(b)
    assert drain(engine)[a].token_ids == want
