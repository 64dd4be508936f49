"""`sdpa_choice`: dense attention with cuDNN's kernel first and key / value widths unpadded.

On a CPU the kernels differ from a GPU's, but what the choice changes in our code does not:
inside `sdpa_choice("cudnn")` MLA's and GLA's (d_h + d_R)-wide keys and d_h-wide values reach
SDPA as they are (no zero padding), with the same outputs and gradients as the padded call, and the
SDPA backend priority is restored on the way out.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hwattn.config import ModelConfig, parse_variant
from hwattn.layers import SDPA_CHOICES, causal_attention, sdpa_choice
from hwattn.models.transformer import Transformer


def _widths_seen(monkeypatch) -> list[tuple[int, int]]:
    """(E, E_v) of every SDPA call from here on."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[-1], v.shape[-1]))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def test_choices_and_bad_name():
    assert SDPA_CHOICES == ("auto", "cudnn")
    with pytest.raises(ValueError, match="sdpa must be one of"):
        with sdpa_choice("flash3"):
            pass


@pytest.mark.parametrize("variant", ["mla", "gla-2"])
def test_unpadded_widths_give_the_padded_outputs_and_gradients(variant, monkeypatch):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", **parse_variant(variant))
    model = Transformer(cfg).double()
    model.init_weights(seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))
    seen = _widths_seen(monkeypatch)

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        logits.square().mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    padded, padded_grads = run()
    assert seen and all(e == e_v for e, e_v in seen)  # auto: one width, zero-padded
    seen.clear()
    with sdpa_choice("cudnn"):
        native, native_grads = run()
    head, rope = cfg.dim // cfg.n_heads, cfg.rope_dim
    assert seen and all((e, e_v) == (head + rope, head) for e, e_v in seen)
    torch.testing.assert_close(native, padded, rtol=1e-10, atol=1e-10)
    for a, b in zip(native_grads, padded_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    seen.clear()
    run()  # the choice ends with its block
    assert all(e == e_v for e, e_v in seen)


def test_cudnn_comes_first_inside_the_block_only():
    before = torch._C._get_sdp_priority_order()
    with sdpa_choice("cudnn"):
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(torch.nn.attention.SDPBackend.CUDNN_ATTENTION)
    assert torch._C._get_sdp_priority_order() == before


def test_equal_widths_are_untouched():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 8, 4, 16, dtype=torch.float64) for _ in range(3))
    with sdpa_choice("cudnn"):
        inside = causal_attention(q, k, v, 0.25)
    torch.testing.assert_close(inside, causal_attention(q, k, v, 0.25))
