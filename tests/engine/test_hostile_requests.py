"""Hostile use of the engine's Python API: construction arguments that make no sense and
requests that cannot be honoured are refused with a ValueError naming the argument, before
anything is built or queued, and a refused request leaves the engine (its queue, its pages)
as it was."""

import dataclasses

import pytest
import torch

from hwattn.engine import LLM, EngineConfig, SamplingParams
from hwattn.engine.sampling_params import ParamError

TINY = dict(attention="gla-2", device="cpu", page_size=8, num_pages=120, seed=0,
            model_overrides=dict(max_seq_len=128, n_layers=1))
GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM("tiny", **TINY)


def untouched(engine) -> None:
    """Nothing queued, no page held, no leak."""
    engine.check_invariants()
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_used_pages == 0


# EngineConfig / LLM(...) arguments.
@pytest.mark.parametrize("name,value", [
    ("page_size", 2.5), ("page_size", "8"), ("page_size", True), ("max_num_seqs", 1.5),
    ("max_num_seqs", True), ("max_num_batched_tokens", "64"), ("tensor_parallel_size", 1.5),
    ("data_parallel_size", True), ("num_pages", 100.5), ("num_pages", "100"),
    ("seed", "x"), ("seed", 1.5), ("seed", 1 << 64),
])
def test_integer_settings_refuse_anything_but_integers(name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig(model="tiny", **{name: value})


@pytest.mark.parametrize("value", [2.5, True])
def test_num_speculative_tokens_is_an_integer(value):
    # 2.5 built an engine whose every generate() failed in the n-gram drafter's slicing;
    # True quietly meant k = 1.
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(model="tiny", speculative="ngram", num_speculative_tokens=value)


def test_integer_settings_take_numpy_integers():
    np = pytest.importorskip("numpy")
    config = EngineConfig(model="tiny", page_size=np.int64(16), max_num_seqs=np.int32(4))
    assert (config.page_size, config.max_num_seqs) == (16, 4)
    assert type(config.page_size) is int and type(config.max_num_seqs) is int


@pytest.mark.parametrize("value", [0, -5, 1, 2.5, "128", True])
def test_max_model_len_is_a_context_that_can_hold_a_request(value):
    # 0 quietly meant the model's own context; -5, 1 and 2.5 built an engine that refused
    # every prompt.
    with pytest.raises(ValueError, match="max_model_len"):
        EngineConfig(model="tiny", max_model_len=value)
    assert EngineConfig(model="tiny", max_model_len=2).max_model_len == 2


@pytest.mark.parametrize("k, max_model_len", [(3, 4), (4, 4), (100, 8), (1, 2)])
def test_num_speculative_tokens_must_leave_room_to_speculate(k, max_model_len):
    """A verify step holds a sequence (at least its prompt's token and the first sampled one)
    plus k drafts within the context. With k >= max_model_len - 1 no step could ever verify:
    the engine was built and quietly never speculated (0 draft tokens)."""
    with pytest.raises(ValueError, match=r"num_speculative_tokens.*max_model_len") as err:
        EngineConfig(model="tiny", speculative="ngram", num_speculative_tokens=k,
                     max_model_len=max_model_len)
    assert f"num_speculative_tokens={k}" in str(err.value)
    # Without a drafter k means nothing (it becomes 0): nothing to refuse.
    assert EngineConfig(model="tiny", num_speculative_tokens=k,
                        max_model_len=max_model_len).num_speculative_tokens == 0


def test_num_speculative_tokens_is_checked_against_the_models_context():
    """max_model_len left to the model (max_seq_len 128 here): checked once it is known."""
    with pytest.raises(ValueError, match=r"num_speculative_tokens=127.*max_model_len 128"):
        LLM("tiny", **TINY, speculative="ngram", num_speculative_tokens=127)


def test_the_largest_num_speculative_tokens_allowed_speculates():
    """k = max_model_len - 2: a one-token prompt's first decode step verifies k drafts."""
    llm = LLM("tiny", **TINY, speculative="ngram", num_speculative_tokens=6, max_model_len=8)
    out = llm.generate([[1]], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 7 and out.error is None
    assert llm.engine.counters["draft_tokens"] > 0
    untouched(llm.engine)


@pytest.mark.parametrize("value", ["", 5])
def test_speculative_names_a_drafter(value):
    # "" quietly turned speculation off (with num_speculative_tokens kept at 3).
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(model="tiny", speculative=value)


@pytest.mark.parametrize("name", ["enable_prefix_caching", "cuda_graphs", "compile_decode",
                                  "compile_prefill", "enable_mixed_batches", "overlap_scheduling",
                                  "launch_thread", "prefill_graphs"])
def test_switches_are_true_or_false(name):
    # "no" read as True.
    with pytest.raises(ValueError, match=name):
        EngineConfig(model="tiny", **{name: "no"})
    with pytest.raises(ValueError, match=name):
        EngineConfig(model="tiny", **{name: 0})


@pytest.mark.parametrize("value", ["1G", True, float("nan"), 0, -1, [1]])
def test_memory_budget_is_bytes_or_a_fraction(value):
    with pytest.raises(ValueError, match="memory_budget"):
        EngineConfig(model="tiny", memory_budget=value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_dtype_must_be_floating_point(dtype):
    with pytest.raises(ValueError, match="dtype"):
        LLM("tiny", **{**TINY, "dtype": dtype})


def test_device_must_be_one_the_engine_runs_on():
    # "meta" built an engine whose first step failed in Tensor.item().
    with pytest.raises(ValueError, match="device"):
        LLM("tiny", **{**TINY, "device": "meta"})
    if not torch.cuda.is_available():  # an AssertionError from deep inside torch before
        with pytest.raises(ValueError, match="CUDA is not available"):
            LLM("tiny", **{**TINY, "device": "cuda"})


def test_model_overrides_are_refused_for_checkpoints(checkpoints):
    # They were ignored: the checkpoint's own shape was served.
    path = checkpoints("gla-2")
    with pytest.raises(ValueError, match="model_overrides"):
        LLM(path, page_size=8, num_pages=120, model_overrides=dict(max_seq_len=64))


def test_build_model_refuses_model_overrides_for_checkpoints(checkpoints):
    # LLM checks them through model_config; build_model (public, and what the tensor-parallel
    # workers call) dropped them without a word and built the checkpoint's own shape.
    from hwattn.engine.loader import build_model

    with pytest.raises(ValueError, match="model_overrides"):
        build_model(checkpoints("gla-2"), device="cpu", overrides=dict(max_seq_len=64))


def test_a_draft_model_must_cover_the_context(checkpoints, tmp_path):
    """A draft whose context is shorter than the engine's failed every step once a sequence
    passed it (on the CPU; on a GPU it would index past its RoPE tables)."""
    from hwattn.models.checkpoint import load_checkpoint, save_checkpoint

    path = checkpoints("gla-2")
    draft = load_checkpoint(path)
    draft.layers = draft.layers[:1]
    draft.config = dataclasses.replace(draft.config, n_layers=1, max_seq_len=32)
    save_checkpoint(draft, tmp_path / "draft")
    with pytest.raises(ValueError, match="max_seq_len 32.*max_model_len"):
        LLM(path, page_size=8, num_pages=120, speculative=str(tmp_path / "draft"))
    # A context that fits the draft is fine.
    llm = LLM(path, page_size=8, num_pages=120, speculative=str(tmp_path / "draft"),
              max_model_len=32)
    out = llm.generate([[1, 2, 3, 1, 2, 3]], SamplingParams(max_tokens=40, temperature=0,
                                                            ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.error is None
    untouched(llm.engine)


# Requests.
@pytest.mark.parametrize("params", [
    dict(stop_token_ids=[1 << 20]), dict(stop_token_ids=[5, 1 << 20], min_tokens=2),
])
def test_stop_token_ids_must_be_in_the_vocabulary(llm, params):
    """Out of the vocabulary a stop id could never match (ignored), and with min_tokens the
    request failed in its first step with an IndexError from the sampler's ban."""
    engine = llm.engine
    bad = SamplingParams(max_tokens=3, **params)
    with pytest.raises(ParamError, match=r"stop_token_ids.*\[0, 2048\)") as err:
        engine.add_request([1, 2, 3], bad)
    assert err.value.param == "stop_token_ids"
    with pytest.raises(ValueError, match=r"prompts\[1\].*stop_token_ids"):
        llm.generate([[1, 2, 3], [4, 5, 6]], [GREEDY, bad])
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.check_params(bad)
    untouched(engine)
    ok = SamplingParams(max_tokens=3, stop_token_ids=[2047], min_tokens=1)
    assert llm.generate([[1, 2, 3]], ok)[0].error is None


@pytest.mark.parametrize("name", ["logprobs", "prompt_logprobs"])
def test_logprobs_beyond_the_vocabulary_are_refused(llm, name):
    """They were cut to the vocabulary's size without a word."""
    engine = llm.engine
    with pytest.raises(ParamError, match=name) as err:
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, **{name: 2049}))
    assert err.value.param == name
    untouched(engine)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1, **{name: 2048}))[0]
    assert out.error is None


def test_request_ids_must_match_the_prompts(llm):
    """A shorter list of ids quietly dropped the prompts past its end."""
    engine = llm.engine
    with pytest.raises(ValueError, match="2 request_ids for 3 prompts"):
        engine.add_requests([[1, 2], [3, 4], [5, 6]], [GREEDY] * 3, request_ids=["a", "b"])
    with pytest.raises(ValueError, match="2 request_ids for 1 prompts"):
        engine.add_requests([[1, 2]], [GREEDY], request_ids=["a", "b"])
    untouched(engine)
    assert engine.add_requests([[1, 2], [3, 4]], [GREEDY] * 2, request_ids=["a", None])[0] == "a"
    while engine.has_unfinished():
        engine.step()
    untouched(engine)


def test_a_refused_request_costs_its_batch_mates_nothing(llm):
    """One bad request among good ones: the batch is refused whole, the engine is as it was,
    and the same good requests then produce exactly what they produce alone."""
    engine = llm.engine
    prompts = [[1, 2, 3], [7, 8, 9, 10], [4, 4, 4]]
    want = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    bad = SamplingParams(max_tokens=3, stop_token_ids=[1 << 40], min_tokens=1)
    running = engine.add_request([11, 12, 13], SamplingParams(max_tokens=8, temperature=0,
                                                              ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        engine.add_requests(prompts, [GREEDY, bad, GREEDY])
    assert list(engine.requests) == [running]
    done = {}
    ids = engine.add_requests(prompts, [GREEDY] * 3)
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
    assert [done[i].token_ids for i in ids] == want
    assert done[running].finish_reason == "length"
    untouched(engine)


def test_an_id_of_the_engines_own_form_never_refuses_a_request_without_one(llm):
    """A caller's own id "req-N" (the form the engine gives requests that bring none) is a
    valid id; the engine's next generated id must step past it, not refuse the next request
    without an id as a duplicate of an id its caller never gave."""
    engine = llm.engine
    start = int(engine.add_request([1, 2], GREEDY).removeprefix("req-"))
    taken = [f"req-{start + i}" for i in (1, 2, 4)]
    assert engine.add_requests([[1, 2]] * 3, [GREEDY] * 3, request_ids=taken) == taken
    ids = engine.add_requests([[3, 4]] * 2, [GREEDY] * 2)
    assert ids == [f"req-{start + 3}", f"req-{start + 5}"]
    # In one batch too: a generated id never repeats an id given beside it.
    batch = engine.add_requests([[5, 6]] * 2, [GREEDY] * 2,
                                request_ids=[None, f"req-{start + 6}"])
    assert batch == [f"req-{start + 7}", f"req-{start + 6}"]
    while engine.has_unfinished():
        engine.step()
    untouched(engine)


@pytest.mark.parametrize("name", ["owner", "request_id"])
def test_an_owner_or_id_that_cannot_be_filed_is_refused_by_name(llm, name):
    """An unhashable owner got as far as the scheduler's queue: the TypeError ("unhashable
    type") named nothing, and the clean-up raised it again, leaving the seed the refused
    request drew taken from the engine's generator."""
    engine = llm.engine
    rng = engine._rng.getstate()
    with pytest.raises(ValueError, match=name):
        engine.add_request([1, 2, 3], SamplingParams(max_tokens=2), **{name: ["x"]})
    untouched(engine)
    assert engine._rng.getstate() == rng
