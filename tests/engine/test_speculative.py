"""Speculative decoding: greedy output identical with and without it, rejected draft slots
rolled back, pages never leaked."""

import random

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.speculative import NgramDrafter
from tests.engine.conftest import step_to_completion

GREEDY = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], list(range(5, 40)), [7] * 5,
           [9, 8, 7, 9, 8, 7, 9], [300, 301]]


def test_ngram_lookup_takes_the_most_recent_match():
    d = NgramDrafter(k=3, max_ngram=2)
    assert d.lookup([1, 2, 3, 4, 9, 1, 2, 5, 6, 1, 2]) == [5, 6, 1]
    assert d.lookup([5, 6, 7, 8]) == [8, 8, 8]  # no match: the last token repeated
    assert d.lookup([4, 4]) == [4, 4, 4]  # a match at the very end pads with its last token


@pytest.mark.parametrize("variant", ["gqa-2", "gla-2"])
@pytest.mark.parametrize("drafter", ["ngram", "model"])
def test_greedy_identical_with_speculation(checkpoints, variant, drafter):
    path = checkpoints(variant)
    plain = LLM(path, page_size=4, num_pages=300, max_model_len=128).generate(PROMPTS, GREEDY)
    spec = checkpoints(variant, draft_layers=1) if drafter == "model" else "ngram"
    llm = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative=spec,
              num_speculative_tokens=3)
    engine = llm.engine
    def cache_is_tight(engine):
        # Cache holds exactly the tokens before the last one; no page beyond what it needs.
        for seq in engine.scheduler.running:
            if not seq.is_prefilling:
                assert seq.num_cached == len(seq) - 1
                assert -(-seq.num_cached // 4) <= len(seq.block_table) <= -(-len(seq) // 4)

    outs = step_to_completion(engine, PROMPTS, GREEDY, after_step=cache_is_tight)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    stats = engine.stats()
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"], stats
    assert engine.block_manager.num_used_pages == 0


def test_speculation_near_the_context_end_and_with_preemption(checkpoints):
    path = checkpoints("gta-4")
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    prompts = [list(range(i, i + 20)) for i in range(6)]
    plain = LLM(path, page_size=4, num_pages=200, max_model_len=48).generate(prompts, params)
    llm = LLM(path, page_size=4, num_pages=30, max_model_len=48, speculative="ngram",
              num_speculative_tokens=3, max_num_seqs=6)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.finish_reason == "length" and len(o.prompt_token_ids) + len(o.token_ids) == 48
               for o in outs)
    assert llm.engine.stats()["preemptions"] > 0
    llm.engine.check_invariants()
    assert llm.engine.block_manager.num_used_pages == 0


