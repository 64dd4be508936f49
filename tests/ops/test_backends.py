"""The backend registry: "auto" picks by priority and device, names and entry points register
backends without editing hwattn, and the model runner chooses one backend once and hands every
layer that backend and the plan it made for the step."""

from __future__ import annotations

import pytest
import torch

from hwattn import ModelConfig, Transformer, ops
from hwattn.engine.model_runner import ModelRunner, StepInput
from hwattn.ops import backends
from hwattn.ops.backends.torch_backend import TorchBackend


class RecordingBackend(TorchBackend):
    """The reference kernels, recording the plans it makes and receives."""

    name = "recording"
    priority = 100

    def __init__(self):
        self.made, self.seen, self.stores = [], [], 0

    @classmethod
    def auto_select(cls, device) -> bool:
        return torch.device(device).type == "cpu"

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None, out=None):
        plan = dict(heads=num_heads_kv, query_len=query_len, lengths=cache_seqlens.tolist())
        self.made.append(plan)
        return plan

    def check_plan(self, plan, batch, capacity) -> bool:
        if plan is not None and len(plan["lengths"]) != batch:
            raise ValueError("plan: wrong batch")
        return False

    def run_decode(self, q, *args, plan, **kw):
        self.seen.append(plan)
        return super().run_decode(q, *args, plan=plan, **kw)

    def run_decode_tied(self, q_nope, *args, plan, **kw):
        self.seen.append(plan)
        return super().run_decode_tied(q_nope, *args, plan=plan, **kw)

    def run_store_kv(self, *args, **kw):
        self.stores += 1
        super().run_store_kv(*args, **kw)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry for one test."""
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))
    monkeypatch.setattr(backends, "_AUTO", {})
    monkeypatch.setattr(backends, "_LOADED_ENTRY_POINTS", set())
    monkeypatch.delenv(backends.ENV_OVERRIDE, raising=False)
    return backends


def test_auto_picks_torch_on_cpu_and_names_resolve(registry):
    assert ops.get_backend("auto", "cpu").name == "torch"
    assert ops.get_backend("torch") is ops.get_backend("auto", torch.device("cpu"))
    assert {"torch", "triton"} <= set(ops.backend_names())
    backend = ops.get_backend("torch")
    assert ops.get_backend(backend) is backend
    with pytest.raises(ValueError, match="backend"):
        ops.get_backend("cuda")
    with pytest.raises(ValueError, match="backend name"):
        ops.register_backend("auto", TorchBackend)
    with pytest.raises(ValueError, match="already registered"):
        ops.register_backend("torch", TorchBackend)


def test_priority_device_and_missing_dependencies_decide_auto(registry, monkeypatch):
    def missing():
        raise ImportError("no such kernels")

    ops.register_backend("needs_gpu", RecordingBackend, priority=200,
                         auto_select=lambda d: torch.device(d).type == "cuda")
    ops.register_backend("broken", missing, priority=150, auto_select=lambda d: True)
    assert ops.get_backend("auto", "cpu").name == "torch"
    ops.register_backend("recording", RecordingBackend)  # priority 100, auto on the CPU
    assert isinstance(ops.get_backend("auto", "cpu"), RecordingBackend)
    monkeypatch.setenv(backends.ENV_OVERRIDE, "torch")
    assert ops.get_backend("auto", "cpu").name == "torch"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "nope")
    with pytest.raises(ValueError, match="nope"):
        ops.get_backend("auto", "cpu")


def test_a_gpu_generation_hook_never_fires_off_the_gpu():
    hopper = backends.on_compute_capability((9, 0))
    assert not hopper(torch.device("cpu")) and not hopper("meta")


def test_entry_points_register_backends(registry, tmp_path, monkeypatch):
    dist = tmp_path / "hwattn_test_backend-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hwattn-test-backend\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[hwattn.backends]\nrecording = {__name__}:RecordingBackend\n"
                                           "bad = no.such.module:Thing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match="bad"):
        assert isinstance(ops.get_backend("recording"), RecordingBackend)
    assert "bad" not in ops.backend_names()


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_runner_chooses_once_and_every_layer_gets_its_plan(registry, attention):
    ops.register_backend("recording", RecordingBackend)
    cfg = ModelConfig.from_preset("tiny", attention=attention, n_layers=3)
    model = Transformer(cfg).eval()
    runner = ModelRunner(model, num_pages=16, page_size=4, max_model_len=32, cuda_graphs=False)
    backend = runner.backend
    assert isinstance(backend, RecordingBackend)
    runner.execute(StepInput("prefill", [[1, 2, 3, 4, 5], [6, 7, 8]], [0, 0], [[1, 2], [3]],
                             need_logits=[True, True]))
    # Two prefill forwards (the rows differ in length), each writing two tensors per layer;
    # prefill attends densely, so no plan is made.
    assert backend.stores == 2 * 2 * cfg.n_layers and not backend.made
    runner.execute(StepInput("decode", [[9], [10]], [5, 3], [[1, 2], [3]]))
    assert backend.made == [dict(heads=cfg.cache_heads, query_len=1, lengths=[6, 4])]
    assert len(backend.seen) == cfg.n_layers
    assert all(plan is backend.made[0] for plan in backend.seen)


def test_triton_plans_on_the_host_for_the_device():
    plan = ops.get_backend("triton").plan(torch.tensor([70, 5000], dtype=torch.int32),
                                          num_heads_kv=2, page_size=16, device="cpu")
    assert isinstance(plan, ops.DecodePlan) and plan.batch == 2 and plan.max_seqlen == 5000
    assert ops.get_backend("torch").plan(torch.tensor([3], dtype=torch.int32), num_heads_kv=1,
                                         page_size=4) is None
