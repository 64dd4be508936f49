"""Sampling on the device without host syncs: logit biases, presence / frequency / repetition
penalties, tokens banned until min_tokens, temperature, min-p, top-k, top-p, and per-request seeds through
a counter-based random number generator; plus the model's log-probabilities that requests ask
to see.

Each random draw is a hash of (request seed, token position, stream, vocabulary index), so a
request's samples depend only on its own seed and never on which other requests share its
batch, and no generator object has to be stepped from the host. Sampling draws a Gumbel
variate per vocabulary entry and takes the argmax (the Gumbel-max trick), which samples
exactly from softmax(logits).

`rejection_sample` verifies speculative drafts: draft i is accepted with probability
min(1, p(d_i) / q(d_i)); at the first rejection the token is drawn from normalize(max(p - q, 0)),
and after k acceptances a bonus token is drawn from p. The output is distributed as p
(Leviathan et al. 2023; Chen et al. 2023). Greedy requests accept a draft iff it is p's argmax.
Its tokens are not those `sample` draws at the same seed and positions: a seeded request of a
draft-model engine gets other tokens (of the same law) when a batch mate makes its steps plain.

`matching_verify` verifies the drafts of a deterministic drafter (q one-hot, n-gram lookup)
by drawing, at each of the k + 1 positions, the very token `sample` draws there without
speculation (same seed, position and stream), and accepting the drafts that match. A draft d
is then accepted with probability p(d) and a rejection emits p's draw given that it is not d:
`rejection_sample`'s law for one-hot q. The tokens are also those of decoding without
speculation. A seeded request therefore gets the same tokens whether or not its steps verify
drafts, and whether they do can depend on its batch mates (a penalised one makes the step
plain).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from hwattn.engine.sampling_params import bad_word_bans
from hwattn.ops.argmax import argmax_last

MASK32 = 0xFFFFFFFF
STREAM_SAMPLE, STREAM_ACCEPT, STREAM_RESIDUAL, STREAM_DRAFT = 0, 1, 2, 3


def _mix32(x: Tensor) -> Tensor:
    """An integer hash of 32-bit values held in int64 (products stay below 2**63)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & MASK32
    return (x >> 16) ^ x


# The largest float32 below 1. (2**24 - 1 + 0.5) / 2**24 rounds up to 1.0 in float32, whose
# Gumbel variate is +inf: that entry would win whatever its probability, even a masked one
# (-inf + inf is NaN, which argmax takes), once in 2**24 draws, i.e. in 0.8% of the tokens
# sampled over a vocabulary of 128K.
BELOW_ONE = 1.0 - 2.0**-24
FLOAT32_MAX = torch.finfo(torch.float32).max


def uniform(seeds: Tensor, counters: Tensor, stream: int, n: int) -> Tensor:
    """(B, n) float32 uniforms in (0, 1) (never 0 or 1) from seeds (B,) int64 and counters
    (B,) int64."""
    h = _mix32(seeds & MASK32)
    h = _mix32(h ^ ((seeds >> 32) & MASK32))
    h = _mix32(h ^ (counters & MASK32))
    h = _mix32(h ^ stream)
    cols = (torch.arange(n, device=seeds.device, dtype=torch.int64) * 0x9E3779B1) & MASK32
    v = _mix32(_mix32(h[:, None] ^ cols))
    return (((v >> 8).float() + 0.5) * (1.0 / (1 << 24))).clamp_(max=BELOW_ONE)


def gumbel(seeds: Tensor, counters: Tensor, stream: int, n: int) -> Tensor:
    return -torch.log(-torch.log(uniform(seeds, counters, stream, n)))


def describe_error(err: BaseException) -> str:
    """How a failed request's output names its error: "ExceptionType: message"."""
    return f"{type(err).__name__}: {err}"


