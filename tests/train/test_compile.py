"""Regional compilation reproduces the model's own training forward."""

from __future__ import annotations

import pytest
import torch

from hwattn.config import ModelConfig, parse_variant
from hwattn.models.transformer import Transformer
from hwattn.train.compile import RegionallyCompiled
from tests.conftest import SMALL


@pytest.mark.parametrize("variant", ["gqa-4", "gta-4", "gla-2"])
def test_regionally_compiled_forward_equals_model(variant):
    torch._dynamo.reset()
    model = Transformer(ModelConfig.from_preset("tiny", **parse_variant(variant), **SMALL))
    x = torch.randint(0, model.config.vocab_size, (2, 24))
    fn = RegionallyCompiled(model, backend="eager")  # dynamo's graph capture, no code generation
    out = fn(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
