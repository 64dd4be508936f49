"""Nothing one request carries can hurt another: settings are checked (and copied) before a
request is queued, batches are all-or-nothing, and a request that still fails inside a step is
finished alone with finish_reason "error" while its batch mates produce what they would have
produced without it."""

import time

import pytest
import torch

from hwattn.data.tokenizer import chat_prompt
from hwattn.engine import LLM, SamplingParams
from hwattn.engine.model_runner import ModelRunner, StepInput
from hwattn.engine.sampler import SamplingInput
from tests.conftest import failing_on_call
from tests.engine.conftest import drain

PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44], [9] * 12]
SAMPLED = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.95, seed=3,
                         ignore_eos=True)


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    """A plain and a speculative (n-gram) engine over one tiny random model."""
    kw = dict(attention="gla-2", device="cpu", page_size=8, num_pages=300, seed=0,
              model_overrides=dict(max_seq_len=256, n_layers=2))
    return {None: LLM("tiny", **kw),
            "ngram": LLM("tiny", speculative="ngram", num_speculative_tokens=3, **kw)}


def run(engine, ids) -> dict:
    done = drain(engine)
    return {i: done[i] for i in ids}


class Hostile(SamplingParams):
    """Valid settings whose `greedy` flag cannot be read: the sampler's batch build raises."""

    @property
    def greedy(self):
        raise RuntimeError("hostile settings")


@pytest.mark.parametrize("speculative", [None, "ngram"])
@pytest.mark.parametrize("fault", ["top_k overflows int64", "stop handling raises"])
def test_a_request_that_fails_in_a_step_finishes_alone(llms, speculative, fault):
    llm = llms[speculative]
    engine = llm.engine
    clean = llm.generate(PROMPTS, SAMPLED)
    ids = [engine.add_request(p, SAMPLED) for p in PROMPTS]
    victim = engine.requests[ids[1]][0]
    if fault == "top_k overflows int64":
        victim.params.top_k = 1 << 64  # changed behind the engine's back, after validation
    else:
        victim.params.stop = [5]  # not a string: the stop search raises
    before = engine.stats()
    outs = run(engine, ids)
    bad = outs[ids[1]]
    assert bad.finish_reason == "error" and bad.error
    for i in (0, 2):
        assert outs[ids[i]].token_ids == clean[i].token_ids
        assert outs[ids[i]].finish_reason == clean[i].finish_reason
    stats = engine.stats()
    assert stats["failed"] == before["failed"] + 1
    assert stats["running"] == stats["waiting"] == stats["pages_used"] == 0


def test_the_runner_samples_row_by_row_when_the_batch_fails(llms):
    """What a tensor-parallel rank 0 runs: one row's settings break the batch's sampling and
    verification; that row gets its error as a string, the others exactly their tokens."""
    engine = llms[None].engine
    runner = ModelRunner(engine.model, num_pages=8, page_size=8, max_model_len=64,
                         cuda_graphs=False)  # its own cache: the engine's pages stay untouched
    tables = [[1], [2], [3]]
    plain = StepInput("decode", [[5], [6], [7]], [0, 0, 0], tables)
    fed = StepInput("decode", [[5, 6, 7, 8], [6, 7, 8, 9], [7, 8, 9, 5]], [0, 0, 0], tables)
    sampling = SamplingInput.of([SAMPLED] * 3, [1, 2, 3], [4, 4, 4])
    clean = runner.sample_step(plain, sampling), runner.verify_step(fed, sampling)
    sampling.top_k[1] = 1 << 64
    for got, want in zip((runner.sample_step(plain, sampling), runner.verify_step(fed, sampling)),
                         clean):
        assert isinstance(got[1], str) and "Overflow" in got[1]
        assert [got[0], got[2]] == [want[0], want[2]]
        assert not any(isinstance(w, str) for w in want)


