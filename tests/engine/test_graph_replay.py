"""The CUDA-graph decode path, exercised on the CPU: static inputs, bucket padding and the
in-place plan refresh are the real code; only the capture itself is replaced by re-running
the recorded forward."""

import gc

import pytest
import torch

from hwattn.engine import LLM, SamplingParams
from hwattn.engine.model_runner import ModelRunner, StepInput, decode_buckets
from hwattn.engine.sampler import SamplingInput


class ReplayRunner(ModelRunner):
    def _record(self, forward):
        out = forward()
        self.recorded += 1

        def replay():
            self.replays += 1
            for buffer, value in zip(out, forward()):  # (logits, argmax)
                buffer.copy_(value)
        return replay, out


def with_replay(llm, query_lens):
    runner = llm.engine.runner
    runner.__class__ = ReplayRunner
    runner.recorded = runner.replays = 0
    runner._capture(query_lens)
    assert runner.graph_error is None, runner.graph_error
    assert gc.get_freeze_count() > 0  # a capture freezes the heap it leaves (freeze_heap)
    return runner


@pytest.fixture(autouse=True)
def _unfreeze():
    """The rest of the test session collects as usual."""
    yield
    gc.unfreeze()


def test_buckets():
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(1) == [1]


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_replayed_decode_matches_eager(checkpoints, speculative):
    path = checkpoints("gla-2")
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 1, 2, 3, 1], list(range(30, 70)), [5] * 9, [8, 9]]  # B = 4, 3, ...
    kw = dict(page_size=4, num_pages=200, max_model_len=96, max_num_seqs=6,
              speculative=speculative, num_speculative_tokens=3)
    # Eager decoding through the same checking backend: on a GPU "auto" picks another kernel,
    # whose rounding can flip a near-tie of these random weights.
    eager = LLM(path, cuda_graphs=False, **kw)
    eager.engine.runner.backend = PlanCheckingBackend()
    want = [o.token_ids for o in eager.generate(prompts, params)]
    llm = LLM(path, **kw)
    runner = with_replay(llm, (1, 4) if speculative else (1,))
    assert runner.recorded == len(decode_buckets(6)) * (2 if speculative else 1)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert runner.replays > 0
    llm.engine.check_invariants()


@pytest.mark.parametrize("speculative", [None, "ngram"])
def test_capture_at_the_models_whole_context(checkpoints, speculative):
    """With `max_model_len` the model's whole context (256 here), the engine's runner holds a
    few more token slots (room for drafts); the capture's placeholder sequences still end
    inside the model's positions. (They once ended one past it: the rope table's gather read
    out of bounds on a GPU, a device-side assert that left the engine unusable.)"""
    path = checkpoints("gqa-4")
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 30)), [5] * 9]
    kw = dict(page_size=16, num_pages=60, max_model_len=256, max_num_seqs=3,
              speculative=speculative, num_speculative_tokens=2)
    want = [o.token_ids for o in LLM(path, cuda_graphs=False, **kw).generate(prompts, params)]
    llm = LLM(path, **kw)
    assert llm.engine.runner.max_model_len > 256
    runner = with_replay(llm, (1, 3) if speculative else (1,))
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert runner.replays > 0
    llm.engine.check_invariants()


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_greedy_one_token_steps_take_their_tokens_from_the_graph(checkpoints, temperature):
    """A one-token graph also records each row's argmax (`_captured_step`): greedy steps take
    their tokens from it and launch no sampling of their own, with the tokens of eager
    decoding; sampled steps still go through the sampler."""
    path = checkpoints("gqa-4")
    params = SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True)
    prompts = [[1, 2, 3, 4], list(range(30, 50)), [5] * 9]
    kw = dict(page_size=4, num_pages=200, max_model_len=96, max_num_seqs=4)
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, **kw)
    runner = with_replay(llm, (1,))
    after_replay = []  # per sampler call: whether a graph replay had just left its argmax
    sample = runner._sample

    def spy(logits, sampling):
        after_replay.append(runner.graph_argmax is not None)
        return sample(logits, sampling)

    runner._sample = spy
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want and runner.replays > 0
    if temperature == 0:
        assert not any(after_replay)  # prompts only: every replayed step used the graph's
    else:
        assert sum(after_replay) >= runner.replays - 1
    llm.engine.check_invariants()


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_greedy_verify_steps_take_their_tokens_from_the_graph(checkpoints, speculative):
    """A verify graph records the argmax of every position (`_captured_step`); greedy verify
    steps read it instead of taking an argmax of their own: with the logits they are handed
    blanked after each replay, the outputs still equal eager decoding's."""
    path = checkpoints("gqa-4")
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 1, 2, 3, 1], list(range(30, 50)), [5] * 9]
    kw = dict(page_size=4, num_pages=200, max_model_len=96, max_num_seqs=4,
              speculative="ngram" if speculative == "ngram" else path,
              num_speculative_tokens=3)
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, **kw)
    runner = with_replay(llm, (1, 4))
    execute, blanked = runner.execute, []

    def blank_replayed(step):
        logits = execute(step)
        if runner.graph_argmax is not None and runner.graph_argmax.dim() == 2:
            blanked.append(len(logits))
            return torch.zeros_like(logits)  # an argmax of these accepts no draft
        return logits

    runner.execute = blank_replayed
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert blanked and got == want
    assert llm.engine.counters["accepted_tokens"] > 0
    llm.engine.check_invariants()


