"""One request as the engine tracks it: its tokens, its pages and where it stands.

A sequence's KV cache holds `num_cached` tokens. While `num_cached < len(token_ids)` the rest
still has to go through the model: a prompt (chunk by chunk) or, in decoding, the last sampled
token. A preempted sequence drops its pages and recomputes prompt and output from scratch.

While the engine overlaps steps, the last `num_pending` entries of `token_ids` are placeholders
for tokens sampled on the device and not yet read back; outputs never show them.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from dataclasses import dataclass

from hwattn.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Logprob:
    """A token's log-probability under the model, its rank among the vocabulary (1 = most
    likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: the sampled (or prompt) token and the requested top tokens, by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    """One of a request's `n` completions.

    index: which of the n it is. text, token_ids: generated so far (with output_kind
    "delta": generated since this completion's previous output). cumulative_logprob: sum
    of the sampled tokens' log-probabilities so far, whatever the output kind (None unless
    `logprobs` was asked for).
    logprobs: per token of `token_ids`, its `PositionLogprobs` (None unless asked for).
    finish_reason: None while running; "stop" (EOS, a stop string or stop token), "length"
    (max_tokens or the model's context), "abort", or "error" (see `RequestOutput.error`).
    stop_reason: the stop string or stop token id that ended it (None otherwise).
    """

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """What `LLM.generate` and the engine's step report for one request.

    outputs: its `n` completions. `text`, `token_ids` and `finish_reason` read `outputs[0]`.
    prompt_logprobs: None unless asked for; else per prompt token, None for the first and its
    `PositionLogprobs` for every other. error: why the request failed, when one of its
    completions failed while being sampled or detokenized (that one finishes "error", the
    others "abort"), or when the worker process running it failed. worker_failed: the
    latter (a data-parallel replica died or got stuck): nothing about the request itself
    was wrong, and it may succeed if sent again.

    With output_kind "delta" each output holds what is new since the request's previous
    output: `outputs` still lists all n completions in index order, each with the token ids,
    their log-probabilities and the text that are new for it (any of them may be empty; a
    completion that finished in an earlier output comes again, empty, with its
    finish_reason). Joining a completion's deltas over all the request's outputs gives
    exactly the text, token ids and log-probabilities a "cumulative" request ends with. The
    text lags its tokens: a multi-byte character waits for its last token, and the last
    `SamplingParams.stop_holdback` characters of an unfinished completion wait until later
    text shows that no stop string cuts them off (each character comes exactly once; the
    completion's finishing output brings all that was kept back). prompt_logprobs comes in
    the request's first output only (as a "cumulative" first output has it), None later;
    the other fields (prompt, prompt_token_ids, cumulative_logprob, finish reasons, error,
    times) are as for "cumulative".

    Times are `time.perf_counter()` seconds: arrival_time (the engine took the request),
    first_scheduled_time (the scheduler first admitted it for prefill; a preemption does not
    reset it; None until then), first_token_time, finish_time. With n > 1, the earliest
    completion's first times and the latest completion's finish time.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_prompt_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None
    worker_failed: bool = False
    first_scheduled_time: float | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        """outputs[0]'s, but "error" whenever the request failed, and None until all n are
        done."""
        if not self.finished:
            return None
        return "error" if self.error is not None else self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)


class DeltaJoiner:
    """Joins a request's "delta" outputs (`SamplingParams.output_kind`), added in the order
    they came, into one output of the same kind that holds what they held together: per
    completion, the text, token ids and log-probabilities appended; prompt_logprobs the
    first's; every other field the last's. Joining all of a request's outputs gives the
    output a "cumulative" request ends with. Adding costs what is added (the text parts are
    joined once, by `take`)."""

    def __init__(self):
        self.last: RequestOutput | None = None
        self.prompt_logprobs = None
        self.texts: list[list[str]] = []
        self.tokens: list[list[int]] = []
        self.logprobs: list[list[PositionLogprobs] | None] = []

    def add(self, out: RequestOutput) -> None:
        if self.last is None:
            self.prompt_logprobs = out.prompt_logprobs
            self.texts = [[c.text] for c in out.outputs]
            self.tokens = [list(c.token_ids) for c in out.outputs]
            self.logprobs = [None if c.logprobs is None else list(c.logprobs)
                             for c in out.outputs]
        else:
            for k, c in enumerate(out.outputs):
                self.texts[k].append(c.text)
                self.tokens[k] += c.token_ids
                if c.logprobs is not None:
                    self.logprobs[k] += c.logprobs
        self.last = out

    def take(self) -> RequestOutput | None:
        """The joined output of what was added since the last `take` (None if nothing was),
        after which the joiner starts over."""
        out, self.last = self.last, None
        if out is None:
            return None
        outputs = [dataclasses.replace(c, text="".join(text), token_ids=tokens, logprobs=logprobs)
                   for c, text, tokens, logprobs in zip(out.outputs, self.texts, self.tokens,
                                                        self.logprobs)]
        return dataclasses.replace(out, outputs=outputs, prompt_logprobs=self.prompt_logprobs)


class Sequence:
    """Token ids (prompt then output), page list and progress of one request."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, prompt: str | None = None, index: int = 0, owner: str | None = None):
        self.request_id = request_id
        # Whom the scheduler shares the batch fairly between (default: the request itself).
        self.owner = request_id if owner is None else owner
        self.index = index  # which of the request's n completions this is
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)  # shared by every output: read-only
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.page_hashes: list[bytes] = []  # hash chain of the full pages registered so far
        self.prompt_hashes: list[bytes] = []  # the prompt's page hash chain, as far as asked
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.num_prefix_hit = 0  # prompt tokens found in the prefix cache at first admission
        self.num_prompt_counted = 0  # prompt tokens counted as prefilled (metrics)
        self.draft_cached = 0  # tokens in the draft model's cache (speculative decoding)
        self.drafter_state = None  # what a speculative drafter keeps of it (an n-gram index)
        self.num_pending = 0  # trailing placeholder tokens still on the device
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""
        self.stop_reason: str | int | None = None
        # Filled in only when the params ask: per output token, per prompt position.
        self.logprobs: list[PositionLogprobs] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.prompt_logprobs: list[PositionLogprobs | None] | None = \
            [None] * self.num_prompt_tokens if params.prompt_logprobs is not None else None
        # Whether its tokens must be read back before the next step is launched (penalties,
        # min_tokens and bad words read them; log-probabilities come back with them). The
        # engine's params are its own copy, so this holds for the sequence's life.
        self.sampled_on_host = not params.plain or self.prompt_logprobs is not None \
            or bool(params.bad_words)
        # Whether its token is always the argmax of the raw logits, with no setting the
        # sampler reads beyond top-k and top-p (`SamplingInput.argmax_rows`). Settings that
        # cannot be read take the general path, where the step fails this request alone.
        try:
            self.argmax_only = bool(params.argmax_of_raw_logits)
        except Exception:  # noqa: BLE001 - see above
            self.argmax_only = False
        self.arrival_time = time.perf_counter()
        # When the scheduler first admitted it for prefill; kept through preemptions.
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        # What "delta" outputs have reported: output tokens (and their log-probabilities),
        # characters of text, and whether the request's first output went (kept on the
        # first sequence of a request: its prompt log-probabilities go there).
        self.reported_tokens = 0
        self.reported_chars = 0
        self.reported_any = False
        self.stop_holdback = params.stop_holdback if params.output_kind == "delta" else 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        """Tokens not yet in the cache: > 1 while prefilling, 1 while decoding."""
        return len(self.token_ids) - self.num_cached

    @property
    def is_prefilling(self) -> bool:
        """Whether prompt tokens remain to be cached (`num_uncomputed` > 1, or no output yet).
        Read for every running sequence each step, hence written out."""
        n = len(self.token_ids)
        return n - self.num_cached > 1 or n == self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def completion(self) -> CompletionOutput:
        known = len(self.token_ids) - self.num_pending  # placeholders stay hidden
        return CompletionOutput(self.index, self.text, self.token_ids[self.num_prompt_tokens:known],
                                self.cumulative_logprob,
                                None if self.logprobs is None else list(self.logprobs),
                                self.finish_reason, self.stop_reason)

    def delta(self) -> CompletionOutput:
        """What is new since this sequence's previous `delta` (see `RequestOutput` on
        output_kind "delta"), and mark it reported: its known tokens since, their
        log-probabilities, and its text since but for the last `stop_holdback` characters
        while it runs. Called for every request and step of a "delta" stream, hence each
        attribute read once."""
        ids = self.token_ids
        reported = self.reported_tokens
        start = self.num_prompt_tokens + reported
        tokens = ids[start:len(ids) - self.num_pending]  # placeholders stay hidden
        new = len(tokens)
        logprobs = None
        if self.logprobs is not None:
            logprobs = self.logprobs[reported:reported + new]
        text, chars, finish_reason = self.text, self.reported_chars, self.finish_reason
        end = len(text)
        if finish_reason is None:
            # A stop string cuts at most this far back, and never into what was reported
            # (`SamplingParams.stop_holdback`): nothing comes while `end` is not past that.
            end -= self.stop_holdback
        self.reported_tokens = reported + new
        if end > chars:
            self.reported_chars = end
            text = text[chars:end]
        else:
            text = ""
        return CompletionOutput(self.index, text, tokens, self.cumulative_logprob, logprobs,
                                finish_reason, self.stop_reason)

    def output(self, siblings: list["Sequence"] | None = None) -> RequestOutput:
        """The request's output, as its `params.output_kind` asks (a "delta" one marks what it
        holds reported; "final_only" builds a "cumulative" one); `siblings`: all n sequences
        of the request (default: this one alone), in index order."""
        group = siblings or [self]
        first = group[0]
        delta = first.params.output_kind == "delta"
        prompt_logprobs = None  # a "delta" request's go in its first output alone
        if first.prompt_logprobs is not None and not (delta and first.reported_any):
            prompt_logprobs = list(first.prompt_logprobs)
        first.reported_any = True
        if len(group) == 1:
            # One completion (most requests): its own times and error, as the merge below
            # gives them, without building its lists and generator for every request and
            # step (most of this method's cost; `docs/results/engine.md`, "The output phase").
            return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                                 [first.delta() if delta else first.completion()],
                                 prompt_logprobs, first.num_prefix_hit, first.arrival_time,
                                 first.first_token_time, first.finish_time, first.error, False,
                                 first.first_scheduled_time)
        times = [s.first_token_time for s in group if s.first_token_time is not None]
        scheduled = [s.first_scheduled_time for s in group if s.first_scheduled_time is not None]
        done = [s.finish_time for s in group]
        error = next((s.error for s in group if s.error is not None), None)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                             [s.delta() if delta else s.completion() for s in group],
                             prompt_logprobs,
                             first.num_prefix_hit, first.arrival_time,
                             min(times) if times else None,
                             None if None in done else max(done), error,
                             first_scheduled_time=min(scheduled) if scheduled else None)