def by_rows(run, n: int) -> list:
    """`run(rows)` over all `n` rows of a batch at once (rows: a list of row indices; it
    returns one result per row). If that raises, every row goes alone, and a row that still
    raises gets `describe_error` of its exception (a str) in place of a result: one row's
    settings can never cost the other rows theirs."""
    try:
        return run(list(range(n)))
    except Exception as err:  # noqa: BLE001 - find the rows that fail on their own
        if n == 1:
            return [describe_error(err)]
    out = []
    for i in range(n):
        try:
            out.append(run([i])[0])
        except Exception as err:  # noqa: BLE001 - that row alone fails
            out.append(describe_error(err))
    return out


@dataclass
class SamplingInput:
    """Per-row sampling settings as plain lists (what a step sends to another process).

    temperature (0 = greedy), top_k (0 = off), top_p, seeds, positions (index of the token
    being sampled within its sequence): one entry per row. The rest is empty when no row uses
    it: min_p (0 = off); presence, frequency, repetition penalties with the earlier tokens
    they read (`outputs`: each row's generated tokens; `prompts`: its prompt, for the
    repetition penalty only); `banned`: token ids a row may not sample yet (end-of-sequence
    and stop ids before min_tokens, the last tokens of bad words its output ends in);
    `logprobs`: top log-probabilities to report (-1 = none); `bias`: each row's (token id,
    bias) pairs added to its logits first; `allowed`: the only ids a row may sample (empty:
    any); `ahead`: a verify step's bad-word bans, per row (offset j of its k + 1 tokens,
    token id) pairs (the bans at j if the row's first j drafts are accepted).
    """

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seeds: list[int]
    positions: list[int]
    min_p: list[float] = field(default_factory=list)
    penalties: list[tuple[float, float, float]] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    banned: list[list[int]] = field(default_factory=list)
    logprobs: list[int] = field(default_factory=list)
    bias: list[list[tuple[int, float]]] = field(default_factory=list)
    allowed: list[list[int]] = field(default_factory=list)
    ahead: list[list[tuple[int, int]]] = field(default_factory=list)

    @classmethod
    def of(cls, params, seeds: list[int], positions: list[int], histories=None,
           eos_token_id: int | None = None) -> "SamplingInput":
        """Settings of rows with `params`. histories: per row (token ids, prompt length) of
        its sequence so far, needed when a row has penalties, min_tokens or bad words (None:
        no row has)."""
        out = cls([0.0 if p.greedy else p.temperature for p in params], [p.top_k for p in params],
                  [p.top_p for p in params], list(seeds), list(positions))
        if any(p.min_p > 0 for p in params):
            out.min_p = [p.min_p for p in params]
        if any(p.logprobs is not None for p in params):
            out.logprobs = [-1 if p.logprobs is None else p.logprobs for p in params]
        if any(p.logit_bias for p in params):
            out.bias = [list(p.logit_bias.items()) if p.logit_bias else [] for p in params]
        if any(p.allowed_token_ids is not None for p in params):
            out.allowed = [[] if p.allowed_token_ids is None else list(p.allowed_token_ids)
                           for p in params]
        if histories is None:
            if any(p.penalized or p.min_tokens or p.bad_words for p in params):
                raise ValueError("penalties, min_tokens and bad_words need the rows' histories")
            return out
        if any(p.penalized for p in params):
            out.penalties = [(p.presence_penalty, p.frequency_penalty, p.repetition_penalty)
                             for p in params]
            out.outputs = [ids[n:] if p.penalized else [] for p, (ids, n) in zip(params, histories)]
            out.prompts = [ids[:n] if p.repetition_penalty != 1 else []
                           for p, (ids, n) in zip(params, histories)]
        if any(p.min_tokens for p in params):
            out.banned = [
                ([] if p.ignore_eos or eos_token_id is None else [eos_token_id])
                + list(p.stop_token_ids) if len(ids) - n < p.min_tokens else []
                for p, (ids, n) in zip(params, histories)]
        if any(p.bad_words for p in params):
            bans = [bad_word_bans(words_of(p), ids[n:]) if p.bad_words else []
                    for p, (ids, n) in zip(params, histories)]
            out.banned = [a + b for a, b in zip(out.banned, bans)] if out.banned else bans
        return out

    @classmethod
    def argmax_rows(cls, params, seeds: list[int], positions: list[int]) -> "SamplingInput":
        """`of` for rows that all sample greedily with no logit bias, penalty, min_tokens, min_p
        or log-probabilities (`Sequence.argmax_only`): the same settings, built in two passes
        instead of one per setting (a decode step builds them for every row)."""
        return cls([0.0] * len(params), [p.top_k for p in params], [p.top_p for p in params],
                   list(seeds), list(positions))

    def __len__(self) -> int:
        return len(self.seeds)

    @property
    def argmax_only(self) -> bool:
        """Whether every row's token is the argmax of its raw logits (greedy, no biases, no
        penalties, no banned tokens): `sample` then needs none of the settings on the device."""
        return not self.penalties and not any(self.banned) and not any(self.bias) \
            and not any(self.allowed) and not any(self.ahead) and all(
                t == 0.0 for t in self.temperature)

    def select(self, rows: list[int]) -> "SamplingInput":
        """The settings of `rows` alone, in that order."""
        def pick(values):
            return [values[i] for i in rows] if values else []

        return SamplingInput(*(pick(getattr(self, f.name)) for f in fields(self)))

    def tensors(self, device, upload=None) -> "SamplingTensors":
        """The settings on `device`: two host-to-device copies for the common settings, a few
        more for penalties. upload: how a host tensor gets there (default `.to(device)`; the
        engine's runner passes its pinned, non-blocking copy)."""
        move = upload or (lambda t: t.to(device))
        floats = move(torch.tensor([self.temperature, self.top_p], dtype=torch.float32))
        ints = move(torch.tensor([self.top_k, self.seeds, self.positions], dtype=torch.int64))
        st = SamplingTensors(floats[0], ints[0], floats[1], ints[1], ints[2],
                             any(k > 0 for k in self.top_k) or any(p < 1.0 for p in self.top_p),
                             all(t == 0.0 for t in self.temperature))
        if self.min_p:
            st.min_p = move(torch.tensor(self.min_p, dtype=torch.float32))
        if self.penalties:
            st.penalties = move(torch.tensor(self.penalties, dtype=torch.float32))  # (B, 3)
            st.outputs = _ragged(self.outputs, move)
            st.prompts = _ragged(self.prompts, move)
        if any(self.banned):
            st.banned = _ragged(self.banned, move)
        if any(self.bias):
            rows, ids = _ragged([[t for t, _ in row] for row in self.bias], move)
            values = move(torch.tensor([b for row in self.bias for _, b in row],
                                       dtype=torch.float32))
            st.bias = (rows, ids, values)
        if any(self.allowed):
            rows, ids = _ragged(self.allowed, move)
            st.allowed = (rows, ids, move(torch.tensor([bool(a) for a in self.allowed])))
        if any(self.ahead):
            both = move(torch.tensor([[i, j, t] for i, row in enumerate(self.ahead)
                                      for j, t in row], dtype=torch.int64).reshape(-1, 3).T)
            st.ahead = (both[0], both[1], both[2])
        st.logprobs = list(self.logprobs)
        return st


