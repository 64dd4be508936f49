"""The device sampler: counter-based randomness, top-k / top-p, and rejection sampling that
keeps the target distribution."""

import pytest
import torch

from hwattn.engine.sampler import (SamplingTensors, adjusted_logits, gumbel, matching_verify,
                                   probabilities, processed_logits, rejection_sample, sample,
                                   top_logprobs, uniform)
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


def test_uniforms_never_reach_one_so_no_gumbel_variate_is_infinite():
    """Observed: seed 1, position 16, vocabulary entry 876 drew u = 1.0 (the top 24-bit value
    plus a half rounds up in float32), a Gumbel variate of +inf, and the token beat one with
    a logit bias of +100 (2**-24 of all draws: 0.8% of tokens over 128K ids)."""
    seeds, counters = torch.tensor([1, 1, 1]), torch.tensor([16, 330, 334])
    u = uniform(seeds, counters, 0, 32768)
    assert u.max() < 1 and u.min() > 0
    assert torch.isfinite(gumbel(seeds, counters, 0, 32768)).all()
    logits = torch.zeros(1, 1000)
    logits[0, 77] = 100.0
    assert sample(logits, tensors([SamplingParams(temperature=1.0)], [16], [1])).item() == 77


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


@pytest.mark.parametrize("min_p", [0.0, 0.3])
@pytest.mark.parametrize("draft", ["ngram", "ngram, matched", "model"])
def test_rejection_sampling_keeps_the_target_distribution(draft, min_p):
    """First and second emitted tokens follow the target's distribution (min-p filtered when
    asked) whatever the drafts."""
    vocab, k, n = 4, 2, 30000
    g = torch.Generator().manual_seed(0)
    target = torch.randn(k + 1, vocab, generator=g) * 1.5
    params = SamplingParams(temperature=1.0, min_p=min_p)
    st = tensors([params] * n, seeds=list(range(n)))
    if draft.startswith("ngram"):  # a fixed proposal, one-hot q
        drafts = torch.tensor([[1, 2]] * n)
        if min_p:  # drafts min-p keeps (the most likely tokens), so some are accepted
            drafts = target[:k].argmax(-1).expand(n, k)
        q = None
    else:  # drafts drawn from a different distribution q
        q_dist = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
        drafts = torch.stack([torch.multinomial(q_dist[i], n, replacement=True, generator=g)
                              for i in range(k)], 1)
        q = q_dist.expand(n, k, vocab)
    if draft == "ngram, matched":
        tokens, accepted = matching_verify(target.expand(n, k + 1, vocab), drafts, st)
    else:
        tokens, accepted = rejection_sample(target.expand(n, k + 1, vocab), drafts, q, st)
    p = probabilities(target, tensors([params] * (k + 1)))  # (k + 1, V)
    if min_p:
        assert (p == 0).any()  # the filter drops something here
    chi2_ok(torch.bincount(tokens[:, 0], minlength=vocab).float(), p[0], n)
    assert 0 < accepted.float().mean() < k
    # The second token, among rows that accepted the first draft, follows p(. | draft 1).
    rows = accepted >= 1
    chi2_ok(torch.bincount(tokens[rows, 1], minlength=vocab).float(), p[1], int(rows.sum()))


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


def reference_penalized(logits, outputs, prompts, presence, frequency, repetition):
    """Penalties for one row, written out: repetition over prompt and output tokens first,
    then frequency per occurrence and presence once per generated token."""
    out = logits.clone().double()
    for t in set(outputs) | set(prompts):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(outputs):
        out[t] -= frequency * outputs.count(t) + presence
    return out


def test_penalties_match_the_written_out_rule_per_row():
    vocab = 12
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 3
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3),
              SamplingParams(),  # untouched beside penalized rows
              SamplingParams(repetition_penalty=0.7, frequency_penalty=-1.0)]
    histories = [([1, 2, 3, 3, 3, 5], 3), ([4, 4, 4], 1), ([7, 8, 8], 2)]
    st = SamplingTensors.build(params, [0, 1, 2], [6, 3, 3], "cpu", histories)
    got = adjusted_logits(logits, st)
    for row, (p, (ids, n)) in enumerate(zip(params, histories)):
        want = reference_penalized(logits[row], ids[n:], ids[:n], p.presence_penalty,
                                   p.frequency_penalty, p.repetition_penalty)
        torch.testing.assert_close(got[row].double(), want, rtol=1e-6, atol=1e-6)


