"""Prefill steps through the prefill pieces' graphs (hwattn/engine/prefill_graphs.py): on the
CPU the same static buffers and padding without graphs, on a GPU real CUDA graphs; greedy
tokens equal the engine's with eager prefill either way."""

import pytest
import torch

from hwattn.engine.llm import LLM
from hwattn.engine.prefill_graphs import PrefillGraphs
from hwattn.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 61, (n,), generator=g).tolist()
    return [torch.randint(0, 2048, (k,), generator=g).tolist() for k in lengths]


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2", "mla"])
def test_padded_prefill_steps_match_eager(checkpoints, variant):
    """Steps of 2-20 tokens (chunks over cached prefixes and whole prompts, mixed with decode
    rows) padded to counts of 4, 8, 16 and 24 (a full step of 20 to 24): the rows past a step
    hold an earlier step's values, and no token changes."""
    path = checkpoints(variant)
    prompts = _prompts(8, seed=5)
    kw = dict(page_size=8, max_num_seqs=4, memory_budget=1 << 20, max_num_batched_tokens=20)
    for mixed in (False, True):
        eager = [o.token_ids for o in LLM(path, compile_prefill=False, enable_mixed_batches=mixed,
                                          **kw).generate(prompts, GREEDY)]
        llm = LLM(path, compile_prefill=True, enable_mixed_batches=mixed, **kw)
        runner = llm.engine.runner
        runner.prefill_graphs = graphs = PrefillGraphs(runner.model, runner.prefill_blocks,
                                                       [4, 8, 16, 24], capture=False)
        calls = []
        forward = graphs.forward
        graphs.forward = lambda tokens, *a: calls.append(tokens.shape[1]) or forward(tokens, *a)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == eager, mixed
        assert 20 in calls, sorted(set(calls))
        llm.engine.check_invariants()


def test_steps_longer_than_the_graphs_run_the_pieces(checkpoints):
    """A step of more tokens than the largest count runs the compiled pieces directly; the
    graphs' forward refuses it with the bound named."""
    path = checkpoints("gla-2")
    prompts = _prompts(4, seed=8)
    kw = dict(page_size=8, max_num_seqs=4, memory_budget=1 << 20, max_num_batched_tokens=64)
    eager = [o.token_ids for o in LLM(path, compile_prefill=False, **kw).generate(prompts, GREEDY)]
    llm = LLM(path, compile_prefill=True, **kw)
    runner = llm.engine.runner
    runner.prefill_graphs = graphs = PrefillGraphs(runner.model, runner.prefill_blocks, [8],
                                                   capture=False)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == eager
    with pytest.raises(ValueError, match="N <= 8"):
        graphs.forward(torch.zeros(1, 9, dtype=torch.long), None, runner.kv_caches)
    with pytest.raises(ValueError, match="at least 2"):
        PrefillGraphs(runner.model, runner.prefill_blocks, [1, 8], capture=False)


def test_no_prefill_graphs_without_cuda_graphs_or_compiled_prefill(checkpoints):
    """The runner records prefill graphs only on a GPU, with CUDA graphs and compiled prefill
    on: on the CPU, and with either off, it has none and says no error."""
    path = checkpoints("gqa-2")
    runner = LLM(path, page_size=8, max_num_seqs=2, memory_budget=1 << 20,
                 compile_prefill=True).engine.runner
    assert runner.prefill_graphs is None and runner.prefill_graph_error is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["gqa-4", "gla-2"])
def test_captured_prefill_on_the_gpu_matches_eager(checkpoints, variant):
    """Real graphs on the GPU: prompts chunked into steps of up to 48 tokens run in the
    recorded counts; greedy tokens equal those of the engine prefilling eagerly, no page
    leaks."""
    path = checkpoints(variant)
    prompts = _prompts(7, seed=9)
    kw = dict(device="cuda", dtype="fp32", page_size=16, num_pages=160, max_model_len=256,
              max_num_seqs=8, max_num_batched_tokens=48)
    want = [o.token_ids for o in LLM(path, compile_prefill=False, **kw).generate(prompts, GREEDY)]
    llm = LLM(path, compile_prefill=True, **kw)
    runner = llm.engine.runner
    assert runner.prefill_graphs is not None, runner.prefill_graph_error
    assert runner.prefill_compile_error is None
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    llm.engine.check_invariants()
