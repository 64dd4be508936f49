"""The backend registry: "auto" picks by priority and device, names and entry points register
backends without editing hwattn, and the model runner chooses one backend once and hands every
layer that backend and the plan it made for the step."""

from __future__ import annotations

import os

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
        self.made, self.seen, self.stores, self.prefill_plans = [], [], 0, []

    @classmethod
    def auto_select(cls, device) -> bool:
        return torch.device(device).type == "cpu"

    def plan(self, cache_seqlens, *, num_heads_kv, query_len=1, page_size, device=None, out=None,
             reserve_pieces=False):
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

    def plan_prefill(self, cu_seqlens_q, cache_seqlens):
        plan = super().plan_prefill(cu_seqlens_q, cache_seqlens)
        self.prefill_plans.append(plan)
        return plan

    def run_prefill(self, q, *args, plan, **kw):
        self.seen.append(plan)
        return super().run_prefill(q, *args, plan=plan, **kw)

    def run_prefill_tied(self, q_nope, *args, plan, **kw):
        self.seen.append(plan)
        return super().run_prefill_tied(q_nope, *args, plan=plan, **kw)

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
    # Whole prompts: one packed forward writing two tensors per layer, attended densely (no
    # prefill-op call), and no decode plan is made.
    assert backend.stores == 2 * cfg.n_layers and not backend.made
    assert [(p.query_lens, p.seqlens) for p in backend.prefill_plans] == [((5, 3), (5, 3))]
    assert backend.seen == []
    # Chunks over cached prefixes: the prefill op, its one plan (the step's host lengths)
    # reaching every layer.
    runner.execute(StepInput("prefill", [[11, 12], [13]], [5, 3], [[1, 2], [3, 4]],
                             need_logits=[True, True]))
    assert [(p.query_lens, p.seqlens) for p in backend.prefill_plans[1:]] == [((2, 1), (7, 4))]
    assert len(backend.seen) == cfg.n_layers
    assert all(plan is backend.prefill_plans[1] for plan in backend.seen)
    backend.seen.clear()
    runner.execute(StepInput("decode", [[9], [10]], [7, 4], [[1, 2], [3, 4]]))
    assert backend.made == [dict(heads=cfg.cache_heads, query_len=1, lengths=[8, 5])]
    assert len(backend.seen) == cfg.n_layers
    assert all(plan is backend.made[0] for plan in backend.seen)


def test_triton_plans_on_the_host_for_the_device():
    plan = ops.get_backend("triton").plan(torch.tensor([70, 5000], dtype=torch.int32),
                                          num_heads_kv=2, page_size=16, device="cpu")
    assert isinstance(plan, ops.DecodePlan) and plan.batch == 2 and plan.max_seqlen == 5000
    assert ops.get_backend("torch").plan(torch.tensor([3], dtype=torch.int32), num_heads_kv=1,
                                         page_size=4) is None