def test_without_new_settings_the_logits_are_untouched():
    logits = torch.randn(4, 9)
    st = tensors([SamplingParams(temperature=0)] * 4)
    assert adjusted_logits(logits, st) is logits
    assert torch.equal(sample(logits, st), logits.argmax(-1))


def test_banned_tokens_are_never_drawn_and_greedy_moves_past_them():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0]]).expand(2000, 4)
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[0])] + \
        [SamplingParams(temperature=1.0, min_tokens=2, stop_token_ids=[0, 1])] * 1999
    st = SamplingTensors.build(params, list(range(2000)), [1] * 2000, "cpu",
                               [([9], 1)] * 2000, eos_token_id=3)
    tokens = sample(logits, st)
    assert tokens[0] == 1  # greedy's argmax 0 is banned
    assert not set(tokens[1:].tolist()) & {0, 1, 3}  # only 2 is left for the sampled rows
    done = SamplingTensors.build(params[:1], [0], [3], "cpu", [([9, 1, 1], 1)], eos_token_id=3)
    assert sample(logits[:1], done).item() == 0  # min_tokens reached: nothing banned


def test_min_p_drops_unlikely_tokens_and_samples_the_rest_in_proportion():
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    n = 20000
    st = tensors([SamplingParams(min_p=0.2)] * n, seeds=list(range(n)))
    tokens = sample(probs.log().expand(n, 5), st)
    kept = torch.tensor([0.5, 0.3, 0.12, 0.0, 0.0])  # below 0.2 * 0.5 = 0.1 is dropped
    chi2_ok(torch.bincount(tokens, minlength=5).float(), kept / kept.sum(), n)


def test_top_logprobs_are_the_models_log_softmax():
    logits = torch.randn(3, 10)
    targets = torch.tensor([4, 0, 9])
    lp, rank, ids, values = top_logprobs(logits, targets, 3)
    ref = logits.log_softmax(-1)
    torch.testing.assert_close(lp, ref.gather(-1, targets[:, None])[:, 0])
    torch.testing.assert_close(values, ref.topk(3).values)
    assert rank.tolist() == [int((ref[i] > ref[i, t]).sum()) + 1 for i, t in enumerate(targets)]


def test_bad_settings_name_the_argument():
    for kw, name in ((dict(n=0), "n"), (dict(min_p=1.5), "min_p"),
                     (dict(presence_penalty=3.0), "presence_penalty"),
                     (dict(frequency_penalty=float("nan")), "frequency_penalty"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(min_tokens=-1), "min_tokens"),
                     (dict(min_tokens=5, max_tokens=4), "min_tokens"),
                     (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=1.5), "prompt_logprobs"),
                     (dict(include_stop_str_in_output="yes"), "include_stop_str_in_output")):
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kw)


def test_argmax_only_rows_sample_the_argmax_of_their_raw_logits():
    """`SamplingInput.argmax_only` (the runner then takes the argmax without uploading any
    setting) holds exactly when `sample` returns the raw logits' argmax for every row."""
    from hwattn.engine.sampler import SamplingInput

    logits = 0.1 * torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    cases = {
        "greedy": ([SamplingParams(temperature=0)] * 4, None),
        "greedy, top-k and min-p": ([SamplingParams(temperature=0, top_k=3, min_p=0.2)] * 4, None),
        "one sampled row": ([SamplingParams(temperature=0)] * 3 + [SamplingParams()], None),
        "penalties": ([SamplingParams(temperature=0, presence_penalty=2.0)] * 4,
                      [([1, int(logits[i].argmax())], 1) for i in range(4)]),
        "min_tokens": ([SamplingParams(temperature=0, min_tokens=5)] * 4,
                       [([int(logits[i].argmax())], 1) for i in range(4)]),
    }
    expected = {"greedy": True, "greedy, top-k and min-p": True, "one sampled row": False,
                "penalties": False, "min_tokens": False}
    for name, (params, histories) in cases.items():
        settings = SamplingInput.of(params, list(range(4)), [1] * 4, histories,
                                    eos_token_id=int(logits[0].argmax()))
        assert settings.argmax_only == expected[name], name
        tokens = sample(logits, settings.tensors("cpu"))
        assert torch.equal(tokens, logits.argmax(-1)) == expected[name], name


