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
class RequestOutput:
    """What `LLM.generate` and the engine's step report for one request.

    finish_reason: None while running; "stop" (EOS, a stop string or stop token), "length"
    (max_tokens or the model's context), "abort", or "error" (this request alone failed while
    being sampled or detokenized; `error` says why).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    num_cached_prompt_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Sequence:
    """Token ids (prompt then output), page list and progress of one request."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)  # shared by every output: read-only
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.page_hashes: list[int] = []  # hash chain of the full pages registered so far
        self.num_cached = 0  # tokens whose K/V are in the cache
        self.num_prefix_hit = 0  # prompt tokens found in the prefix cache at admission
        self.draft_cached = 0  # tokens in the draft model's cache (speculative decoding)
        self.num_pending = 0  # trailing placeholder tokens still on the device
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.text = ""
        self.arrival_time = time.perf_counter()
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
        return self.num_uncomputed > 1 or self.num_output_tokens == 0

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    def output(self) -> RequestOutput:
        known = len(self.token_ids) - self.num_pending
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids,
                             self.text, self.token_ids[self.num_prompt_tokens:known],
                             self.finish_reason,
                             self.num_prefix_hit, self.arrival_time, self.first_token_time,
                             self.finish_time, self.error)