@pytest.fixture
def replay_runner(checkpoints):
    from hwattn.engine.loader import build_model

    model = build_model(checkpoints("gqa-4"), dtype=torch.float32, device="cpu")
    runner = ModelRunner(model, num_pages=16, page_size=4, max_model_len=32, max_num_seqs=4,
                         cuda_graphs=False)
    runner.__class__ = ReplayRunner
    runner.recorded = runner.replays = 0
    runner._capture((1, 4))
    assert runner.graph_error is None
    yield runner
    gc.unfreeze()


GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=0.9, top_k=20, seed=1, ignore_eos=True)


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("bad_row", [False, True])
def test_replayed_verify_step_rows_match_eager(replay_runner, on_device, bad_row):
    """Three rows in the bucket of four (argmax[:batch]), greedy rows around a sampled one; with
    `bad_row` the sampled row's settings break the batch, so every row is verified alone
    (`by_rows`: the greedy rows read `graph_best[[i]]`). Host drafts and device drafts (a draft
    model's) alike: the replayed step's results equal the eager step's."""
    runner = replay_runner
    tables = [[1, 2], [3, 4], [5, 6]]
    rows = [[5, 6, 7, 8], [6, 7, 8, 9], [7, 8, 9, 5]]
    tokens = torch.tensor(rows) if on_device else rows
    runner.execute(StepInput("prefill", [[1, 2, 3], [4, 5, 6], [7, 8, 9]], [0] * 3, tables))
    sampling = SamplingInput.of([GREEDY, SAMPLED, GREEDY], [1, 2, 3], [4, 4, 4])
    if bad_row:
        sampling.top_k[1] = 1 << 64
    step = StepInput("decode", tokens, [3, 3, 3], tables)
    with runner.eager():
        want = runner.verify_step(step, sampling)
        assert runner.graph_argmax is None
    got = runner.verify_step(step, sampling)
    assert runner.graph_argmax is not None and runner.graph_argmax.shape == (3, 4)
    assert isinstance(got[1], str) == bad_row
    assert got == want


def test_public_graph_seams_the_benchmarks_use(checkpoints):
    """`graph_for`, `eager()` and `BlockManager.borrow_pages`, through the benchmarks that
    use them: a replayed step agrees with the same step run eagerly."""
    from hwattn.bench.engine import decode_breakdown, graph_consistency

    llm = LLM(checkpoints("gqa-4"), page_size=4, num_pages=120, max_model_len=96, max_num_seqs=6)
    runner = with_replay(llm, (1,))
    assert runner.cuda_graphs
    assert runner.graph_for(3, 1) is runner.graphs[(4, 1)][0]  # the bucket of 4 serves 3 rows
    assert runner.graph_for(3, 2) is None  # no graph captured for L_q = 2
    with runner.eager():
        assert not runner.cuda_graphs and runner.graph_for(3, 1) is None
    assert runner.graph_for(3, 1) is not None
    free = llm.engine.block_manager.num_free_pages
    check = graph_consistency(llm.engine, batch=3, context=20)
    assert check["rel_max_diff"] < 1e-5 and check["argmax_agreement"] == 1.0
    replays = runner.replays
    step = decode_breakdown(llm.engine, 3, 40, iters=2)
    assert step["cuda_graphs"] and runner.replays > replays
    assert step["allreduce_s"] < 1e-3  # one process: no collectives to make
    assert llm.engine.block_manager.num_free_pages == free
    llm.engine.check_invariants()