def test_argmax_rows_equal_the_general_build_for_the_rows_it_takes():
    """`SamplingInput.argmax_rows` (the engine's decode-step shortcut) builds exactly what
    `SamplingInput.of` does, for every setting `Sequence.argmax_only` lets through, and that
    flag holds for exactly those settings."""
    from hwattn.engine.sampler import SamplingInput
    from hwattn.engine.sequence import Sequence

    through = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=1),
               SamplingParams(temperature=0, top_k=5, top_p=0.5, seed=3, max_tokens=7,
                              stop=["x"], ignore_eos=True)]
    kept_out = [SamplingParams(), SamplingParams(temperature=0, min_p=0.1),
                SamplingParams(temperature=0, logprobs=2),
                SamplingParams(temperature=0, repetition_penalty=1.1),
                SamplingParams(temperature=0, min_tokens=2)]
    assert all(Sequence("r", [1], p, seed=0).argmax_only for p in through)
    assert not any(Sequence("r", [1], p, seed=0).argmax_only for p in kept_out)
    seeds, positions = [11, 12, 13], [4, 9, 2]
    assert SamplingInput.argmax_rows(through, seeds, positions) == \
        SamplingInput.of(through, seeds, positions)


def test_matching_verification_emits_the_plain_samplers_tokens():
    """Each emitted token is the one `sample` draws at its position without speculation, so
    drafts change how many tokens a step yields, never which; a draft is accepted iff it
    matches that draw and every draft before it was accepted."""
    vocab, k, n = 7, 3, 64
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(n, k + 1, vocab, generator=g)
    params = [SamplingParams(temperature=t, top_k=tk) for t, tk in
              zip([0.0, 0.5, 1.0, 1.7] * (n // 4), [0, 3, 0, 2] * (n // 4))]
    positions = torch.randint(0, 500, (n,), generator=g).tolist()
    st = tensors(params, positions=positions, seeds=list(range(100, 100 + n)))
    plain = torch.stack([sample(logits[:, i], tensors(params, [p + i for p in positions],
                                                      list(range(100, 100 + n))))
                         for i in range(k + 1)], 1)  # (n, k + 1): one plain step per position
    drafts = torch.where(torch.rand(n, k, generator=g) < 0.5, plain[:, :k],
                         torch.randint(0, vocab, (n, k), generator=g))
    tokens, accepted = matching_verify(logits, drafts, st)
    for b in range(n):
        a = int(accepted[b])
        assert tokens[b, :a + 1].tolist() == plain[b, :a + 1].tolist()
        assert drafts[b, :a].tolist() == plain[b, :a].tolist()
        assert a == k or drafts[b, a] != plain[b, a]
    assert 0 < accepted.float().mean() < k


def dense_bias(params, vocab: int) -> torch.Tensor:
    """(B, V) the rows' logit biases written out."""
    out = torch.zeros(len(params), vocab)
    for row, p in enumerate(params):
        for token, bias in (p.logit_bias or {}).items():
            out[row, token] += bias
    return out


def test_logit_bias_is_added_to_the_logits_before_everything_else():
    """Each row's biases are added to its own logits (rows without any untouched), before
    penalties, greedy argmax, temperature and filtering: a biased row samples exactly what
    the unbiased sampler draws from the written-out biased logits, with the same seed."""
    vocab, n = 11, 48
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(n, vocab, generator=g) * 2
    params = []
    for i in range(n):
        bias = {int(t): float(b) for t, b in zip(torch.randint(0, vocab, (i % 4,), generator=g),
                                                 torch.randn(i % 4, generator=g) * 5)}
        params.append(SamplingParams(temperature=[0.0, 0.6, 1.0, 1.5][i % 4], top_k=[0, 3][i % 2],
                                     top_p=[1.0, 0.9, 1.0][i % 3], logit_bias=bias or None))
    positions, seeds = list(range(7, 7 + n)), list(range(50, 50 + n))
    unbiased = [SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p)
                for p in params]
    want = sample(logits + dense_bias(params, vocab), tensors(unbiased, positions, seeds))
    assert torch.equal(sample(logits, tensors(params, positions, seeds)), want)
    assert tensors(unbiased).bias is None
    torch.testing.assert_close(adjusted_logits(logits, tensors(params)),
                               logits + dense_bias(params, vocab))
    # before the penalties: repetition divides the biased logit (token 1: (1 + 4) / 2 = 2.5,
    # below token 2's 3), not the raw one (1 / 2 + 4 = 4.5 would win)
    p = SamplingParams(temperature=0, repetition_penalty=2.0, logit_bias={1: 4.0})
    st = SamplingTensors.build([p], [0], [2], "cpu", [([1, 1], 1)])
    row = torch.tensor([[0.0, 1.0, 3.0]])
    assert adjusted_logits(row, st)[0, 1] == 2.5 and sample(row, st).item() == 2


def test_logit_bias_of_minus_100_bans_and_plus_100_forces_a_token():
    logits = torch.randn(64, 20, generator=torch.Generator().manual_seed(4))
    top = logits.argmax(-1)
    banned = [SamplingParams(temperature=1.0, logit_bias={int(t): -100.0}) for t in top]
    assert not (sample(logits, tensors(banned, seeds=list(range(64)))) == top).any()
    forced = [SamplingParams(temperature=1.0, logit_bias={5: 100.0})] * 64
    assert (sample(logits, tensors(forced, seeds=list(range(64)))) == 5).all()


def test_verification_repeats_each_rows_logit_bias_with_it():
    """`matching_verify` and `rejection_sample` see the biases at every one of a row's k + 1
    positions: a row forced to a token by its bias emits it at each, whatever its drafts."""
    vocab, k = 9, 3
    logits = torch.randn(4, k + 1, vocab, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=1.0, logit_bias={2: 100.0}), SamplingParams(),
              SamplingParams(temperature=0, logit_bias={7: 100.0, 1: -3.0}), SamplingParams()]
    st = tensors(params, positions=[3, 4, 5, 6], seeds=[1, 2, 3, 4])
    drafts = torch.tensor([[2, 2, 2], [0, 0, 0], [7, 7, 1], [4, 4, 4]])
    for verify in (matching_verify, lambda lg, d, s: rejection_sample(lg, d, None, s)):
        tokens, accepted = verify(logits, drafts, st)
        assert accepted[0] == k and tokens[0].tolist() == [2] * (k + 1)
        assert accepted[2] == 2 and tokens[2, :3].tolist() == [7, 7, 7]
    plain = torch.stack([sample(logits[:, i], tensors(params, [p + i for p in [3, 4, 5, 6]],
                                                      [1, 2, 3, 4])) for i in range(k + 1)], 1)
    tokens, accepted = matching_verify(logits, drafts, st)
    for b in range(4):
        assert tokens[b, :int(accepted[b]) + 1].tolist() == plain[b, :int(accepted[b]) + 1].tolist()


def test_logit_bias_is_checked_and_copied():
    for bias, says in (({"5": 1.0}, "keys must be token ids"), ({-1: 1.0}, "keys must be token ids"),
                       ({True: 1.0}, "keys must be token ids"), ({5: float("nan")}, "finite"),
                       ({5: "high"}, "finite"), ([(5, 1.0)], "dict of token id")):
        with pytest.raises(ValueError, match="logit_bias.*" + says):
            SamplingParams(logit_bias=bias)
    mine = {3: 2}
    p = SamplingParams(logit_bias=mine)
    mine[3] = -100
    assert p.logit_bias == {3: 2.0} and isinstance(p.logit_bias[3], float)
    assert SamplingParams(logit_bias={}).logit_bias is None
    assert not SamplingParams(temperature=0, logit_bias={1: 1.0}).argmax_of_raw_logits


def test_temperatures_below_1e_5_are_greedy():
    """Observed: temperature 1e-40 divided the logits to +-inf in float32, and the token drawn
    was the first positive logit, not the largest. As vLLM, temperatures below 1e-5 decode
    greedily (the argmax, whatever top-k, top-p and min-p say)."""
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(6)) * 4
    for t in (1e-6, 1e-20, 1e-40, 5e-324):
        for kw in ({}, dict(top_p=0.9), dict(min_p=0.1), dict(top_k=3)):
            params = [SamplingParams(temperature=t, **kw)] * 32
            assert all(p.greedy for p in params)
            assert torch.equal(sample(logits, tensors(params, seeds=list(range(32)))),
                               logits.argmax(-1)), (t, kw)
    assert not SamplingParams(temperature=1e-5).greedy


