"""Engine assembly: one `EngineConfig` from `LLM` keywords and from the command line, handed to
the engine whole; any `Drafter` works without the engine knowing its class."""

import logging

import pytest
import torch

from hwattn.engine import LLM, EngineConfig, SamplingParams, create_engine
from hwattn.engine.speculative import Drafter
from hwattn.models import Transformer
from tests.engine.conftest import step_to_completion


def test_config_validates_and_speculation_needs_a_drafter():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="tiny", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(model="tiny", speculative="ngram", num_speculative_tokens=0)
    assert EngineConfig(model="tiny", num_speculative_tokens=5).num_speculative_tokens == 0
    config = EngineConfig(model="tiny", speculative="ngram")
    assert EngineConfig(**config.as_kwargs()) == config
    with pytest.raises(ValueError, match="not both"):
        create_engine(config, page_size=8)


@pytest.mark.parametrize("size", [0, -2, 2.5, "4", True])
def test_speculative_disable_batch_size_is_a_positive_integer(size):
    with pytest.raises(ValueError, match="speculative_disable_batch_size must be a positive "
                                         f"integer or None, got {size!r}"):
        EngineConfig(model="tiny", speculative="ngram", speculative_disable_batch_size=size)


def test_speculative_disable_batch_size_needs_speculation():
    with pytest.raises(ValueError, match="speculative_disable_batch_size=8 needs speculative"):
        EngineConfig(model="tiny", speculative_disable_batch_size=8)
    with pytest.raises(ValueError, match="speculative_disable_batch_size"):
        LLM("tiny", model_overrides=dict(n_layers=1), speculative="ngram",
            speculative_disable_batch_size=0)
    config = EngineConfig(model="tiny", speculative="ngram", speculative_disable_batch_size=8)
    assert EngineConfig(**config.as_kwargs()) == config
    assert EngineConfig(model="tiny", speculative="ngram").speculative_disable_batch_size is None


def test_llm_keywords_become_the_engines_config():
    llm = LLM("tiny", attention="gqa-2", page_size=8, max_num_seqs=3, memory_budget=1 << 20,
              max_num_batched_tokens=64, model_overrides=dict(n_layers=1))
    engine = llm.engine
    config = engine.config
    assert (config.model, config.attention, config.page_size, config.max_num_seqs,
            config.max_num_batched_tokens) == ("tiny", "gqa-2", 8, 3, 64)
    # Resolved once at assembly: what every rank and replica builds from.
    assert config.device == "cpu" and config.dtype == torch.float32
    assert config.max_model_len == engine.model_config.max_seq_len
    assert isinstance(engine.model, Transformer) and engine.dtype == torch.float32
    assert engine.tensor_parallel_size == 1


def test_command_line_options_become_a_config():
    from hwattn.cli import build_parser
    from hwattn.cli.serve import engine_config

    args = build_parser().parse_args(
        ["serve", "tiny", "--attention", "gla-2", "--page-size", "16", "--memory-budget", "2e6",
         "--speculative", "ngram", "--num-speculative-tokens", "2", "--no-cuda-graphs",
         "--max-seq-len", "128"])
    assert engine_config(args) == EngineConfig(
        model="tiny", attention="gla-2", dtype=args.dtype, device=args.device, page_size=16,
        memory_budget=2_000_000, speculative="ngram", num_speculative_tokens=2,
        cuda_graphs=False, model_overrides={"max_seq_len": 128})
    for flag in ("--speculative-disable-batch-size", "--speculative-disable-by-batch-size"):
        args = build_parser().parse_args(["serve", "tiny", "--speculative", "ngram", flag, "16"])
        assert engine_config(args).speculative_disable_batch_size == 16
    args = build_parser().parse_args(["serve", "tiny", "--speculative-disable-batch-size", "4"])
    # Named as the command line's options (`hwattn.cli.serve.flag_names`).
    with pytest.raises(ValueError, match="--speculative-disable-batch-size=4 needs --speculative"):
        engine_config(args)


class FirstTokenDrafter(Drafter):
    """Proposes token 0 k times: a drafter the engine has never heard of."""

    deterministic = True

    def __init__(self, k):
        self.k = k
        self.calls = 0

    def propose(self, seqs, st):
        self.calls += 1
        return torch.zeros(len(seqs), self.k, dtype=torch.int64), None