def test_host_block_table_equals_a_table_built_afresh():
    """Kept from step to step, the host table equals the one built from the step's lists,
    whatever happened to them in between: pages appended or popped (speculative rollback),
    a row taken by another sequence, fewer rows, then more again."""
    import random

    import numpy as np

    from hwattn.engine.block_manager import NULL_PAGE
    from hwattn.engine.staging import HostBlockTable

    rng = random.Random(0)
    rows, width = 8, 12
    table = HostBlockTable(rows, width)
    lists = [[rng.randrange(1, 100) for _ in range(rng.randrange(0, 6))] for _ in range(5)]
    for _ in range(300):
        op = rng.randrange(6)
        i = rng.randrange(len(lists)) if lists else 0
        if op == 0 and lists and len(lists[i]) < width:
            lists[i].append(rng.randrange(1, 100))
        elif op == 1 and lists and lists[i]:
            lists[i].pop()
        elif op == 2 and lists:
            lists[i] = [rng.randrange(1, 100) for _ in range(rng.randrange(0, width + 1))]
        elif op == 3 and len(lists) > 1:
            lists.pop(i)
        elif op == 4 and len(lists) < rows:
            lists.insert(i, [rng.randrange(1, 100) for _ in range(rng.randrange(0, 4))])
        elif op == 5 and lists and lists[i]:
            lists[i][rng.randrange(len(lists[i]))] = 7  # a page replaced mid-row
        size = rng.randrange(max(1, len(lists)), rows + 1)
        got = table.update(lists, size)
        want = np.full((size, width), NULL_PAGE, dtype=np.int32)
        for row, pages in zip(want, lists):
            row[:len(pages)] = pages
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="row 0 has 13 pages"):
        table.update([list(range(1, 14))], 1)
    with pytest.raises(ValueError, match="rows must lie"):
        table.update([[1]] * 3, 2)


def _gpu_requests(n: int, tokens: int, more: int, num_pages: int):
    """The GPU tests' requests: n prompts of 37 + 6·i tokens, greedy, of `tokens` + `more`·i
    output tokens each (batch mates finish at different steps), and the `LLM` keywords (fp32
    on the GPU, pages of 16, up to 8 sequences)."""
    prompts = [list(range(3 + i, 40 + 7 * i)) for i in range(n)]
    params = [SamplingParams(max_tokens=tokens + more * i, temperature=0, ignore_eos=True)
              for i in range(n)]
    kw = dict(device="cuda", dtype="fp32", page_size=16, num_pages=num_pages,
              max_model_len=256, max_num_seqs=8)
    return prompts, params, kw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("launch_thread", [False, True])
@pytest.mark.parametrize("lag", [False, True], ids=["in-step", "device-behind"])
def test_captured_decode_on_the_gpu_matches_eager(checkpoints, launch_thread, lag):
    """Real graphs, staged inputs, fed tokens and the pinned ring of sampled tokens: greedy
    tokens equal those of the same engine decoding eagerly, as batch mates finish early.
    lag: the device held about 10 ms behind the host before every replay (`torch.cuda._sleep`
    queued ahead of the graph), so the host writes the next steps' staging slots while the
    copies out of them are still queued, which only the slots' own waits make safe."""
    path = checkpoints("gqa-4")
    prompts, params, kw = _gpu_requests(7, 12, 9, num_pages=160)
    want = [o.token_ids for o in LLM(path, cuda_graphs=False, **kw).generate(prompts, params)]
    llm = LLM(path, launch_thread=launch_thread, **kw)
    runner = llm.engine.runner
    assert runner.cuda_graphs, runner.graph_error
    for key, (replay, out) in list(runner.graphs.items()) if lag else ():
        def lagging(replay=replay):
            torch.cuda._sleep(20_000_000)  # clock cycles: about 10 ms at 2 GHz
            replay()
        runner.graphs[key] = (lagging, out)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    llm.engine.check_invariants()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["gla-2", "mla"])