def test_top_k_keeps_every_token_tied_with_the_kth():
    """Observed: top_k=2 over logits [0, 2, 1, 2, 2, -1] kept tokens 1 and 3 (the sort's
    first two) and never drew token 4, exactly as likely. As vLLM's and Hugging Face's top-k,
    every token tied with the k-th most likely stays (bf16 logits tie at the boundary of a
    top-50 over 128K ids in most rows)."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]])
    for dtype in (torch.float32, torch.bfloat16):
        for kw in (dict(top_k=2), dict(top_k=2, top_p=0.9), dict(top_k=3, temperature=0.7)):
            p = probabilities(logits.to(dtype), tensors([SamplingParams(**kw)]))
            assert torch.allclose(p[0], torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3, 0])), kw
    n = 6000
    tokens = sample(logits.expand(n, 6), tensors([SamplingParams(top_k=2)] * n,
                                                 seeds=list(range(n))))
    chi2_ok(torch.bincount(tokens, minlength=6).float(),
            torch.tensor([0, 1 / 3, 0, 1 / 3, 1 / 3, 0]), n)
    # Fewer finite logits than k, or k beyond the vocabulary: nothing more is dropped.
    banned = torch.tensor([[1.0, float("-inf"), 0.5, float("-inf")]])
    p = probabilities(banned, tensors([SamplingParams(top_k=3)]))
    assert torch.allclose(p, banned.softmax(-1))
    p = probabilities(logits, tensors([SamplingParams(top_k=(1 << 63) - 1)]))
    assert torch.allclose(p, logits.softmax(-1))


def test_top_p_of_one_drops_nothing_beside_rows_that_filter():
    """Observed: a row with top_p=1 and no top-k lost its ~1,300 least likely tokens of 32K
    (the float32 running sum reached 1 before them, and `before >= 1` dropped them) whenever a
    batch mate used top-k, so a seeded request's law depended on its batch."""
    logits = torch.randn(4, 32000, generator=torch.Generator().manual_seed(0)) * 3
    alone = processed_logits(logits, tensors([SamplingParams()] * 4))
    mates = [SamplingParams(), SamplingParams(top_k=5), SamplingParams(top_k=32000),
             SamplingParams(top_p=1.0, min_p=0.0, temperature=1.0)]
    beside = processed_logits(logits, tensors(mates))
    assert torch.isfinite(beside[[0, 2, 3]]).all()
    assert torch.equal(beside[[0, 2, 3]], alone[[0, 2, 3]])
    assert torch.isfinite(beside[1]).sum() == 5


