"""The chunked linear cross-entropy against the plain head + F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hwattn.train.loss import linear_cross_entropy


def _reference(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.t()).float().flatten(0, -2), targets.flatten())


@pytest.mark.parametrize("shape,vocab,chunk", [((2, 7), 50, 3), ((1, 1), 5, None), ((3, 16), 97, 48),
                                                ((4, 5), 64, 1)],
                         ids=["chunks-uneven", "one-row", "one-chunk", "row-by-row"])
def test_matches_plain_cross_entropy(shape, vocab, chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(*shape, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, 24, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = torch.randint(0, vocab, shape, generator=gen)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk)
    (2.5 * loss).backward()  # a scaled loss, as under gradient accumulation
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = _reference(hidden, weight, targets)
    (2.5 * ref).backward()
    torch.testing.assert_close(loss.double(), ref.double(), rtol=1e-6, atol=1e-6)
    # Both paths take the softmax in fp32 (the logits are cast, as in training).
    torch.testing.assert_close(gh, hidden.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, weight.grad, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_error_is_that_of_the_plain_head():
    """Under autocast the matmul runs in bf16, like the plain path; its error against an fp64
    truth stays within a small multiple of the plain bf16 path's."""
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 32, generator=gen, requires_grad=True)
    weight = (0.3 * torch.randn(300, 32, generator=gen)).requires_grad_()
    targets = torch.randint(0, 300, (64,), generator=gen)
    truth = _reference(hidden.double(), weight.double(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_cross_entropy(hidden, weight, targets, chunk_rows=16)
        plain = F.cross_entropy((hidden @ weight.t()).float(), targets)
    assert torch.isfinite(fused)
    err, base = abs(fused.double() - truth).item(), abs(plain.double() - truth).item()
    assert err <= 4 * base + 1e-4, (err, base)
    fused.backward()
    assert hidden.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_no_grad_gives_the_loss_only():
    hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (6,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)
    torch.testing.assert_close(loss, _reference(hidden, weight, targets))


def test_bad_arguments():
    h, w = torch.randn(2, 3, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="targets shape"):
        linear_cross_entropy(h, w, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, torch.randn(10, 9), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        linear_cross_entropy(h, w, torch.zeros(2, 3, dtype=torch.int32))
