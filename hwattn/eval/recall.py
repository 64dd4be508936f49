"""Multi-query associative recall (MQAR) probe: how much does the cache remember?

A sequence lists `n_pairs` random key–value pairs, then asks `n_queries` of them again:

    k_1 v_1 k_2 v_2 ... k_n v_n | k_a v_a k_b v_b ...      (queries teacher-forced)

Keys and values are distinct single-token words drawn from the tokenizer's vocabulary
(tokens that decode to a space and 3+ letters), so the sequence looks like a word list rather
than out-of-distribution ids. The model is scored at each query key: correct when its argmax
is the value paired with that key earlier in the sequence. A language model trained on text
can only do this by in-context copying (induction), which is exactly what a compressed KV
cache (GTA's tied states, MLA/GLA's latents, MQA's single head) might lose. Chance is
1 / n_values. Several queries per sequence make it multi-query.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from hwattn.data.progress import progress_bar
from hwattn.eval.perplexity import autocast_for


def word_tokens(tokenizer, limit: int = 4000) -> list[int]:
    """Ids of tokens that decode to " " + 3 or more lowercase letters (in id order)."""
    out = []
    for i in range(tokenizer.vocab_size):
        if i == tokenizer.eot_id:
            continue
        if re.fullmatch(r" [a-z]{3,}", tokenizer.decode([i])):
            out.append(i)
            if len(out) >= limit:
                break
    return out


def make_recall_batch(words: list[int], n_seqs: int, n_pairs: int, n_queries: int,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (S, 2·(n_pairs + n_queries)) int64, query positions (S, n_queries) (index of
    each query key), answers (S, n_queries)."""
    if len(words) < 4 * n_pairs:
        raise ValueError(f"need at least {4 * n_pairs} word tokens for {n_pairs} pairs, "
                         f"the tokenizer offers {len(words)}")
    rng = np.random.default_rng(seed)
    words = np.asarray(words)
    half = len(words) // 2
    keys_pool, vals_pool = words[:half], words[half:]
    seqs, qpos, answers = [], [], []
    for _ in range(n_seqs):
        keys = rng.choice(keys_pool, n_pairs, replace=False)
        vals = rng.choice(vals_pool, n_pairs, replace=True)
        asked = rng.choice(n_pairs, n_queries, replace=n_queries > n_pairs)
        pairs = np.stack([keys, vals], 1).reshape(-1)
        query = np.stack([keys[asked], vals[asked]], 1).reshape(-1)
        seqs.append(np.concatenate([pairs, query]))
        qpos.append(2 * n_pairs + 2 * np.arange(n_queries))
        answers.append(vals[asked])
    return (torch.tensor(np.stack(seqs), dtype=torch.long),
            torch.tensor(np.stack(qpos), dtype=torch.long),
            torch.tensor(np.stack(answers), dtype=torch.long))


@torch.no_grad()
def recall_accuracy(model, tokenizer, pair_counts: tuple[int, ...] = (8, 32, 64),
                    n_queries: int = 16, n_seqs: int = 32, max_len: int | None = None,
                    seed: int = 0, batch_size: int = 16, amp: str = "auto",
                    progress: bool = False) -> dict:
    """{"pairs_<n>": accuracy} for each pair count that fits `max_len`, plus "mean"
    (over those counts) and "chance". `progress`: a bar on stderr of the sequences scored.
    ValueError naming the argument, before any forward pass, unless `pair_counts`,
    `n_queries`, `n_seqs` and `batch_size` are integers >= 1 (0 queries or sequences
    divided by zero, a batch of 0 was "range() arg 3 must not be zero") and `max_len` is
    within the model's context."""
    for name, value in (("n_queries", n_queries), ("n_seqs", n_seqs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    bad = [n for n in pair_counts if isinstance(n, bool) or not isinstance(n, int) or n < 1]
    if bad:
        raise ValueError(f"pair_counts must be integers >= 1, got {bad[0]!r}")
    context = getattr(getattr(model, "config", None), "max_seq_len", None)
    if max_len is None:
        max_len = context
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= (
            context or max_len):
        raise ValueError(f"max_len must be an integer from 1 to the model's context of "
                         f"{context} tokens (max_seq_len), got {max_len!r}")
    device = next(model.parameters()).device
    words = word_tokens(tokenizer)
    counts = [n for n in pair_counts if 2 * (n + n_queries) <= max_len and len(words) >= 4 * n]
    bar = progress_bar(total=len(counts) * n_seqs, desc="recall", unit="seq",
                       disable=not progress)
    out = {}
    for n in counts:
        tokens, qpos, ans = make_recall_batch(words, n_seqs, n, n_queries, seed + n)
        hits = 0
        for i in range(0, n_seqs, batch_size):
            x = tokens[i:i + batch_size].to(device)
            with autocast_for(device, amp):
                logits = model(x)
            pred = logits.argmax(-1).cpu()  # (b, L)
            q = qpos[i:i + batch_size]
            hits += int((pred.gather(1, q) == ans[i:i + batch_size]).sum())
            bar.update(len(x))
        out[f"pairs_{n}"] = hits / (n_seqs * n_queries)
    bar.close()
    if out:
        out["mean"] = sum(out.values()) / len(out)
    out["chance"] = 1 / max(1, len(words) - len(words) // 2)
    return out
