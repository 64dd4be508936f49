"""Mixed batches (decodes and prompt chunks in one step under the token budget) and
overlapped scheduling (the next step launched before the last one is read back): greedy
outputs equal the unmixed, unoverlapped engine's and the minimal greedy decoder's; budgets
hold; aborts mid-chunk and mid-flight leave no page behind and no placeholder in an output."""

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.llm_engine import PLACEHOLDER
from hwattn.models import greedy_generate
from tests.engine.conftest import drain, step_to_completion

MODES = [dict(enable_mixed_batches=m, overlap_scheduling=o) for m in (False, True)
         for o in (False, True)]
MODE_IDS = ["plain", "overlap", "mixed", "mixed+overlap"]


def prompts(n, seed=0, longest=40):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, longest, (n,), generator=g).tolist()
    return [torch.randint(0, 2048, (m,), generator=g).tolist() for m in lengths]


def oracle(model, prompt, n):
    tokens, _ = greedy_generate(model, torch.tensor([prompt]), n, page_size=8)
    return tokens[0, len(prompt):].tolist()


def record_batches(engine) -> list:
    """Wrap the scheduler so every scheduled batch is kept, for inspection."""
    seen, schedule = [], engine.scheduler.schedule

    def wrapped(*args, **kw):
        batch = schedule(*args, **kw)
        if batch is not None:
            seen.append((batch.kind, batch.num_decode, list(batch.chunks), batch.query_len))
        return batch

    engine.scheduler.schedule = wrapped
    return seen


def recorded_engine(checkpoints, **kw):
    """A gqa-2 engine over pages of 8 tokens whose scheduled batches are kept:
    (engine, batches), as `record_batches` keeps them."""
    engine = LLM(checkpoints("gqa-2"), page_size=8, **kw).engine
    return engine, record_batches(engine)


def chunks_by_step(batches) -> list:
    """The prompt chunks of each step that has any (the rows after its decode rows)."""
    return [chunks[nd:] for _, nd, chunks, _ in batches if chunks[nd:]]


