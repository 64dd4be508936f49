"""The engine under a random load: requests of random lengths and settings arrive between
steps, some are aborted at random moments, the page pool is tight enough to preempt, and
prefix caching, overlapped scheduling (its launches made from a thread or not), mixed steps
and the captured-graph decode path are on or off; a speculative engine may turn to plain
overlapped steps while its batch is large (`speculative_disable_batch_size`) and back.
Requests ask for cumulative, "delta" (joined here) or final outputs.

Bad requests arrive too and must be refused whole. After every step the pages must add up (`check_invariants`); at the end every request must
have finished exactly once (aborted ones with "abort") and the pool must be empty; and every
request that ran to its end must hold the tokens it gets alone in a roomy engine: seeded
sampling and greedy decoding depend on nothing a request shares its batch with, speculative
steps included (a batch mate with penalties makes a step plain; n-gram drafts are verified
against the plain sampler's own draws, `sampler.matching_verify`).
"""

from __future__ import annotations

import dataclasses
import gc
import random

import pytest

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.sequence import DeltaJoiner


def random_request(rng: random.Random, shared_prefix: list[int]) -> tuple[list[int], SamplingParams]:
    length = rng.randint(1, 40)
    prompt = [rng.randrange(2048) for _ in range(length)]
    if rng.random() < 0.3:  # a prefix other requests share: prefix-cache hits
        prompt = shared_prefix + prompt[:8]
    params = SamplingParams(
        max_tokens=rng.randint(1, 14), temperature=rng.choice([0.0, 0.0, 0.7, 1.3]),
        top_k=rng.choice([0, 0, 5]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30),
        n=rng.choice([1, 1, 1, 2]), ignore_eos=True,
        presence_penalty=rng.choice([0.0, 0.0, 0.0, 0.5]),
        output_kind=rng.choice(["cumulative", "final_only"]))
    return prompt, params


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (a tokenizer.json: text through tokenizers' DecodeStream) whose merges
    cut multi-byte characters apart, for the model's 2048 ids and fewer."""
    from hwattn.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("bpe")
    train_bpe(["words, añb€ 😀 日本語 ok; x += 1\n" * 50], 600).save(path)
    return path


# disable: speculative_disable_batch_size, so that steps switch between verify steps and plain
# (overlapped) ones as the batch grows and shrinks. bpe: the requests' text comes through
# tokenizers' DecodeStream (else the byte tokenizer's window detokenizer).
@pytest.mark.parametrize("seed, overlap, mixed, speculative, graphs, thread, disable, bpe", [
    (0, True, False, None, False, False, None, False),
    (1, False, False, None, False, False, None, False),
    (2, True, True, None, False, False, None, False),
    (3, False, True, None, False, False, None, True),
    (4, False, False, "ngram", False, False, None, False),
    (5, True, False, None, True, False, None, True),
    (6, False, False, "ngram", True, False, None, False),
    (7, True, False, None, True, True, None, False),
    (8, True, True, None, False, True, None, False),
    (9, True, False, "ngram", False, False, 3, True),
    (10, True, False, "ngram", True, True, 4, False)])
def test_random_load_keeps_pages_outputs_and_isolation(checkpoints, bpe_dir, seed, overlap, mixed,
                                                       speculative, graphs, thread, disable, bpe):
    rng = random.Random(seed)
    path = checkpoints("gqa-2")
    spec = dict(speculative=speculative, num_speculative_tokens=3,
                speculative_disable_batch_size=disable) if speculative else {}
    text = dict(tokenizer=str(bpe_dir)) if bpe else {}
    tight = LLM(path, page_size=4, num_pages=40, max_num_seqs=6, max_num_batched_tokens=24,
                max_model_len=128, overlap_scheduling=overlap, enable_mixed_batches=mixed,
                enable_prefix_caching=True, launch_thread=thread, **spec, **text)
    assert (tight.engine.launcher is not None) == thread
    engine = tight.engine
    if graphs:  # the captured-graph decode path, its capture re-run on the CPU
        from tests.engine.test_graph_replay import with_replay

        try:
            runner = with_replay(tight, (1, 4) if speculative else (1,))
        finally:
            gc.unfreeze()
        assert runner.cuda_graphs
    if disable:
        from tests.engine.test_speculative import record_steps

        kinds = record_steps(engine)
    shared_prefix = [rng.randrange(2048) for _ in range(12)]
    requests: dict[str, tuple[list[int], SamplingParams]] = {}
    finals: dict[str, object] = {}
    aborted: set[str] = set()
    outputs_seen: dict[str, int] = {}
    texts: dict[tuple[str, int], str] = {}
    # Half the "cumulative" requests ask for "delta" outputs instead, joined here (drawn
    # apart: the requests and what the engine does with them stay those of `rng`).
    delta_rng, joined = random.Random(seed + 1000), {}
    for step in range(400):
        if step < 150 and rng.random() < 0.35:
            for _ in range(rng.randint(1, 3)):
                prompt, params = random_request(rng, shared_prefix)
                if params.output_kind == "cumulative" and delta_rng.random() < 0.5:
                    params = dataclasses.replace(params, output_kind="delta")
                requests[engine.add_request(prompt, params)] = (prompt, params)
        if rng.random() < 0.05:  # a bad request is refused whole and touches nothing
            bad = rng.choice([([], "empty"), ([5, 1 << 20], "vocabulary"),
                              ([1] * 200, "context"), ([7, 8], "max_tokens")])
            params = SamplingParams(max_tokens=2)
            if bad[1] == "max_tokens":
                params.max_tokens = -3  # changed after construction: caught when queued
            used = engine.block_manager.num_used_pages
            with pytest.raises(ValueError, match=bad[1]):
                engine.add_request(bad[0], params)
            assert engine.block_manager.num_used_pages == used
            assert engine.abort_request("no-such-request") is None
        live = [r for r in requests if r not in finals and r not in aborted]
        if live and rng.random() < 0.04:
            victim = rng.choice(live)
            out = engine.abort_request(victim)
            assert out is not None and out.finished
            aborted.add(victim)
        if not engine.has_unfinished() and step >= 150:
            break
        for out in engine.step():
            rid = out.request_id
            if requests[rid][1].output_kind == "delta":  # all so far: the deltas joined
                joiner = joined.setdefault(rid, DeltaJoiner())
                joiner.add(out)
                out = joiner.take()
                joiner.add(out)
            assert rid not in finals, f"{rid} gave an output after its final one"
            outputs_seen[rid] = outputs_seen.get(rid, 0) + 1
            for c in out.outputs:  # a streamed text only grows
                assert c.text.startswith(texts.get((rid, c.index), "")), (rid, c.index)
                texts[(rid, c.index)] = c.text
            if requests[rid][1].output_kind == "final_only":
                assert out.finished, f"{rid} asked for its final output only"
            if out.finished:
                finals[rid] = out
        engine.check_invariants()
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_pages == 0
    engine.shutdown()
    assert set(finals) | aborted == set(requests) and not set(finals) & aborted
    assert engine.stats()["preemptions"] > 0 and engine.stats()["prefix_hit_pages"] > 0
    if graphs:
        assert runner.replays > 0
    if disable:  # both kinds of decode step ran, the plain ones overlapped
        assert "verify" in kinds and "fed" in kinds, set(kinds)

    tok = engine.tokenizer
    assert bpe == (type(tok).__name__ == "Tokenizer")
    assert any(c.text for out in finals.values() for c in out.outputs)
    for out in finals.values():  # each text is its tokens' text (less a held-back tail)
        for c in out.outputs:
            whole = tok.decode(c.token_ids, skip_special_tokens=True)
            assert c.text == whole or whole.endswith("\ufffd") and whole.startswith(c.text), \
                (out.request_id, c.text, whole)

    roomy = LLM(path, page_size=4, num_pages=400, max_num_seqs=1, max_model_len=128,
                enable_prefix_caching=False, **spec, **text).engine
    for rid, out in finals.items():
        prompt, params = requests[rid]
        assert all(c.finish_reason == "length" for c in out.outputs), out
        if params.output_kind == "delta":  # alone, its final output holds everything
            params = dataclasses.replace(params, output_kind="final_only")
        alone = [o for o in _run_alone(roomy, prompt, params) if o.finished][0]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in alone.outputs], rid


def _run_alone(engine, prompt, params):
    engine.add_request(prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs
