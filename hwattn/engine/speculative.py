"""Draft proposers for speculative decoding: the `Drafter` interface, n-gram prompt lookup and
a small draft model.

The target model then verifies all k drafts of every sequence in one decode call with
L_q = k + 1 (see `sampler.matching_verify` for n-gram drafts, `sampler.rejection_sample` for a
draft model's). Both drafters propose exactly k tokens per
sequence so the batch keeps one query length; a sequence with no n-gram match gets its last
token repeated, which the target simply rejects.
"""

from __future__ import annotations

import weakref
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from hwattn.engine.model_runner import ModelRunner, StepInput
from hwattn.engine.sampler import STREAM_DRAFT, SamplingTensors, gumbel, probabilities
from hwattn.engine.sequence import Sequence


class Drafter(ABC):
    """What the engine asks of a speculative drafter; it never looks at the concrete class.

    k: drafts proposed per sequence and step.
    deterministic: the drafts are a function of the tokens alone, so `propose` returns no
        distributions and the drafts may travel as lists (to tensor-parallel workers);
        otherwise they were sampled and the target verifies them against their distributions.
    """

    k: int
    deterministic: bool = True

    def prefill(self, step: StepInput) -> None:
        """See the target's prefill step (a drafter with a cache of its own writes it too)."""

    @abstractmethod
    def propose(self, seqs: list[Sequence], st: SamplingTensors) -> tuple[Tensor, Tensor | None]:
        """Drafts (B, k) int64 for the running `seqs`, and the (B, k, V) distributions they
        were drawn from (None for a deterministic drafter). st: the rows' sampling tensors."""

    def cache_written(self, seq: Sequence) -> int | None:
        """How many of `seq`'s tokens the drafter's own KV cache (kept in the sequence's
        pages) holds, so that a page is shared only once both caches hold it; None when the
        drafter keeps no cache."""
        return None


class NgramDrafter(Drafter):
    """Prompt lookup: find the most recent earlier occurrence of the sequence's last n tokens
    (n from `max_ngram` down to `min_ngram`, within the last `window` tokens) and propose the
    k tokens that followed it.

    Each sequence keeps an index from every n-gram it holds to where that n-gram last ended,
    extended by the tokens appended since the previous call, so a proposal costs a few
    dictionary lookups per sequence however long the history is.
    """

    deterministic = True

    def __init__(self, k: int, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.k = k
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.window = window
        self.proposed = 0
        self.matched = 0
        # Per sequence: (tokens indexed so far, {n-gram tuple: index of the token after it}).
        self._index: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _extend(self, index: dict, tokens: list[int], start: int, stop: int) -> None:
        """Record the n-grams that end right before each position in [start, stop); positions
        before the window are skipped (a match there is never proposed)."""
        start = max(start, stop - self.window)
        for n in range(self.min_ngram, self.max_ngram + 1):
            first = max(start, n)
            # The j-th slice holds token pos - n + j for every pos in [first, stop).
            grams = zip(*(tokens[first - n + j:stop - n + j] for j in range(n)))
            index.update(zip(grams, range(first, stop)))

    def _draft(self, index: dict, tokens: list[int]) -> list[int]:
        size = len(tokens)
        self.proposed += 1
        for n in range(min(self.max_ngram, size - 1), self.min_ngram - 1, -1):
            start = index.get(tuple(tokens[size - n:]))
            # The suffix itself is never indexed (nothing follows it yet); the match must lie
            # inside the window, as a scan of the last `window` tokens would find it.
            if start is not None and start - n >= size - self.window:
                draft = tokens[start:start + self.k]
                self.matched += 1
                return draft + [draft[-1]] * (self.k - len(draft))
        return [tokens[-1]] * self.k

    def lookup(self, tokens: list[int]) -> list[int]:
        """k draft tokens for a token history (its last token repeated when nothing matches)."""
        index: dict = {}
        self._extend(index, tokens, 0, len(tokens))
        return self._draft(index, tokens)

    def draft(self, seq: Sequence) -> list[int]:
        """`lookup` of the sequence's tokens, indexing only the tokens new since the last call."""
        tokens = seq.token_ids
        done, index = self._index.get(seq, (0, None))
        if index is None or done > len(tokens):  # a new sequence, or its history was cut
            done, index = 0, {}
        self._extend(index, tokens, done, len(tokens))
        self._index[seq] = (len(tokens), index)
        return self._draft(index, tokens)

    def propose(self, seqs: list[Sequence], st: SamplingTensors) -> tuple[Tensor, None]:
        """Drafts (B, k) int64 on the host: a deterministic drafter's tokens travel as lists."""
        return torch.tensor([self.draft(s) for s in seqs], dtype=torch.int64), None


class DraftModelDrafter(Drafter):
    """A small model with the target's vocabulary drafts k tokens autoregressively.

    Its KV cache uses the same page ids as the target's (one `BlockManager` serves both), so
    it needs no bookkeeping of its own beyond `Sequence.draft_cached`.
    """

    deterministic = False

    def __init__(self, model, k: int, num_pages: int, page_size: int, max_model_len: int,
                 backend: str = "auto"):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        self.k = k
        self.runner = ModelRunner(model, num_pages, page_size, max_model_len, cuda_graphs=False,
                                  backend=backend)

    def cache_written(self, seq: Sequence) -> int:
        return seq.draft_cached

    def prefill(self, step: StepInput) -> None:
        self.runner.execute(StepInput("prefill", step.tokens, step.num_cached, step.block_tables))

    def propose(self, seqs: list[Sequence], st: SamplingTensors) -> tuple[Tensor, Tensor]:
        """Drafts (B, k) int64 and the draft distributions they were drawn from (B, k, V).

        The draft cache lags the sequence by one token, or by two when every draft of the
        last step was accepted; the first call feeds the last two tokens and leaves the older
        one unwritten when it is already cached.
        """
        device = st.seeds.device
        lags = [len(s) - s.draft_cached for s in seqs]
        if any(lag not in (1, 2) for lag in lags):
            raise RuntimeError(f"draft cache lags by {lags}, expected 1 or 2")
        tables = [s.block_table for s in seqs]
        step = StepInput("decode", [s.token_ids[-2:] for s in seqs], [len(s) - 2 for s in seqs],
                         tables, skip_write=[2 - lag for lag in lags])
        logits = self.runner.execute(step)[:, -1]  # (B, V)
        drafts, probs = [], []
        for i in range(self.k):
            rows = SamplingTensors(st.temperature, st.top_k, st.top_p, st.seeds,
                                   st.positions + i, st.filtered, st.all_greedy)
            q = probabilities(logits, rows)  # (B, V)
            noisy = q.log() + gumbel(rows.seeds, rows.positions, STREAM_DRAFT, q.shape[-1])
            token = torch.where(rows.temperature == 0, q.argmax(-1), noisy.argmax(-1))
            drafts.append(token)
            probs.append(q)
            if i + 1 < self.k:
                step = StepInput("decode", token[:, None], [len(s) + i for s in seqs], tables)
                logits = self.runner.execute(step)[:, -1]
        for s in seqs:
            s.draft_cached = len(s) + self.k - 1
        return torch.stack(drafts, 1).to(device), torch.stack(probs, 1).to(device)