def test_the_engine_takes_any_drafter(checkpoints):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [[1, 2, 3, 4], list(range(20, 45))]
    path = checkpoints("gqa-2")
    want = [o.token_ids for o in LLM(path, page_size=4, num_pages=100).generate(prompts, params)]
    engine = LLM(path, page_size=4, num_pages=100, speculative="ngram",
                 num_speculative_tokens=2).engine
    engine.drafter = FirstTokenDrafter(2)
    outs = step_to_completion(engine, prompts, params)
    assert [o.token_ids for o in outs] == want
    assert engine.drafter.calls > 0


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_num_pages_beside_a_memory_setting_says_that_it_overrides_it(caplog):
    """Observed: num_pages sized the page pool and a gpu_memory_utilization or memory_budget
    given with it was dropped without a word (on the CPU too, where gpu_memory_utilization
    is otherwise refused). Now the engine warns, naming both settings, as vLLM logs that
    num_gpu_blocks_override overrides its memory plan; memory settings left at their
    defaults say nothing."""
    kw = dict(device="cpu", num_pages=40, model_overrides=dict(n_layers=1, max_seq_len=64))
    with caplog.at_level(logging.WARNING):
        llm = LLM("tiny", gpu_memory_utilization=0.5, **kw)
        assert llm.engine.block_manager.num_pages == 40
        assert len(_warnings(caplog)) == 1
        assert "num_pages=40 overrides gpu_memory_utilization=0.5" in _warnings(caplog)[0]
        caplog.clear()
        LLM("tiny", memory_budget=1 << 20, **kw)
        assert len(_warnings(caplog)) == 1
        assert "num_pages=40 overrides memory_budget=1048576" in _warnings(caplog)[0]
        caplog.clear()
        LLM("tiny", **kw)
        LLM("tiny", memory_budget=1 << 20, device="cpu", model_overrides=kw["model_overrides"])
        assert _warnings(caplog) == []


def test_replicas_do_not_repeat_the_num_pages_warning(monkeypatch, caplog):
    """With data_parallel_size > 1 the warning comes once, from the engine the user built,
    not again from each replica building its own engine."""
    from hwattn.engine.data_parallel import DataParallelEngine

    seen = {}

    def capture(self, size, engine_kwargs, *args, **kwargs):
        seen.update(engine_kwargs)
        raise AssertionError("replicas stopped here")

    monkeypatch.setattr(DataParallelEngine, "__init__", capture)
    with caplog.at_level(logging.WARNING):
        with pytest.raises(AssertionError, match="replicas stopped here"):
            LLM("tiny", device="cpu", num_pages=40, gpu_memory_utilization=0.5,
                data_parallel_size=2, model_overrides=dict(n_layers=1, max_seq_len=64))
        assert len(_warnings(caplog)) == 1 and "num_pages=40 overrides" in _warnings(caplog)[0]
        caplog.clear()
        replica = create_engine(**seen)  # as each replica process builds its engine
        assert replica.block_manager.num_pages == 40 and _warnings(caplog) == []


@pytest.fixture
def no_workers(monkeypatch):
    """Fails the test if a tensor-parallel rank or a data-parallel replica starts."""
    from hwattn.engine.data_parallel import DataParallelEngine
    from hwattn.engine.tp_executor import TensorParallelExecutor

    def started(*args, **kwargs):
        raise AssertionError("worker processes started before the settings were checked")

    monkeypatch.setattr(TensorParallelExecutor, "__init__", started)
    monkeypatch.setattr(DataParallelEngine, "__init__", started)


@pytest.mark.parametrize("kw, match", [
    (dict(tensor_parallel_size=3), r"tensor_parallel_size 3 does not split gqa-4: tp \(3\) must "
                                   r"divide n_heads \(8\)"),
    (dict(tensor_parallel_size=16), r"tensor_parallel_size 16 does not split"),
    (dict(tensor_parallel_size=3, data_parallel_size=2), r"tensor_parallel_size 3 does not split"),
    (dict(data_parallel_size=2, speculative="/no/such/draft"), r"speculative must be None, "
                                                               r"'ngram' or a draft checkpoint"),
], ids=["tp3", "tp16", "tp3-dp2", "dp2-no-draft"])
def test_multi_process_settings_are_refused_before_any_worker_starts(no_workers, kw, match):
    """Observed: `LLM(tensor_parallel_size=3)` started three rank processes that each failed
    to shard the model (a `WorkerError` with their tracebacks; `hwattn serve --tp 3` checked
    it first, `LLM` did not), and with data_parallel_size > 1 the speculative settings were
    only checked inside each replica process."""
    with pytest.raises(ValueError, match=match):
        LLM("tiny", attention="gqa-4", device="cpu", model_overrides=dict(n_layers=1), **kw)


def test_a_draft_model_for_replicas_is_checked_before_they_start(no_workers, checkpoints):
    target, draft = checkpoints("gqa-4"), checkpoints("gqa-4", draft_layers=1)
    with pytest.raises(ValueError, match="a draft model cannot be combined with "
                                         "tensor_parallel_size > 1"):
        LLM(target, device="cpu", tensor_parallel_size=2, data_parallel_size=2, speculative=draft)
    with pytest.raises(ValueError, match="the draft model's context .* is shorter than "
                                         "max_model_len 512"):
        LLM("tiny", attention="gqa-4", device="cpu", data_parallel_size=2, speculative=draft,
            model_overrides=dict(n_layers=1, max_seq_len=512))
