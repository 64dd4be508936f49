"""Decode steps through `torch.compile`d blocks (EngineConfig.compile_decode) give the eager
engine's greedy tokens, for every kernel shape and with speculative verification; the paged
ops stay outside the compiled graphs. Prefill and mixed steps through the prefill blocks
(EngineConfig.compile_prefill) do too, compiled once for every chunk layout."""

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from tests.engine.test_engine import prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def _generate(path, compile_decode=False, prompts_=None, **kw):
    """Greedy outputs of `prompts_` (default: five short prompts) and the engine, which
    leaks no page."""
    llm = LLM(path, page_size=8, max_num_seqs=4, memory_budget=1 << 20,
              compile_decode=compile_decode, **kw)
    outs = [o.token_ids for o in llm.generate(prompts_ or prompts(5, seed=3), GREEDY)]
    assert llm.engine.block_manager.num_used_pages == 0
    return outs, llm


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2", "mla"])
def test_compiled_decode_matches_eager(checkpoints, variant):
    torch._dynamo.reset()
    path = checkpoints(variant)
    eager, _ = _generate(path, False)
    compiled, llm = _generate(path, True)
    assert compiled == eager
    assert llm.engine.runner.decode_blocks is not None


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gla-2", "mla"])
def test_composed_absorptions_decode_as_the_separate_products(checkpoints, variant, monkeypatch):
    """With HWATTN_COMPOSE_ABSORB (W_UK and W_UV multiplied into the projections), the
    engine decodes the separate products' greedy tokens, eager and compiled; the runner says
    how many layers composed them."""
    from hwattn.layers import mla

    torch._dynamo.reset()
    path = checkpoints(variant)
    separate, _ = _generate(path, False)
    monkeypatch.setattr(mla, "COMPOSE_ABSORPTIONS", True)
    eager, llm = _generate(path, False)
    assert llm.engine.runner.composed_layers == len(llm.engine.model.layers)
    compiled, _ = _generate(path, True)
    assert eager == separate and compiled == separate


