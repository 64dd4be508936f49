"""Request intake: what the engine checks before a request is queued, all or nothing.

A prompt is text, token ids or a 1-D integer tensor: `validate_prompt` turns it into token ids
or refuses it with a `ValueError` (a `ContextLengthError` when it cannot fit the context; a
text too long for any tokenization is refused before it is tokenized, `check_prompt_chars`).
`check_requests` checks a batch of (prompt, params) pairs before any of it is queued, so one
bad request refuses the batch and harms no other. `LLMEngine`, the data-parallel front end,
the chat template and the server call these; none of them keeps state.
"""

from __future__ import annotations

import dataclasses
import numbers

import torch

from hwattn.engine.sampling_params import ParamError, SamplingParams, bad_words_token_ids


class ContextLengthError(ValueError):
    """A prompt that cannot fit the model's context."""


def check_prompt_chars(chars: int, tokenizer, max_model_len: int, generate: bool = True,
                       what: str = "prompt") -> None:
    """ContextLengthError (naming `what`) if a text of `chars` characters cannot fit the
    context, checked before it is tokenized so that a huge text costs nothing: no token stands
    for more than `tokenizer.max_token_chars` characters (no bound when the tokenizer does not
    say), so a text of more than T times that many characters cannot come to T tokens or
    fewer. T is max_model_len - 1 with `generate` (a prompt must leave room for a token, as
    `validate_prompt` requires) and max_model_len without (/tokenize)."""
    per_token = getattr(tokenizer, "max_token_chars", None)
    limit = max_model_len - 1 if generate else max_model_len
    if per_token is not None and chars > limit * per_token:
        raise ContextLengthError(f"{what} has {chars} characters, more than {limit} tokens can "
                                 f"hold; the model's context is {max_model_len}")


def encode_prompt(text: str, tokenizer, max_model_len: int | None,
                  generate: bool = True) -> list[int]:
    """`tokenizer.encode(text)` after `check_prompt_chars` (none when max_model_len is None: a
    text to be truncated); ValueError if the text is not valid Unicode (a lone surrogate),
    naming the character."""
    if max_model_len is not None:
        check_prompt_chars(len(text), tokenizer, max_model_len, generate)
    try:
        return tokenizer.encode(text)
    except UnicodeEncodeError as err:
        raise ValueError(f"prompt is not valid Unicode: character {err.start} is "
                         f"{text[err.start]!r} ({err.reason})") from None


def truncation(truncate_prompt_tokens: int | None, max_model_len: int) -> int | None:
    """How many prompt tokens `truncate_prompt_tokens` keeps (None: all): -1 keeps
    max_model_len - 1, the longest prompt that leaves room for a token. A `ParamError` above
    max_model_len, as vLLM's."""
    if truncate_prompt_tokens == -1:
        return max(1, max_model_len - 1)
    if truncate_prompt_tokens is not None and truncate_prompt_tokens > max_model_len:
        raise ParamError("truncate_prompt_tokens", f"truncate_prompt_tokens must be at most the "
                         f"model's context ({max_model_len}), or -1, got "
                         f"{truncate_prompt_tokens}")
    return truncate_prompt_tokens


