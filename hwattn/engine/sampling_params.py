"""Per-request sampling settings, validated when a request is made (and again when the engine
queues it, so a setting changed after construction cannot reach the sampler unchecked)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

INT64_LIMIT = 1 << 63  # settings the sampler puts in int64 tensors must stay below this


class ParamError(ValueError):
    """A refused sampling setting, named in `param` (so that the server's 400 can name it
    without reading the message)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _integer(name: str, value, low: int, what: str = "") -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) \
            or not low <= value < INT64_LIMIT:
        lowest = "-2**63" if low == -INT64_LIMIT else low
        raise ValueError(f"{name} must be an integer in [{lowest}, 2**63){what}, got {value!r}")
    return int(value)


def _number(name: str, value, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


OUTPUT_KINDS = ("cumulative", "delta", "final_only")
# Temperatures below this decode greedily, as vLLM's: dividing float32 logits by less can
# overflow them to +-inf, after which the draw is no longer the distribution's limit.
GREEDY_BELOW = 1e-5


def _logit_bias(value) -> dict[int, float] | None:
    """A checked copy of a {token id: bias} mapping (None when empty): the caller's dict
    changed afterwards cannot reach the sampler."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got "
                         f"{type(value).__name__}")
    out = {}
    for token, bias in value.items():
        if not isinstance(token, numbers.Integral) or isinstance(token, bool) \
                or not 0 <= token < INT64_LIMIT:
            raise ValueError(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
        if not isinstance(bias, numbers.Real) or isinstance(bias, bool) \
                or not math.isfinite(bias):
            raise ValueError(f"logit_bias values must be finite numbers, got {bias!r} for "
                             f"token {token}")
        out[int(token)] = float(bias)
    return out or None


def _allowed_token_ids(value) -> list[int] | None:
    """A checked copy of allowed_token_ids (repeats dropped, order kept); an empty list is
    refused, as vLLM refuses it (no token could be sampled)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"allowed_token_ids must be a list of token ids, got "
                         f"{type(value).__name__}")
    if not value:
        raise ValueError("allowed_token_ids must not be empty (None: every token is allowed)")
    return list(dict.fromkeys(_integer("allowed_token_ids", t, 0, what=" each") for t in value))


def _bad_words(value) -> list[str] | None:
    """A checked copy of bad_words (None when empty): strings with something beside
    whitespace, in valid Unicode."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"bad_words must be a list of strings, got {type(value).__name__}")
    for word in value:
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"bad_words must hold strings with more than whitespace, got "
                             f"{word!r}")
        try:
            word.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"bad_words must hold valid Unicode: {word[:60]!r} has "
                             f"{word[err.start]!r} at character {err.start} ({err.reason})"
                             ) from None
    return list(value) or None


def bad_words_token_ids(words: list[str], tokenizer) -> list[list[int]]:
    """Token id sequences of `words` as vLLM's `SamplingParams.update_from_tokenizer` makes
    them: each word (leading whitespace stripped) encoded alone, and once more after a space
    (a word in mid-text), that second form kept when it starts with another token and has as
    many tokens as the first."""
    out: list[list[int]] = []
    for word in words:
        bare = list(tokenizer.encode(word.lstrip()))
        spaced = list(tokenizer.encode(" " + word.lstrip()))
        for ids in (bare, spaced) if spaced and spaced[0] != bare[0] \
                and len(spaced) == len(bare) else (bare,):
            if ids not in out:
                out.append(ids)
    return out


def bad_word_bans(words: list[list[int]], output: list[int]) -> list[int]:
    """The tokens `words` (token id sequences) ban after `output` (a request's generated
    tokens so far, or their last tokens, at least as many as the longest word has minus one):
    each word's last token where the output ends with the word's other tokens (a one-token
    word: always), as vLLM's bad-words processor bans them (the prompt does not count)."""
    bans = []
    for ids in words:
        n = len(ids) - 1
        if n == 0 or (n <= len(output) and output[-n:] == ids[:-1]):
            bans.append(ids[-1])
    return bans