def test_composed_absorptions_on_the_gpu_decode_as_the_separate_products(checkpoints, variant,
                                                                        monkeypatch):
    """HWATTN_COMPOSE_ABSORB on the GPU (fp32): compiled blocks in captured graphs decode
    the greedy tokens of the separate products run eagerly."""
    from hwattn.layers import mla

    path = checkpoints(variant)
    prompts, params, kw = _gpu_requests(5, 10, 5, num_pages=96)
    want = [o.token_ids for o in LLM(path, cuda_graphs=False, **kw).generate(prompts, params)]
    monkeypatch.setattr(mla, "COMPOSE_ABSORPTIONS", True)
    llm = LLM(path, compile_decode=True, **kw)
    assert llm.engine.runner.cuda_graphs, llm.engine.runner.graph_error
    assert llm.engine.runner.composed_layers == len(llm.engine.model.layers)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    llm.engine.check_invariants()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
@pytest.mark.parametrize("variant", ["gta-4", "gla-2", "mla"])
def test_states_finished_in_the_cache_write_on_the_gpu_decode_as_before(checkpoints, variant,
                                                                       monkeypatch):
    """The Triton store that norms and rotates the states (`store_states_kernel`,
    HWATTN_FUSED_STATE_STORE=1) in compiled, captured steps whose blocks defer their last
    residual add (HWATTN_DEFER_RESIDUAL=1), fp32, decodes the greedy tokens of eager steps
    that norm and rotate the states first."""
    from hwattn.layers import base
    from hwattn.models import compile as regional

    path = checkpoints(variant)
    prompts, params, kw = _gpu_requests(5, 10, 5, num_pages=96)
    monkeypatch.setattr(base, "FUSED_STATE_STORE", "0")
    want = [o.token_ids for o in LLM(path, cuda_graphs=False, **kw).generate(prompts, params)]
    monkeypatch.setattr(base, "FUSED_STATE_STORE", "1")
    monkeypatch.setattr(regional, "DEFER_RESIDUAL", True)
    llm = LLM(path, compile_decode=True, **kw)
    assert llm.engine.runner.cuda_graphs, llm.engine.runner.graph_error
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    llm.engine.check_invariants()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU")
def test_captured_latent_decode_on_the_gpu_reads_its_staged_plan(checkpoints):
    """GLA-2 in bf16 on the GPU's own backend (the Hopper kernels on an H100/H200, whose
    plans hold one part per launch shape): replayed steps at lengths that change every plan's
    items, each through the other staging slot, agree with the same steps run eagerly."""
    from hwattn.bench.engine import graph_consistency

    llm = LLM(checkpoints("gla-2"), device="cuda", dtype="bf16", page_size=64, num_pages=200,
              max_model_len=256, max_num_seqs=8)
    runner = llm.engine.runner
    assert runner.cuda_graphs, runner.graph_error
    for batch, context in ((5, 60), (8, 200), (3, 130)):
        check = graph_consistency(llm.engine, batch=batch, context=context)
        assert check["rel_max_diff"] < 2e-2, (batch, context, check)
    llm.engine.check_invariants()


