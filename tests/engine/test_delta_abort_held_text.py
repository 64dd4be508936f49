"""A "delta" request's text that a stop string may still cut is held back until it stays; an
abort must then bring it, through a data-parallel engine as through an `LLMEngine`: joined,
the outputs and the abort output hold exactly the text of the tokens generated."""

import dataclasses

from hwattn.engine import SamplingParams, create_engine
from tests.engine.conftest import drain

PROMPT = [104, 101, 108, 108, 111, 32]  # "hello "
ASCII = [ord(c) for c in "abc "]  # one character per token: the text of n tokens is n long


def _data_parallel():
    from tests.parallel.test_data_parallel import _in_process  # replicas in this process

    return _in_process(2, 0)


def _params(seed: int = 6) -> SamplingParams:
    # "zzzz" never comes (no z is allowed): its 3 characters are held back all along.
    return SamplingParams(max_tokens=40, temperature=1.0, seed=seed, ignore_eos=True,
                          allowed_token_ids=ASCII, stop=["zzzz"], output_kind="delta")


def _text_of(tokens: list[int]) -> str:
    return "".join(chr(t) for t in tokens)


def test_data_parallel_abort_brings_the_text_held_back_for_a_stop_string():
    dp = _data_parallel()
    rid = dp.add_request(PROMPT, _params())
    other = dp.add_request([5, 6, 7], _params(seed=7))
    seen, rest = [], []
    while sum(len(o.token_ids) for o in seen) < 6:
        for o in dp.step():
            (seen if o.request_id == rid else rest).append(o)
    assert len("".join(o.text for o in seen)) < sum(len(o.token_ids) for o in seen)  # held
    aborted = dp.abort_request(rid)
    assert aborted.finished and aborted.finish_reason == "abort"
    outs = seen + [aborted]
    tokens = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == _text_of(tokens)
    # The other request, beside it on a replica or not, runs on to its end unharmed.
    while dp.has_unfinished():
        rest += dp.step()
    assert {o.request_id for o in rest} == {other} and rest[-1].finish_reason == "length"
    joined = [t for o in rest for t in o.token_ids]
    assert len(joined) == 40 and "".join(o.text for o in rest) == _text_of(joined)
    dp.check_invariants()
    assert dp.router.load == [0, 0]


def test_data_parallel_delta_with_a_stop_string_joins_to_the_cumulative_outputs():
    """Step by step, the joined deltas of a data-parallel "delta" request with stop strings
    never take back text, hold back at most the longest stop string less one character, and
    end as the "cumulative" request's final output (cut by a stop string or not)."""
    alphabet = ASCII
    cases = [dict(seed=s, stop=stop, max_tokens=30) for s, stop in
             ((1, ["bbb", "c a"]), (2, ["aa"]), (4, ["cc", "b b"]), (5, ["zzzz"]))]
    runs = {}
    for kind in ("cumulative", "delta"):
        dp = _data_parallel()
        ids = [dp.add_request(PROMPT, SamplingParams(
            temperature=1.0, ignore_eos=True, allowed_token_ids=alphabet, output_kind=kind,
            **c)) for c in cases]
        seen = {rid: [] for rid in ids}
        while dp.has_unfinished():
            for out in dp.step():
                seen[out.request_id].append(out)
        dp.check_invariants()
        runs[kind] = [seen[rid] for rid in ids]
    stopped = 0
    for case, cumulative, delta in zip(cases, runs["cumulative"], runs["delta"]):
        want = cumulative[-1]
        hold = max(len(s) for s in case["stop"]) - 1
        text = ""
        for o in delta:
            text += o.text
            assert want.text.startswith(text) or o.finished
        assert text == want.text and [t for o in delta for t in o.token_ids] == want.token_ids
        assert delta[-1].outputs[0].stop_reason == want.outputs[0].stop_reason
        tokens = 0
        for o in delta[:-1]:
            tokens += len(o.token_ids)
        assert len("".join(o.text for o in delta[:-1])) >= min(tokens, len(want.text)) - hold
        stopped += want.outputs[0].stop_reason is not None
    assert stopped > 0


def test_llm_engine_abort_brings_the_text_held_back_for_a_stop_string():
    """The reference: an `LLMEngine` "delta" request's abort output brings the tail."""
    from tests.parallel.test_data_parallel import TINY as DP_TINY

    engine = create_engine(**DP_TINY)
    rid = engine.add_request(PROMPT, _params())
    seen = []
    while sum(len(o.token_ids) for o in seen) < 6:
        seen += engine.step()
    outs = seen + [engine.abort_request(rid)]
    tokens = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == _text_of(tokens)
    drain(engine)
    whole = engine.add_request(PROMPT, dataclasses.replace(_params(), output_kind="final_only"))
    assert drain(engine)[whole].token_ids[:len(tokens)] == tokens
