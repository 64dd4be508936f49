"""Hostile combinations under a seeded random schedule: the engine never leaks pages, one bad
request never harms another, and greedy outputs with speculation equal plain decoding's.

`test_engine_random_load` drives a random load of mostly sampled requests; this one aims at
what it leaves out, in combination: n-gram speculation with every k from 1 to 4 (with
`speculative_disable_batch_size` or not, prefix caching on or off), stop token ids and stop
strings chosen from the plain greedy continuation so that they fire inside a step's accepted
drafts, max_tokens 1 and max_tokens None (to the context's end, prompts a token short of it),
n = 2, requests that make speculative steps plain (log-probs, penalties, min_tokens) or
compute their whole prompt (prompt log-probs), prompts that are copies or prefixes of each
other (whole cached pages, a prompt ending on a page boundary), request ids reused after an
abort or a finish, and aborts aimed at a sequence mid chunked prefill, one with a token still
in flight, one between verify steps and one preempted back to the queue. Refused requests
(too long, a stop id or log-probs beyond the vocabulary, settings broken after construction,
a batch with one bad request) arrive in between and must leave the engine as it was.

After every step: `check_invariants`; every live sequence's pages cover its cache and no
more than its tokens (rejected draft slots are given back); and no page that a sequence may
still write is shared (a page held twice is a registered full page inside every holder's
cached prefix). At the end: every page is free, every registered prefix page is on the free
list under its own hash, and every request that was not aborted holds what a roomy plain
engine gives it (fp64, so that no near tie tells the two apart; sampled requests are seeded):
tokens, finish and stop reasons, text.
"""

from __future__ import annotations

import random

import pytest

from hwattn.engine import LLM, SamplingParams

PAGE = 4
MAX_LEN = 64
VOCAB = 2048


def prompt_pool(rng: random.Random) -> list[list[int]]:
    """Prompts from 1 to 30 tokens: some share a prefix (some end on a page boundary), some
    are copies of another, some repeat a motif (n-gram drafts get accepted)."""
    prefixes = [[rng.randrange(VOCAB) for _ in range(n)] for n in (8, 12, 5)]
    pool = []
    for _ in range(14):
        r = rng.random()
        if r < 0.35:
            base = rng.choice(prefixes)
            pool.append(base + [rng.randrange(VOCAB) for _ in range(rng.choice([0, 1, 3, 4, 9]))])
        elif r < 0.55:
            motif = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 4))]
            pool.append((motif * 12)[:rng.randint(5, 24)])
        else:
            pool.append([rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))])
    pool.append(list(pool[0]))  # a copy: all its full pages cached
    pool.append([rng.randrange(VOCAB)])  # one token
    for n in (MAX_LEN - 1, MAX_LEN - 6):  # near the context's end: steps go plain there
        motif = [rng.randrange(VOCAB) for _ in range(3)]
        pool.append((motif * MAX_LEN)[:n])
    return pool


def good_params(rng: random.Random, free) -> SamplingParams:
    """Settings (greedy, or seeded sampling) for a prompt whose plain greedy continuation
    (`free`: up to 16 tokens, ignoring EOS) is known: stops are cut from that continuation,
    so they fire mid-output."""
    kind = rng.choice(["length", "one", "stop_id", "stop_str", "n2", "logprobs", "eos",
                       "sampled", "penalty", "min_tokens", "prompt_logprobs"])
    base = dict(temperature=0.0, ignore_eos=True,
                max_tokens=rng.choice([rng.randint(2, 16), None]),  # None: to the context's end
                output_kind=rng.choice(["cumulative", "final_only"]))
    at = rng.randrange(len(free.token_ids))
    if kind == "one":
        base["max_tokens"] = 1
    elif kind == "stop_id":
        base["stop_token_ids"] = [free.token_ids[at], rng.randrange(VOCAB)]
    elif kind == "stop_str" and len(free.text) >= 2:
        start = rng.randrange(len(free.text) - 1)
        base["stop"] = [free.text[start:start + rng.randint(1, 3)]]
        base["include_stop_str_in_output"] = rng.random() < 0.5
    elif kind == "n2":
        base["n"] = 2
    elif kind == "logprobs":  # sampled on the host's terms: a speculative step goes plain
        base["logprobs"] = 1
    elif kind == "eos":  # the tokenizer's EOS is one of the continuation's tokens
        base["ignore_eos"] = False
    elif kind == "sampled":  # seeded: its draws depend on nothing it shares a batch with
        base.update(temperature=0.9, top_p=0.9, seed=rng.randrange(1 << 20),
                    stop_token_ids=[free.token_ids[at]], n=rng.choice([1, 2]))
    elif kind == "penalty":  # sampled on the host's terms, greedy still
        base["presence_penalty"] = 0.5
    elif kind == "min_tokens":  # a stop id that may not fire before min_tokens
        base.update(stop_token_ids=[free.token_ids[at]], min_tokens=rng.randint(0, 3),
                    max_tokens=16)
    elif kind == "prompt_logprobs":  # its whole prompt is computed: no prefix-cache hits
        base["prompt_logprobs"] = 1
    return SamplingParams(**base)


