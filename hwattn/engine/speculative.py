"""Draft proposers for speculative decoding: the `Drafter` interface, n-gram prompt lookup and
a small draft model.

The target model then verifies all k drafts of every sequence in one decode call with
L_q = k + 1 (see `sampler.matching_verify` for n-gram drafts, `sampler.rejection_sample` for a
draft model's). Both drafters propose exactly k tokens per
sequence so the batch keeps one query length; a sequence with no n-gram match gets its last
token repeated, which the target simply rejects.
"""

from __future__ import annotations

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
    def propose(self, seqs: list[Sequence], st: SamplingTensors | None
                ) -> tuple[Tensor | list[list[int]], Tensor | None]:
        """Drafts (B, k) int64 for the running `seqs`, and the (B, k, V) distributions they
        were drawn from. A deterministic drafter returns its drafts as B lists of k token ids
        and no distributions (None), and is given no sampling tensors (st None: the engine
        builds none for it); any other gets the rows' sampling tensors on the device."""

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
    dictionary lookups per sequence however long the history is. The index lives on the
    sequence (`Sequence.drafter_state`), so it goes when the sequence does.
    """

    deterministic = True
    # Past this many new positions (a prompt, a history indexed afresh) the n-grams are
    # indexed per n-gram size over slices; up to it (a decode step's 1 to k + 1), per position.
    BULK = 16

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
        # The n-grams ending at a position, as slices of the max_ngram tokens before it.
        self._tails = [slice(max_ngram - n, None) for n in range(min_ngram, max_ngram + 1)]

    def _extend(self, index: dict, tokens: list[int], start: int, stop: int) -> None:
        """Record the n-grams that end right before each position in [start, stop), per
        n-gram size over slices (for many positions at once: a prompt, a history indexed
        afresh); positions before the window are skipped (a match there is never proposed)."""
        start = max(start, stop - self.window)
        for n in range(self.min_ngram, self.max_ngram + 1):
            first = max(start, n)
            # The j-th slice holds token pos - n + j for every pos in [first, stop).
            grams = zip(*(tokens[first - n + j:stop - n + j] for j in range(n)))
            index.update(zip(grams, range(first, stop)))

    def _propose(self, work: list[tuple[list[int], dict, int]]) -> list[list[int]]:
        """k drafts for each (tokens, index, done) of `work`: first extend `index` (which
        holds the n-grams ending before each of the first `done` positions of `tokens`) by
        the positions since, each n-gram keeping the latest position it ends before."""
        lo, hi, k, window, bulk = self.min_ngram, self.max_ngram, self.k, self.window, self.BULK
        tails = self._tails
        drafts, matched = [], 0
        for tokens, index, done in work:
            size = len(tokens)
            start = max(done, size - window)
            if size - start > bulk:
                self._extend(index, tokens, start, size)
            else:  # a decode step's few tokens: per position, its n-grams cut from the longest
                first = max(start, lo)
                for pos in range(first, min(hi, size)):  # (a history shorter than max_ngram)
                    for n in range(lo, pos + 1):
                        index[tuple(tokens[pos - n:pos])] = pos
                for pos in range(max(first, hi), size):
                    longest = tuple(tokens[pos - hi:pos])
                    for tail in tails:
                        index[longest[tail]] = pos
            top = min(hi, size - 1)
            suffix = tuple(tokens[size - top:]) if top > 0 else ()
            for n in range(top, lo - 1, -1):
                at = index.get(suffix[top - n:])
                # The suffix itself is never indexed (nothing follows it yet); the match must
                # lie inside the window, as a scan of the last `window` tokens would find it.
                if at is not None and at - n >= size - window:
                    matched += 1
                    draft = tokens[at:at + k]
                    if len(draft) < k:  # the match runs into the end: its last token repeated
                        draft += [draft[-1]] * (k - len(draft))
                    break
            else:
                draft = [tokens[-1]] * k
            drafts.append(draft)
        self.proposed += len(work)
        self.matched += matched
        return drafts

    def lookup(self, tokens: list[int]) -> list[int]:
        """k draft tokens for a token history (its last token repeated when nothing matches)."""
        return self._propose([(tokens, {}, 0)])[0]

    def _work(self, seq: Sequence) -> tuple[list[int], dict, int]:
        """(tokens, index, positions indexed) of a sequence, its index kept on it."""
        tokens = seq.token_ids
        state = seq.drafter_state
        if state is not None and state[0] is self and state[1] <= len(tokens):
            _, done, index = state
        else:  # a new sequence, another drafter's, or its history was cut
            done, index = 0, {}
        seq.drafter_state = (self, len(tokens), index)
        return tokens, index, done

    def draft(self, seq: Sequence) -> list[int]:
        """`lookup` of the sequence's tokens, indexing only the tokens new since the last call."""
        return self._propose([self._work(seq)])[0]

    def propose(self, seqs: list[Sequence], st: SamplingTensors | None = None
                ) -> tuple[list[list[int]], None]:
        """Drafts as B lists of k ids: a deterministic drafter's tokens travel as lists."""
        return self._propose([self._work(s) for s in seqs]), None


class DraftModelDrafter(Drafter):
    """A small model with the target's vocabulary drafts k tokens autoregressively.

    Its KV cache uses the same page ids as the target's (one `BlockManager` serves both), so
    it needs no bookkeeping of its own beyond `Sequence.draft_cached`.
    """

    deterministic = False

    def __init__(self, model, k: int, num_pages: int, page_size: int, max_model_len: int,
                 backend: str = "auto", max_num_batched_tokens: int = 2048):
        if k < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {k}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.k = k
        # Tokens one catch-up prefill writes at most (the engine's own prefill budget).
        self.budget = max_num_batched_tokens
        self.runner = ModelRunner(model, num_pages, page_size, max_model_len, cuda_graphs=False,
                                  backend=backend, mixed_steps=False)  # (prefill steps only)

    def cache_written(self, seq: Sequence) -> int:
        return seq.draft_cached

    def prefill(self, step: StepInput) -> None:
        self.runner.execute(StepInput("prefill", step.tokens, step.num_cached, step.block_tables))

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Write into the draft cache the tokens of `seqs` it lacks but the last one (the
        first draft call feeds that), for the sequences lagging by more than two tokens, in
        prefill steps of at most `budget` tokens (a long stretch of plain steps may leave
        thousands behind); they then lag by one."""
        behind = [s for s in seqs if len(s) - s.draft_cached > 2]
        while behind:
            rows, left = [], self.budget
            for s in behind:
                n = min(len(s) - 1 - s.draft_cached, left)
                if n <= 0:
                    break
                rows.append((s, n))
                left -= n
            self.runner.execute(StepInput(
                "prefill", [s.token_ids[s.draft_cached:s.draft_cached + n] for s, n in rows],
                [s.draft_cached for s, _ in rows], [s.block_table for s, _ in rows]))
            for s, n in rows:
                s.draft_cached += n
            behind = [s for s in behind if len(s) - 1 > s.draft_cached]

    def propose(self, seqs: list[Sequence], st: SamplingTensors) -> tuple[Tensor, Tensor]:
        """Drafts (B, k) int64 and the draft distributions they were drawn from (B, k, V).

        The draft cache lags the sequence by one token, or by two when every draft of the
        last step was accepted; the first call feeds the last two tokens and leaves the older
        one unwritten when it is already cached. A sequence that went through plain decode
        steps since (which the drafter does not see) lags by more: `_catch_up` writes what
        it missed first.
        """
        device = st.seeds.device
        self._catch_up(seqs)
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