def validate_prompt(prompt: str | list[int] | torch.Tensor, tokenizer, vocab_size: int,
                    max_model_len: int, truncate_prompt_tokens: int | None = None) -> list[int]:
    """The prompt's token ids; ValueError if it is empty, has ids outside [0, vocab_size), is
    not valid Unicode or leaves no room to generate within max_model_len (a
    `ContextLengthError`). A text too long for the context is refused before it is tokenized
    (`check_prompt_chars`), unless it is truncated.

    prompt: text, a list of token ids, or a 1-D integer tensor of token ids.
    truncate_prompt_tokens: keep only the last k tokens (`SamplingParams`'; -1: as many as
        the context leaves room for), before the length is checked."""
    keep = truncation(truncate_prompt_tokens, max_model_len)
    if isinstance(prompt, str):
        if keep is None:
            ids = encode_prompt(prompt, tokenizer, max_model_len)
        else:  # tokenized in full, then cut
            ids = encode_prompt(prompt, tokenizer, max_model_len=None)
    elif isinstance(prompt, torch.Tensor):
        if prompt.dim() != 1 or prompt.dtype.is_floating_point or prompt.dtype.is_complex \
                or prompt.dtype == torch.bool:
            raise ValueError(f"a tensor prompt must be a 1-D integer tensor of token ids, got "
                             f"shape {tuple(prompt.shape)} and dtype {prompt.dtype}")
        ids = prompt.tolist()
    elif isinstance(prompt, (list, tuple)):
        ids = list(prompt)
    else:
        raise ValueError(f"prompt must be a string, a list of token ids or a 1-D integer "
                         f"tensor, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("prompt must not be empty")
    if keep is not None and len(ids) > keep:
        ids = ids[len(ids) - keep:]
    if len(ids) >= max_model_len:
        raise ContextLengthError(f"prompt has {len(ids)} tokens; the model's context is "
                                 f"{max_model_len}, leaving no room to generate")
    if all(type(t) is int and 0 <= t < vocab_size for t in ids):  # the common case, fast
        return ids
    for i, t in enumerate(ids):
        if not isinstance(t, numbers.Integral) or isinstance(t, bool) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab_size}) (the "
                             f"model's vocabulary); got {t!r} at position {i}")
    return [int(t) for t in ids]  # numpy or other integer scalars


