"""Transformer.forward refuses malformed token tensors at its entry, naming `tokens`, instead of
failing deep inside (an unpacking error, an embedding IndexError, a reshape of nothing)."""

import pytest
import torch

from hwattn import ModelConfig, Transformer


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_preset("tiny", attention="gta", n_layers=1)).eval()


@pytest.mark.parametrize("tokens, match", [
    pytest.param(torch.zeros(5, dtype=torch.long), "tokens must be .*batch, length", id="1-D"),
    pytest.param(torch.zeros(1, 5, 2, dtype=torch.long), "tokens must be .*batch, length", id="3-D"),
    pytest.param(torch.zeros(1, 5), "tokens must hold integer", id="float"),
    pytest.param(torch.zeros(1, 5, dtype=torch.bool), "tokens must hold integer", id="bool"),
    pytest.param(torch.zeros(1, 0, dtype=torch.long), "tokens must hold at least one", id="empty"),
    pytest.param(torch.zeros(0, 3, dtype=torch.long), "tokens must hold at least one", id="no rows"),
    pytest.param(torch.full((1, 5), 2048), "tokens .*vocab_size", id="id=vocab_size"),
    pytest.param(torch.full((1, 5), -1), "tokens .*vocab_size", id="negative id"),
])
def test_malformed_tokens_are_refused_by_name(model, tokens, match):
    with pytest.raises(ValueError, match=match):
        model(tokens)


def test_int32_and_boundary_ids_still_run(model):
    v = model.config.vocab_size
    tokens = torch.tensor([[0, v - 1, 3]])
    with torch.no_grad():
        ref = model(tokens)
        torch.testing.assert_close(model(tokens.int()), ref)


def test_negative_positions_are_refused_not_wrapped(model):
    """A negative position would index the RoPE table from its end (position max_seq_len - 1)
    and silently rotate by the wrong angle."""
    from hwattn import AttentionMetadata

    caches = model.allocate_kv_cache(2, 4, dtype=torch.float32)
    meta = AttentionMetadata(torch.zeros(1, 1, dtype=torch.int32), torch.full((1,), 2, dtype=torch.int32),
                             torch.tensor([0, 1]), token_positions=torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="position -1"):
        model(torch.zeros(1, 2, dtype=torch.long), meta=meta, kv_caches=caches)