def test_a_tight_pool_never_preempts_a_sequence_before_it_decodes(checkpoints):
    """Admission leaves room for the k + 1 tokens a verify step writes, for the sequence
    admitted and for those already running: no verify step then preempts a sequence that has
    not decoded since it was admitted (its prefill thrown away for nothing: with room for one
    token, 12 of the 17 preemptions here were such, and 14 of the 61 steps prefills; now 6
    preemptions, 4 prefill steps in 55), and greedy outputs stay the plain engine's."""
    path = checkpoints("gta-4")
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = [list(range(10 * i, 10 * i + 12)) for i in range(6)]
    plain = LLM(path, page_size=4, num_pages=200, max_model_len=64).generate(prompts, params)
    llm = LLM(path, page_size=4, num_pages=24, max_model_len=64, speculative="ngram",
              num_speculative_tokens=3, enable_prefix_caching=False)
    engine = llm.engine
    admitted, wasted = {}, []
    allocate, preempt = engine.block_manager.allocate, engine.scheduler._preempt

    def on_allocate(seq):
        admitted[seq] = len(seq)
        allocate(seq)

    def on_preempt(seq):
        if len(seq) <= admitted[seq] + 1:  # nothing but the token its prefill sampled
            wasted.append(seq.request_id)
        preempt(seq)

    engine.block_manager.allocate, engine.scheduler._preempt = on_allocate, on_preempt
    outs = step_to_completion(engine, prompts, params)
    assert [o.token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    stats = engine.stats()
    assert stats["preemptions"] > 0, stats  # the pool is tight: growth still preempts
    assert wasted == [], (wasted, stats)
    assert engine.block_manager.num_used_pages == 0


def test_admission_leaves_room_for_the_next_verify_step():
    """A waiting prompt that fits beside the running sequences only between their verify
    steps is not admitted (the next verify step would preempt it straight back): the step
    verifies the running ones."""
    from hwattn.engine.block_manager import BlockManager
    from hwattn.engine.scheduler import Scheduler
    from hwattn.engine.sequence import Sequence

    bm = BlockManager(num_pages=9, page_size=4)  # 8 usable
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    # (prompts that share no page: b would wait for a page of a's prompt otherwise)
    a, b = (Sequence(r, list(range(i, i + 6)), SamplingParams(), seed=0)
            for r, i in (("a", 0), ("b", 10)))
    c = Sequence("c", list(range(8)), SamplingParams(), seed=0)  # 2 pages, 3 once verified
    for seq in (a, b):
        sched.add(seq)
    assert sched.schedule(lookahead=3).kind == "prefill"
    for seq in (a, b):  # as the engine does after their prefill: 7 tokens, 6 cached, 2 pages
        seq.num_cached = 6
        seq.token_ids.append(1)
    sched.add(c)
    assert bm.num_free_pages == 4 and bm.pages_to_grow([a, b], 4) == 2
    batch = sched.schedule(lookahead=3)
    assert (batch.kind, batch.seqs, batch.query_len) == ("decode", [a, b], 4)
    assert sched.num_preemptions == 0 and c in sched.waiting
    bm.check([a, b])


def test_sampled_speculation_runs_and_is_seeded(checkpoints):
    llm = LLM(checkpoints("mla"), page_size=4, num_pages=300, max_model_len=128,
              speculative=checkpoints("mla", draft_layers=1), num_speculative_tokens=2)
    sp = SamplingParams(max_tokens=20, temperature=0.8, top_p=0.95, seed=11, ignore_eos=True)
    a = llm.generate(PROMPTS, sp)
    b = llm.generate(PROMPTS[::-1], sp)[::-1]
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert all(len(o.token_ids) == 20 for o in a)
    assert llm.engine.block_manager.num_used_pages == 0


def test_incremental_ngram_drafts_equal_a_fresh_lookup():
    """The per-sequence index, extended as tokens arrive, proposes what a scan of the whole
    history proposes: over growing random histories from a small alphabet (many matches),
    with a window short enough to cut some of them."""
    from hwattn.engine.sequence import Sequence

    g = torch.Generator().manual_seed(0)
    for window in (4096, 9):
        incremental, fresh = NgramDrafter(k=3, window=window), NgramDrafter(k=3, window=window)
        seq = Sequence("r", torch.randint(0, 5, (3,), generator=g).tolist(), GREEDY, 0)
        for _ in range(60):
            assert incremental.draft(seq) == fresh.lookup(seq.token_ids)
            seq.token_ids.extend(torch.randint(0, 5, (int(torch.randint(1, 4, (1,))),),
                                               generator=g).tolist())


def scan(tokens, k, max_ngram=3, min_ngram=1, window=4096):
    """What `NgramDrafter` proposes, by brute force: for n from max_ngram down, the latest
    earlier occurrence of the last n tokens that starts inside the last `window` tokens;
    the k tokens after it (its last token repeated past the end), else the last token k
    times."""
    size = len(tokens)
    floor = max(0, size - window)
    for n in range(min(max_ngram, size - 1), min_ngram - 1, -1):
        suffix = tokens[size - n:]
        for end in range(size - 1, floor + n - 1, -1):  # the occurrence is tokens[end - n:end]
            if tokens[end - n:end] == suffix:
                draft = tokens[end:end + k]
                return draft + [draft[-1]] * (k - len(draft))
    return [tokens[-1]] * k


@pytest.mark.parametrize("k,max_ngram,min_ngram", [(1, 3, 1), (3, 3, 1), (4, 4, 2), (2, 1, 1)])
def test_ngram_drafts_equal_a_reference_scan(k, max_ngram, min_ngram):
    """The incremental index (per position for a decode step's few tokens, per n-gram size
    for many), a fresh lookup and `propose` over a batch all propose what a brute-force
    scan proposes: random histories from small alphabets (many matches) growing by a decode
    step's 1 to k + 1 tokens or by a long run, cut back now and then, at windows down to 1."""
    from hwattn.engine.sequence import Sequence

    rng = random.Random(k * 100 + max_ngram * 10 + min_ngram)
    for window in (1, 2, 5, 9, 40, 4096):
        for alphabet in (2, 4, 30):
            drafter = NgramDrafter(k, max_ngram, min_ngram, window)
            seqs = [Sequence(str(i), [rng.randrange(alphabet) for _ in range(rng.randint(1, 30))],
                             GREEDY, 0) for i in range(3)]
            for step in range(40):
                want = [scan(s.token_ids, k, max_ngram, min_ngram, window) for s in seqs]
                if step % 2:
                    assert drafter.propose(seqs)[0] == want
                else:
                    assert [drafter.draft(s) for s in seqs] == want
                assert [drafter.lookup(list(s.token_ids)) for s in seqs] == want
                for s in seqs:
                    grow = rng.randint(1, k + 1) if rng.random() < 0.85 else rng.randint(17, 60)
                    s.token_ids.extend(rng.randrange(alphabet) for _ in range(grow))
                    if rng.random() < 0.05:  # a history cut back: indexed afresh
                        del s.token_ids[rng.randint(1, len(s.token_ids)):]
    assert drafter.proposed > 0 and 0 < drafter.matched <= drafter.proposed


def test_ngram_index_lives_on_the_sequence_per_drafter():
    """Two drafters on one sequence keep apart: each proposes as a fresh lookup would."""
    from hwattn.engine.sequence import Sequence

    seq = Sequence("r", [1, 2, 3, 1, 2, 3, 1, 2], GREEDY, 0)
    a, b = NgramDrafter(k=2), NgramDrafter(k=2, window=3)
    for extra in ([3], [9, 1], [2]):
        assert a.draft(seq) == scan(seq.token_ids, 2)
        assert b.draft(seq) == scan(seq.token_ids, 2, window=3)
        seq.token_ids.extend(extra)
    assert seq.drafter_state[0] is b


@pytest.mark.parametrize("caching", [True, False])
def test_verify_steps_register_their_pages_and_count_their_drafts(checkpoints, caching):
    """The pages a verify step fills are registered for the prefix cache as it resolves (a
    later prompt made of the first request's prompt and output finds every full page of it),
    and none without the prefix cache; every verified row counts k drafts."""
    llm = LLM(checkpoints("gqa-2"), page_size=4, num_pages=200, max_model_len=128,
              speculative="ngram", num_speculative_tokens=3, enable_prefix_caching=caching)
    first = llm.generate([PROMPTS[0]], GREEDY)[0]
    stats, drafter = llm.engine.stats(), llm.engine.drafter
    assert stats["draft_tokens"] == 3 * drafter.proposed > 0
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    tokens = PROMPTS[0] + first.token_ids  # the cache held all of them but the last
    again = llm.generate([tokens], SamplingParams(max_tokens=1, temperature=0))[0]
    full_pages = (len(tokens) - 1) // 4 * 4
    assert again.num_cached_prompt_tokens == (full_pages if caching else 0)
    assert len(PROMPTS[0]) // 4 * 4 < full_pages  # most of them filled by verify steps


def test_stops_inside_accepted_drafts_equal_plain_decoding(checkpoints):
    """A stop token, the end of sequence or max_tokens reached among a step's accepted
    drafts ends the output exactly where plain decoding ends it."""
    path = checkpoints("gqa-2")
    plain_llm = LLM(path, page_size=4, num_pages=300, max_model_len=128)
    free = plain_llm.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0,
                                                      ignore_eos=True))
    stop = free[0].token_ids[11]  # a token the first prompt's output reaches mid-way
    eos = free[1].token_ids[7]
    spec_llm = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative="ngram",
                   num_speculative_tokens=4)
    for tokenizer in (plain_llm.engine.tokenizer, spec_llm.engine.tokenizer):
        tokenizer.eos_token_id = eos
    for params in (SamplingParams(max_tokens=40, temperature=0, stop_token_ids=[stop]),
                   SamplingParams(max_tokens=17, temperature=0, ignore_eos=True)):
        want = plain_llm.generate(PROMPTS, params)
        got = step_to_completion(spec_llm.engine, PROMPTS, params)
        assert [(o.token_ids, o.finish_reason, o.outputs[0].stop_reason) for o in got] == \
            [(o.token_ids, o.finish_reason, o.outputs[0].stop_reason) for o in want]
    stats = spec_llm.engine.stats()
    assert stats["accepted_tokens"] > 0
    assert spec_llm.engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("with_probs", [False, True])
