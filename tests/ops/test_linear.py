"""`hwattn.ops.linear`: which products take the skinny kernel, that they compute `F.linear`,
and that a compiled graph keeps the kernel's custom op inside it.

On CPU the kernel runs under Triton's interpreter: the tests add "cpu" to the device types
that may take it (on a GPU, HWATTN_TEST_DEVICE=cuda, CUDA takes it already)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hwattn.ops import linear as lin
from tests.ops.paged import DEVICE


@pytest.fixture
def skinny_here(monkeypatch):
    monkeypatch.setattr(lin, "SKINNY_DEVICES", (DEVICE.type,))
    monkeypatch.setattr(lin, "SKINNY_ENABLED", True)


def _rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_only_few_bf16_rows_without_grad_on_the_kernel_devices(skinny_here, monkeypatch):
    w = torch.randn(48, 32, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(2, 32, 32, dtype=torch.bfloat16, device=DEVICE)  # 64 rows
    assert lin.takes_skinny_kernel(x, w)
    assert lin.takes_skinny_kernel(x.half(), w.half())
    assert not lin.takes_skinny_kernel(torch.randn(129, 32, dtype=torch.bfloat16, device=DEVICE), w)
    assert not lin.takes_skinny_kernel(x.float(), w.float())  # fp32: cuBLAS
    assert not lin.takes_skinny_kernel(x, w.half())  # mixed dtypes: F.linear raises its error
    assert not lin.takes_skinny_kernel(x[:0], w)
    assert not lin.takes_skinny_kernel(x.clone().requires_grad_(), w)  # training
    with torch.no_grad():
        assert lin.takes_skinny_kernel(x.clone().requires_grad_(), w)
    monkeypatch.setattr(lin, "SKINNY_ENABLED", False)
    assert not lin.takes_skinny_kernel(x, w)
    monkeypatch.setattr(lin, "SKINNY_ENABLED", True)
    monkeypatch.setattr(lin, "SKINNY_DEVICES", ("cuda",) if DEVICE.type == "cpu" else ("cpu",))
    assert not lin.takes_skinny_kernel(x, w)


@pytest.mark.parametrize("shape,bias", [((64, 1, 96), False), ((5, 96), True), ((1, 1, 96), False)])
def test_linear_on_the_kernel_matches_f_linear(skinny_here, shape, bias):
    w = torch.randn(72, 96, dtype=torch.bfloat16, device=DEVICE) / 8
    b = torch.randn(72, dtype=torch.bfloat16, device=DEVICE) if bias else None
    x = torch.randn(*shape, dtype=torch.bfloat16, device=DEVICE)
    assert lin.takes_skinny_kernel(x, w)
    y = lin.linear(x, w, b)
    truth = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert y.shape == (*shape[:-1], 72) and y.dtype == torch.bfloat16
    assert _rel_err(y, truth) < 1e-2


def test_linear_layers_route_through_it(skinny_here):
    """`hwattn.layers.Linear`, a fused projection and the SwiGLU block give what F.linear
    gives, on the kernel."""
    from hwattn.layers import Linear, fuse_linears
    from hwattn.models.transformer import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(64, 160, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(3, 1, 64, dtype=torch.bfloat16, device=DEVICE)
    with torch.no_grad():
        plain = ffn.w2(F.silu(F.linear(x, ffn.w1.weight)) * F.linear(x, ffn.w3.weight))
        ffn.fuse_projections()
        assert _rel_err(ffn(x), plain) < 2e-2
    a, b = Linear(64, 24, device=DEVICE, dtype=torch.bfloat16), Linear(64, 40, device=DEVICE,
                                                                      dtype=torch.bfloat16)
    with torch.no_grad():
        ya, yb = fuse_linears([a, b])(x)
        assert _rel_err(ya, F.linear(x.double(), a.weight.double(), a.bias.double())) < 1e-2
        assert _rel_err(yb, F.linear(x.double(), b.weight.double(), b.bias.double())) < 1e-2


def test_a_compiled_graph_keeps_the_kernel_inside(skinny_here):
    """fullgraph=True fails on a graph break: the custom op is traced as one node."""
    w = torch.randn(40, 64, dtype=torch.bfloat16, device=DEVICE)
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=DEVICE)

    def block(x):
        return torch.relu(lin.linear(x * 2, w))

    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)
    assert _rel_err(compiled(x), torch.relu(F.linear(x.double() * 2, w.double()))) < 1e-2
