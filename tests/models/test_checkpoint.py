import json

import pytest
import torch

from hwattn import ModelConfig, Transformer
from hwattn.config import ATTENTION_KINDS
from hwattn.models.checkpoint import load_checkpoint, save_checkpoint

pytest.importorskip("safetensors")


@pytest.mark.parametrize("attention", ATTENTION_KINDS)
def test_roundtrip(tmp_path, attention):
    model = Transformer(ModelConfig.from_preset("tiny", attention=attention, n_layers=2))
    save_checkpoint(model, tmp_path, extra={"note": "x"})
    doc = json.loads((tmp_path / "config.json").read_text())
    assert doc["model_type"] == "hwattn" and doc["attention"] == attention and doc["note"] == "x"
    loaded = load_checkpoint(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    tokens = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)


def test_bf16_load_keeps_rope_in_fp32(tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", attention="gta", n_layers=1))
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, dtype=torch.bfloat16)
    cos, _ = loaded.rope(torch.arange(1000)[None])
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16 and cos.dtype == torch.float32


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path)