def test_greedy_verify_equals_rejection_sampling_of_greedy_rows(with_probs):
    from hwattn.engine.model_runner import accepted_prefix, greedy_verify
    from hwattn.engine.sampler import SamplingTensors, rejection_sample

    g = torch.Generator().manual_seed(1)
    batch, k, vocab = 6, 3, 11
    logits = torch.randn(batch, k + 1, vocab, generator=g)
    drafts = torch.randint(0, vocab, (batch, k), generator=g)
    drafts[:3] = logits[:3, :k].argmax(-1)  # some rows fully accepted
    drafts[1, 2] = (drafts[1, 2] + 1) % vocab
    probs = torch.rand(batch, k, vocab, generator=g).softmax(-1) if with_probs else None
    st = SamplingTensors.build([GREEDY] * batch, list(range(batch)), [10] * batch, "cpu")
    want = rejection_sample(logits, drafts, probs, st)
    got = greedy_verify(logits, drafts)
    assert torch.equal(got[1], want[1])
    for row, (n, ours, theirs) in enumerate(zip(want[1].tolist(), got[0], want[0])):
        assert ours[:n + 1].tolist() == theirs[:n + 1].tolist(), row  # the tokens kept
    assert got[1].tolist()[:3] == [3, 2, 3]
    # The host's count (the runner's path for drafts that came as lists) agrees.
    fed = [[0] + row for row in drafts.tolist()]
    best = logits.argmax(-1).tolist()
    assert [accepted_prefix(f, b) for f, b in zip(fed, best)] == got[1].tolist()


