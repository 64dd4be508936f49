"""output_kind "delta" (vLLM's `RequestOutputKind.DELTA`): each output holds what is new since
the request's previous one, and joining a completion's deltas gives exactly what a
"cumulative" request ends with (text, token ids, log-probabilities), step by step, with
multi-byte characters split over tokens and stop strings whose start is held back; through a
data-parallel engine too."""

import dataclasses

import pytest

from hwattn.engine import SamplingParams, create_engine
from tests.engine.conftest import drain

TINY = dict(model="tiny", attention="gla-2", device="cpu", dtype="fp32", page_size=8,
            num_pages=160, max_model_len=96, model_overrides=dict(n_layers=1, max_seq_len=96))
PROMPT = [104, 101, 108, 108, 111, 32]  # "hello "
# A few ASCII letters and the UTF-8 bytes of "é" (C3 A9) and "€" (E2 82 AC): sampling over
# them writes multi-byte characters split over tokens, broken ones (U+FFFD) and stop strings
# that begin in one step and end in a later one.
ALPHABET = [ord(c) for c in "abc "] + [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
CASES = {
    "greedy": dict(temperature=0),
    "seeded-stop": dict(temperature=1.0, seed=3, stop=["bbb", "c é"], min_tokens=2),
    "n3-logprobs-stop": dict(temperature=1.0, seed=5, n=3, logprobs=2, stop=["aa", "€"]),
    "n2-keep-stop": dict(temperature=0.9, seed=8, n=2, stop=["bc"],
                         include_stop_str_in_output=True, prompt_logprobs=1),
    "multibyte-stop-ids": dict(temperature=1.0, seed=11, stop_token_ids=[0xAC], logprobs=0),
    "long-stop": dict(temperature=1.0, seed=13, n=2, stop=["cab é€ a", "b  "]),
}


@pytest.fixture(scope="module")
def engine():
    return create_engine(**TINY, seed=0)


def params(case: str, kind: str) -> SamplingParams:
    return SamplingParams(max_tokens=40, ignore_eos=True, allowed_token_ids=ALPHABET,
                          output_kind=kind, **CASES[case])


def run(engine, kind: str) -> dict:
    """{case: its outputs step by step}, every case queued at once as `kind`."""
    ids = {engine.add_request(PROMPT, params(case, kind)): case for case in CASES}
    seen = {case: [] for case in CASES}
    while engine.has_unfinished():
        for out in engine.step():
            seen[ids[out.request_id]].append(out)
        engine.check_invariants()
    return seen


def test_joined_deltas_are_the_cumulative_outputs_step_by_step(engine):
    cumulative, delta = run(engine, "cumulative"), run(engine, "delta")
    held_back = 0
    for case, outs in delta.items():
        want = cumulative[case]
        n = params(case, "delta").n
        hold = params(case, "delta").stop_holdback
        assert len(outs) == len(want) and outs[-1].finished and not outs[0].finished, case
        text, tokens, logprobs = [""] * n, [[] for _ in range(n)], [[] for _ in range(n)]
        for step, (d, c) in enumerate(zip(outs, want)):
            assert [o.index for o in d.outputs] == list(range(n)), case
            assert d.finished == c.finished and d.finish_reason == c.finish_reason
            assert d.prompt_logprobs == (c.prompt_logprobs if step == 0 else None), case
            for i, (dc, cc) in enumerate(zip(d.outputs, c.outputs)):
                text[i] += dc.text
                tokens[i] += dc.token_ids
                assert (dc.logprobs is None) == (cc.logprobs is None), case
                if dc.logprobs is not None:
                    assert len(dc.logprobs) == len(dc.token_ids)
                    logprobs[i] += dc.logprobs
                    assert logprobs[i] == cc.logprobs
                assert tokens[i] == cc.token_ids, (case, step, i)
                assert (dc.finish_reason, dc.stop_reason, dc.cumulative_logprob) == \
                    (cc.finish_reason, cc.stop_reason, cc.cumulative_logprob), (case, step, i)
                if cc.finished:
                    assert text[i] == cc.text, (case, step, i)
                else:
                    # Sent text is never taken back: all but the tail a stop string may cut.
                    final = want[-1].outputs[i].text
                    assert final.startswith(text[i]) and cc.text.startswith(text[i]), case
                    assert len(text[i]) >= len(cc.text) - hold, (case, step, i)
                    held_back += len(cc.text) - len(text[i])
    assert held_back > 0  # a stop string's start was held back at some step
    finals = [o.outputs[i].text for outs in cumulative.values() for o in outs[-1:]
              for i in range(len(o.outputs))]
    assert any("\ufffd" in t for t in finals) and any("é" in t or "€" in t for t in finals)
    assert any(o.outputs[0].stop_reason is not None
               for outs in cumulative.values() for o in outs[-1:])
    assert engine.block_manager.num_used_pages == 0


def test_a_finished_completion_comes_again_empty_and_abort_brings_the_rest(engine):
    """n > 1: a completion that has finished is listed in later outputs with nothing new and
    its finish_reason; `abort_request` returns what no output has held yet (the held-back
    text too), finished "abort"."""
    short = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=1, ignore_eos=True,
                           allowed_token_ids=ALPHABET, stop=["b"], output_kind="delta")
    rid = engine.add_request(PROMPT, short)
    seen = []
    while engine.has_unfinished():
        seen += [o for o in engine.step() if o.request_id == rid]
    done_at = {}
    for out in seen:
        for c in out.outputs:
            if c.index in done_at:
                assert (c.text, c.token_ids, c.finish_reason) == ("", [], done_at[c.index])
            elif c.finished:
                done_at[c.index] = c.finish_reason
    assert len(done_at) == 3 and len(seen) > 1

    rid = engine.add_request(PROMPT, SamplingParams(
        max_tokens=40, temperature=1.0, seed=2, ignore_eos=True, stop=["zzzz"],
        allowed_token_ids=ALPHABET, output_kind="delta"))
    seq = engine.requests[rid][0]
    outs = []
    while sum(len(o.outputs[0].token_ids) for o in outs) < 6:
        outs += engine.step()
    aborted = engine.abort_request(rid)
    assert aborted.finished and aborted.outputs[0].finish_reason == "abort"
    outs.append(aborted)
    assert "".join(o.outputs[0].text for o in outs) == seq.text
    assert [t for o in outs for t in o.outputs[0].token_ids] == seq.output_token_ids
    assert 0 < len(aborted.outputs[0].text) <= 3  # it brought the held-back tail
    assert engine.detok == {} and engine.block_manager.num_used_pages == 0