@dataclass
class SamplingParams:
    """How one request is decoded.

    n: independent completions of the prompt (>= 1); each is one of the output's `outputs`.
        Not capped in the Python API: completions beyond max_num_seqs wait their turn, and
        each costs host memory while it waits (the server caps n per request,
        `ServerLimits.max_n`).
    max_tokens: new tokens to generate at most (>= 1); None: until the context is full (the
        engine sets it to max_model_len minus the prompt's length when the request is queued).
    min_tokens: new tokens before end-of-sequence, stop token ids or stop strings may end the
        output (0 <= min_tokens <= max_tokens).
    temperature: 0 (or below 1e-5, as vLLM) means greedy; otherwise logits are divided by it
        (finite, >= 0).
    top_k: keep the k most likely tokens, and any tied with the k-th (as vLLM; 0 or -1: all;
        below 2**63).
    top_p: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
    min_p: drop tokens less likely than min_p times the most likely one (0 <= min_p <= 1).
    presence_penalty: subtracted from the logit of every token already in the output
        (finite, in [-2, 2]).
    frequency_penalty: subtracted once per occurrence in the output (finite, in [-2, 2]).
    repetition_penalty: divides positive (multiplies negative) logits of tokens in the prompt
        or the output (finite, > 0; 1 is off).
    logit_bias: {token id: bias} added to those tokens' logits before anything else the sampler
        does (penalties, bans, temperature, filtering, the greedy argmax), as OpenAI's
        `logit_bias`; ids must be in the model's vocabulary (checked when the request is
        queued), biases finite (the server takes -100 to 100, as OpenAI does). None or {}: off.
    allowed_token_ids: None, or the only token ids that may be sampled (the others' logits
        are -inf, after logit biases and penalties, before temperature and filtering, greedy
        included); ids must be in the model's vocabulary (checked when the request is
        queued); an empty list is refused, as is one whose every id is banned at the first
        token (stop token ids or end-of-sequence under min_tokens, one-token bad words;
        checked when the request is queued). Log-probabilities stay the model's own, as vLLM's
        default (raw) ones: a disallowed token may be among the top ones reported.
    bad_words: None, or words never to be generated (as vLLM's): each is tokenized alone and
        after a space (`bad_words_token_ids`), and a word's last token is banned (-inf) while
        the generated tokens end with its other tokens (a one-token word always). The prompt
        does not count. A request with bad words is sampled in step with the host; speculative
        decoding verifies its n-gram drafts with the bans of each draft position, and a draft
        model engine decodes plainly while such a request runs.
    truncate_prompt_tokens: None, or keep only the prompt's last k tokens (k >= 1, at most
        max_model_len; -1: max_model_len - 1, the longest prompt that leaves room for a token
        here), applied before the prompt's length is checked; the output's prompt_token_ids
        are the kept ones. A text prompt is then tokenized in full, however long.
    seed: makes this request's samples reproducible whatever else runs beside it; when None
        the engine draws one from its own seeded generator. Any signed 64-bit integer, as
        vLLM's server takes (negative ones included); the sampler hashes its 64 bits as two's
        complement, so -1 is the seed a uint64 generator would call 2**64 - 1, and distinct
        seeds are distinct inputs to the hash. Values outside [-2**63, 2**63), 2**64 - 1
        among them, are refused rather than folded onto a negative seed. With a draft model
        speculating, the tokens also depend on which of its steps verified drafts (a verify
        step draws other tokens than a plain step, from the same law), and a batch mate can
        make a step plain (penalties, min_tokens, log-probabilities, the end of its context,
        `speculative_disable_batch_size`); n-gram speculation draws the plain tokens.
    stop: a string or a list of strings that end the output when they appear (the stop string
        is not returned unless include_stop_str_in_output).
    stop_token_ids: token ids that end the output (the id is kept in `token_ids`, its text
        left out of `text` unless include_stop_str_in_output, as vLLM's); each must be in the
        model's vocabulary (checked when the request is queued).
    include_stop_str_in_output: keep the stop string, stop token or end-of-sequence token that
        ended the output in its text.
    ignore_eos: keep going past the end-of-sequence token.
    logprobs: None, or how many of the most likely tokens to report beside each sampled one
        (0: the sampled token alone; at most the model's vocabulary size, checked when the
        request is queued). Log-probabilities are the model's own (log-softmax of
        its logits, before penalties, temperature and filtering).
    prompt_logprobs: None, or the same for every prompt token but the first (the request's
        prompt is then computed in full, not taken from the prefix cache).
    detokenize: build the output text (benchmarks turn it off to time the model alone);
        stop strings need it (refused without it, as vLLM refuses them).
    skip_special_tokens: leave special tokens (such as <|endoftext|>) out of the output text
        (True, as vLLM); False writes them into the text. The token ids are the same either way.
    output_kind: when `LLMEngine.step` returns this request's output, and what it holds:
        "cumulative" (the default: every step that advanced it, with everything so far),
        "delta" (every step that advanced it, with only what is new since its previous
        output: for streaming, at a cost per step that does not grow with the answer; see
        `RequestOutput` for what each field then means) or "final_only" (once, when it has
        finished, a step building no output for it before; `LLM.generate` asks for this). As
        vLLM's `RequestOutputKind.CUMULATIVE` / `DELTA` / `FINAL_ONLY`.

    Logit biases, penalties, min_p / min_tokens, allowed_token_ids and bad_words apply before
    the greedy argmax too; with none of them
    set, sampling is exactly what it was without them.
    Every setting is checked here; a bad one raises `ValueError` naming it.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    min_tokens: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: str = "cumulative"
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = None
    # bad_words as token ids (`bad_words_token_ids`), set by the engine's check of the params
    # (it has the tokenizer), as vLLM's `_bad_words_token_ids`.
    bad_words_token_ids: list[list[int]] | None = field(default=None, init=False, repr=False,
                                                        compare=False)

    def __post_init__(self) -> None:
        stop = self.stop
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got "
                             f"{type(stop).__name__} {stop!r}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must hold non-empty strings, got {list(stop)!r}")
        for s in stop:  # a lone surrogate is in no text the model can write: it could never match
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError(f"stop must hold valid Unicode: {s[:60]!r} has {s[err.start]!r} "
                                 f"at character {err.start} ({err.reason})") from None
        self.stop = list(stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got "
                             f"{type(ids).__name__}")
        self.stop_token_ids = [_integer("stop_token_ids", t, 0, what=" each") for t in ids]
        if self.max_tokens is not None:
            self.max_tokens = _integer("max_tokens", self.max_tokens, 1,
                                       what=" (None: up to the context limit)")
        self.temperature = _number("temperature", self.temperature, ">= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        self.top_k = _integer("top_k", self.top_k, -1, what=" (0 or -1: no limit)")
        if self.top_k == -1:
            self.top_k = 0
        self.top_p = _number("top_p", self.top_p, "in (0, 1]")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be a finite number in (0, 1], got {self.top_p!r}")
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, -INT64_LIMIT,
                                 what=" (a signed 64-bit integer)")
        self.n = _integer("n", self.n, 1)
        self.min_tokens = _integer("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be at most max_tokens ({self.max_tokens}), got "
                             f"{self.min_tokens}")
        self.min_p = _number("min_p", self.min_p, "in [0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be a finite number in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _number(name, getattr(self, name), "in [-2, 2]")
            if not -2 <= value <= 2:
                raise ValueError(f"{name} must be a finite number in [-2, 2], got {value!r}")
            setattr(self, name, value)
        self.repetition_penalty = _number("repetition_penalty", self.repetition_penalty, "> 0")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got "
                             f"{self.repetition_penalty!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                setattr(self, name, _integer(name, getattr(self, name), 0,
                                             what=" (None: no log-probabilities)"))
        self.logit_bias = _logit_bias(self.logit_bias)
        self.allowed_token_ids = _allowed_token_ids(self.allowed_token_ids)
        self.bad_words = _bad_words(self.bad_words)
        if self.truncate_prompt_tokens is not None:
            value = self.truncate_prompt_tokens
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) \
                    or not (value == -1 or 1 <= value < INT64_LIMIT):
                raise ValueError(f"truncate_prompt_tokens must be an integer >= 1, or -1 (the "
                                 f"model's context), got {value!r}")
            self.truncate_prompt_tokens = int(value)
        if self.output_kind not in OUTPUT_KINDS:
            raise ValueError(f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got "
                             f"{self.output_kind!r}")
        for name in ("ignore_eos", "detokenize", "include_stop_str_in_output",
                     "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.stop and not self.detokenize:  # they would never match: refused, as vLLM does
            raise ValueError(f"stop strings {self.stop!r} are matched on the output text, which "
                             f"detokenize=False does not build: set detokenize=True or use "
                             f"stop_token_ids")

    @property
    def stop_holdback(self) -> int:
        """Characters at the end of an unfinished output's text that a stop string begun there
        may still cut off (the engine then cuts the text back to before the stop string): the
        longest stop string's length minus one; 0 without stop strings or when the stop string
        is kept (include_stop_str_in_output, whose cut never reaches back). A "delta" output
        keeps them back until more text or the finish shows they stay."""
        if not self.stop or self.include_stop_str_in_output:
            return 0
        return max(len(s) for s in self.stop) - 1

    @property
    def argmax_of_raw_logits(self) -> bool:
        """Whether the token is always the argmax of the model's logits as they are: greedy,
        with no setting that changes the logits first."""
        return self.greedy and self.plain and self.min_p == 0 and not self.logit_bias \
            and self.allowed_token_ids is None and not self.bad_words

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def penalized(self) -> bool:
        """Whether a penalty reads this request's earlier tokens."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 \
            or self.repetition_penalty != 1

    @property
    def plain(self) -> bool:
        """Whether the sampler needs nothing beyond temperature, top-k, top-p, min-p, logit
        biases, allowed_token_ids and bad_words (speculative decoding verifies drafts of plain
        requests only; bad_words only with an n-gram drafter, whose drafts are on the host)."""
        return not self.penalized and self.min_tokens == 0 and self.logprobs is None