class PlanCheckingBackend:
    """The PyTorch backend with a Hopper-style plan (two launch shapes, so two `DecodePlan`
    parts) whose every decode call checks the plans it is handed, as a kernel would read them,
    against plans made afresh from the step's lengths."""

    KEYS = ((1, 2, 256), (2, 1, 64))  # (head blocks, programs per SM, shortest piece)

    def __new__(cls):
        from hwattn.ops.backends.hopper_backend import HopperPlan
        from hwattn.ops.backends.torch_backend import TorchBackend
        from hwattn.ops.plan import plan_decode

        class Checking(TorchBackend):
            name = "torch+hopper-plan"
            checked = 0

            def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None,
                     out=None, reserve_pieces=False):
                if out is not None:
                    out.refresh(cache_seqlens.cpu())
                    return out
                return HopperPlan(cache_seqlens.cpu().clone(), num_heads_kv, query_len,
                                  page_size, torch.device(device or "cpu"), 8,
                                  reserve_pieces=reserve_pieces)

            def plan_parts(self, plan):
                return list(plan.plans.values()) if isinstance(plan, HopperPlan) else []

            def check_plan(self, plan, batch, capacity):
                return False  # the lengths are read and checked on the CPU

            def _check(self, plan, cache_seqlens):
                if not isinstance(plan, HopperPlan):
                    return
                parts = [plan.for_launch(*key) for key in self.KEYS]  # as the kernels ask
                lengths = cache_seqlens.cpu()
                if not torch.equal(plan.lengths, lengths):
                    return  # (a capture's forwards run a plan made for the longest context)
                for key, got in zip(self.KEYS, parts):
                    want = plan_decode(lengths, num_heads_kv=plan.num_heads_kv,
                                       query_len=plan.query_len, page_size=plan.page_size,
                                       num_sms=8, head_blocks=key[0], programs_per_sm=key[1],
                                       min_piece=key[2])
                    total = int(want.splits[:, 1].sum())
                    assert torch.equal(got.splits.cpu(), want.splits)
                    assert torch.equal(got.items[:total].cpu(), want.items[:total])
                    assert (got.items[total:, 0] == -1).all()
                self.checked += 1

            def run_decode(self, q, k_cache, v_cache, block_table, cache_seqlens, **kw):
                self._check(kw["plan"], cache_seqlens)
                return super().run_decode(q, k_cache, v_cache, block_table, cache_seqlens, **kw)

            def run_decode_tied(self, q_nope, q_rope, kv_cache, rope_cache, block_table,
                                cache_seqlens, **kw):
                self._check(kw["plan"], cache_seqlens)
                return super().run_decode_tied(q_nope, q_rope, kv_cache, rope_cache,
                                               block_table, cache_seqlens, **kw)

        Checking.KEYS = cls.KEYS
        return Checking()


@pytest.mark.parametrize("variant, speculative", [("gqa-4", None), ("gla-2", None),
                                                  ("gla-2", "ngram")])
def test_replayed_plans_reach_the_kernels_through_the_staged_upload(checkpoints, variant,
                                                                    speculative):
    """A captured step's plan (here two launch shapes of a Hopper plan) is refreshed into the
    staging slot and carried by the step's one upload: at every replayed step, in every layer,
    the plans the decode op reads equal plans made afresh from the step's lengths, across
    buckets (rows finishing early) and both staging slots; tokens equal eager decoding's."""
    path = checkpoints(variant)
    params = [SamplingParams(max_tokens=6 + 5 * i, temperature=0, ignore_eos=True)
              for i in range(5)]
    prompts = [list(range(3 + i, 20 + 9 * i)) for i in range(5)]  # lengths 17 .. 53
    kw = dict(page_size=4, num_pages=200, max_model_len=96, max_num_seqs=6,
              speculative=speculative, num_speculative_tokens=3)
    # Eager decoding through the same checking backend: on a GPU "auto" picks another kernel,
    # whose rounding can flip a near-tie of these random weights.
    eager = LLM(path, cuda_graphs=False, **kw)
    eager.engine.runner.backend = PlanCheckingBackend()
    want = [o.token_ids for o in eager.generate(prompts, params)]
    llm = LLM(path, **kw)
    runner = llm.engine.runner
    runner.backend = PlanCheckingBackend()
    query_lens = (1, 4) if speculative else (1,)
    runner = with_replay(llm, query_lens)
    for t in query_lens:  # largest bucket's plan first, then the smaller ones', then inputs
        names = list(runner.stages[t]._offsets)
        assert names[:2] == ["plan6.0", "plan6.1"] and names[-3:] == ["ids", "lens", "table"]
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want
    assert runner.replays > 0 and runner.backend.checked >= runner.replays
    llm.engine.check_invariants()


