"""Regional compilation (hwattn/models/compile.py): compiled blocks, with the feed-forward's
residual add deferred to the next block or not, compute the eager model's logits."""

import pytest
import torch

from hwattn import ModelConfig, Transformer
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