@pytest.mark.parametrize("variant", ["gqa-2", "gla-2"])
@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_greedy_output_is_the_reference_decoders_in_every_mode(checkpoints, variant, mode):
    ps = prompts(7)
    params = [SamplingParams(max_tokens=4 + 3 * i, temperature=0, ignore_eos=True)
              for i in range(len(ps))]
    llm = LLM(checkpoints(variant), page_size=8, max_num_seqs=4, memory_budget=1 << 20,
              max_num_batched_tokens=12, **mode)
    engine = llm.engine
    batches = record_batches(engine)
    ids = engine.add_requests(ps, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert PLACEHOLDER not in out.token_ids
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
    for p, sp, rid in zip(ps, params, ids):
        assert done[rid].token_ids == oracle(engine.model, p, sp.max_tokens)
        assert done[rid].finish_reason == "length"
    assert engine.block_manager.num_used_pages == 0
    for kind, nd, chunks, _ in batches:
        assert sum(chunks) <= 12 or kind == "decode"
    mixed = [b for b in batches if b[0] == "mixed"]
    assert bool(mixed) == mode["enable_mixed_batches"]
    assert engine.stats()["mixed_steps"] == len(mixed)


def test_mixed_steps_give_decodes_first_and_the_rest_of_the_budget_to_prompts(checkpoints):
    llm = LLM(checkpoints("gta-4"), page_size=4, num_pages=200, max_model_len=128,
              max_num_batched_tokens=10, overlap_scheduling=False, enable_mixed_batches=True)
    engine = llm.engine
    batches = record_batches(engine)
    short = [engine.add_request([3, 4, 5], SamplingParams(max_tokens=20, temperature=0))
             for _ in range(3)]
    engine.step()  # the three short prompts: 9 tokens
    long = engine.add_request(list(range(60)), SamplingParams(max_tokens=3, temperature=0))
    engine.step()
    kind, nd, chunks, _ = batches[-1]
    assert (kind, nd, chunks) == ("mixed", 3, [1, 1, 1, 7])  # three decodes, then 10 - 3
    seq = engine.requests[long][0]
    assert seq.num_cached == 7 and seq.is_prefilling
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    assert engine.block_manager.num_used_pages == 0
    assert all(rid not in engine.requests for rid in short + [long])


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_steps_keep_to_a_budget_below_max_num_seqs(checkpoints, overlap):
    """A budget of 3 tokens with 64 slots: every step (decode-only ones too) holds at most 3
    tokens, so at most 3 sequences decode at once while the other prompts wait their turn;
    all of them finish with the reference tokens."""
    ps = [[3 + i, 4, 5] for i in range(8)]
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(checkpoints("gla-2"), page_size=4, num_pages=6, max_model_len=16,
              max_num_batched_tokens=3, enable_mixed_batches=True, overlap_scheduling=overlap)
    engine = llm.engine
    assert engine.scheduler.max_num_seqs == 64
    batches = record_batches(engine)
    outs = step_to_completion(engine, ps, greedy)
    assert all(sum(chunks) <= 3 for _, _, chunks, _ in batches), batches
    assert max(nd for _, nd, _, _ in batches) == 3
    assert [o.token_ids for o in outs] == [oracle(engine.model, p, 6) for p in ps]
    assert engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_mid_chunk_and_mid_flight_is_clean(checkpoints, overlap):
    path = checkpoints("gla-2")
    greedy = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    llm = LLM(path, page_size=4, num_pages=200, max_model_len=128, max_num_batched_tokens=8,
              overlap_scheduling=overlap)
    engine = llm.engine
    keep = engine.add_request([5, 6, 7], greedy)
    chunked = engine.add_request(list(range(50)), greedy)
    flying = engine.add_request([9, 8, 7, 6], greedy)
    engine.step()
    engine.step()
    seq = engine.requests[chunked][0]
    assert 0 < seq.num_cached < 50  # part-way through its prompt
    out = engine.abort_request(chunked)
    assert out.finish_reason == "abort" and out.token_ids == []
    engine.step()
    if overlap:
        assert engine.requests[flying][0].num_pending == 1  # its token is still on the device
    out = engine.abort_request(flying)
    assert out.finish_reason == "abort" and PLACEHOLDER not in out.token_ids
    engine.check_invariants()
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
        engine.check_invariants()
    assert set(outs) == {keep}
    assert outs[keep].token_ids == oracle(engine.model, [5, 6, 7], 15)
    assert engine.block_manager.num_used_pages == 0


def test_overlap_stops_preempts_and_recomputes_like_the_plain_engine(checkpoints):
    path = checkpoints("gta-4")
    ps = prompts(10, seed=1) + [list(range(100, 133))] * 2
    reference = LLM(path, page_size=4, max_num_seqs=8, num_pages=400,
                    overlap_scheduling=False, enable_mixed_batches=False)
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    free = reference.generate(ps, greedy)
    # Stop on each request's 5th greedy token: the stop is seen one step late under overlap.
    stops = [SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[o.token_ids[4]])
             for o in free]
    expected = reference.generate(ps, stops)
    assert any(len(o.token_ids) < 12 for o in expected)
    tight = LLM(path, page_size=4, max_num_seqs=8, num_pages=22, max_num_batched_tokens=16,
                max_model_len=64, enable_mixed_batches=True)
    engine = tight.engine
    assert engine.overlap and engine.scheduler.mixed
    ids = engine.add_requests(ps, stops)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
    got = [done[i] for i in ids]
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in expected]
    stats = engine.stats()
    assert stats["preemptions"] > 0 and stats["prefix_hit_pages"] > 0, stats
    assert engine.block_manager.num_used_pages == 0
    assert step_to_completion(engine, ps[:2], greedy)[0].token_ids == free[0].token_ids


def test_sampled_outputs_do_not_depend_on_mixing_or_overlap(checkpoints):
    ps = prompts(6, seed=3)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=5, ignore_eos=True)
    outs = []
    for mode in MODES:
        llm = LLM(checkpoints("mla"), page_size=8, num_pages=200, max_num_batched_tokens=16,
                  **mode)
        outs.append([o.token_ids for o in llm.generate(ps, sp)])
    assert all(o == outs[0] for o in outs[1:])