def test_delta_is_an_output_kind_with_its_stop_holdback():
    with pytest.raises(ValueError, match="output_kind must be one of cumulative, delta, "
                                         "final_only"):
        SamplingParams(output_kind="deltas")
    assert SamplingParams(stop=["abc", "d"]).stop_holdback == 2
    assert SamplingParams(stop=["abc"], include_stop_str_in_output=True).stop_holdback == 0
    assert SamplingParams().stop_holdback == 0


def _data_parallel(size: int = 2, seed: int = 0):
    from tests.parallel.test_data_parallel import _in_process  # replicas in this process

    return _in_process(size, seed)


def test_data_parallel_delta_outputs_join_to_the_cumulative_ones():
    """A data-parallel engine's "delta" requests: their replicas report deltas (those with
    stop strings everything so far, their text a stop string may cut held back by the front
    end, where an abort still finds it), and outputs waiting for `step` merge, so that
    joining them gives what "cumulative" requests end with; "cumulative" ones are unchanged."""
    prompts = [PROMPT, [5, 6, 7], [9] * 11]
    cases = [dict(temperature=1.0, seed=s, stop=stop, max_tokens=30, ignore_eos=True,
                  allowed_token_ids=ALPHABET)
             for s, stop in ((1, ["bbb", "c é"]), (2, ["aa"]), (3, None), (4, ["cc"]))]
    runs = {}
    for kind in ("cumulative", "delta"):
        dp = _data_parallel(seed=4)
        ids = [dp.add_request(p, SamplingParams(**c, output_kind=kind))
               for p in prompts for c in cases]
        if kind == "delta":
            unstopped = sum(c["stop"] is None for c in cases) * len(prompts)
            assert sum(len(core.delta) for core in dp.replicas.cores) == unstopped > 0
        seen = {rid: [] for rid in ids}
        while dp.has_unfinished():
            for out in dp.step():
                seen[out.request_id].append(out)
        dp.check_invariants()
        assert dp.router.load == [0, 0]
        runs[kind] = [seen[rid] for rid in ids]
    stopped = 0
    for cumulative, delta in zip(runs["cumulative"], runs["delta"]):
        want = cumulative[-1]
        assert [o.finished for o in delta] == [False] * (len(delta) - 1) + [True]
        assert "".join(o.text for o in delta) == want.text
        assert [t for o in delta for t in o.token_ids] == want.token_ids
        assert delta[-1].outputs[0].stop_reason == want.outputs[0].stop_reason
        text = ""
        for o in delta[:-1]:
            text += o.text
            assert want.text.startswith(text)
        stopped += want.outputs[0].stop_reason is not None
    assert stopped > 0


