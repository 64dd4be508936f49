"""Downstream-style tasks built from held-out text, and their scoring.

No stock benchmark data (HellaSwag, LAMBADA, ...) is reachable offline, so both tasks are cut
from the validation documents of a built dataset, deterministically from a seed:

- **cloze** (LAMBADA-style last word): the context is up to `context_chars` of text ending
  just before the last word of a sentence; the target is that word with its leading space.
  Correct when greedy decoding reproduces every token of the target.
- **mc** (4-way continuation choice, HellaSwag-style): the context ends at a sentence
  boundary; the true next sentence competes with three sentences of similar length drawn from
  other held-out documents of the same domain (or, when the domain holds one document, from
  later in the same document, never shown in the context). Scored by total log-likelihood
  (acc) and by log-likelihood per character (acc_norm).

Both are stored as JSONL ({"context", "target"} / {"context", "choices", "gold"}, plus
"domain"), the same files the lm-evaluation-harness adapter turns into tasks.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hwattn.data.progress import progress_bar
from hwattn.eval.perplexity import autocast_for

_SENT_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[\"'(\[]?[A-Z])")
_WORD = re.compile(r"^[A-Za-z][a-z]{2,}$")


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of `text` (single lines joined)."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        spans.append((start, m.start() + 1 if text[m.start()] in ".!?" else m.end()))
        start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def _trim_left(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[-max_chars:]
    space = cut.find(" ")
    return cut[space + 1:] if 0 <= space < 40 else cut


def build_cloze(docs: list[dict], n: int, seed: int = 0, context_chars: int = 600) -> list[dict]:
    """Up to `n` last-word cloze items, balanced over the documents' domains."""
    rng = random.Random(seed)
    by_domain = defaultdict(list)
    for d in docs:
        text = d["text"].replace("\n", " ")
        for s, e in sentences(text):
            sent = text[s:e].rstrip(".!?\"') ")
            if " " not in sent or s < 200:
                continue
            head, word = sent.rsplit(" ", 1)
            if not _WORD.match(word):
                continue
            ctx = _trim_left(text[:s] + head, context_chars)
            by_domain[d["domain"]].append({"context": ctx, "target": " " + word, "domain": d["domain"]})
    return _balanced(by_domain, n, rng)


def build_mc(docs: list[dict], n: int, seed: int = 0, context_chars: int = 600,
             choices: int = 4) -> list[dict]:
    """Up to `n` continuation multiple-choice items, balanced over domains."""
    rng = random.Random(seed)
    pool = defaultdict(list)  # domain -> (doc index, sentence index, sentence)
    cands = defaultdict(list)
    for i, d in enumerate(docs):
        text = re.sub(r"\s+", " ", d["text"])
        spans = sentences(text)
        for j, (s, e) in enumerate(spans):
            sent = text[s:e].strip()
            if 30 <= len(sent) <= 240:
                pool[d["domain"]].append((i, j, sent))
                if j > 0 and s >= 200:
                    cands[d["domain"]].append((i, j, _trim_left(text[:s].rstrip(), context_chars), sent))
    by_domain = defaultdict(list)
    for dom, items in cands.items():
        others = pool[dom]
        blocks = _doc_blocks(others)
        for i, j, ctx, sent in items:
            wrong = _Without(others, *blocks.get(i, (0, 0)))  # the other documents' sentences
            if len(wrong) < choices - 1:  # a one-document domain: its later sentences
                wrong = [x for x in others if x[0] == i and x[1] > j + 2]
            if len(wrong) < choices - 1:
                continue
            picks = []
            for _ in range(40 * choices):
                if len(picks) == choices - 1:
                    break
                cand = rng.choice(wrong)[2]
                if 0.6 <= len(cand) / len(sent) <= 1.6 and cand != sent and cand not in picks:
                    picks.append(cand)
            if len(picks) < choices - 1:
                continue
            opts = [" " + sent] + [" " + p for p in picks]
            order = list(range(choices))
            rng.shuffle(order)
            by_domain[dom].append({"context": ctx, "choices": [opts[k] for k in order],
                                   "gold": order.index(0), "domain": dom})
    return _balanced(by_domain, n, rng)