@pytest.mark.parametrize("mode", MODES[1:], ids=MODE_IDS[1:])
def test_host_sampled_requests_beside_overlapped_ones(checkpoints, mode):
    """Requests whose sampling reads the tokens so far (penalties, min_tokens) or returns
    log-probabilities run beside plain ones: every output equals the plain engine's."""
    ps = prompts(6, seed=3)
    params = []
    for i in range(len(ps)):
        extra = [dict(), dict(repetition_penalty=1.5, frequency_penalty=0.5),
                 dict(logprobs=2), dict(min_tokens=5), dict(prompt_logprobs=1),
                 dict(temperature=0.9, seed=i)][i]
        params.append(SamplingParams(**{"max_tokens": 6 + i, "temperature": 0, **extra}))

    def run(**kw):
        llm = LLM(checkpoints("gla-2"), page_size=8, max_num_seqs=3, memory_budget=1 << 20,
                  max_num_batched_tokens=12, **kw)
        outs = llm.generate(ps, params)
        llm.engine.check_invariants()
        return outs

    def flat(entries):  # log-probabilities in order: batch composition moves them by ~1e-6
        return [v.logprob for e in entries or [] if e for v in e.values()]

    for got, want in zip(run(**mode), run(**MODES[0])):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in ((got.outputs[0].logprobs, want.outputs[0].logprobs),
                     (got.prompt_logprobs, want.prompt_logprobs)):
            assert (a is None) == (b is None)
            assert [list(e or {}) for e in a or []] == [list(e or {}) for e in b or []]
            assert flat(a) == pytest.approx(flat(b), abs=1e-4)


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_n_completions_compute_their_prompt_once(checkpoints, mode):
    """A request of n = 4 greedy completions over a 37-token prompt (4 full pages of 8 before
    its last token): the first sibling computes the prompt, the others wait for the step that
    writes it and take its 4 full pages from the prefix cache, computing only the last 5
    tokens. Admitted beside it, each computed all 37 and held its own copy of every page.
    Outputs equal one completion's; another owner's prompt is not held back meanwhile."""
    prompt = list(range(100, 137))
    other = list(range(500, 520))
    sp = SamplingParams(n=4, max_tokens=3, temperature=0, ignore_eos=True)
    engine, batches = recorded_engine(checkpoints, max_num_seqs=8, memory_budget=1 << 20,
                                      max_num_batched_tokens=64, **mode)
    rid = engine.add_request(prompt, sp)
    other_rid = engine.add_request(other, SamplingParams(max_tokens=3, temperature=0,
                                                         ignore_eos=True))
    done = drain(engine)
    want = oracle(engine.model, prompt, 3)
    assert [c.token_ids for c in done[rid].outputs] == [want] * 4
    assert done[other_rid].outputs[0].token_ids == oracle(engine.model, other, 3)
    stats = engine.stats()
    assert stats["prefix_hit_pages"] == 3 * 4
    prompt_chunks = sum(sum(chunks[nd:]) for _, nd, chunks, _ in batches)
    assert prompt_chunks == 37 + 3 * 5 + 20
    first = batches[0]
    assert first[2][first[1]:] == [37, 20]  # the other owner's prompt is admitted at once
    assert engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "mixed"])
def test_one_owner_many_prompts_with_n_2_are_admitted_together(checkpoints, mixed):
    """Eight prompts of one owner (the server's one HTTP request), n = 2 each: the first
    completions are admitted together and their siblings together in the next step (found in
    review: holding back the owner instead of the request admitted one prompt per step)."""
    engine, batches = recorded_engine(checkpoints, max_num_seqs=64, memory_budget=1 << 22,
                                      max_num_batched_tokens=2048, enable_mixed_batches=mixed)
    ps = [list(range(100 + 30 * i, 120 + 30 * i)) for i in range(8)]
    sp = SamplingParams(n=2, max_tokens=2, temperature=0, ignore_eos=True)
    ids = engine.add_requests(ps, [sp] * 8, owner="client")
    done = drain(engine)
    prompt_steps = chunks_by_step(batches)
    assert prompt_steps == [[20] * 8, [4] * 8]
    assert engine.stats()["prefix_hit_pages"] == 8 * 2
    for p, rid in zip(ps, ids):
        assert [c.token_ids for c in done[rid].outputs] == [oracle(engine.model, p, 2)] * 2


@pytest.mark.parametrize("mode", MODES, ids=MODE_IDS)
def test_prompts_that_start_alike_compute_their_common_pages_once(checkpoints, mode):
    """Three owners send the same 37-token prompt, a fourth a prompt sharing its first 2 pages
    (16 tokens) and a fifth one sharing nothing: the first computes the prompt, the second and
    third wait for the step that writes it and take its 4 full pages, the fourth takes 2; the
    fifth is admitted beside the first. Greedy outputs are each prompt's own."""
    same = list(range(100, 137))
    ps = [same, same, same, same[:16] + list(range(900, 921)), list(range(300, 337))]
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    engine, batches = recorded_engine(checkpoints, max_num_seqs=8, memory_budget=1 << 20,
                                      max_num_batched_tokens=128, **mode)
    ids = [engine.add_request(p, sp) for p in ps]
    done = drain(engine)
    for p, rid in zip(ps, ids):
        assert done[rid].outputs[0].token_ids == oracle(engine.model, p, 3)
    prompt_steps = chunks_by_step(batches)
    assert prompt_steps[0] == [37, 37]  # the first and the one sharing nothing
    assert engine.stats()["prefix_hit_pages"] == 4 + 4 + 2
    assert sum(map(sum, prompt_steps)) == 37 + 37 + 5 + 5 + 21
    assert engine.block_manager.num_used_pages == 0