def checked_params(params: SamplingParams | None, vocab_size: int | None = None,
                   tokenizer=None, max_model_len: int | None = None) -> SamplingParams:
    """A validated copy: a caller changing its params afterwards cannot reach the sampler.
    vocab_size: the model's; a `ParamError` for stop token ids outside it (they could never
    match, and min_tokens bans them in the sampler), logit biases or allowed_token_ids of
    tokens outside it, or more log-probabilities per token than it has.
    tokenizer: the model's; the copy's `bad_words_token_ids` are its tokens of `bad_words`
    (a `ParamError` if one is outside the vocabulary).
    max_model_len: a `ParamError` for truncate_prompt_tokens above it (as vLLM's)."""
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
    params = dataclasses.replace(params)
    if vocab_size is not None:
        for t in params.stop_token_ids:
            if t >= vocab_size:
                raise ParamError("stop_token_ids", f"stop_token_ids must be token ids in "
                                 f"[0, {vocab_size}) (the model's vocabulary), got {t}")
        for t in params.logit_bias or ():
            if t >= vocab_size:
                raise ParamError("logit_bias", f"logit_bias must name token ids in "
                                 f"[0, {vocab_size}) (the model's vocabulary), got {t}")
        for t in params.allowed_token_ids or ():
            if t >= vocab_size:
                raise ParamError("allowed_token_ids", f"allowed_token_ids must be token ids in "
                                 f"[0, {vocab_size}) (the model's vocabulary), got {t}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > vocab_size:
                raise ParamError(name, f"{name} must be at most the model's vocabulary size "
                                 f"({vocab_size}), got {value}")
    if max_model_len is not None:
        truncation(params.truncate_prompt_tokens, max_model_len)
    if tokenizer is not None and params.bad_words:
        try:
            words = bad_words_token_ids(params.bad_words, tokenizer)
        except UnicodeEncodeError as err:
            raise ParamError("bad_words", f"bad_words cannot be tokenized: {err.reason}") from None
        for ids in words:
            if not ids or (vocab_size is not None and max(ids) >= vocab_size):
                raise ParamError("bad_words", f"bad_words: a word's tokens {ids} are not token "
                                 f"ids of the model's vocabulary")
        params.bad_words_token_ids = words
    if params.allowed_token_ids is not None:
        _check_something_allowed(params, getattr(tokenizer, "eos_token_id", None))
    return params


def _check_something_allowed(params: SamplingParams, eos_token_id: int | None) -> None:
    """A `ParamError` naming allowed_token_ids when every allowed token is banned at the first
    step: a one-token bad word, or (while min_tokens holds them back) a stop token id or the
    end-of-sequence token. The sampler would then find every logit at -inf and emit token 0,
    which was never allowed."""
    banned = {ids[0] for ids in params.bad_words_token_ids or () if len(ids) == 1}
    if params.min_tokens:
        banned.update(params.stop_token_ids)
        if eos_token_id is not None and not params.ignore_eos:
            banned.add(eos_token_id)
    if banned.issuperset(params.allowed_token_ids):
        raise ParamError("allowed_token_ids", f"allowed_token_ids {params.allowed_token_ids} "
                         f"are all banned at the first token (min_tokens={params.min_tokens} "
                         f"holds back stop token ids and end-of-sequence; one-token bad_words "
                         f"are never sampled): no token could be sampled")


def check_requests(prompts: list, params: list, validate, check_params,
                   max_model_len: int) -> list[tuple[list[int], SamplingParams]]:
    """(token ids, checked params copy) of every request, or a ValueError naming the first bad
    prompt's index (one request's error as it was raised, a `ParamError` keeping its `param`):
    the all-or-nothing check before a batch of requests is queued anywhere.
    validate: (prompt, truncate_prompt_tokens) -> token ids (`validate_prompt` bound to a
    model). check_params: params -> a
    checked copy (the engine's `check_params`), checked first (its truncate_prompt_tokens
    cuts the prompt). A `max_tokens` of None becomes what the context leaves after the prompt
    (`max_model_len` - its length)."""
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling_params for {len(prompts)} prompts")
    checked = []
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        try:
            sp = check_params(sp)
            ids = validate(prompt, sp.truncate_prompt_tokens)
            if sp.max_tokens is None:
                sp.max_tokens = max_model_len - len(ids)  # validate left at least one
            checked.append((ids, sp))
        except ValueError as err:
            if len(prompts) == 1:
                raise
            raise ValueError(f"prompts[{i}]: {err}") from None
    return checked


def sibling_seed(seed: int, index: int) -> int:
    """The seed of a request's `index`-th completion: its own seed for the first. A seed's
    completions stay on its side of zero (a negative seed's are negative: bitwise
    complements of a non-negative one's), so that no two int64 seeds share one."""
    if index == 0:
        return seed
    if seed < 0:
        return ~sibling_seed(~seed, index)
    return (seed + index * 0x9E3779B97F4A7C15) % (1 << 63)


def _hashable(name: str, value) -> None:
    """ValueError naming `name` if `value` cannot be a dict key (the engine files requests
    and owners by them)."""
    try:
        hash(value)
    except TypeError:
        raise ValueError(f"{name} must be a string (hashable), got {type(value).__name__} "
                         f"{value!r}") from None


def check_owner(owner) -> None:
    """ValueError unless `owner` (whom the scheduler shares the batch fairly between) is None
    or can be filed by (a string, as the server's)."""
    if owner is not None:
        _hashable("owner", owner)


def fresh_request_ids(request_ids: list[str | None], counter, in_use) -> list[str]:
    """`request_ids` with each None replaced by the next "req-N" of `counter` (an
    `itertools.count`) that is neither in `in_use` nor given in `request_ids`: a caller's own
    id of that form (say "req-0") never makes a request without an id refused as a duplicate.
    ValueError naming request_id if a given one cannot be filed by."""
    for rid in request_ids:
        _hashable("request_id", rid)
    given = {r for r in request_ids if r is not None}
    out = []
    for rid in request_ids:
        while rid is None:
            rid = f"req-{next(counter)}"
            if rid in given or rid in in_use:
                rid = None
        out.append(rid)
    return out


def check_request_ids(request_ids: list[str], in_use, num_prompts: int | None = None) -> None:
    """ValueError if any id is in `in_use` or appears twice, or if there are not
    `num_prompts` of them (when given)."""
    if num_prompts is not None and len(request_ids) != num_prompts:
        raise ValueError(f"got {len(request_ids)} request_ids for {num_prompts} prompts")
    seen = set()
    for rid in request_ids:
        if rid in in_use or rid in seen:
            raise ValueError(f"request_id {rid!r} is already in use")
        seen.add(rid)