def words_of(params) -> list[list[int]]:
    """A request's bad words as token ids (set when the engine checked its params)."""
    if params.bad_words_token_ids is None:
        raise ValueError("bad_words were not tokenized: the engine's check_params sets "
                         "bad_words_token_ids")
    return params.bad_words_token_ids


def verify_bans(params, output: list[int], drafts: list[int]) -> list[tuple[int, int]]:
    """A verify step's bad-word bans of one row (`SamplingInput.ahead`): (j, token) for each
    token banned at the j-th of the k + 1 positions, after `output` (its generated tokens)
    and its first j drafts."""
    words = words_of(params)
    longest = max(len(w) for w in words) - 1  # tokens a ban looks back at, at most
    out = []
    for j in range(len(drafts) + 1):
        seen = (list(output[max(0, len(output) - longest):]) + list(drafts[:j])) if longest \
            else []
        out += [(j, t) for t in bad_word_bans(words, seen)]
    return out


def _ragged(rows: list[list[int]], move) -> tuple[Tensor, Tensor]:
    """(row index, token id) pairs of ragged per-row token lists, as two (N,) int64 tensors
    put on the device by `move`."""
    index = [i for i, row in enumerate(rows) for _ in row]
    flat = [t for row in rows for t in row]
    both = move(torch.tensor([index, flat], dtype=torch.int64).reshape(2, -1))
    return both[0], both[1]


