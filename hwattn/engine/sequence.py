"""One request as the engine tracks it: its tokens, its pages and where it stands.

A sequence's KV cache holds `num_cached` tokens. While `num_cached < len(token_ids)` the rest
still has to go through the model: a prompt (chunk by chunk) or, in decoding, the last sampled
token. A preempted sequence drops its pages and recomputes prompt and output from scratch.

While the engine overlaps steps, the last `num_pending` entries of `token_ids` are placeholders
for tokens sampled on the device and not yet read back; outputs never show them.
"""

from __future__ import annotations

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

    index: which of the n it is. text, token_ids: generated so far. cumulative_logprob: sum
    of the sampled tokens' log-probabilities (None unless `logprobs` was asked for).
    logprobs: per generated token, its `PositionLogprobs` (None unless asked for).
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

    def output(self, siblings: list["Sequence"] | None = None) -> RequestOutput:
        """The request's output; `siblings`: all n sequences of the request (default: this
        one alone), in index order."""
        group = siblings or [self]
        first = group[0]
        times = [s.first_token_time for s in group if s.first_token_time is not None]
        scheduled = [s.first_scheduled_time for s in group if s.first_scheduled_time is not None]
        done = [s.finish_time for s in group]
        error = next((s.error for s in group if s.error is not None), None)
        return RequestOutput(first.request_id, first.prompt, first.prompt_token_ids,
                             [s.completion() for s in group],
                             None if first.prompt_logprobs is None else list(first.prompt_logprobs),
                             first.num_prefix_hit, first.arrival_time,
                             min(times) if times else None,
                             None if None in done else max(done), error,
                             first_scheduled_time=min(scheduled) if scheduled else None)