def test_a_prompt_waits_for_every_chunk_of_a_long_prefill_it_shares(checkpoints):
    """A 64-token prompt prefilled in chunks of 24 (the budget): a second request with the same
    prompt waits until all 7 of its shared pages (those before its last token) are written,
    then computes its last page only; admitted beside the first's last chunk (16 tokens, 8 of
    the budget left), it took 8 of its tokens there (found in review: at a budget of 16 the
    first's chunks left no room, and the test passed without the change)."""
    prompt = list(range(200, 264))
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    engine, batches = recorded_engine(checkpoints, max_num_seqs=4, memory_budget=1 << 20,
                                      max_num_batched_tokens=24)
    first, second = (engine.add_request(prompt, sp) for _ in range(2))
    done = drain(engine)
    want = oracle(engine.model, prompt, 2)
    assert done[first].outputs[0].token_ids == want == done[second].outputs[0].token_ids
    prompt_chunks = chunks_by_step(batches)
    assert prompt_chunks == [[24], [24], [16], [8]]
    assert engine.stats()["prefix_hit_pages"] == 7


def test_many_copies_of_one_prompt_from_one_owner_wait_for_one_prefill(checkpoints):
    """100 copies of a 20-token prompt from one owner (max_num_seqs 64): the first computes
    it; past `HeldBack.MAX_HELD` held copies the pass admits no more; the next step admits
    63 copies, each computing only the 4 tokens after the 2 shared pages."""
    prompt = list(range(700, 720))
    sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    engine, batches = recorded_engine(checkpoints, max_num_seqs=64, memory_budget=1 << 22,
                                      max_num_batched_tokens=4096)
    engine.add_requests([prompt] * 100, [sp] * 100, owner="client")
    outs = list(drain(engine).values())
    assert len(outs) == 100
    assert {tuple(o.outputs[0].token_ids) for o in outs} == {tuple(oracle(engine.model, prompt, 1))}
    prompt_steps = chunks_by_step(batches)
    assert prompt_steps[:2] == [[20], [4] * 63]
    assert engine.stats()["prefix_hit_pages"] == 99 * 2


def test_a_pass_holds_back_a_bounded_number_of_requests():
    """200 owners send one prompt each, all starting with the same page: the first is admitted,
    then at most `HeldBack.MAX_HELD` are held back in the pass, which then admits no more (each
    hold looks at every owner: without a bound one pass cost owners x waiting). A prompt of an
    owner queued after them that shares nothing waits for the next step too."""
    from hwattn.engine.block_manager import BlockManager
    from hwattn.engine.scheduler import HeldBack, Scheduler
    from hwattn.engine.sequence import Sequence

    bm = BlockManager(num_pages=2000, page_size=4)
    sched = Scheduler(bm, max_num_seqs=256, max_num_batched_tokens=100000)
    seqs = [Sequence(f"r{i}", [1, 2, 3, 4, 100 + i, 7], SamplingParams(), seed=0)
            for i in range(200)]
    other = Sequence("other", [9, 9, 9, 9, 9, 9], SamplingParams(), seed=0)
    for seq in seqs + [other]:
        sched.add(seq)
    calls = []
    next_ = sched.waiting.next
    sched.waiting.next = lambda *a: calls.append(1) or next_(*a)
    batch = sched.schedule()
    assert batch.seqs == [seqs[0]]
    assert len(calls) == 2 + HeldBack.MAX_HELD  # `_make_way`'s look, the admission, the holds
    batch = sched.schedule()  # (nothing launched: the first is still prefilling)
    assert batch.seqs == [seqs[0]]


def test_a_big_batch_of_one_owner_with_n_2_is_admitted_in_two_steps(checkpoints):
    """64 prompts with n = 2 from one owner (one HTTP request): the first completions in one
    step, their siblings in the next (found in review: passing over an owner after 16 held
    requests admitted 16 prompts a step)."""
    engine, batches = recorded_engine(checkpoints, max_num_seqs=256, memory_budget=1 << 23,
                                      max_num_batched_tokens=4096)
    ps = [list(range(100 + 30 * i, 120 + 30 * i)) for i in range(64)]
    sp = SamplingParams(n=2, max_tokens=2, temperature=0, ignore_eos=True)
    engine.add_requests(ps, [sp] * 64, owner="client")
    drain(engine)
    prompt_steps = chunks_by_step(batches)
    assert prompt_steps == [[20] * 64, [4] * 64]
