"""The device sampler: counter-based randomness, top-k / top-p, and rejection sampling that
keeps the target distribution."""

import pytest
import torch

from hwattn.engine.sampler import SamplingTensors, probabilities, rejection_sample, sample, uniform
from hwattn.engine.sampling_params import SamplingParams


def tensors(params, positions=None, seeds=None):
    n = len(params)
    return SamplingTensors.build(params, seeds or list(range(n)), positions or [0] * n, "cpu")


def chi2_ok(counts: torch.Tensor, probs: torch.Tensor, n: int) -> None:
    """Pearson's chi-square against `probs` below the 0.999 quantile (df <= 9: < 27.9)."""
    expected = probs * n
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability zero"
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    assert keep.sum() <= 10 and stat < 27.9, f"chi2 {stat:.1f} over {int(keep.sum())} bins"


def test_uniforms_are_uniform_and_keyed_by_seed_and_position():
    u = uniform(torch.arange(2000), torch.zeros(2000, dtype=torch.int64), 0, 50)
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u.flatten(), bins=10, min=0, max=1)
    chi2_ok(counts, torch.full((10,), 0.1), u.numel())
    a = uniform(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 0, 8)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
    assert torch.equal(a[0], uniform(torch.tensor([5]), torch.tensor([0]), 0, 8)[0])


def test_sampling_follows_softmax():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    n = 20000
    st = tensors([SamplingParams(temperature=1.0)] * n, seeds=list(range(n)))
    tokens = sample(logits.expand(n, 5), st)
    chi2_ok(torch.bincount(tokens, minlength=5).float(), logits.softmax(-1), n)


def test_top_k_top_p_and_temperature():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]] * 3))
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.65), SamplingParams(temperature=0.5)]
    p = probabilities(logits, tensors(params))
    assert torch.allclose(p[0], torch.tensor([4 / 7, 3 / 7, 0, 0]))
    assert torch.allclose(p[1], torch.tensor([4 / 7, 3 / 7, 0, 0]))  # 0.4 < 0.65 <= 0.7
    sharp = torch.tensor([0.16, 0.09, 0.04, 0.01])
    assert torch.allclose(p[2], sharp / sharp.sum())
    greedy = probabilities(logits, tensors([SamplingParams(temperature=0)]))
    assert torch.equal(greedy[0], torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("draft", ["ngram", "model"])
def test_rejection_sampling_keeps_the_target_distribution(draft):
    """First and second emitted tokens follow the target's distribution whatever the drafts."""
    vocab, k, n = 4, 2, 30000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(k + 1, vocab, generator=g) * 1.5
    st = tensors([SamplingParams(temperature=1.0)] * n, seeds=list(range(n)))
    if draft == "ngram":  # a fixed proposal, one-hot q
        drafts = torch.tensor([[1, 2]] * n)
        q = None
    else:  # drafts drawn from a different distribution q
        q_dist = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
        drafts = torch.stack([torch.multinomial(q_dist[i], n, replacement=True, generator=g)
                              for i in range(k)], 1)
        q = q_dist.expand(n, k, vocab)
    tokens, accepted = rejection_sample(target.expand(n, k + 1, vocab), drafts, q, st)
    p0 = target[0].softmax(-1)
    chi2_ok(torch.bincount(tokens[:, 0], minlength=vocab).float(), p0, n)
    assert 0 < accepted.float().mean() < k
    # The second token, among rows that accepted the first draft, follows p(. | draft 1).
    rows = accepted >= 1
    chi2_ok(torch.bincount(tokens[rows, 1], minlength=vocab).float(), target[1].softmax(-1),
            int(rows.sum()))


def test_greedy_verification_accepts_exactly_the_argmax_prefix():
    logits = torch.full((2, 4, 6), -5.0)
    best = torch.tensor([[3, 1, 4, 2], [0, 0, 5, 5]])
    logits.scatter_(2, best[..., None], 5.0)
    drafts = torch.tensor([[3, 1, 0], [0, 0, 5]])
    st = tensors([SamplingParams(temperature=0)] * 2)
    tokens, accepted = rejection_sample(logits, drafts, None, st)
    assert accepted.tolist() == [2, 3]
    assert tokens[0, :3].tolist() == [3, 1, 4]
    assert tokens[1].tolist() == [0, 0, 5, 5]