def test_settings_beyond_float32_take_their_limits():
    """Observed: temperature 1e39 (finite, so accepted) is inf in float32, and the banned
    tokens' -inf / inf = NaN won every argmax: min_tokens' end-of-sequence and stop ids were
    drawn every time. A logit bias of 1e39 (inf in float32) made its row's probabilities NaN,
    and draft-model verification emitted token 0. Clamped, a huge temperature draws uniformly
    among the allowed tokens and a huge bias forces its token on every path."""
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0, 0.5, 2.0]])
    n = 3000
    sp = SamplingParams(temperature=1e39, min_tokens=3, stop_token_ids=[0])
    st = SamplingTensors.build([sp] * n, list(range(n)), [1] * n, "cpu", [([9], 1)] * n,
                               eos_token_id=5)
    chi2_ok(torch.bincount(sample(logits.expand(n, 6), st), minlength=6).float(),
            torch.tensor([0, 0.25, 0.25, 0.25, 0.25, 0]), n)
    for bias, temperature in ((1e39, 1.0), (1e38, 0.1), (3e38, 1e-4)):
        sp = SamplingParams(temperature=temperature, top_p=0.9, min_p=0.1, logit_bias={4: bias})
        st = tensors([sp] * 8, seeds=list(range(8)))
        p = probabilities(logits.expand(8, 6), st)
        assert torch.equal(p, torch.tensor([[0, 0, 0, 0, 1.0, 0]]).expand(8, 6)), bias
        assert sample(logits.expand(8, 6), st).tolist() == [4] * 8
        target = logits.expand(8, 3, 6)
        drafts = torch.tensor([[1, 4]] * 8)
        tokens, accepted = rejection_sample(target, drafts, torch.full((8, 2, 6), 1 / 6), st)
        assert tokens[:, 0].tolist() == [4] * 8 and accepted.tolist() == [0] * 8
        tokens, accepted = matching_verify(target, drafts, st)
        assert tokens[:, 0].tolist() == [4] * 8 and accepted.tolist() == [0] * 8