def test_serving_composes_a_model_once(monkeypatch):
    """The engine composes before it sizes the cache and the runner again: the second call
    keeps the first's composed weights; switched off, it drops them."""
    from hwattn import ModelConfig, Transformer
    from hwattn.engine.model_runner import compose_absorptions_for_serving
    from hwattn.layers import mla

    model = Transformer(ModelConfig.from_preset("tiny", attention="gla", n_layers=2))
    monkeypatch.setattr(mla, "COMPOSE_ABSORPTIONS", True)
    assert compose_absorptions_for_serving(model) == 2
    first = [blk.attn._composed for blk in model.layers]
    assert compose_absorptions_for_serving(model) == 2
    assert [blk.attn._composed for blk in model.layers] == first
    assert all(a is b for a, b in zip(first, [blk.attn._composed for blk in model.layers]))
    assert compose_absorptions_for_serving(model, on=False) == 0 == model.composed_layers


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gta-4", "gla-2", "mla"])
def test_states_finished_in_the_cache_write_decode_as_before(checkpoints, variant, monkeypatch):
    """Decode steps that finish their states in the cache write (`Attention.
    finishes_states_in_store`, HWATTN_FUSED_STATE_STORE=1) give the greedy tokens of steps that
    norm and rotate them first, eager and compiled; compiled also with each block's last
    residual add deferred to the next block (HWATTN_DEFER_RESIDUAL=1)."""
    from hwattn.layers import base
    from hwattn.models import compile as regional

    torch._dynamo.reset()
    path = checkpoints(variant)
    monkeypatch.setattr(base, "FUSED_STATE_STORE", "0")
    monkeypatch.setattr(regional, "DEFER_RESIDUAL", False)
    unfused, _ = _generate(path, False)
    monkeypatch.setattr(base, "FUSED_STATE_STORE", "1")
    eager, _ = _generate(path, False)
    compiled, _ = _generate(path, True)
    monkeypatch.setattr(regional, "DEFER_RESIDUAL", True)
    deferred, llm = _generate(path, True)
    assert all(isinstance(b._orig_mod, regional.DeferredResidual)
               for b in llm.engine.runner.decode_blocks)
    assert eager == unfused and compiled == unfused and deferred == unfused


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_no_compiled_decode_graph_is_a_lone_residual_add(attention):
    """A compiled block's residual adds stay in the graphs around them: a helper that made
    the attention's residual add after the graph break a frame of its own compiled it into a
    graph, and a kernel a layer, of that one add (run 19 on an H100, docs/results/engine.md)."""
    import operator

    from hwattn import ModelConfig, Transformer
    from hwattn.layers import AttentionMetadata
    from hwattn.models.compile import compile_blocks

    graphs = []

    def backend(gm, example_inputs):
        graphs.append([n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")])
        return gm.forward

    torch._dynamo.reset()
    model = Transformer(ModelConfig.from_preset("tiny", attention=attention, n_layers=2)).eval()
    caches = [blk.attn.allocate_cache(16, 4, dtype=torch.float32, device=torch.device("cpu"))
              for blk in model.layers]
    blocks = compile_blocks(model, backend=backend)
    table = torch.arange(16, dtype=torch.int32).view(2, 8)
    for step in range(2):
        lens = torch.full((2,), 6 + step, dtype=torch.int32)
        slots = AttentionMetadata.slots(table, torch.full((2, 1), 5 + step), 4)
        with torch.no_grad():
            model(torch.randint(0, model.config.vocab_size, (2, 1)),
                  meta=AttentionMetadata(table, lens, slots, backend="torch"), kv_caches=caches,
                  blocks=blocks)
    assert graphs
    lone_adds = [g for g in graphs if g in ([operator.add], [torch.add], ["add"])]
    assert not lone_adds, graphs


def test_decode_steps_prefer_their_blas_library_on_a_gpu_only(monkeypatch):
    """`decode_blas`: a CUDA device gets the library asked for (HWATTN_BLAS by default), any
    other device "default"; an unknown name is refused naming HWATTN_BLAS. `blas_preference`
    sets the preference for its block only and restores the one before; "default" leaves
    it alone."""
    from hwattn.engine import model_runner

    state = ["cublas"]
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library",
                        lambda name=None: state[-1] if name is None else state.append(name))
    monkeypatch.setattr(torch.version, "hip", None)
    assert model_runner.decode_blas(torch.device("cpu")) == "default"
    assert model_runner.decode_blas(torch.device("cuda", 0)) == model_runner.BLAS_LIBRARY
    assert model_runner.decode_blas(torch.device("cuda", 0), "cublas") == "cublas"
    assert model_runner.decode_blas(torch.device("cuda", 0), "default") == "default"
    with pytest.raises(ValueError, match="HWATTN_BLAS"):
        model_runner.decode_blas(torch.device("cuda", 0), "mkl")
    with model_runner.blas_preference("cublaslt"):
        assert state[-1] == "cublaslt"
    assert state == ["cublas", "cublaslt", "cublas"]
    with pytest.raises(RuntimeError), model_runner.blas_preference("cublaslt"):
        raise RuntimeError("a failed step")
    assert state[-1] == "cublas"
    with model_runner.blas_preference("default"):
        pass
    assert len(state) == 5


def test_decode_steps_alone_run_under_the_decode_blas_library(checkpoints, monkeypatch):
    """A runner whose decode library is cuBLASLt asks for it around each eager decode forward
    and restores the preference after; prefill steps' forwards run under the preference as it
    was."""
    state, during, kinds = ["cublas"], [], []
    monkeypatch.setattr(torch.backends.cuda, "preferred_blas_library",
                        lambda name=None: state[-1] if name is None else state.append(name))
    llm = LLM(checkpoints("gqa-2"), page_size=8, max_num_seqs=4, memory_budget=1 << 20)
    runner = llm.engine.runner
    monkeypatch.setattr(runner, "blas", "cublaslt")
    for kind in ("_prefill", "_decode"):
        real = getattr(runner, kind)

        def spy(step, real=real, kind=kind):
            kinds.append(kind)
            return real(step)

        monkeypatch.setattr(runner, kind, spy)
    model_forward = runner.model.forward

    def forward(*args, **kwargs):  # the model's GEMMs run here
        during.append((kinds[-1], state[-1]))
        return model_forward(*args, **kwargs)

    monkeypatch.setattr(runner.model, "forward", forward)
    llm.generate(prompts(2, seed=5), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    assert {k for k, _ in during} == {"_prefill", "_decode"}
    assert all(blas == ("cublaslt" if k == "_decode" else "cublas") for k, blas in during), during
    assert state[-1] == "cublas"


@pytest.mark.slow
def test_compiled_verify_steps_match_eager(checkpoints):
    """Speculative verification (L_q = k + 1) runs the same compiled blocks."""
    torch._dynamo.reset()
    path = checkpoints("gla-2")
    eager, _ = _generate(path, False, speculative="ngram", num_speculative_tokens=2)
    compiled, _ = _generate(path, True, speculative="ngram", num_speculative_tokens=2)
    assert compiled == eager


def test_backend_ops_are_opaque_to_the_compiler(checkpoints):
    """dynamo breaks the graph at the paged ops instead of tracing into the kernels: the
    cache write and decode run once per layer as the eager model runs them."""
    from torch._dynamo.testing import CompileCounter

    from hwattn.models.compile import compile_blocks

    torch._dynamo.reset()
    llm = LLM(checkpoints("gta-4"), page_size=8, max_num_seqs=4, memory_budget=1 << 20)
    runner = llm.engine.runner
    counter = CompileCounter()
    runner.decode_blocks = compile_blocks(llm.engine.model, backend=counter)
    outs = [o.token_ids for o in llm.generate(prompts(3, seed=4), GREEDY)]
    runner.decode_blocks = None
    eager = [o.token_ids for o in llm.generate(prompts(3, seed=4), GREEDY)]
    assert outs == eager
    # One block code object: before the cache write, between it and the decode op, after it
    # (and one recompile with a symbolic batch), shared by every layer.
    assert 0 < counter.frame_count <= 8, counter.frame_count


def _generate_chunked(path, prompts_, compile_prefill, **kw):
    """`_generate` with prompts cut into chunks of at most 24 tokens (so prefill steps attend
    over cached prefixes through the paged op, and whole short prompts densely)."""
    return _generate(path, prompts_=prompts_, max_num_batched_tokens=24,
                     compile_prefill=compile_prefill, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["gqa-2", "gta-4", "gla-2", "mla"])
def test_compiled_prefill_matches_eager(checkpoints, variant):
    """Prefill and mixed steps through the runner's compiled prefill blocks
    (EngineConfig.compile_prefill) give the eager engine's greedy tokens."""
    torch._dynamo.reset()
    path = checkpoints(variant)
    for mixed in (False, True):
        eager, _ = _generate_chunked(path, prompts(5, seed=3), False,
                                     enable_mixed_batches=mixed)
        compiled, llm = _generate_chunked(path, prompts(5, seed=3), True,
                                          enable_mixed_batches=mixed)
        assert compiled == eager, mixed
        assert llm.engine.runner.prefill_blocks is not None


@pytest.mark.parametrize("variant, page_size", [("gqa-2", 8), ("gta-4", 8), ("gla-2", 8),
                                               ("mla", 8), ("gla-2", 1), ("gqa-2", 2),
                                               ("mla", 3)])
def test_prefill_blocks_compile_once(checkpoints, variant, page_size):
    """The prefill blocks are compiled at start-up for any number of tokens: no step of
    another chunk layout (rows, lengths, cached prefixes, whole prompts or chunks) compiles
    them again, since the attention dispatch that reads the step's host lengths is one graph
    break (`Attention._attend_prefill`, whose output is contiguous whichever path ran), and
    the warm-up's graphs are compiled without duck sizing (two cached heads, pages of one or
    two tokens: `ModelRunner._warm_prefill`)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    path = checkpoints(variant)
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(1, 61, (12,), generator=g).tolist()
    prompts_ = [torch.randint(0, 2048, (n,), generator=g).tolist() for n in lengths]
    llm = LLM(path, page_size=page_size, max_num_seqs=4, memory_budget=1 << 20,
              max_num_batched_tokens=24, compile_prefill=True)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    outs = [o.token_ids for o in llm.generate(prompts_, GREEDY)]
    outs += [o.token_ids for o in llm.generate([[7]], GREEDY)]  # a step of one token
    assert counters["stats"]["unique_graphs"] == graphs
    llm.engine.runner.prefill_blocks = llm.engine.runner.prefill_graphs = None
    assert outs == [o.token_ids for o in llm.generate(prompts_ + [[7]], GREEDY)]


def test_a_failed_prefill_compile_leaves_prefill_eager(checkpoints, monkeypatch, caplog):
    """A prefill-block compile that fails at start-up leaves prefill on the eager blocks with
    the error kept and logged, as a failed graph capture leaves decoding eager: the engine
    still serves (compile_prefill is on by default on CUDA)."""
    import hwattn.engine.model_runner as mr

    def broken(model, **kw):
        def fail(*args, **kwargs):
            raise RuntimeError("inductor could not compile\nsecond line")
        return [fail] * len(model.layers)

    monkeypatch.setattr(mr, "compile_pieces", broken)
    path = checkpoints("gla-2")
    with caplog.at_level("WARNING", logger="hwattn.engine.model_runner"):
        outs, llm = _generate_chunked(path, prompts(3, seed=6), True)
    runner = llm.engine.runner
    assert runner.prefill_blocks is None
    assert runner.prefill_compile_error == "RuntimeError: inductor could not compile"
    assert "prefilling eagerly" in caplog.text
    monkeypatch.undo()
    assert outs == _generate_chunked(path, prompts(3, seed=6), False)[0]


def test_a_failed_prefill_compile_keeps_its_cause(checkpoints, monkeypatch):
    """dynamo wraps a backend's error ("backend=... raised:" on its first line): the error
    kept names the wrapped one, which says what went wrong."""
    import hwattn.engine.model_runner as mr
    from hwattn.models.compile import compile_pieces

    def bad_backend(gm, inputs):
        raise RuntimeError("out of shared memory (the cause)")

    monkeypatch.setattr(mr, "compile_pieces",
                        lambda model, **kw: compile_pieces(model, backend=bad_backend))
    torch._dynamo.reset()
    _, llm = _generate_chunked(checkpoints("gla-2"), prompts(2, seed=6), True)
    error = llm.engine.runner.prefill_compile_error
    assert error.startswith("BackendCompilerFailed") and "out of shared memory (the cause)" in error


@pytest.mark.slow
def test_tensor_parallel_ranks_warm_their_prefill_blocks_alike():
    """Each rank's warm-up runs the layers' collectives, so every rank must warm with the
    same steps, even where the ranks' shards differ in size (an FFN width of 5 split 3 + 2:
    a warm-up length chosen from each rank's sizes put the ranks' all-reduces out of step)."""
    kw = dict(attention="gqa-2", device="cpu", dtype="fp32", page_size=8, max_num_seqs=2,
              memory_budget=1 << 23, tensor_parallel_size=2, model_overrides=dict(hidden_dim=5))
    sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    prompt = [[1, 2, 3, 4, 5, 6, 7]]
    compiled = LLM("tiny", compile_prefill=True, **kw).generate(prompt, sp)[0].token_ids
    assert compiled == LLM("tiny", compile_prefill=False, **kw).generate(prompt, sp)[0].token_ids


@pytest.mark.slow
def test_tensor_parallel_compiled_decode_matches_eager(checkpoints):
    """Compiled decode blocks on two tensor-parallel ranks (CPU processes), whose blocks defer
    their residual add by default (`DEFER_RESIDUAL`) and reduce the feed-forward's output
    before handing it on: the eager engine's greedy tokens."""
    from hwattn.models import compile as regional

    assert regional.DEFER_RESIDUAL  # (the ranks' processes read the same default)
    path = checkpoints("gla-2")
    eager, _ = _generate(path, False, tensor_parallel_size=2)
    compiled, _ = _generate(path, True, tensor_parallel_size=2)
    assert compiled == eager
    assert len({tuple(o) for o in eager}) > 1 and len(set(eager[0])) > 1  # not one token over
