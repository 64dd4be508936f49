"""`SamplingParams.logit_bias` through the engine: it reaches every step (captured argmax
shortcut, overlapped sampling and speculative verification alike), touches only its own
request, and ids outside the vocabulary are refused by name."""

import pytest

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.sampling_params import ParamError

PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3], list(range(5, 40)), [7] * 5, [300, 301]]


def test_a_bias_forces_or_bans_tokens_at_every_step(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=8, memory_budget=1 << 20)
    for temperature in (0.0, 1.0):
        forced = SamplingParams(max_tokens=9, temperature=temperature, seed=1, ignore_eos=True,
                                logit_bias={77: 100.0})
        assert all(o.token_ids == [77] * 9 for o in llm.generate(PROMPTS, forced))
    greedy = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)
    plain = llm.generate(PROMPTS, greedy)
    for p, out in zip(PROMPTS, plain):
        seen = set(out.token_ids)
        banned = SamplingParams(max_tokens=9, temperature=0, ignore_eos=True,
                                logit_bias={t: -100.0 for t in seen})
        assert not seen & set(llm.generate([p], banned)[0].token_ids)
    assert llm.engine.block_manager.num_used_pages == 0


def test_a_bias_touches_only_its_own_request(checkpoints):
    llm = LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1 << 20)
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=10, temperature=0.9, seed=5, ignore_eos=True)
    biased = SamplingParams(max_tokens=10, temperature=0.9, seed=6, ignore_eos=True,
                            logit_bias={t: 3.0 for t in range(0, 2048, 3)})
    alone = [llm.generate([PROMPTS[0]], greedy)[0].token_ids,
             llm.generate([PROMPTS[1]], sampled)[0].token_ids,
             llm.generate([PROMPTS[2]], biased)[0].token_ids]
    crowd = llm.generate(PROMPTS[:3], [greedy, sampled, biased])
    assert [o.token_ids for o in crowd] == alone
    unbiased = SamplingParams(max_tokens=10, temperature=0.9, seed=6, ignore_eos=True)
    assert alone[2] != llm.generate([PROMPTS[2]], unbiased)[0].token_ids
    assert sum(t % 3 == 0 for t in alone[2]) > 5  # a third of the ids, e^3 times likelier


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculation_verifies_biased_requests_to_the_same_tokens(checkpoints, temperature):
    """n-gram drafts of a biased request are verified against the biased distribution, so
    its tokens equal plain decoding's, greedy or seeded."""
    path = checkpoints("gta-4")
    params = [SamplingParams(max_tokens=24, temperature=temperature, seed=s, ignore_eos=True,
                             logit_bias={4: 2.5, 5: 2.5, 2: -1.0} if s % 2 else None)
              for s in range(len(PROMPTS))]
    plain = LLM(path, page_size=4, num_pages=300, max_model_len=128).generate(PROMPTS, params)
    spec = LLM(path, page_size=4, num_pages=300, max_model_len=128, speculative="ngram",
               num_speculative_tokens=3)
    outs = spec.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert spec.engine.stats()["draft_tokens"] > 0
    assert spec.engine.block_manager.num_used_pages == 0


def test_ids_outside_the_vocabulary_are_refused_by_name(checkpoints):
    llm = LLM(checkpoints("mla"), page_size=8, memory_budget=1 << 20)
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ParamError, match="logit_bias") as err:
        llm.generate([[1, 2]], SamplingParams(logit_bias={vocab: 1.0}))
    assert err.value.param == "logit_bias"
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2, logit_bias={vocab - 1: 1.0}))
