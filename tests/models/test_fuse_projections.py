"""`Transformer.fuse_projections`: one matrix product per input for inference, the same
logits, no weight stored twice, the state dict unchanged."""

import copy

import pytest
import torch

from hwattn import ModelConfig, Transformer


@pytest.mark.parametrize("variant", [dict(attention="mha"), dict(attention="gqa", n_kv_heads=2),
                                     dict(attention="gta", n_kv_heads=2), dict(attention="mla"),
                                     dict(attention="gla", attention_bias=True)])
def test_fused_projections_keep_logits_and_weights(variant):
    model = Transformer(ModelConfig.from_preset("tiny", **variant)).eval()
    for p in model.parameters():  # biases too (zero-initialised otherwise)
        p.data.normal_(0, 0.05) if p.dim() == 1 else None
    fused = copy.deepcopy(model).fuse_projections()
    tokens = torch.randint(0, model.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(fused(tokens), model(tokens), rtol=1e-5, atol=1e-5)
    assert fused.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(fused.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    attn, ffn = fused.layers[0].attn, fused.layers[0].ffn
    weight, bias, sizes = attn._fused_in
    names = attn.input_projections
    assert sizes == [getattr(attn, n).out_features for n in names] and len(names) >= 2
    for n in names:  # views of the fused matrix, not copies
        assert getattr(attn, n).weight.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert (bias is not None) == bool(variant.get("attention_bias"))
    assert ffn.w1.weight.untyped_storage().data_ptr() == ffn._w13.weight.untyped_storage().data_ptr()
    params = {id(p): p for p in fused.parameters()}.values()
    assert sum(p.numel() for p in params) == model.num_params()
