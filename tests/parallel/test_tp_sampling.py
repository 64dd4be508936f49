"""Penalties, min_p, min_tokens, log-probabilities and n > 1 run where the sampler runs: on
tensor-parallel rank 0, with the same results as in one process, and a completion that fails
there fails its request alone."""

import pytest

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.sampler import SamplingInput

TINY = dict(model="tiny", attention="gla-2", device="cpu", dtype="fp32", page_size=8,
            num_pages=96, max_model_len=96, model_overrides=dict(n_layers=1, max_seq_len=96))
PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 40, 41]]
PARAMS = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.4,
                         presence_penalty=0.5, frequency_penalty=0.3, logprobs=2,
                         prompt_logprobs=1),
          SamplingParams(n=2, max_tokens=8, temperature=0.9, min_p=0.05, seed=4, min_tokens=3,
                         stop_token_ids=[7], logprobs=0)]

pytestmark = pytest.mark.timeout(180)


def summary(out):
    """(tokens and finish reason per completion, every reported log-probability)."""
    tokens = [(c.token_ids, c.finish_reason) for c in out.outputs]
    logprobs = [e[t].logprob for c in out.outputs for t, e in zip(c.token_ids, c.logprobs)]
    if out.prompt_logprobs is not None:
        logprobs += [e[t].logprob for t, e in zip(out.prompt_token_ids, out.prompt_logprobs)
                     if e is not None]
    return tokens, logprobs


def same(got, want):
    assert got[0] == want[0]
    assert got[1] == pytest.approx(want[1], abs=1e-4)


def test_rank_0_samples_penalties_and_logprobs_as_one_process_does(monkeypatch):
    with LLM(**TINY) as one:
        want = [summary(o) for o in one.generate(PROMPTS, PARAMS)]

    def not_here(self, device):
        raise AssertionError("the engine process sampled")

    monkeypatch.setattr(SamplingInput, "tensors", not_here)
    with LLM(tensor_parallel_size=2, **TINY) as llm:
        for out, expected in zip(llm.generate(PROMPTS, PARAMS), want):
            same(summary(out), expected)
        engine = llm.engine
        rid = engine.add_request(PROMPTS[1], PARAMS[1])
        engine.requests[rid][1].seed = 1 << 64  # overflows int64 on rank 0
        keep = engine.add_request(PROMPTS[0], PARAMS[0])
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
        assert done[rid].finish_reason == "error" and "Overflow" in done[rid].error
        same(summary(done[keep]), want[0])
        assert engine.stats()["pages_used"] == 0


def test_data_parallel_refuses_what_replicas_do_not_report_by_name():
    from hwattn.engine.data_parallel import DataParallelEngine
    from hwattn.engine.loader import model_config
    from hwattn.data.tokenizer import load_tokenizer
    from tests.parallel.test_data_parallel import TINY as DP_TINY
    from tests.parallel.test_data_parallel import InProcessReplicas

    config = model_config(DP_TINY["model"], DP_TINY["attention"], DP_TINY["model_overrides"])
    dp = DataParallelEngine(2, dict(DP_TINY), config, load_tokenizer(None, config.vocab_size),
                            workers=InProcessReplicas(2))
    for kw in (dict(n=2), dict(logprobs=1), dict(prompt_logprobs=0)):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=f"{name}=.* data_parallel_size"):
            dp.add_requests([[1, 2], [3, 4]], [SamplingParams(), SamplingParams(**kw)])
        assert not dp.has_unfinished()
    penalized = SamplingParams(max_tokens=4, temperature=0, repetition_penalty=1.5, min_tokens=2)
    rid = dp.add_request([5, 6, 7], penalized)
    done = {}
    while dp.has_unfinished():
        for out in dp.step():
            if out.finished:
                done[out.request_id] = out
    with LLM(**DP_TINY) as one:
        assert done[rid].token_ids == one.generate([[5, 6, 7]], penalized)[0].token_ids
