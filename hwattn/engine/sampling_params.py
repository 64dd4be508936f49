"""Per-request sampling settings, validated when a request is made."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_tokens: new tokens to generate at most (>= 1).
    temperature: 0 means greedy; otherwise logits are divided by it (>= 0).
    top_k: keep the k most likely tokens (0 or -1: all).
    top_p: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
    seed: makes this request's samples reproducible whatever else runs beside it; when None
        the engine draws one from its own seeded generator.
    stop: strings that end the output when they appear (the stop string is not returned).
    ignore_eos: keep going past the end-of-sequence token.
    detokenize: build the output text (benchmarks turn it off to time the model alone).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    stop_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0 \
                or self.temperature != self.temperature:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 for no limit, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2 ** 63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        self.temperature = float(self.temperature)
        self.top_p = float(self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
