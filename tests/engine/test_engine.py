"""The engine against the minimal greedy decoder: every variant, continuous batching,
chunked prefill, preemption, prefix caching, aborts, stop conditions and seeds."""

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.models import greedy_generate
from tests.engine.conftest import step_to_completion

VARIANTS = ["mha", "mqa", "gqa-2", "gta-4", "mla", "gla-2"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 40, (n,), generator=g).tolist()
    return [torch.randint(0, 2048, (m,), generator=g).tolist() for m in lengths]


def oracle(model, prompt, n):
    tokens, _ = greedy_generate(model, torch.tensor([prompt]), n, page_size=8)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_matches_reference_decoder(checkpoints, variant):
    llm = LLM(checkpoints(variant), page_size=8, max_num_seqs=4, memory_budget=1 << 20)
    ps = prompts(6)
    outs = llm.generate(ps, GREEDY)
    for p, out in zip(ps, outs):
        assert out.token_ids == oracle(llm.engine.model, p, 12)
        assert out.finish_reason == "length"
    llm.engine.check_invariants()
    assert llm.engine.block_manager.num_used_pages == 0


def test_preemption_chunked_prefill_and_prefix_cache_keep_outputs(checkpoints):
    path = checkpoints("gta-4")
    ps = prompts(10, seed=1) + [list(range(100, 133))] * 2
    free = LLM(path, page_size=4, max_num_seqs=8, num_pages=400)
    expected = [o.token_ids for o in free.generate(ps, GREEDY)]
    # 40 usable pages of 4 tokens for up to 8 sequences of up to 51 tokens: preemptions.
    tight = LLM(path, page_size=4, max_num_seqs=8, num_pages=41, max_num_batched_tokens=16,
                max_model_len=128)
    engine = tight.engine
    assert [o.token_ids for o in step_to_completion(engine, ps, GREEDY)] == expected
    stats = engine.stats()
    assert stats["preemptions"] > 0, stats
    assert stats["prefix_hit_pages"] > 0, stats
    assert engine.block_manager.num_used_pages == 0


def test_abort_frees_pages_and_the_rest_finish(checkpoints):
    llm = LLM(checkpoints("gla-2"), page_size=4, num_pages=200, max_model_len=128)
    engine = llm.engine
    keep = engine.add_request([5, 6, 7], GREEDY)
    drop = engine.add_request(list(range(30)), SamplingParams(max_tokens=50, temperature=0))
    engine.step()  # prefill both
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    out = engine.abort_request(drop)
    assert out.finish_reason == "abort"
    engine.check_invariants()
    assert engine.abort_request(drop) is None
    finished = []
    while engine.has_unfinished():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == [keep]
    assert engine.block_manager.num_used_pages == 0


def test_stop_strings_stop_tokens_and_eos(checkpoints):
    llm = LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1 << 20)
    base = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert len(base.text) >= 4
    stop = base.text[2:4]
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and stop not in out.text
    assert base.text.startswith(out.text)
    tok = base.token_ids[5]
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0,
                                                   stop_token_ids=[tok]))[0]
    assert out.token_ids == base.token_ids[:base.token_ids.index(tok) + 1]
    assert out.finish_reason == "stop"
    llm.engine.tokenizer.eos_token_id = base.token_ids[3]
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == base.token_ids[3]


def test_seeded_sampling_is_independent_of_batch_mates(checkpoints):
    llm = LLM(checkpoints("mla"), page_size=8, memory_budget=1 << 20)
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=50, top_p=0.9, seed=7)
    alone = llm.generate([[4, 5, 6]], sp)[0].token_ids
    crowd = llm.generate([[9, 9], [4, 5, 6], [1] * 20],
                         [SamplingParams(max_tokens=5, temperature=1.0), sp,
                          SamplingParams(max_tokens=8, temperature=0)])
    assert crowd[1].token_ids == alone
    other = llm.generate([[4, 5, 6]], SamplingParams(max_tokens=10, temperature=0.9, seed=8))
    assert other[0].token_ids != alone


def test_text_prompts_and_validation(checkpoints):
    llm = LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1 << 20)
    out = llm.generate("héllo", SamplingParams(max_tokens=3, temperature=0))[0]
    assert out.prompt_token_ids == list("héllo".encode()) and len(out.token_ids) <= 3
    with pytest.raises(ValueError, match="context"):
        llm.generate([[1] * 256])
    with pytest.raises(ValueError, match="vocabulary|token ids"):
        llm.generate([[1, 99999]])
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]])
    for bad in (dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-5),
                dict(seed=2**63), dict(stop=[""])):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=name):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="preset"):
        LLM("no-such-model")
    with pytest.raises(ValueError, match="memory_budget"):
        LLM(checkpoints("gqa-2"), page_size=8, memory_budget=1000)


def test_cached_prompt_tokens_are_counted_at_the_first_admission_only(checkpoints):
    """`num_cached_prompt_tokens` is what the prefix cache held of the prompt when the request
    was first admitted. A preempted request recomputes from the pages it registered itself
    (its prompt and its output so far): they are no cached prompt tokens, and were counted as
    such (more than the prompt's length) when each admission overwrote the first one's."""
    llm = LLM(checkpoints("gqa-2"), page_size=4, num_pages=14, max_model_len=40,
              max_num_seqs=4, overlap_scheduling=False)
    ps = [[100 + i] * 9 for i in range(3)]  # no prompt shares a page with another
    outs = llm.generate(ps, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    assert llm.engine.stats()["preemptions"] > 0
    assert [o.num_cached_prompt_tokens for o in outs] == [0, 0, 0]
    # A real hit is still reported: the first two pages of the last prompt.
    again = llm.generate([ps[2] + [5]], SamplingParams(max_tokens=1))[0]
    assert again.num_cached_prompt_tokens == 8
    llm.engine.check_invariants()
