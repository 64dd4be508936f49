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


def test_hidden_only_and_the_compiled_training_path(dataset_dir, tmp_path, monkeypatch):
    """`hidden_only` gives the final-norm states; `train(compile=True)` trains through the
    regionally compiled blocks and the chunked loss exactly as the eager model does."""
    from hwattn.train import compile as C
    from hwattn.train.metrics import read_metrics
    from hwattn.train.trainer import TrainConfig, train

    torch._dynamo.reset()
    model = Transformer(ModelConfig.from_preset("tiny", attention="mla", **SMALL))
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    h = RegionallyCompiled(model, backend="eager")(x, hidden_only=True)
    torch.testing.assert_close(h, model(x, hidden_only=True), rtol=0, atol=0)
    torch.testing.assert_close(model.output(h), model(x), rtol=0, atol=0)

    real_init = C.RegionallyCompiled.__init__
    monkeypatch.setattr(C.RegionallyCompiled, "__init__",
                        lambda self, m, **kw: real_init(self, m, backend="eager"))
    losses = {}
    for compiled in (False, True):
        cfg = TrainConfig(data=str(dataset_dir), out=str(tmp_path / str(compiled)), variant="gta-4",
                          seq_len=32, batch_size=4, steps=3, warmup_steps=1, log_every=1,
                          eval_tokens=256, compile=compiled, model_overrides=SMALL, plot=False,
                          save_final=False)
        train(cfg, progress=False, log=lambda *a: None)
        losses[compiled] = [r["loss"] for r in read_metrics(tmp_path / str(compiled) / "metrics.jsonl")
                            if "loss" in r]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