@dataclass
class SamplingTensors:
    """Per-row sampling settings on the device, all (B,) unless said otherwise."""

    temperature: Tensor  # float32, 0 = greedy
    top_k: Tensor  # int64, 0 = off
    top_p: Tensor  # float32
    seeds: Tensor  # int64
    positions: Tensor  # int64: index of the token being sampled within its sequence
    filtered: bool  # whether any row uses top-k / top-p (decided on the host)
    all_greedy: bool
    min_p: Tensor | None = None  # float32, 0 = off; None: no row uses it
    penalties: Tensor | None = None  # (B, 3) float32 presence, frequency, repetition
    outputs: tuple[Tensor, Tensor] | None = None  # (row, token) of generated tokens
    prompts: tuple[Tensor, Tensor] | None = None  # (row, token) of prompt tokens
    banned: tuple[Tensor, Tensor] | None = None  # (row, token) not to be sampled yet
    bias: tuple[Tensor, Tensor, Tensor] | None = None  # (row, token, float32 bias) added first
    # (row, token): the only tokens restricted rows may sample, and (B,) bool: which are
    allowed: tuple[Tensor, Tensor, Tensor] | None = None
    ahead: tuple[Tensor, Tensor, Tensor] | None = None  # (row, offset, token): `repeat`'s bans
    logprobs: list[int] = field(default_factory=list)  # top log-probs per row, -1 = none

    @classmethod
    def build(cls, params, seeds: list[int], positions: list[int], device,
              histories=None, eos_token_id: int | None = None) -> "SamplingTensors":
        return SamplingInput.of(params, seeds, positions, histories, eos_token_id).tensors(device)

    def repeat(self, times: int) -> "SamplingTensors":
        """Each row repeated `times` times with positions counting up (for k + 1 rows), its
        logit biases and allowed tokens with it, and its `ahead` bans at their offsets.
        Speculative verification takes plain rows only: penalties, min_tokens bans and
        log-probs stay behind."""
        step = torch.arange(times, device=self.positions.device)
        rep = lambda t: t.repeat_interleave(times)  # noqa: E731
        bias = allowed = banned = None
        if self.bias is not None:
            rows, ids, values = self.bias
            bias = ((rows[:, None] * times + step).flatten(), rep(ids), rep(values))
        if self.allowed is not None:
            rows, ids, restricted = self.allowed
            allowed = ((rows[:, None] * times + step).flatten(), rep(ids), rep(restricted))
        if self.ahead is not None:
            rows, offsets, ids = self.ahead
            banned = (rows * times + offsets, ids)
        return SamplingTensors(rep(self.temperature), rep(self.top_k), rep(self.top_p),
                               rep(self.seeds), (self.positions[:, None] + step).flatten(),
                               self.filtered, self.all_greedy,
                               None if self.min_p is None else rep(self.min_p), banned=banned,
                               bias=bias, allowed=allowed)


