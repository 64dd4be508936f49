"""Regional compilation (hwattn/models/compile.py): compiled blocks, with the feed-forward's
residual add deferred to the next block or not, compute the eager model's logits, and the
deferred blocks run one Inductor kernel fewer a layer."""

import subprocess
import sys
from collections import Counter

import pytest
import torch

from hwattn import ModelConfig, Transformer
from hwattn.layers import AttentionMetadata
from hwattn.models.compile import DeferredResidual, compile_blocks


@pytest.mark.parametrize("attention", ["gqa", "gla"])
def test_deferred_residual_blocks_give_the_eager_logits(attention):
    """Eagerly (the wrapper alone) bit for bit, and compiled within fp32 rounding; the blocks
    but the last hand on a pair, the last the hidden states."""
    torch._dynamo.reset()
    model = Transformer(ModelConfig.from_preset("tiny", attention=attention, n_layers=3)).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        want = model(tokens)
        wrapped = [DeferredResidual(blk, i == 2) for i, blk in enumerate(model.layers)]
        torch.testing.assert_close(model(tokens, blocks=wrapped), want, rtol=0, atol=0)
        x, cos, sin = model.embed(tokens)
        assert isinstance(wrapped[0](x, cos, sin, None, None), tuple)
        assert isinstance(wrapped[2](x, cos, sin, None, None), torch.Tensor)
        compiled = compile_blocks(model, defer_residual=True)
        torch.testing.assert_close(model(tokens, blocks=compiled), want, rtol=1e-5, atol=1e-5)


def _decode_kernels(model, blocks) -> Counter:
    """The Inductor kernels (by name, without the graph prefix) one decode step of `model`
    through `blocks` runs on the CPU, counted from the profiler, after two warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    caches = [blk.attn.allocate_cache(16, 4, dtype=torch.float32, device=torch.device("cpu"))
              for blk in model.layers]
    table = torch.arange(16, dtype=torch.int32).view(2, 8)

    def step(i):
        lens = torch.full((2,), 6 + i, dtype=torch.int32)
        slots = AttentionMetadata.slots(table, torch.full((2, 1), 5 + i), 4)
        meta = AttentionMetadata(table, lens, slots, backend="torch")
        with torch.no_grad():
            return model(torch.randint(0, model.config.vocab_size, (2, 1)), meta=meta,
                         kv_caches=caches, blocks=blocks)

    step(0), step(1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(2)
    return Counter(e.name.split("cpp_fused_", 1)[1] for e in prof.events()
                   if "cpp_fused_" in e.name)


@pytest.mark.slow
def test_deferred_residual_runs_one_kernel_fewer_a_layer(monkeypatch):
    """Inductor fuses the handed-on residual add into the next block's first RMSNorm: a decode
    step of 3 deferred blocks runs the feed-forward's lone residual-add kernel once (the last
    block's) where plain compiled blocks run it thrice, and nothing else more."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "enable_kernel_profile", True)
    counts = {}
    for defer in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", attention="gqa", n_layers=3)).eval()
        counts[defer] = _decode_kernels(model, compile_blocks(model, defer_residual=defer))
    plain, deferred = counts[False], counts[True]
    assert sum(plain.values()) - sum(deferred.values()) == 2, (plain, deferred)
    lone_adds = [name for name in plain if plain[name] - deferred[name] == 2]
    assert len(lone_adds) == 1 and "add" in lone_adds[0], (plain, deferred)


def test_the_deferral_switch_refuses_a_bad_value_by_name():
    done = subprocess.run([sys.executable, "-c", "import hwattn.models.compile"],
                          env={"HWATTN_DEFER_RESIDUAL": "on", "PATH": ""}, capture_output=True,
                          text=True)
    assert done.returncode != 0
    assert "HWATTN_DEFER_RESIDUAL must be 0 or 1, got 'on'" in done.stderr
