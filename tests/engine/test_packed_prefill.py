"""Prefill and mixed steps as one packed variable-length forward through the paged prefill op:
greedy output equals a decoder that recomputes the whole sequence without any cache, for every
variant, through chunked prefill, prefix-cache hits and mixed steps; the runner runs one forward
per step; the Triton kernels (interpreted on CPU) give the reference backend's tokens."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from hwattn.engine import LLM, SamplingParams  # noqa: E402
from hwattn.engine.model_runner import StepInput  # noqa: E402
from tests.engine.conftest import step_to_completion  # noqa: E402

DEVICE = "cuda"
VARIANTS = ["mha", "mqa", "gqa-2", "gta-4", "mla", "gla-2"]


def shared_prefix_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts of 3-40 tokens, half of them opening with one 17-token prefix."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, 2048, (17,), generator=g).tolist()
    out = []
    for i in range(8):
        tail = torch.randint(0, 2048, (int(torch.randint(3, 24, (1,), generator=g)),),
                             generator=g).tolist()
        out.append(prefix + tail if i % 2 else tail)
    return out


def uncached_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by the training forward over the whole sequence at every step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefix_cached_mixed_greedy_equals_uncached_forward(checkpoints, variant):
    ps = shared_prefix_prompts()
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    llm = LLM(checkpoints(variant), dtype="fp64", page_size=4, max_num_seqs=3, num_pages=120,
              max_num_batched_tokens=10, enable_mixed_batches=True)
    engine = llm.engine
    outs = step_to_completion(engine, ps, params)
    for p, out in zip(ps, outs):
        assert out.token_ids == uncached_greedy(engine.model, p, 7)
    stats = engine.stats()
    assert stats["mixed_steps"] > 0 and stats["prefix_hit_pages"] > 0, stats
    assert engine.block_manager.num_used_pages == 0


def _count_forwards(runner) -> list:
    calls, forward = [], runner.model.forward

    def counted(tokens, *args, **kw):
        calls.append(tuple(tokens.shape))
        return forward(tokens, *args, **kw)

    runner.model.forward = counted
    return calls


def test_one_forward_per_prefill_and_mixed_step(checkpoints, monkeypatch):
    """Rows of any chunk length, cached prefix or not, and the decode rows of a mixed step run
    as one forward (the decode rows attending through the decode op); each row's logits equal
    those of the row run alone."""
    llm = LLM(checkpoints("gla-2"), dtype="fp64", page_size=4, num_pages=80,
              overlap_scheduling=False)
    runner = llm.engine.runner
    tables = [list(range(1, 6)), list(range(6, 11)), list(range(11, 16))]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 2048, (3, 20), generator=g).tolist()

    def prefill(rows, cached, lens, need):
        return runner.execute(StepInput("prefill", [tokens[r][c:c + n] for r, c, n in zip(rows, cached, lens)],
                                        cached, [tables[r] for r in rows], need_logits=need))

    prefill([0, 1], [0, 0], [9, 4], [False, False])  # two fresh rows of different lengths
    calls = _count_forwards(runner)
    packed = prefill([0, 1, 2], [9, 4, 0], [5, 1, 11], [True, False, True])
    assert calls == [(1, 17)]
    step = StepInput("mixed", [[tokens[0][14]], [tokens[1][5]], tokens[2][11:18]], [14, 5, 11],
                     [tables[0], tables[1], tables[2]], need_logits=[True, True, False],
                     num_decode=2)
    family = type(runner.model.layers[0].attn)
    decoded, decode = [], family.decode

    def spy(self, q, cache, meta):
        decoded.append(tuple(q[0].shape[:2]))
        return decode(self, q, cache, meta)

    monkeypatch.setattr(family, "decode", spy)
    mixed = runner.execute(step)
    assert calls == [(1, 17), (1, 9)] and mixed.shape[0] == 2
    assert decoded == [(2, 1)] * len(runner.model.layers)  # the decode rows, through the decode op
    # The same rows, one at a time, over a cache written the same way.
    alone = [prefill([r], [c], [n], [True])[0] for r, c, n in ((0, 9, 5), (2, 0, 11))]
    torch.testing.assert_close(packed, torch.stack(alone), rtol=1e-9, atol=1e-9)
    alone = [prefill([r], [c], [1], [True])[0] for r, c in ((0, 14), (1, 5))]
    torch.testing.assert_close(mixed, torch.stack(alone), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("variant", ["gqa-2", "gla-2"])
def test_triton_backend_gives_the_reference_backends_tokens(checkpoints, variant):
    ps = shared_prefix_prompts(seed=1)[:5]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(checkpoints(variant), dtype="fp32", page_size=4, max_num_seqs=3, num_pages=120,
                  max_num_batched_tokens=10, enable_mixed_batches=True, backend=backend)
        outs[backend] = [o.token_ids for o in step_to_completion(llm.engine, ps, params)]
        assert llm.engine.stats()["mixed_steps"] > 0
    assert outs["triton"] == outs["torch"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU kernels need a GPU")
@pytest.mark.parametrize("variant, dtype", [("gqa-2", "fp32"), ("gla-2", "fp32"), ("mla", "fp32"),
                                            ("gla-2", "bf16")])
def test_mixed_steps_on_the_gpu_match_prefill_first(checkpoints, variant, dtype):
    """On the GPU's backend, mixed steps (decode rows through the decode op, prompt chunks
    through the prefill path) give the greedy tokens of prefill-first steps, and leak no page.
    (bf16: the decode and prefill kernels round differently, so only the first tokens, sampled
    by prompt rows in both runs, must agree.)"""
    path = checkpoints(variant)
    prompts = shared_prefix_prompts(seed=3)
    params = SamplingParams(max_tokens=7, temperature=0, ignore_eos=True)
    kw = dict(device=DEVICE, dtype=dtype, page_size=16, num_pages=64, max_num_seqs=4,
              max_num_batched_tokens=24, cuda_graphs=False, compile_prefill=False)
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, enable_mixed_batches=True, **kw)
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert llm.engine.stats()["mixed_steps"] > 0
    llm.engine.check_invariants()
    assert llm.engine.block_manager.num_used_pages == 0
    if dtype == "fp32":
        assert got == want
    else:
        assert [g[0] for g in got] == [w[0] for w in want]


def test_kernel_warm_up_covers_chunk_and_mixed_shapes(checkpoints, monkeypatch):
    """`ModelRunner.warm_kernels` (run at start-up on a GPU) runs, in the null page, chunks of
    1, 2, 4 ... tokens over short and the longest contexts and mixed steps of 1 to 16 decode
    rows (and the decode buckets') over the longest context the model's positions allow; it
    takes no page, leaves greedy output as it was, and raises what fails in it (on the CPU a
    position past the RoPE table raises too)."""
    path = checkpoints("gla-2")
    kw = dict(dtype="fp64", page_size=4, num_pages=80, max_num_seqs=6,
              max_num_batched_tokens=40, enable_mixed_batches=True)  # the model's max_seq_len
    prompts = shared_prefix_prompts(seed=5)[:4]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in LLM(path, **kw).generate(prompts, params)]
    llm = LLM(path, **kw)
    runner, steps = llm.engine.runner, []
    execute = runner.execute

    def spy(step):
        steps.append((step.kind, step.num_decode, [len(t) for t in step.tokens], step.num_cached))
        return execute(step)

    monkeypatch.setattr(runner, "execute", spy)
    runner.warm_kernels()
    prefills = [(lens[0], cached[0]) for kind, _, lens, cached in steps if kind == "prefill"]
    long = llm.engine.model.config.max_seq_len - 1  # the last position the RoPE table holds
    assert runner.max_model_len > long + 1  # (the runner's room for one more token)
    assert prefills == [(n, c) for n in (1, 2, 4, 8, 16, 32) for c in sorted({n, long - n})]
    mixed = [(nd, cached[:nd]) for kind, nd, _, cached in steps if kind == "mixed"]
    assert mixed == [(nd, [long] * nd) for nd in (1, 2, 3, 4, 5)]  # up to max_num_seqs - 1
    assert llm.engine.block_manager.num_used_pages == 0
    assert [o.token_ids for o in llm.generate(prompts, params)] == want

    steps.clear()
    runner.mixed_steps = False  # an engine that never runs mixed steps warms none
    runner.warm_kernels()
    assert steps and all(kind == "prefill" for kind, *_ in steps)
    assert LLM(path, speculative="ngram", **kw).engine.runner.mixed_steps is False
    assert LLM(path, **{**kw, "enable_mixed_batches": False}).engine.runner.mixed_steps is False

    def fail(step):
        raise RuntimeError("no kernel for you")

    monkeypatch.setattr(runner, "execute", fail)
    with pytest.raises(RuntimeError, match="no kernel for you"):
        runner.warm_kernels()
