"""Prefill steps through the prefill pieces' graphs (hwattn/engine/prefill_graphs.py): on the
CPU the same static buffers and padding without graphs, on a GPU real CUDA graphs; greedy
tokens equal the engine's with eager prefill either way."""

import pytest
import torch

from hwattn.engine.llm import LLM
from hwattn.engine.prefill_graphs import PREFILL_GRAPH_SIZES, PrefillGraphs, prefill_graph_sizes
from hwattn.engine.sampling_params import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 61, (n,), generator=g).tolist()
    return [torch.randint(0, 2048, (k,), generator=g).tolist() for k in lengths]


def _eager_and_compiled(path, prompts: list[list[int]], **kw) -> tuple[list, LLM]:
    """The greedy tokens of `prompts` from an engine prefilling eagerly, and an engine of the
    same settings with compiled prefill (its runner's prefill graphs for the test to set)."""
    want = [o.token_ids for o in LLM(path, compile_prefill=False, **kw).generate(prompts, GREEDY)]
    return want, LLM(path, compile_prefill=True, **kw)


@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2", "mla"])
def test_padded_prefill_steps_match_eager(checkpoints, variant):
    """Steps of 2-20 tokens (chunks over cached prefixes and whole prompts, mixed with decode
    rows) padded to counts of 4, 8, 16 and 24 (a full step of 20 to 24): the rows past a step
    hold an earlier step's values, and no token changes."""
    path = checkpoints(variant)
    prompts = _prompts(8, seed=5)
    kw = dict(page_size=8, max_num_seqs=4, memory_budget=1 << 20, max_num_batched_tokens=20)
    for mixed in (False, True):
        eager, llm = _eager_and_compiled(path, prompts, enable_mixed_batches=mixed, **kw)
        runner = llm.engine.runner
        runner.prefill_graphs = graphs = PrefillGraphs(runner.model, runner.prefill_blocks,
                                                       [4, 8, 16, 24], capture=False)
        calls = []
        forward = graphs.forward
        graphs.forward = lambda tokens, *a: calls.append(tokens.shape[1]) or forward(tokens, *a)
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == eager, mixed
        assert 20 in calls, sorted(set(calls))
        llm.engine.check_invariants()


def test_graph_sizes_pad_little_and_stop_at_the_budget():
    """Counts from 48 tokens up pad a step by at most a third, from 512 by at most a quarter;
    the scheduler's budget is the largest count (a full step runs unpadded)."""
    sizes = prefill_graph_sizes(4096)
    assert sizes == list(PREFILL_GRAPH_SIZES)
    for small, big in zip(sizes, sizes[1:]):
        assert big <= small * (4 / 3 if small < 512 else 5 / 4) or small < 48, (small, big)
    assert prefill_graph_sizes(24) == [16, 24] and prefill_graph_sizes(2048)[-1] == 2048
    assert prefill_graph_sizes(1) == [] and prefill_graph_sizes(2) == [2]


def test_the_graphs_compile_nothing_after_start_up(checkpoints):
    """Building the graphs runs every segment once: no step afterwards compiles a piece again
    (their buffers are laid out as the eager pieces' inputs, in inference mode)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    llm = LLM(checkpoints("gla-2"), page_size=8, max_num_seqs=4, memory_budget=1 << 20,
              max_num_batched_tokens=20, compile_prefill=True)
    runner = llm.engine.runner
    runner.prefill_graphs = PrefillGraphs(runner.model, runner.prefill_blocks, [4, 8, 16, 24],
                                          capture=False)
    graphs = counters["stats"]["unique_graphs"]
    llm.generate(_prompts(6, seed=2), GREEDY)
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_prefill_capture_leaves_the_pieces(checkpoints, monkeypatch, caplog):
    """A prefill-graph capture that fails leaves the compiled pieces launching directly, with
    the error kept and logged; the engine's tokens do not change."""
    import hwattn.engine.model_runner as mr

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed: out of memory\nsecond line")

    path = checkpoints("gqa-2")
    prompts = _prompts(4, seed=3)
    kw = dict(page_size=8, max_num_seqs=4, memory_budget=1 << 20, max_num_batched_tokens=20)
    want, llm = _eager_and_compiled(path, prompts, **kw)
    runner = llm.engine.runner
    monkeypatch.setattr(mr, "PrefillGraphs", broken)
    with caplog.at_level("WARNING", logger="hwattn.engine.model_runner"):
        runner._capture_prefill()  # (what a GPU runner does at start-up)
    assert runner.prefill_graphs is None
    assert runner.prefill_graph_error == "RuntimeError: capture failed: out of memory"
    assert "launching them one by one" in caplog.text
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want


def test_steps_longer_than_the_graphs_run_the_pieces(checkpoints):
    """A step of more tokens than the largest count runs the compiled pieces directly; the
    graphs' forward refuses it with the bound named."""
    path = checkpoints("gla-2")
    prompts = _prompts(4, seed=8)
    kw = dict(page_size=8, max_num_seqs=4, memory_budget=1 << 20, max_num_batched_tokens=64)
    eager, llm = _eager_and_compiled(path, prompts, **kw)
    runner = llm.engine.runner
    runner.prefill_graphs = graphs = PrefillGraphs(runner.model, runner.prefill_blocks, [8],
                                                   capture=False)
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == eager
    with pytest.raises(ValueError, match="N <= 8"):
        graphs.forward(torch.zeros(1, 9, dtype=torch.long), None, runner.kv_caches)
    with pytest.raises(ValueError, match="at least 2"):
        PrefillGraphs(runner.model, runner.prefill_blocks, [1, 8], capture=False)


@pytest.mark.parametrize("on", [True, False])
def test_the_engine_passes_its_prefill_graphs_switch_to_the_runner(checkpoints, monkeypatch, on):
    """EngineConfig.prefill_graphs (and the scheduler's budget, which caps the graphs' token
    counts) reach the runner the engine builds."""
    import hwattn.engine.llm as llm_module

    seen = {}

    class Recording(llm_module.ModelRunner):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llm_module, "ModelRunner", Recording)
    LLM(checkpoints("gqa-2"), page_size=8, max_num_seqs=2, memory_budget=1 << 20,
        max_num_batched_tokens=40, prefill_graphs=on)
    assert seen["prefill_graphs"] is on and seen["max_num_batched_tokens"] == 40


def test_no_prefill_graphs_on_the_cpu(checkpoints):
    """The runner records prefill graphs only on a GPU (with CUDA graphs and compiled prefill
    on): on the CPU it has none and says no error."""
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
    llm = LLM(path, compile_prefill=True, prefill_graphs=True, **kw)
    runner = llm.engine.runner
    assert runner.prefill_graphs is not None, runner.prefill_graph_error
    assert runner.prefill_compile_error is None
    assert runner.prefill_graphs.sizes[-1] == 48  # the budget, unpadded
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == want
    llm.engine.check_invariants()
    for off in (dict(cuda_graphs=False), dict(compile_prefill=False), dict(prefill_graphs=False)):
        on = dict(compile_prefill=True, prefill_graphs=True, **kw)
        assert LLM(path, **{**on, **off}).engine.runner.prefill_graphs is None