def refused(rng: random.Random):
    """A request `add_request` must refuse whole: (prompts, params)."""
    kind = rng.randrange(6)
    ok = SamplingParams(max_tokens=3, temperature=0)
    if kind == 0:
        return [[1] * (MAX_LEN + 1)], [ok]
    if kind == 1:
        return [[1, 2]], [SamplingParams(max_tokens=3, stop_token_ids=[VOCAB + 5])]
    if kind == 2:
        return [[1, 2]], [SamplingParams(max_tokens=3, logprobs=VOCAB + 1)]
    if kind == 3:
        bad = SamplingParams(max_tokens=3)
        bad.temperature = -1.0  # broken after construction: caught when queued
        return [[3, 4]], [bad]
    if kind == 4:
        bad = SamplingParams(max_tokens=3)
        bad.n = 0
        return [[3, 4]], [bad]
    return [[5, 6, 7], [8] * (MAX_LEN + 3)], [ok, ok]  # one bad prompt: none is queued


def check_pages(engine) -> None:
    """Every live sequence's pages cover its cache and no more than its tokens. A page held
    by two live sequences is a registered full page inside each one's cached prefix: no
    sequence can write where another reads."""
    bm = engine.block_manager
    live = engine.scheduler.running + list(engine.scheduler.waiting)
    holders: dict[int, list] = {}
    for seq in live:
        # Its pages cover its cache, and nothing past its tokens (rejected draft slots given
        # back: a page held beyond them is a leak that lasts as long as the sequence).
        assert len(seq.block_table) * PAGE >= seq.num_cached, seq.request_id
        assert len(seq.block_table) <= -(-len(seq) // PAGE), (seq.request_id, len(seq))
        for i, page in enumerate(seq.block_table):
            holders.setdefault(page, []).append((seq, i))
    for page, held in holders.items():
        if len(held) > 1:
            assert bm.page_hash[page] is not None, f"unregistered page {page} shared"
            for seq, i in held:
                assert (i + 1) * PAGE <= seq.num_cached, (page, seq.request_id, i)
                assert tuple(seq.token_ids[i * PAGE:(i + 1) * PAGE]) == bm.page_tokens[page]


def check_all_free(engine) -> None:
    bm = engine.block_manager
    assert not engine.has_unfinished() and not engine.requests and not engine.detok
    assert bm.num_used_pages == 0 and len(bm.free) == bm.num_usable_pages
    assert all(c == 0 for c in bm.ref_count)
    for h, page in bm.hash_to_page.items():  # the prefix cache: free pages under their hash
        assert page in bm.free and bm.page_hash[page] == h and bm.page_tokens[page] is not None
    if not bm.enable_prefix_caching:
        assert not bm.hash_to_page


# k: n-gram drafts per verify step (None: no speculation); disable:
# speculative_disable_batch_size; budget: max_num_batched_tokens (chunked prefill); extra:
# max_num_seqs, spare pages beyond the fewest one request needs, launch_thread.
@pytest.mark.parametrize("seed, k, disable, caching, budget, overlap, mixed, extra", [
    (0, None, None, True, 5, True, True, {}),
    (1, None, None, False, 6, False, False, {}),
    (12, 1, None, True, 7, True, False, {}),
    (3, 2, 2, True, 5, True, False, {}),
    (4, 3, None, False, 6, False, False, {}),
    (5, 4, 3, True, 8, True, False, {}),
    (6, 4, None, True, 4, False, False, {}),
    (7, 3, 4, True, 1, True, False, dict(max_num_seqs=8, spare=0, launch_thread=True)),
    (8, None, None, True, 2, True, True, dict(max_num_seqs=8, spare=1, launch_thread=True)),
    (9, 2, None, False, 16, True, False, dict(max_num_seqs=2, spare=10)),
])
def test_hostile_combinations_keep_pages_isolation_and_greedy_outputs(
        checkpoints, seed, k, disable, caching, budget, overlap, mixed, extra):
    stats, hits, reasons = drive(checkpoints("gqa-2"), seed, k, disable, caching, budget,
                                 overlap, mixed, **extra)
    # The schedule reached what it aims at.
    assert stats["preemptions"] > 0, stats
    assert "mid-prefill" in hits and "n2" in hits, hits
    if overlap:
        assert "in-flight" in hits, hits
    if caching:
        assert stats["prefix_hit_pages"] > 0, stats
    if k:
        assert "between-verify-steps" in hits, hits
        assert 0 < stats["accepted_tokens"] < stats["draft_tokens"], stats
    assert ("stop", "int") in reasons and ("stop", "str") in reasons, reasons
    assert ("length", "NoneType") in reasons, reasons


def drive(path, seed, k, disable, caching, budget, overlap, mixed, max_num_seqs=5, spare=3,
          **extra):
    """Run one random schedule, checking as it goes (see the module's docstring); returns
    the engine's stats, the kinds of abort made and the (finish reason, stop reason type)
    pairs of the finished outputs."""
    rng = random.Random(seed)
    plain = LLM(path, dtype="fp64", page_size=PAGE, num_pages=400, max_num_seqs=32,
                max_model_len=MAX_LEN, enable_prefix_caching=False)
    pool = prompt_pool(rng)
    free = plain.generate(pool, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))
    eos = rng.choice([o for o in free if len(o.token_ids) == 16]).token_ids[rng.randrange(3, 10)]
    spec = dict(speculative="ngram", num_speculative_tokens=k,
                speculative_disable_batch_size=disable) if k else {}
    need = -(-(MAX_LEN + (k or 0) + 1) // PAGE) + 1  # the fewest pages the engine allows
    llm = LLM(path, dtype="fp64", page_size=PAGE, num_pages=need + spare,
              max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, max_model_len=MAX_LEN,
              overlap_scheduling=overlap, enable_mixed_batches=mixed,
              enable_prefix_caching=caching, **spec, **extra)
    engine = llm.engine
    for tokenizer in (plain.engine.tokenizer, engine.tokenizer):
        tokenizer.eos_token_id = eos

    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    finals: dict[str, object] = {}
    aborted: set[str] = set()
    hits: set[str] = set()  # the kinds of abort made
    counter = 0

    def add(prompt, params, rid=None):
        nonlocal counter
        if rid is None:
            counter += 1
            rid = f"r{counter}"
        engine.add_request(prompt, params, request_id=rid)
        requests[rid] = (prompt, params)

    def abort(rid, kind):
        out = engine.abort_request(rid)
        assert out is not None and out.finished and out.request_id == rid
        assert all(c.finish_reason in ("abort", "stop", "length") for c in out.outputs)
        aborted.add(rid)
        requests[f"{rid}/aborted"] = requests.pop(rid)  # the id may be used again
        hits.add(kind)

    for step in range(5000):
        if step < 120 and rng.random() < 0.45:
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(pool))
                add(pool[i], good_params(rng, free[i]))
        if rng.random() < 0.08:  # refused whole: nothing queued, no page taken
            prompts, params = refused(rng)
            before = (engine.block_manager.num_used_pages, len(engine.requests),
                      len(engine.scheduler.waiting))
            with pytest.raises(ValueError):
                engine.add_requests(prompts, params)
            assert before == (engine.block_manager.num_used_pages, len(engine.requests),
                              len(engine.scheduler.waiting))
            assert engine.abort_request("no-such-request") is None
        if rng.random() < 0.05 and (aborted or finals):  # an id used again, once it is free
            rid = rng.choice(sorted(aborted | set(finals)))
            if rid not in engine.requests and rid not in requests:
                i = rng.randrange(len(pool))
                add(pool[i], good_params(rng, free[i]), rid=rid)
                finals.pop(rid, None)
                aborted.discard(rid)
        if rng.random() < 0.12:  # an abort aimed at a sequence in a given state
            sched = engine.scheduler
            states = {
                "mid-prefill": [s for s in sched.running
                                if 0 < s.num_cached < s.num_prompt_tokens],
                "in-flight": [s for s in sched.running if s.num_pending],
                "between-verify-steps": [s for s in sched.running
                                         if k and s.num_output_tokens and not s.num_pending
                                         and not s.is_prefilling],
                "preempted": [s for s in sched.waiting if s.num_preemptions],
                "n2": [s for s in sched.running if s.params.n == 2],
            }
            states = {kind: seqs for kind, seqs in states.items() if seqs}
            if states:
                kind = rng.choice(sorted(states))
                abort(rng.choice(states[kind]).request_id, kind)
        if step >= 120 and not engine.has_unfinished():
            break
        assert step < 4999, "the engine stopped making progress"
        for out in engine.step():
            rid = out.request_id
            assert rid in requests and rid not in finals, rid
            if requests[rid][1].output_kind == "final_only":
                assert out.finished
            if out.finished:
                finals[rid] = out
        engine.check_invariants()
        check_pages(engine)
    assert set(finals) == {r for r in requests if not r.endswith("/aborted")}
    check_all_free(engine)

    # Every request that ran to its end: what plain decoding gives it.
    rids = sorted(finals)
    want = plain.generate([requests[r][0] for r in rids], [requests[r][1] for r in rids])
    reasons = set()
    for rid, w in zip(rids, want):
        got = finals[rid]
        assert got.error is None, (rid, got.error)
        for g, p in zip(got.outputs, w.outputs):
            assert (g.token_ids, g.finish_reason, g.stop_reason, g.text) == \
                (p.token_ids, p.finish_reason, p.stop_reason, p.text), (rid, requests[rid][1])
            reasons.add((g.finish_reason, type(g.stop_reason).__name__))
    plain.engine.check_invariants()
    assert plain.engine.block_manager.num_used_pages == 0
    stats = engine.stats()
    engine.shutdown()
    return stats, hits, reasons