def _doc_blocks(pool: list[tuple]) -> dict[int, tuple[int, int]]:
    """Document index -> [start, stop) of its entries in `pool`, where each document's
    entries are consecutive (the pool is built document by document)."""
    blocks: dict[int, tuple[int, int]] = {}
    for k, entry in enumerate(pool):
        start = blocks.get(entry[0], (k, k))[0]
        blocks[entry[0]] = (start, k + 1)
    return blocks


class _Without(Sequence):
    """`items` without items[start:stop], as a read-only view: what `[x for x in items if x
    is not in that block]` holds, without building it for every multiple-choice item (which
    made `build_mc` quadratic in the held-out sentences). `random.choice` draws the same
    element from it as from the list."""

    def __init__(self, items: list, start: int, stop: int):
        self.items, self.start, self.gap = items, start, stop - start

    def __len__(self) -> int:
        return len(self.items) - self.gap

    def __getitem__(self, k: int):
        if not 0 <= k < len(self):
            raise IndexError(k)
        return self.items[k if k < self.start else k + self.gap]


def _balanced(by_domain: dict, n: int, rng: random.Random) -> list[dict]:
    domains = sorted(by_domain)
    for d in domains:
        rng.shuffle(by_domain[d])
    out, k = [], 0
    while len(out) < n and any(k < len(by_domain[d]) for d in domains):
        for d in domains:
            if k < len(by_domain[d]) and len(out) < n:
                out.append(by_domain[d][k])
        k += 1
    return out


def write_jsonl(items: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness's `--model hf` splits a
    request: whitespace ending the context moves to the front of the continuation (the
    harness's contract puts a word boundary's space in the continuation), and the continuation's
    ids are those of context + continuation encoded together, after the context's own ids. So
    "answer is " + "yes" scores the tokens of " yes", as "answer is" + " yes" does, not a lone
    space token followed by "yes". Where encoding the two together changes the context's own ids
    (a merge across the boundary), each part is encoded alone."""
    stripped = context.rstrip()
    if stripped != context:
        context, continuation = stripped, context[len(stripped):] + continuation
    ctx = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer.encode(continuation)


@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], max_len: int,
                   batch_size: int = 16, amp: str = "auto", bar=None) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids): the summed log-probability of the
    continuation given the context, and whether greedy decoding would produce it.

    Contexts are cut from the left so that at most `max_len` tokens are fed to the model (the
    last token is only predicted), as lm-evaluation-harness's `max_length`; when a
    continuation is longer than `max_len`, that pair's `max_len` is raised to its length, which
    scores it after one context token (up to the model's `max_seq_len`), the others' left as they are, so no pair's score depends on the
    pairs it is scored with. `bar` (a progress bar, optional) advances by the pairs of each
    batch. ValueError for a `max_len` beyond the model's context, before any forward pass."""
    if not batch_size >= 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not max_len >= 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    device = next(model.parameters()).device
    limit = getattr(getattr(model, "config", None), "max_seq_len", None) or max_len
    if max_len > limit:  # it failed inside the model, on the first long pair
        raise ValueError(f"max_len {max_len} exceeds the model's context of {limit} tokens "
                         "(max_seq_len)")
    rows, windows = [], []
    for ctx, cont in pairs:
        if not ctx:  # its first token would have nothing to be predicted from
            raise ValueError("every continuation needs a context of at least one token "
                             "(HwattnLM gives an empty context <|endoftext|>)")
        # Per pair: one long continuation once widened every pair's window. A window of
        # len(cont) input tokens holds the continuation after one context token; one of
        # len(cont) + 1 gave two, and fed a max_len-token continuation max_len + 1 tokens.
        window = max(max_len, min(len(cont), limit))
        if not cont or len(cont) > window:
            raise ValueError(f"continuation must have 1..{window} tokens, got {len(cont)}")
        seq = (ctx + cont)[-(window + 1):]
        rows.append((seq[:-1], len(cont)))
        windows.append(window)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(rows[i][0]) for i in idx)
        inp = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            inp[r, :len(rows[i][0])] = torch.tensor(rows[i][0])  # right padding: causal, harmless
        with autocast_for(device, amp):
            logits = model(inp.to(device))  # (b, width, V)
        for r, i in enumerate(idx):
            seq, n_cont = rows[i]
            full = (pairs[i][0] + pairs[i][1])[-(windows[i] + 1):]
            targets = torch.tensor(full[-n_cont:], device=logits.device)
            lp = F.log_softmax(logits[r, len(seq) - n_cont:len(seq)].float(), dim=-1)  # (n_cont, V)
            ll = lp.gather(1, targets[:, None]).sum()
            greedy = (lp.argmax(-1) == targets).all()
            results[i] = (float(ll), bool(greedy))
        if bar is not None:
            bar.update(len(idx))
    return results