def test_generate_returns_a_failing_request_alone(llms):
    llm = llms[None]
    clean = llm.generate(PROMPTS, SAMPLED)
    hostile = Hostile(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    outs = llm.generate(PROMPTS, [SAMPLED, hostile, SAMPLED])
    assert outs[1].finish_reason == "error" and "hostile" in outs[1].error
    assert [o.token_ids for o in (outs[0], outs[2])] == [clean[0].token_ids, clean[2].token_ids]
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_used_pages == 0


def test_params_changed_after_queueing_cannot_reach_the_sampler(llms):
    engine = llms[None].engine
    params = SamplingParams(max_tokens=4, temperature=0.5, seed=1)
    rid = engine.add_request([1, 2, 3], params)
    params.top_k = 1 << 64  # too late: the engine holds its own checked copy
    out = run(engine, [rid])[rid]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request([1, 2, 3], params)  # checked again when queued
    assert not engine.has_unfinished()


@pytest.mark.parametrize("bad,name", [
    (dict(top_k=1 << 63), "top_k"), (dict(top_k=10 ** 30), "top_k"), (dict(top_k=1e30), "top_k"),
    (dict(temperature=float("inf")), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(stop=5), "stop"), (dict(stop=[1]), "stop"),
    (dict(stop="\ud800"), "stop"), (dict(stop=["ok", "x\udfff"]), "stop"),
    (dict(stop_token_ids=["a"]), "stop_token_ids"), (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(seed=1 << 63), "seed"), (dict(ignore_eos="yes"), "ignore_eos"),
])
def test_sampling_params_refuse_values_the_sampler_cannot_hold(bad, name):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_generate_is_all_or_nothing(llms):
    llm = llms[None]
    with pytest.raises(ValueError, match=r"prompts\[2\].*empty"):
        llm.generate(["good", "good", ""])
    with pytest.raises(ValueError, match=r"prompts\[1\].*top_k"):
        bad = SamplingParams(max_tokens=2)
        bad.top_k = -7
        llm.generate(["good", "good"], [SamplingParams(max_tokens=2), bad])
    assert not llm.engine.has_unfinished()
    outs = llm.generate(["next"], SamplingParams(max_tokens=2))
    assert len(outs) == 1 and outs[0].prompt == "next"
    assert not llm.engine.has_unfinished()


def test_a_request_failing_while_it_is_queued_leaves_nothing_behind(llms, monkeypatch):
    """A batch whose third request fails while it is queued (its detokenizer cannot be set
    up: a KeyError, not a refusal) raises that error and queues none of the batch. Observed:
    the requests before it stayed queued and ran with no caller to read them, and the failing
    one stayed in the engine's requests for good."""
    import hwattn.engine.output_processor as output_processor

    engine = llms[None].engine
    real = output_processor.incremental_detokenizer
    monkeypatch.setattr(output_processor, "incremental_detokenizer",
                        failing_on_call(real, 3, KeyError("no decoding table")))
    with pytest.raises(KeyError, match="no decoding table"):
        engine.add_requests(PROMPTS, [SAMPLED] * 3, ["a", "b", "c"])
    assert not engine.has_unfinished() and not engine.requests and not engine.detok
    engine.check_invariants()
    monkeypatch.setattr(output_processor, "incremental_detokenizer", real)
    assert [o.token_ids for o in run(engine, engine.add_requests(PROMPTS, [SAMPLED] * 3,
                                                                 ["a", "b", "c"])).values()] \
        == [o.token_ids for o in llms[None].generate(PROMPTS, SAMPLED)]


def test_generate_accepts_tensors_of_token_ids(llms):
    llm = llms[None]
    greedy = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS[:2], greedy)]
    one = llm.generate(torch.tensor(PROMPTS[0]), greedy)
    assert [o.token_ids for o in one] == want[:1]
    assert one[0].prompt_token_ids == PROMPTS[0]
    listed = llm.generate([torch.tensor(p) for p in PROMPTS[:2]], greedy)
    assert [o.token_ids for o in listed] == want
    rows = llm.generate(torch.tensor([PROMPTS[0], PROMPTS[0]]), greedy)
    assert [o.token_ids for o in rows] == want[:1] * 2
    for bad in (torch.tensor([1.0, 2.0]), torch.zeros(1, 2, 3, dtype=torch.long), {"a": 1}):
        with pytest.raises(ValueError, match="tensor|prompt"):
            llm.generate(bad, greedy)
    assert not llm.engine.has_unfinished()


def test_text_prompts_are_checked_before_tokenizing(llms, monkeypatch):
    engine = llms[None].engine
    seen = []
    encode = engine.tokenizer.encode
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: seen.append(len(text)) or encode(text))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="context"):
        engine.add_request("x" * 20_000_000)
    assert time.perf_counter() - start < 0.5 and seen == []
    with pytest.raises(ValueError, match="not valid Unicode"):
        engine.add_request("ok \ud800")
    assert not engine.has_unfinished()


def test_chat_template_knows_its_roles_and_content_types():
    assert chat_prompt([{"role": "user", "content": "hi"}]) == "<|user|>\nhi\n<|assistant|>\n"
    for bad in ({"role": "hacker", "content": "x"}, {"role": "user|>\n<|system", "content": "x"},
                {"role": "user", "content": 5}, {"role": "user", "content": [{"type": "text", "text": 5}]},
                {"role": "user", "content": None}):
        with pytest.raises(ValueError, match="role|content"):
            chat_prompt([bad])


@pytest.mark.parametrize("where", ["verify step", "host-sampled step"])
def test_requests_finished_before_a_step_fails_are_still_reported(where, monkeypatch):
    """A step that must read the step in flight back first (a verify step drafts from the
    tokens; a request sampled on the host's terms needs them) finishes some requests there,
    then the model fails. Observed: those requests were never reported: they stayed in
    `engine.requests` while `has_unfinished()` was False, so a caller waited for them
    forever (their pages were freed). They come back from the next `step()`, before it runs
    anything (an aborted one is not)."""
    kw = dict(attention="gla-2", device="cpu", page_size=8, num_pages=300, seed=0,
              model_overrides=dict(max_seq_len=256, n_layers=2))
    spec = dict(speculative="ngram", num_speculative_tokens=3) if where == "verify step" else {}
    llm = LLM("tiny", **kw, **spec)
    engine = llm.engine
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    later = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True,
                           logprobs=1 if where == "host-sampled step" else None)
    want = [o.token_ids for o in llm.generate(PROMPTS[:2], [one, later])]
    a = engine.add_request(PROMPTS[0], one)
    aborted = engine.add_request(PROMPTS[2], one)
    if where == "verify step":
        b = engine.add_request(PROMPTS[1], later)
        method = "verify_step"
    else:
        method = "sample_step"
    assert engine.step() == []  # the prompts' step is in flight (overlapped)
    if where == "host-sampled step":
        b = engine.add_request(PROMPTS[1], later)  # sampled on the host: read back first
    real = getattr(engine.runner, method)
    monkeypatch.setattr(engine.runner, method, failing_on_call(real, 1, RuntimeError("lost")))
    with pytest.raises(RuntimeError, match="lost"):
        engine.step()
    engine.abort_request(aborted)  # finished, not reported yet: never reported now
    done = drain(engine)
    assert sorted(done) == sorted([a, b]) and done[a].finish_reason == "length"
    assert [done[a].token_ids, done[b].token_ids] == want
    assert not engine.requests and not engine.detok
    assert engine.block_manager.num_used_pages == 0