def _capability(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("capability, chosen", [((9, 0), "hopper"), ((8, 0), "triton"),
                                                ((10, 0), "triton"), ((8, 9), "triton")])
def test_auto_picks_hopper_only_on_sm90(registry, monkeypatch, capability, chosen):
    pytest.importorskip("triton.experimental.gluon")
    _capability(monkeypatch, capability)
    assert ops.get_backend("auto", "cuda").name == chosen
    assert ops.get_backend("auto", "cpu").name == "torch"
    assert ops.backend_names()[:2] == ("hopper", "triton")


def test_hopper_is_overridable_by_name_and_environment(registry, monkeypatch):
    pytest.importorskip("triton.experimental.gluon")
    _capability(monkeypatch, (9, 0))
    assert ops.get_backend("triton").name == "triton"
    monkeypatch.setenv(backends.ENV_OVERRIDE, "triton")
    assert ops.get_backend("auto", "cuda").name == "triton"


def test_hopper_is_skipped_without_gluon(registry, monkeypatch):
    """A Triton without Gluon: the factory raises ImportError and "auto" takes Triton."""
    import builtins

    real_import = builtins.__import__

    def no_gluon(name, *args, **kwargs):
        if name.startswith("triton.experimental"):
            raise ImportError("no gluon here")
        return real_import(name, *args, **kwargs)

    _capability(monkeypatch, (9, 0))
    backends._REGISTRY["hopper"] = backends._Entry(backends._hopper_factory, 20,
                                                   backends.on_compute_capability((9, 0)))
    monkeypatch.setattr(builtins, "__import__", no_gluon)
    assert ops.get_backend("auto", "cuda").name == "triton"


class _Recorder:
    """Stands in for a kernel launcher: records (plan, config) and returns zeros."""

    def __init__(self):
        self.calls = []

    def __call__(self, q, *args, plan=None, config=None, **kwargs):
        self.calls.append(dict(plan=plan, config=config))
        d_v = args[1].shape[-1] if len(args) > 1 else q.shape[-1]
        batch, l_q, h_q = q.shape[:3]
        return torch.zeros(batch, l_q, h_q, d_v), torch.zeros(batch, h_q, l_q)


def _tied_call(batch, l_q, h_q, h_kv, d_nope, d_v, d_rope, length, page=64, dtype=torch.bfloat16):
    """Small CPU tensors of a decode_tied call whose block table covers `length` tokens (the
    recorded launchers never read the caches)."""
    pages = -(-length // page)
    return (torch.zeros(batch, l_q, h_q, d_nope, dtype=dtype),
            torch.zeros(batch, l_q, h_q, d_rope, dtype=dtype),
            torch.zeros(2, page, h_kv, d_v, dtype=dtype), torch.zeros(2, page, d_rope, dtype=dtype),
            torch.zeros(batch, pages, dtype=torch.int32))


# (label, batch, L_q, H_q, H_kv, D_nope, D_v, D_R, length) -> (schedule, overlap, ctas, knobs)
HOPPER_PLANS = [
    (("mla-b4-32k", 4, 1, 128, 1, 512, 512, 64, 32768), ("duo", False, 1, (2, 1, 256))),
    (("mla-b128-lq1", 128, 1, 128, 1, 512, 512, 64, 4096), ("duo", False, 1, (2, 2, None))),
    (("mla-tp8-b128", 128, 2, 16, 1, 512, 512, 64, 4096), ("duo", False, 1, (1, 1, 256))),
    (("gla2-b128-lq1", 128, 1, 128, 2, 256, 256, 64, 4096), ("ring", True, 1, (1, 2, None))),
    (("gla2-b128-lq2", 128, 2, 128, 2, 256, 256, 64, 4096), ("pingpong", False, 1, (1, 2, None))),
    (("gla2-b1-128k", 1, 1, 128, 2, 256, 256, 64, 131072), ("ring", True, 1, (1, 1, 256))),
    (("gta4-b1-128k", 1, 1, 32, 4, 64, 128, 64, 131072), ("ring", True, 2, (1, 2, None))),
]


@pytest.mark.parametrize("case, expected", HOPPER_PLANS, ids=[c[0][0] for c in HOPPER_PLANS])
def test_hopper_backend_hands_each_launch_its_plan(monkeypatch, case, expected):
    """The Hopper backend's step plan gives each launch the split-KV plan of its measured
    default (schedule, programs per SM, shortest piece), refreshed in place for graph replay."""
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops import hopper_decode, triton_decode
    from hwattn.ops.backends.hopper_backend import HopperBackend, HopperPlan

    _, batch, l_q, h_q, h_kv, d_nope, d_v, d_rope, length = case
    schedule, overlap, ctas, (head_blocks, per_sm, min_piece) = expected
    backend = HopperBackend()
    hopper = _Recorder()
    monkeypatch.setattr(hopper_decode, "supported", lambda *a, **k: True)
    monkeypatch.setattr(hopper_decode, "decode_tied", hopper)
    q_nope, q_rope, kv_cache, rope_cache, table = _tied_call(batch, l_q, h_q, h_kv, d_nope, d_v,
                                                             d_rope, length)
    lengths = torch.full((batch,), length, dtype=torch.int32)
    plan = backend.plan(lengths, num_heads_kv=h_kv, query_len=l_q, page_size=64, device="cpu")
    assert isinstance(plan, HopperPlan) and plan.batch == batch and plan.max_seqlen == length
    for _ in range(2):  # two layers: one plan made, then reused
        backend.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, lengths, plan=plan)
    first, second = hopper.calls
    assert first["plan"] is second["plan"] and len(plan.plans) == 1
    config = first["config"]
    assert (config.schedule, config.overlap, config.ctas_per_sm) == (schedule, overlap, ctas)
    if min_piece is None:  # the planner's defaults: two per SM, the Triton kernel's piece rule
        min_piece = triton_decode.min_piece(q_nope, kv_cache, kv_cache, rope_cache, True)
    expected_plan = ops.plan_decode(lengths, num_heads_kv=h_kv, query_len=l_q, page_size=64,
                                    head_blocks=head_blocks, programs_per_sm=per_sm,
                                    min_piece=min_piece, num_sms=132)
    assert torch.equal(first["plan"].items, expected_plan.items)
    assert torch.equal(first["plan"].splits, expected_plan.splits)

    # CUDA-graph replay: new lengths, same tensors, rewritten in place.
    shorter = torch.randint(l_q, length + 1, (batch,), dtype=torch.int32)
    items = first["plan"].items
    assert backend.plan(shorter, num_heads_kv=h_kv, query_len=l_q, page_size=64,
                        out=plan) is plan
    assert plan.plans[next(iter(plan.plans))] is first["plan"] and first["plan"].items is items
    fresh = ops.plan_decode(shorter, num_heads_kv=h_kv, query_len=l_q, page_size=64,
                            head_blocks=head_blocks, programs_per_sm=per_sm, min_piece=min_piece,
                            num_sms=132)
    assert torch.equal(items[:fresh.capacity], fresh.items)
    assert (items[fresh.capacity:, 0] == -1).all() and plan.max_seqlen == int(shorter.max())


def test_hopper_backend_gives_triton_what_it_does_not_take(monkeypatch):
    """Separate K/V decode and unsupported tied calls run the Triton launchers, each with the
    plan the Triton kernel would make for itself."""
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops import hopper_decode, triton_decode
    from hwattn.ops.backends.hopper_backend import HopperBackend

    backend = HopperBackend()
    tri_tied, tri, hopper = _Recorder(), _Recorder(), _Recorder()
    monkeypatch.setattr(triton_decode, "decode_tied", tri_tied)
    monkeypatch.setattr(triton_decode, "decode", tri)
    monkeypatch.setattr(hopper_decode, "decode_tied", hopper)
    lengths = torch.tensor([3000, 40], dtype=torch.int32)
    plan = backend.plan(lengths, num_heads_kv=2, page_size=64, device="cpu")

    q = torch.zeros(2, 1, 8, 64, dtype=torch.bfloat16)
    k_cache = torch.zeros(2, 64, 2, 64, dtype=torch.bfloat16)
    table = torch.zeros(2, 47, dtype=torch.int32)
    backend.decode(q, k_cache, k_cache, table, lengths, plan=plan)
    # CPU tensors: the Hopper kernels decline ("not a CUDA tensor") and Triton runs.
    q_nope, q_rope, kv_cache, rope_cache, _ = _tied_call(2, 1, 8, 2, 64, 128, 64, 3000)
    assert hopper_decode.why_unsupported(q_nope, q_rope, kv_cache, rope_cache) == "not a CUDA tensor"
    backend.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, lengths, plan=plan)
    assert not hopper.calls and len(tri.calls) == len(tri_tied.calls) == 1
    for calls, args in ((tri.calls, (q, k_cache, k_cache, None, False)),
                        (tri_tied.calls, (q_nope, kv_cache, kv_cache, rope_cache, True))):
        expected = ops.plan_decode(lengths, num_heads_kv=2, page_size=64, num_sms=132,
                                   min_piece=triton_decode.min_piece(*args))
        assert torch.equal(calls[0]["plan"].items, expected.items)
    with pytest.raises(ValueError, match="B=2"):
        backend.decode(q[:1], k_cache, k_cache, table[:1], lengths[:1], plan=plan)
    with pytest.raises(ValueError, match="HopperPlan"):
        backend.plan(lengths, num_heads_kv=2, page_size=64, out=ops.plan_decode(lengths, num_heads_kv=2))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs CPU tensors only under its interpreter")