def adjusted_logits(logits: Tensor, st: SamplingTensors) -> Tensor:
    """(B, V) logits with the rows' biases added, then their penalties applied, banned
    tokens and (in restricted rows) tokens not allowed at -inf: what both the greedy argmax
    and sampling start from. Returns `logits` itself when no row has any."""
    if st.penalties is None and st.banned is None and st.bias is None and st.allowed is None:
        return logits
    logits = logits.float().clone()
    batch, vocab = logits.shape
    if st.bias is not None:
        rows, ids, values = st.bias
        logits.index_put_((rows, ids), values, accumulate=True)
    if st.penalties is not None:
        presence, frequency, repetition = st.penalties.unbind(-1)  # (B,) each
        counts = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)
        rows, ids = st.outputs
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
        seen = counts > 0
        rows, ids = st.prompts
        seen_anywhere = seen.clone().index_put_((rows, ids), torch.ones_like(ids, dtype=torch.bool))
        scaled = torch.where(logits > 0, logits / repetition[:, None], logits * repetition[:, None])
        logits = torch.where(seen_anywhere, scaled, logits)
        logits = logits - frequency[:, None] * counts - presence[:, None] * seen.float()
    if st.banned is not None:
        rows, ids = st.banned
        logits.index_put_((rows, ids), torch.full_like(ids, float("-inf"), dtype=torch.float32))
    if st.allowed is not None:
        rows, ids, restricted = st.allowed
        keep = (~restricted)[:, None].repeat(1, vocab)  # unrestricted rows keep everything
        keep.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.bool))
        logits = logits.masked_fill_(~keep, float("-inf"))
    return logits


def processed_logits(logits: Tensor, st: SamplingTensors) -> Tensor:
    """(B, V) logits -> temperature-scaled, min-p / top-k / top-p masked (-inf) fp32 logits."""
    logits = logits.float()
    temp = torch.where(st.temperature > 0, st.temperature, torch.ones_like(st.temperature))
    # float32 holds neither every finite temperature nor every finite logit bias: an infinite
    # temperature turned banned tokens' -inf into NaN (which argmax takes), and an infinite
    # logit turns its row's probabilities into NaN. Clamped, both take their limits.
    logits = (logits / temp.clamp(max=FLOAT32_MAX)[:, None]).clamp_(max=FLOAT32_MAX)
    if st.min_p is not None:
        probs = logits.softmax(-1)
        low = probs < st.min_p[:, None] * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(low, float("-inf"))
    if not st.filtered:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(st.top_k > 0, st.top_k.clamp(max=vocab), torch.full_like(st.top_k, vocab))
    # Tokens tied with the k-th most likely stay, as in vLLM's and Hugging Face's top-k: cutting
    # between equal logits would keep the ones the sort happens to put first (bf16 logits tie
    # often) and never draw the others, however likely.
    drop = sorted_logits < sorted_logits.gather(1, (k - 1)[:, None])
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
    # top_p = 1 keeps everything: float32 sums over a large vocabulary reach 1 before its
    # last tokens, which `before >= 1` would drop (in rows with top-k, or beside rows that
    # filter: a seeded request's law would then depend on its batch).
    drop |= (before >= st.top_p[:, None]) & (st.top_p < 1)[:, None]
    drop[:, 0] = False
    mask = torch.empty_like(drop).scatter_(1, order, drop)
    return logits.masked_fill(mask, float("-inf"))


def probabilities(logits: Tensor, st: SamplingTensors) -> Tensor:
    """(B, V) fp32 distribution each row samples from; greedy rows are one-hot at the argmax."""
    logits = adjusted_logits(logits, st)
    probs = processed_logits(logits, st).softmax(-1)
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(probs.dtype)
    return torch.where((st.temperature == 0)[:, None], greedy, probs)


