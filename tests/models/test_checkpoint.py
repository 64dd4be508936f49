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


def _damaged(tmp_path, how):
    model = Transformer(ModelConfig.from_preset("tiny", attention="gla", n_layers=1))
    save_checkpoint(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    blob = weights.read_bytes()
    if how == "missing":
        weights.unlink()
    elif how == "truncated":
        weights.write_bytes(blob[: len(blob) // 2])
    elif how == "garbage":
        weights.write_bytes(b"not a safetensors file at all" * 10)
    elif how == "empty":
        weights.write_bytes(b"")
    elif how == "wrong-shapes":
        other = Transformer(ModelConfig.from_preset("tiny", attention="gla", n_layers=1, dim=64))
        save_checkpoint(other, tmp_path / "other")
        weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    elif how == "bad-config":
        (tmp_path / "config.json").write_text("{ not json")
    return tmp_path


@pytest.mark.parametrize("how", ["missing", "truncated", "garbage", "empty", "wrong-shapes",
                                 "bad-config"])
def test_damaged_checkpoint_names_the_file(tmp_path, how):
    path = _damaged(tmp_path, how)
    name = "config.json" if how == "bad-config" else "model.safetensors"
    with pytest.raises(ValueError, match=name):
        load_checkpoint(path)


@pytest.mark.parametrize("command", ["eval", "serve"])
def test_cli_reports_damaged_weights_in_one_line(trained, dataset_dir, tmp_path, capsys, command):
    import shutil

    from hwattn.cli import main

    out, _ = trained
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out / "checkpoint", ckpt)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = ["eval", str(ckpt), "--data", str(dataset_dir)] if command == "eval" else \
        ["serve", str(ckpt), "--device", "cpu", "--port", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(weights) in err and "truncated or corrupt" in err
