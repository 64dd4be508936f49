"""Building a step's outputs (`OutputProcessor.outputs`, `Sequence.output`, `Sequence.delta`),
which the engine does for every request and step of a "cumulative" or "delta" stream. A
request of one completion takes its own times and error without the lists an n-completion
request merges them from: both must give what the merge rules say (earliest first times,
the latest finish time once all have finished, the first error). A "delta" sequence reports
each token and character once, keeping the stop-string tail back while it runs. `outputs`
frees the finished, stops a failed request's siblings, skips unfinished "final_only"
requests, counts and forgets the finished ones, once per request however often it was
touched."""

import copy
import random

import pytest

from hwattn.data.tokenizer import ByteTokenizer
from hwattn.engine.output_processor import OutputProcessor
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.sequence import CompletionOutput, Logprob, RequestOutput, Sequence


def merged(group: list[Sequence], completions: list[CompletionOutput],
           prompt_logprobs) -> RequestOutput:
    """The output the merge rules of `RequestOutput` give for `group`, written out."""
    firsts = [s.first_token_time for s in group if s.first_token_time is not None]
    scheduled = [s.first_scheduled_time for s in group if s.first_scheduled_time is not None]
    finishes = [s.finish_time for s in group]
    errors = [s.error for s in group if s.error is not None]
    first = group[0]
    return RequestOutput(
        request_id=first.request_id, prompt=first.prompt,
        prompt_token_ids=first.prompt_token_ids, outputs=completions,
        prompt_logprobs=prompt_logprobs, num_cached_prompt_tokens=first.num_prefix_hit,
        arrival_time=first.arrival_time, first_token_time=min(firsts) if firsts else None,
        finish_time=None if None in finishes else max(finishes),
        error=errors[0] if errors else None, worker_failed=False,
        first_scheduled_time=min(scheduled) if scheduled else None)


def random_group(rng: random.Random, n: int, kind: str) -> list[Sequence]:
    params = SamplingParams(n=n, output_kind=kind, stop=["xyz"], logprobs=rng.choice([None, 1]),
                            prompt_logprobs=rng.choice([None, 0]))
    prompt = [rng.randrange(256) for _ in range(rng.randint(1, 5))]
    group = [Sequence(f"r{n}", prompt, params, seed=0, prompt="p", index=i) for i in range(n)]
    for s in group:
        s.num_prefix_hit = rng.randint(0, len(prompt))
        s.first_scheduled_time = rng.choice([None, rng.random()])
        if s.first_scheduled_time is not None:
            s.first_token_time = rng.choice([None, rng.random()])
        if s.first_token_time is not None:
            for _ in range(rng.randint(0, 6)):
                s.token_ids.append(rng.randrange(256))
                s.text += rng.choice(["a", "xy", "", "é"])
                if s.logprobs is not None:
                    s.logprobs.append({s.token_ids[-1]: Logprob(-rng.random(), 1, "a")})
                    s.cumulative_logprob += s.logprobs[-1][s.token_ids[-1]].logprob
            s.num_pending = rng.randint(0, 1)
            s.token_ids += [-1] * s.num_pending
            if rng.random() < 0.5:
                s.finish_reason = rng.choice(["stop", "length", "abort", "error"])
                s.finish_time = rng.random()
                s.num_pending = 0
                s.token_ids = [t for t in s.token_ids if t != -1]
                if s.finish_reason == "error":
                    s.error = f"boom {s.index}"
        if s.prompt_logprobs is not None:
            s.prompt_logprobs[1:] = [{t: Logprob(-1.0)} for t in prompt[1:]]
    group[0].reported_any = rng.random() < 0.5
    return group


@pytest.mark.parametrize("kind", ["cumulative", "delta", "final_only"])
def test_output_follows_the_merge_rules_for_one_and_for_n_completions(kind):
    rng = random.Random(7)
    for trial in range(300):
        n = rng.choice([1, 1, 2, 3])
        group = random_group(rng, n, kind)
        first = group[0]
        shadow = [copy.copy(s) for s in group]  # the same state, for the expected completions
        delta = kind == "delta"
        completions = [s.delta() if delta else s.completion() for s in shadow]
        prompt_logprobs = None if first.prompt_logprobs is None or (delta and first.reported_any) \
            else list(first.prompt_logprobs)
        want = merged(group, completions, prompt_logprobs)
        got = first.output(group) if n > 1 or rng.random() < 0.5 else first.output()
        assert got == want, (trial, n)
        assert got.prompt_token_ids is first.prompt_token_ids  # shared, as before
        assert first.reported_any
        for s, c in zip(group, shadow):  # a "delta" output marks what it holds reported
            assert (s.reported_tokens, s.reported_chars) == (c.reported_tokens, c.reported_chars)