def record_steps(engine) -> list[str]:
    """Wrap the runner so that each decode step it runs is recorded, in order: "verify",
    "plain" (a plain decode step) or "fed" (a plain decode step launched while the one before
    it was still in flight: it feeds on that step's sampled tokens on the device). With a
    launch thread the plain steps are recorded on that thread, possibly after `engine.step()`
    returns."""
    runner, kinds = engine.runner, []

    def plain(method):
        def run(step, sampling):
            if step.kind == "decode":
                kinds.append("fed" if step.feed is not None else "plain")
            return method(step, sampling)
        return run

    def verify(step, sampling, draft_probs=None, _method=runner.verify_step):
        kinds.append("verify")
        return _method(step, sampling, draft_probs)

    runner.launch_step = plain(runner.launch_step)
    runner.sample_step = plain(runner.sample_step)
    runner.verify_step = verify
    return kinds


def check_greedy_drafts(engine, draft_path):
    """Wrap a draft model's `propose` to check that each greedy draft is what the draft model
    continues the sequence's tokens with when run afresh over all of them (no cache): its
    cache, caught up after plain steps, holds what it should."""
    from hwattn.engine.loader import build_model

    fresh = build_model(draft_path, dtype=torch.float32, device="cpu")
    drafter, checked = engine.drafter, []
    propose = drafter.propose

    def checked_propose(seqs, st):
        drafts, probs = propose(seqs, st)
        for seq, row in zip(seqs, drafts.tolist()):
            tokens = list(seq.token_ids)
            for _ in range(drafter.k):
                tokens.append(int(fresh(torch.tensor([tokens]))[0, -1].argmax()))
            assert row == tokens[len(seq):], seq.request_id
            checked.append(seq)
        return drafts, probs

    drafter.propose = checked_propose
    return checked