def test_data_parallel_abort_request_takes_a_list_of_ids():
    """As `LLMEngine.abort_request`: a list of ids aborts each and returns their outputs in a
    list (None for an id that is unknown); a "delta" request's abort output holds what no
    output of `step` has held."""
    dp = _data_parallel()
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=6, ignore_eos=True,
                            output_kind="delta", allowed_token_ids=ALPHABET)
    ids = [dp.add_request(PROMPT, params), dp.add_request([5, 6, 7], params),
           dp.add_request([8, 9], SamplingParams(max_tokens=40, ignore_eos=True))]
    seen = {rid: [] for rid in ids}
    while sum(len(o.token_ids) for o in seen[ids[0]]) < 3:
        for out in dp.step():
            seen[out.request_id].append(out)
    aborted = dp.abort_request([ids[0], "nobody", ids[1]])
    assert [o is None for o in aborted] == [False, True, False]
    assert all(o.finished and o.finish_reason == "abort" for o in (aborted[0], aborted[2]))
    assert dp.unfinished_request_ids() == [ids[2]]
    assert dp.abort_request([ids[2]])[0].finish_reason == "abort"
    assert dp.abort_request([]) == [] and not dp.has_unfinished()
    assert dp.router.load == [0, 0]
    # Joined, the outputs and the abort output are the start of what the request generates
    # when it runs to its end (its seed fixes its tokens).
    from tests.parallel.test_data_parallel import TINY as DP_TINY

    single = create_engine(**DP_TINY)
    whole = single.add_request(PROMPT, dataclasses.replace(params, output_kind="final_only"))
    want = drain(single)[whole]
    tokens = [t for o in seen[ids[0]] + [aborted[0]] for t in o.token_ids]
    text = "".join(o.text for o in seen[ids[0]] + [aborted[0]])
    assert len(tokens) >= 3 and tokens == want.token_ids[:len(tokens)]
    assert want.text.startswith(text)


def test_abort_after_a_failed_step_keeps_the_held_back_delta():
    """A step that fails after reading tokens back holds their outputs for the next `step`;
    aborting a "delta" request meanwhile drops its held output, whose tokens its abort output
    must then bring (else they came in no output at all)."""
    from tests.conftest import failing_on_call

    engine = create_engine(**TINY, seed=0, overlap_scheduling=True)
    rid = engine.add_request(PROMPT, SamplingParams(
        max_tokens=40, temperature=1.0, seed=4, ignore_eos=True, allowed_token_ids=ALPHABET,
        output_kind="delta"))
    seq = engine.requests[rid][0]
    outs = []
    while sum(len(o.token_ids) for o in outs) < 3:
        outs += engine.step()
    # Sampled on the host: the step in flight is read back first, then the launch fails.
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, logprobs=1, output_kind="delta"))
    real = engine.runner.sample_step
    engine.runner.sample_step = failing_on_call(real, 1, RuntimeError("lost"))
    with pytest.raises(RuntimeError, match="lost"):
        engine.step()
    engine.runner.sample_step = real
    assert any(o.request_id == rid for o in engine._unreported)
    outs.append(engine.abort_request(rid))
    assert [t for o in outs for t in o.token_ids] == seq.output_token_ids
    assert "".join(o.text for o in outs) == seq.text
    drain(engine)
    assert engine.block_manager.num_used_pages == 0