@pytest.mark.parametrize("stop,keep", [(["abc"], False), (["abc", "zz"], True), (None, False)])
def test_deltas_report_each_token_and_character_once_keeping_the_stop_tail_back(stop, keep):
    rng = random.Random(11)
    for trial in range(100):
        params = SamplingParams(output_kind="delta", stop=stop, include_stop_str_in_output=keep,
                                logprobs=0)
        hold = params.stop_holdback
        seq = Sequence("r", [1, 2, 3], params, seed=0)
        tokens, text, logprobs = [], "", []
        while True:
            finished = rng.random() < 0.08
            for _ in range(rng.randint(0, 3)):
                token = rng.randrange(256)
                seq.token_ids.append(token)
                seq.logprobs.append({token: Logprob(-0.5)})
            seq.text += rng.choice(["", "a", "bc", "é€", "abcd"])
            if finished:
                seq.finish_reason = "stop"
                # A stop string cuts the text back, never into what was reported.
                seq.text = seq.text[:max(seq.reported_chars,
                                         len(seq.text) - rng.randint(0, hold))]
            else:
                pending = rng.randint(0, 2)  # placeholders of steps still on the device
                seq.token_ids += [-1] * pending
                seq.num_pending += pending
            before = len(text)
            out = seq.delta()
            assert -1 not in out.token_ids
            assert len(out.logprobs) == len(out.token_ids)
            assert out.finish_reason == seq.finish_reason
            tokens += out.token_ids
            logprobs += out.logprobs
            text += out.text
            if finished:
                break
            # While it runs, all but the last `hold` characters have come, none of them twice.
            assert len(text) == max(before, len(seq.text) - hold), trial
            assert seq.text.startswith(text)
            del seq.token_ids[len(seq.token_ids) - seq.num_pending:]
            seq.num_pending = 0
        assert text == seq.text and tokens == seq.output_token_ids, trial
        assert logprobs == seq.logprobs
        again = seq.delta()  # a finished completion comes again, empty
        assert (again.text, again.token_ids, again.logprobs) == ("", [], [])


class Scheduler:
    """Records the sequences it is asked to free."""

    def __init__(self):
        self.finished = []

    def finish(self, seq):
        self.finished.append(seq)


def processor(groups):
    requests = {group[0].request_id: group for group in groups}
    counters = {"finished": 0, "failed": 0, "generation_tokens": 0}
    op = OutputProcessor(ByteTokenizer(300), 64, Scheduler(), requests, counters)
    for group in groups:
        for seq in group:
            op.add(seq)
    return op


def group_of(rid, n, kind, reasons):
    params = SamplingParams(n=n, output_kind=kind)
    group = [Sequence(rid, [1, 2], params, seed=0, index=i) for i in range(n)]
    for seq, reason in zip(group, reasons):
        seq.token_ids.append(65)
        seq.text = "A"
        seq.finish_reason = reason
        seq.finish_time = None if reason is None else 1.0 + seq.index
    return group


def test_outputs_frees_counts_and_skips_as_the_output_kind_says():
    running = group_of("running", 1, "cumulative", [None])
    done = group_of("done", 1, "delta", ["length"])
    waiting = group_of("waiting", 2, "final_only", ["stop", None])  # one still runs
    final = group_of("final", 2, "final_only", ["stop", "length"])
    failing = group_of("failing", 3, "cumulative", [None, None, "stop"])
    half = group_of("half", 2, "delta", ["length", None])  # its first completion finished
    gone = group_of("gone", 1, "cumulative", ["abort"])  # aborted before: no request left
    op = processor([running, done, waiting, final, failing, half])
    op.begin_step()
    op.fail(failing[1], "bad token")
    touched = [done[0], running[0], waiting[0], final[1], final[0], running[0], failing[2],
               gone[0], half[0]]
    outs = op.outputs(touched)
    assert touched[-1] is failing[1]  # the failed one joins the step's sequences
    assert [o.request_id for o in outs] == ["done", "running", "final", "failing", "half"]
    assert [o.finished for o in outs] == [True, False, True, True, False]
    assert outs[3].error == "bad token" and outs[3].finish_reason == "error"
    assert [c.finish_reason for c in outs[3].outputs] == ["abort", "error", "stop"]
    assert failing[0].finish_time == failing[1].finish_time  # the sibling stops with it
    assert [c.finish_reason for c in outs[2].outputs] == ["stop", "length"]
    assert outs[2].finish_time == 2.0
    assert set(op.requests) == {"running", "waiting", "half"}
    assert op.counters["finished"] == 2 and op.counters["failed"] == 1
    freed = op.scheduler.finished
    assert len(freed) == len(set(map(id, freed)))
    assert {id(s) for s in freed} == {id(s) for s in
                                      [done[0], waiting[0], *final, *failing, half[0]]}
    assert set(op.detok) == {running[0], waiting[1], half[1]}
    # The next step: the waiting request's last completion finishes, and it comes once.
    op.begin_step()
    waiting[1].finish_reason, waiting[1].finish_time = "length", 3.0
    outs = op.outputs([waiting[1], waiting[1]])
    assert [o.request_id for o in outs] == ["waiting"] and outs[0].finished
    assert outs[0].finish_time == 3.0 and outs[0].text == "A"
    assert set(op.requests) == {"running", "half"} and op.counters["finished"] == 3