# Requests arrive (step -> indices into SWITCH_PROMPTS) so that the running batch grows past
# the threshold (3) and shrinks below it again, twice.
SWITCH_PROMPTS = PROMPTS + [[11, 12, 13, 11, 12, 13, 11, 12], list(range(60, 75)), [42, 43]]
SWITCH_MAX_TOKENS = [40, 9, 13, 6, 34, 11, 17, 5]
ARRIVALS = {0: [0], 4: [1, 2, 3], 12: [4], 20: [5, 6, 7]}


@pytest.mark.parametrize("drafter, overlap, thread", [
    ("ngram", True, False), ("ngram", True, True), ("ngram", False, False),
    ("model", True, False)])
def test_disable_batch_size_switches_both_ways_like_plain_decoding(checkpoints, drafter,
                                                                   overlap, thread):
    """With speculative_disable_batch_size=3 a step of 3 or more running sequences is a plain
    decode step (overlapped: fed by the step in flight) and one of fewer a verify step. As
    requests arrive and finish (by length, by a stop token inside a plain or a verify step)
    the engine goes from one to the other and back, twice; outputs stay plain greedy
    decoding's, no token is lost or doubled, and no page is leaked."""
    path = checkpoints("gqa-2")
    plain_llm = LLM(path, page_size=4, num_pages=300, max_model_len=128)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for n in SWITCH_MAX_TOKENS]
    free = plain_llm.generate(SWITCH_PROMPTS, params)
    # Two requests stop at a token of their own output instead: inside some step of either kind.
    for i, at in ((4, 19), (6, 8)):
        params[i] = SamplingParams(max_tokens=SWITCH_MAX_TOKENS[i], temperature=0,
                                   ignore_eos=True, stop_token_ids=[free[i].token_ids[at]])
    want = plain_llm.generate(SWITCH_PROMPTS, params)
    assert want[4].finish_reason == want[6].finish_reason == "stop"
    spec = checkpoints("gqa-2", draft_layers=1) if drafter == "model" else "ngram"
    llm = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative=spec,
              num_speculative_tokens=3, speculative_disable_batch_size=3, max_num_seqs=6,
              overlap_scheduling=overlap, launch_thread=thread)
    engine = llm.engine
    assert engine.disable_batch_size == 3
    # Each step's decision as it is made (with a launch thread, the last kind recorded after
    # a step could still be the step before's): the running sequences and the drafts.
    decided = []
    lookahead = engine._lookahead

    def spy():
        k = lookahead()
        decided.append((len(engine.scheduler.running), k))
        return k

    engine._lookahead = spy
    kinds = record_steps(engine)
    checked = check_greedy_drafts(engine, spec) if drafter == "model" else None
    ids, done, step = {}, {}, 0
    while step <= max(ARRIVALS) or engine.has_unfinished():
        for i in ARRIVALS.get(step, []):
            ids[engine.add_request(SWITCH_PROMPTS[i], params[i])] = i
        for out in engine.step():
            assert out.request_id not in done, "an output after the final one"
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
        step += 1
    assert any(k for _, k in decided), "no verify step"
    assert all(k == 0 for n, k in decided if n >= 3), f"drafts with 3 or more running: {decided}"
    assert any(n >= 3 for n, _ in decided)  # the threshold was reached
    got = [None] * len(SWITCH_PROMPTS)
    for rid, i in ids.items():
        got[i] = done[rid]
    assert [(o.token_ids, o.finish_reason) for o in got] == \
        [(o.token_ids, o.finish_reason) for o in want]
    assert engine.block_manager.num_used_pages == 0
    # Both ways, twice: verify -> plain -> verify -> plain -> verify.
    runs = [kind for j, kind in enumerate(kinds)
            if j == 0 or (kind == "verify") != (kinds[j - 1] == "verify")]
    assert runs[:5] == ["verify", runs[1], "verify", runs[3], "verify"], runs
    assert ("fed" in kinds) == overlap  # plain steps overlapped where overlap is on
    stats = engine.stats()
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"], stats
    if checked is not None:
        assert checked  # drafts were made, and checked, after plain steps too
    engine.shutdown()


