"""Log-probabilities in the two OpenAI response formats.

The engine reports, per position, a `PositionLogprobs`: {token id: Logprob(logprob, rank,
decoded_token)} holding the position's token and the requested most likely ones. Completions
(the legacy format lm-eval's `local-completions` reads) list `tokens`, `token_logprobs`,
`top_logprobs` ({token text: logprob}) and `text_offset`; an echoed prompt's first token has
no log-probability (null). Chat lists `content`: {token, logprob, bytes, top_logprobs}.
"""

from __future__ import annotations

import math

FLOOR = -9999.0  # stands for -inf, which JSON cannot carry


def _finite(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def completion_logprobs(entries, decode, offset: int = 0) -> dict:
    """The completions `logprobs` object.

    entries: (token id, PositionLogprobs or None) per token, in order. decode: token id ->
    its text (for tokens without an entry). offset: the text offset of the first token."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for token, position in entries:
        own = position.get(token) if position else None
        text = own.decoded_token if own is not None and own.decoded_token is not None \
            else decode(token)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if position is None:
            token_logprobs.append(None)
            top.append(None)
            continue
        token_logprobs.append(_finite(own.logprob))
        best: dict[str, float] = {}
        for tid, lp in position.items():
            key = lp.decoded_token if lp.decoded_token is not None else decode(tid)
            best[key] = max(best.get(key, FLOOR), _finite(lp.logprob))
        top.append(best)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
            "text_offset": offsets}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries, decode, top_n: int) -> dict:
    """The chat `logprobs` object for generated tokens: entries as in `completion_logprobs`
    (every one with its PositionLogprobs), top_n: how many most likely tokens to list."""
    content = []
    for token, position in entries:
        own = position[token]
        text = own.decoded_token if own.decoded_token is not None else decode(token)
        likely = sorted(position.items(), key=lambda item: -item[1].logprob)[:top_n]
        entry = _chat_entry(text, own.logprob)
        entry["top_logprobs"] = [
            _chat_entry(lp.decoded_token if lp.decoded_token is not None else decode(tid),
                        lp.logprob) for tid, lp in likely]
        content.append(entry)
    return {"content": content}


def top(position, token: int, k: int | None):
    """`position` (a PositionLogprobs, or None) cut to `token`'s own entry and the `k` most
    likely tokens (the engine may have computed more for another part of the answer)."""
    if position is None or k is None:
        return position
    return {t: lp for t, lp in position.items()
            if t == token or (lp.rank is not None and lp.rank <= k)}


def prompt_logprobs(prompt_ids, positions, k: int) -> list:
    """vLLM's `prompt_logprobs`: per prompt token, null for the first (nothing predicts it),
    else {token id: {"logprob", "rank", "decoded_token"}} for the token itself and the `k`
    most likely tokens at its position."""
    out = []
    for token, position in zip(prompt_ids, positions or [None] * len(prompt_ids)):
        position = top(position, token, k)
        out.append(None if position is None else {
            str(t): {"logprob": _finite(lp.logprob), "rank": lp.rank,
                     "decoded_token": lp.decoded_token} for t, lp in position.items()})
    return out
