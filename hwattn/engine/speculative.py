"""Draft proposers for speculative decoding: the `Drafter` interface, n-gram prompt lookup and
a small draft model.

The target model then verifies all k drafts of every sequence in one decode call with
L_q = k + 1 (see `sampler.rejection_sample`). Both drafters propose exactly k tokens per
sequence so the batch keeps one query length; a sequence with no n-gram match gets its last
token repeated, which the target simply rejects.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
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
    k tokens that followed it."""

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

    def lookup(self, tokens: list[int]) -> list[int]:
        """k draft tokens for a token history (its last token repeated when nothing matches)."""
        hist = np.asarray(tokens[-self.window:], dtype=np.int64)
        n_hist = len(hist)
        self.proposed += 1
        for n in range(min(self.max_ngram, n_hist - 1), self.min_ngram - 1, -1):
            suffix = hist[n_hist - n:]
            # Windows starting at 0 .. n_hist - n - 1 (the suffix itself excluded).
            windows = np.lib.stride_tricks.sliding_window_view(hist[:n_hist - 1], n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                draft = hist[start:start + self.k].tolist()
                self.matched += 1
                return draft + [draft[-1]] * (self.k - len(draft))
        return [tokens[-1]] * self.k

    def propose(self, seqs: list[Sequence], st: SamplingTensors) -> tuple[Tensor, None]:
        drafts = [self.lookup(s.token_ids) for s in seqs]
        return torch.tensor(drafts, dtype=torch.int64, device=st.seeds.device), None


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