def test_disable_batch_size_one_never_drafts(checkpoints):
    """A threshold of one sequence turns every step plain: nothing is drafted, steps overlap,
    and the outputs are plain decoding's."""
    path = checkpoints("gqa-2")
    want = LLM(path, page_size=4, num_pages=300, max_model_len=128).generate(PROMPTS, GREEDY)
    llm = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative="ngram",
              num_speculative_tokens=3, speculative_disable_batch_size=1)
    kinds = record_steps(llm.engine)
    outs = step_to_completion(llm.engine, PROMPTS, GREEDY)
    assert [o.token_ids for o in outs] == [o.token_ids for o in want]
    assert "verify" not in kinds and "fed" in kinds
    assert llm.engine.stats()["draft_tokens"] == 0
    assert llm.engine.block_manager.num_used_pages == 0


def test_draft_model_catches_up_after_plain_steps_of_a_logprobs_request(checkpoints):
    """A request with log-probs makes every step plain while it runs; the draft model's cache
    then lags the other sequences by many tokens, and is caught up before it drafts again."""
    path = checkpoints("gqa-2")
    draft = checkpoints("gqa-2", draft_layers=1)
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1)]
    prompts = PROMPTS[:2]
    want = LLM(path, page_size=4, num_pages=300, max_model_len=128).generate(prompts, params)
    llm = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative=draft,
              num_speculative_tokens=3)
    checked = check_greedy_drafts(llm.engine, draft)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert checked and llm.engine.block_manager.num_used_pages == 0


def test_draft_model_catches_up_within_the_prefill_budget(checkpoints):
    """Plain steps of a batch at the threshold leave the draft cache a hundred or more tokens
    behind; once the batch shrinks, the catch-up writes them in prefill steps of at most
    `max_num_batched_tokens`, and the drafts made after it are still the draft model's own."""
    path = checkpoints("gqa-2")
    draft = checkpoints("gqa-2", draft_layers=1)
    budget = 32
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
              for n in (80, 80, 80, 40)]  # the short one ends: the batch drops below 4
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    want = LLM(path, page_size=4, num_pages=400, max_model_len=128).generate(prompts, params)
    llm = LLM(path, page_size=4, num_pages=400, max_model_len=128, max_num_seqs=8,
              max_num_batched_tokens=budget, speculative=draft, num_speculative_tokens=3,
              speculative_disable_batch_size=4)
    checked = check_greedy_drafts(llm.engine, draft)
    sizes, execute = [], llm.engine.drafter.runner.execute

    def record(step):
        if step.kind == "prefill":
            sizes.append(sum(len(t) for t in step.tokens))
        return execute(step)

    llm.engine.drafter.runner.execute = record
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert checked and llm.engine.block_manager.num_used_pages == 0
    assert max(sizes) <= budget, sizes
    assert sum(n == budget for n in sizes) >= 2, sizes  # the lag took several full steps


def _plain_extend_per_position(lo, hi, index, tokens, start):
    """The drafter's per-position index update, written plainly (as it was before it went
    through precomputed tail slices)."""
    for pos in range(max(start, lo), len(tokens)):
        longest = tuple(tokens[pos - hi:pos] if pos >= hi else tokens[:pos])
        for n in range(lo, min(hi, pos) + 1):
            index[longest[-n:]] = pos


@pytest.mark.parametrize("lo,hi", [(lo, hi) for hi in range(1, 6) for lo in range(1, hi + 1)])
def test_ngram_tails_index_as_the_previous_per_position_update(lo, hi):
    """The drafter's per-position loop keeps the index the plain update keeps (same entries,
    same insertion order) and the same drafts, for every window and from the first token on
    (histories shorter than max_ngram)."""
    rng = random.Random(lo * 10 + hi)
    for window in (1, 2, 3, 5, 8, 4096):
        drafter = NgramDrafter(3, hi, lo, window)
        for trial in range(20):
            tokens, new, old, done = [], {}, {}, 0
            while len(tokens) < 40:
                tokens += [rng.randrange(4) for _ in range(rng.randint(1, 4))]
                got = drafter._propose([(tokens, new, done)])[0]
                start = max(done, len(tokens) - window)
                _plain_extend_per_position(lo, hi, old, tokens, start)
                assert list(new.items()) == list(old.items()), (window, tokens)
                assert got == drafter._propose([(tokens, dict(old), len(tokens))])[0]
                done = len(tokens)