def score_cloze(model, tokenizer, items: list[dict], max_len: int, batch_size: int = 16,
                amp: str = "auto", progress: bool = False) -> dict:
    """Accuracy (greedy reproduces the whole target word), overall and per domain.
    `progress`: a bar on stderr of the items scored."""
    pairs = [encode_pair(tokenizer, x["context"], x["target"]) for x in items]
    bar = progress_bar(total=len(pairs), desc="cloze", unit="item", disable=not progress)
    res = loglikelihoods(model, pairs, max_len, batch_size, amp, bar)
    bar.close()
    return _summarise(items, [{"acc": float(g), "loglik": ll} for ll, g in res])


def score_mc(model, tokenizer, items: list[dict], max_len: int, batch_size: int = 16,
             amp: str = "auto", progress: bool = False) -> dict:
    """acc (argmax total log-likelihood) and acc_norm (argmax per character), per domain.
    `progress`: a bar on stderr of the choices scored (every item's, together). ValueError
    naming the item, before any scoring, for one with fewer than two choices or a `gold`
    that is not the index of one (it was never right, so accuracy fell without a word)."""
    for k, x in enumerate(items):
        n, gold = len(x["choices"]), x["gold"]
        if n < 2 or isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < n:
            raise ValueError(f"multiple-choice item {k}: needs two or more choices and gold an "
                             f"index into them, got {n} choice(s) and gold {gold!r}")
    pairs, owner = [], []
    for k, x in enumerate(items):
        for c in x["choices"]:
            pairs.append(encode_pair(tokenizer, x["context"], c))
            owner.append(k)
    bar = progress_bar(total=len(pairs), desc="multiple choice", unit="choice",
                       disable=not progress)
    res = loglikelihoods(model, pairs, max_len, batch_size, amp, bar)
    bar.close()
    per = []
    pos = 0
    for x in items:
        lls = [res[pos + j][0] for j in range(len(x["choices"]))]
        pos += len(x["choices"])
        norm = [ll / len(c) for ll, c in zip(lls, x["choices"])]
        per.append({"acc": float(max(range(len(lls)), key=lls.__getitem__) == x["gold"]),
                    "acc_norm": float(max(range(len(norm)), key=norm.__getitem__) == x["gold"])})
    return _summarise(items, per)


def _summarise(items: list[dict], per: list[dict]) -> dict:
    keys = [k for k in per[0] if k != "loglik"] if per else []
    out = {"n": len(items)}
    for k in keys:
        out[k] = sum(p[k] for p in per) / len(per)
    by = defaultdict(list)
    for x, p in zip(items, per):
        by[x.get("domain", "all")].append(p)
    out["by_domain"] = {d: {"n": len(ps), **{k: sum(p[k] for p in ps) / len(ps) for k in keys}}
                        for d, ps in sorted(by.items())}
    return out