class FailingRunner(ReplayRunner):
    """A capture that fails at its third graph, after the staged inputs and plans exist."""

    def _record(self, forward):
        if self.recorded == 2:
            raise RuntimeError("capture failed here")
        return super()._record(forward)


def test_a_failed_capture_decodes_eagerly_and_keeps_none_of_its_buffers(checkpoints):
    """A capture failing part-way leaves decoding eager, exact, and holds none of the static
    inputs, staging slots, plans or graph pool made for the graphs (device memory on a GPU)."""
    path = checkpoints("gqa-4")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 20)), [7, 8, 9]]
    kw = dict(page_size=4, num_pages=100, max_model_len=64, max_num_seqs=6)
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, **kw)
    runner = llm.engine.runner
    runner.__class__ = FailingRunner
    runner.recorded = runner.replays = 0
    runner._capture((1,))
    assert runner.graph_error == "RuntimeError: capture failed here" and not runner.cuda_graphs
    assert not (runner.static or runner.stages or runner.host_tables or runner.plans
                or runner.staged_plans) and runner._pool is None
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert runner.replays == 0
    llm.engine.check_invariants()


def eager_then_replayed(path, backend, prompts, params, kw):
    """Greedy tokens of `prompts` decoded eagerly through `backend()`, then an engine on the
    same backend with its one-token decode graphs captured (`with_replay`): (tokens, llm,
    runner)."""
    eager = LLM(path, cuda_graphs=False, **kw)
    eager.engine.runner.backend = backend()
    want = [o.token_ids for o in eager.generate(prompts, params)]
    llm = LLM(path, **kw)
    llm.engine.runner.backend = backend()
    return want, llm, with_replay(llm, (1,))


@pytest.mark.parametrize("variant", ["gla-2", "mla"])
def test_a_captured_full_bucket_cuts_a_sequence_far_longer_than_the_rest(checkpoints, variant):
    """A bucket whose rows fill the GPU one piece each (here the 8-SM plans' second launch
    shape, at B = 4, for a model of one or two latent heads) is captured on even placeholder lengths, which need no pieces. Its plan
    keeps room for them: a replayed step with one sequence far longer than the rest cuts it,
    as a plan made afresh for that step does (the checking backend compares them in every
    layer). Captured without room, the long sequence stayed one program's work."""
    path = checkpoints(variant)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 153))] + [[5 + i, 6, 7, 8, 9] for i in range(3)]
    kw = dict(page_size=4, num_pages=200, max_model_len=192, max_num_seqs=4)
    want, llm, runner = eager_then_replayed(path, PlanCheckingBackend, prompts, params, kw)
    cut = []
    check = runner.backend._check

    def spy(plan, cache_seqlens):
        check(plan, cache_seqlens)
        cut.append(max(p.max_pieces for p in plan.plans.values()))

    runner.backend._check = spy
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want and runner.replays > 0
    assert max(cut) > 1  # the long sequence was cut at some replayed step
    assert runner.backend.checked >= runner.replays
    llm.engine.check_invariants()


def test_a_backend_whose_plan_predates_reserve_pieces_still_captures(checkpoints):
    """A backend registered from outside with `plan` as documented before `reserve_pieces`
    existed: the capture calls it without the keyword (it failed on it, and the engine then
    decoded eagerly for good), and replayed steps decode as eager ones."""
    from hwattn.ops.backends.torch_backend import TorchBackend
    from hwattn.ops.plan import plan_decode

    class Older(TorchBackend):
        name = "torch+older-plan"

        def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None,
                 out=None):
            plan = plan_decode(cache_seqlens, num_heads_kv=num_heads_kv, query_len=query_len,
                               page_size=page_size, out=out)
            return plan if out is not None else plan.to(device or cache_seqlens.device)

    path = checkpoints("gqa-4")
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 30)), [5] * 9]
    kw = dict(page_size=4, num_pages=100, max_model_len=64, max_num_seqs=2)
    # (with_replay asserts that the capture did not fail)
    want, llm, runner = eager_then_replayed(path, Older, prompts, params, kw)
    assert [o.token_ids for o in llm.generate(prompts, params)] == want and runner.replays > 0