def test_runner_decodes_through_the_hopper_backend_plan():
    """The engine's path: the runner asks the Hopper backend for the step's plan, every layer's
    call takes its launch's plan from it (off Hopper: the Triton kernels'), and the logits
    match the references'."""
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops.backends.hopper_backend import HopperBackend, HopperPlan

    cfg = ModelConfig.from_preset("tiny", attention="mla", n_layers=2)
    model = Transformer(cfg).eval()
    logits = {}
    for name, backend in (("hopper", HopperBackend()), ("torch", "torch")):
        runner = ModelRunner(model, num_pages=16, page_size=4, max_model_len=32,
                             cuda_graphs=False, backend=backend)
        runner.execute(StepInput("prefill", [[1, 2, 3, 4, 5], [6, 7, 8]], [0, 0], [[1, 2], [3]],
                                 need_logits=[True, True]))
        step = StepInput("decode", [[9], [10]], [5, 3], [[1, 2], [3]])
        if name == "hopper":
            plan = runner.plan(torch.tensor([6, 4], dtype=torch.int32), 1)
            assert isinstance(plan, HopperPlan) and plan.num_heads_kv == cfg.cache_heads
        logits[name] = runner.execute(step)
    torch.testing.assert_close(logits["hopper"], logits["torch"], rtol=1e-4, atol=1e-4)