class _MarkovDraftRunner:
    """A draft model's runner whose logits after a token are a fixed row of `table` (V, V)."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def execute(self, step):
        last = torch.as_tensor([row[-1] for row in step.tokens]) \
            if isinstance(step.tokens, list) else step.tokens[:, -1]
        return self.table[last][:, None]  # (B, 1, V)


class _Row:
    """What `DraftModelDrafter.propose` reads of a sequence: its tokens and draft cache."""

    def __init__(self, tokens: list[int]):
        self.token_ids, self.block_table, self.draft_cached = tokens, [], len(tokens) - 1

    def __len__(self):
        return len(self.token_ids)


@pytest.mark.parametrize("drafter", ["model", "ngram", "ngram, one-hot q"])
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=2, logit_bias={0: 0.5}),
    SamplingParams(temperature=1.3, top_p=0.75, min_p=0.1)], ids=["t1", "topk-bias", "topp-minp"])
def test_the_first_two_tokens_keep_their_joint_law_under_speculation(drafter, params):
    """The joint law of the first two tokens emitted after a context, when the target's and
    the draft's logits depend on the token before (so the second token's law depends on the
    first): verify steps of k = 2 drafts as the engine runs them (a second step, one position
    later, when the first accepted nothing) against the exact product p(x1) p(x2 | x1) of the
    filtered target, and against plain sampling of the same seeds. Chi-square over 9 bins at
    the 0.999 quantile: a false alarm 1 in 1000 per case, fixed seeds, so deterministic; a
    verifier that drew its corrections from p instead of norm(max(p - q, 0)) fails it."""
    from hwattn.engine.speculative import DraftModelDrafter, NgramDrafter

    vocab, k, n, pos = 3, 2, 20000, 11
    g = torch.Generator().manual_seed(3)
    target = torch.randn(vocab, vocab, generator=g) * 1.5  # logits after each token
    draft = torch.randn(vocab, vocab, generator=g) * 1.5
    seeds = list(range(7000, 7000 + n))
    a = int(target[2].argmax())  # n-gram drafts after 2: its likeliest continuation
    context = [2, a, int(target[a].argmax())]

    def settings(position):
        return SamplingTensors.build([params] * n, seeds, [position] * n, "cpu")

    model = DraftModelDrafter.__new__(DraftModelDrafter)
    model.k, model.budget, model.runner = k, 1 << 20, _MarkovDraftRunner(draft)
    ngram = NgramDrafter(k)

    def verify_step(last: torch.Tensor, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        st = settings(position)
        history = [context + [int(t)] for t in last]
        if drafter == "model":
            drafts, q = model.propose([_Row(h) for h in history], st)
        else:
            drafts, q = torch.tensor([ngram.lookup(h) for h in history]), None
        logits = torch.stack([target[last], target[drafts[:, 0]], target[drafts[:, 1]]], 1)
        if drafter == "ngram":
            return matching_verify(logits, drafts, st)
        return rejection_sample(logits, drafts, q, st)

    first = torch.full((n,), 2, dtype=torch.int64)
    tokens, accepted = verify_step(first, pos)
    x1, x2 = tokens[:, 0], tokens[:, 1].clone()
    again = accepted == 0  # one token from the first step: the second comes from the next
    x2[again] = verify_step(x1, pos + 1)[0][again, 0]
    assert 0 < accepted.float().mean() < k  # drafts both accepted and rejected

    p1 = probabilities(target[2][None], tensors([params]))[0]  # (V,)
    p2 = probabilities(target, tensors([params] * vocab))  # (V, V): after each token
    joint = (p1[:, None] * p2).flatten()
    chi2_ok(torch.bincount(x1 * vocab + x2, minlength=vocab * vocab).float(), joint, n)
    y1 = sample(target[first], settings(pos))
    y2 = sample(target[y1], settings(pos + 1))
    chi2_ok(torch.bincount(y1 * vocab + y2, minlength=vocab * vocab).float(), joint, n)
    if drafter == "ngram":  # the plain sampler's own tokens, seed by seed
        assert torch.equal(x1, y1) and torch.equal(x2, y2)