def sample(logits: Tensor, st: SamplingTensors, stream: int = STREAM_SAMPLE) -> Tensor:
    """(B, V) logits -> (B,) int64 tokens."""
    logits = adjusted_logits(logits, st)
    greedy = argmax_last(logits)
    if st.all_greedy:
        return greedy
    noisy = processed_logits(logits, st) + gumbel(st.seeds, st.positions, stream, logits.shape[-1])
    return torch.where(st.temperature == 0, greedy, argmax_last(noisy))


def top_logprobs(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The model's log-probabilities (log-softmax of raw `logits` (N, V), in fp32) of
    `targets` (N,) int64, with their ranks (1 = most likely) and the `k` most likely tokens.
    Returns (target logprob (N,), rank (N,) int64, top ids (N, k), top logprobs (N, k))."""
    logp = logits.float().log_softmax(-1)
    chosen = logp.gather(-1, targets[:, None])  # (N, 1)
    rank = (logp > chosen).sum(-1) + 1
    top = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return chosen[:, 0], rank, top.indices, top.values


def matching_verify(target_logits: Tensor, drafts: Tensor,
                    st: SamplingTensors) -> tuple[Tensor, Tensor]:
    """Verify k drafts per row of a deterministic drafter by matching them against the tokens
    plain sampling draws at their positions (see the module's docstring).

    target_logits: (B, k + 1, V); drafts: (B, k) int64; st: settings of the B plain rows, with
    `positions` the index the first new token will take.
    Returns (tokens (B, k + 1) int64, num_accepted (B,) int64), as `rejection_sample`: row b's
    new tokens are tokens[b, :num_accepted[b] + 1] (its accepted drafts, then one draw).
    """
    batch, k1, vocab = target_logits.shape
    tokens = sample(target_logits.reshape(batch * k1, vocab), st.repeat(k1)).view(batch, k1)
    num_accepted = (drafts == tokens[:, :-1]).long().cumprod(-1).sum(-1)
    return tokens, num_accepted


def rejection_sample(target_logits: Tensor, drafts: Tensor, draft_probs: Tensor | None,
                     st: SamplingTensors) -> tuple[Tensor, Tensor]:
    """Verify k drafts per row.

    target_logits: (B, k + 1, V), the target's logits after the last accepted token and after
        each draft. drafts: (B, k) int64. draft_probs: (B, k, V) draft distribution, or None
        for a deterministic drafter (one-hot at the draft). st: settings of the B rows, with
        `positions` the index the first new token will take.
    Returns (tokens (B, k + 1) int64, num_accepted (B,) int64): row b's new tokens are
    tokens[b, :num_accepted[b] + 1].
    """
    batch, k1, vocab = target_logits.shape
    k = k1 - 1
    rows = st.repeat(k1)
    p = probabilities(target_logits.reshape(batch * k1, vocab), rows).view(batch, k1, vocab)
    q = draft_probs if draft_probs is not None else \
        torch.nn.functional.one_hot(drafts, vocab).to(p.dtype)  # (B, k, V)
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]  # (B, k)
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = uniform(st.seeds, st.positions, STREAM_ACCEPT, k)  # (B, k)
    accept = u * q_d < p_d
    num_accepted = accept.long().cumprod(-1).sum(-1)  # (B,)
    residual = torch.cat(((p[:, :k] - q).clamp(min=0), p[:, k:]), 1)  # (B, k + 1, V)
    mass = residual.sum(-1, keepdim=True)
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p)
    noise = gumbel(rows.seeds, rows.positions, STREAM_RESIDUAL, vocab).view(batch, k1, vocab)
    fixed = (residual.log() + noise).argmax(-1)  # (B, k + 1)
    fixed = torch.where((st.temperature == 0)[:, None], residual.argmax(-1), fixed)
    correction = fixed.gather(1, num_accepted[:, None])  # (B, 1)
    idx = torch.arange(k1, device=drafts.device)[None, :]
    padded = torch.cat((drafts, drafts[:, -1:]), 1)
    tokens = torch.where(idx < num_accepted[:, None], padded, correction)
    return tokens, num_accepted
