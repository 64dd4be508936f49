"""Per-request sampling settings, validated when a request is made (and again when the engine
queues it, so a setting changed after construction cannot reach the sampler unchecked)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

INT64_LIMIT = 1 << 63  # settings the sampler puts in int64 tensors must stay below this


def _integer(name: str, value, low: int, what: str = "") -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) \
            or not low <= value < INT64_LIMIT:
        raise ValueError(f"{name} must be an integer in [{low}, 2**63){what}, got {value!r}")
    return int(value)


def _number(name: str, value, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number {what}, got {value!r}")
    return float(value)


@dataclass
class SamplingParams:
    """How one request is decoded.

    max_tokens: new tokens to generate at most (>= 1).
    temperature: 0 means greedy; otherwise logits are divided by it (finite, >= 0).
    top_k: keep the k most likely tokens (0 or -1: all; below 2**63).
    top_p: keep the smallest set of tokens whose probability reaches top_p (0 < top_p <= 1).
    seed: makes this request's samples reproducible whatever else runs beside it; when None
        the engine draws one from its own seeded generator.
    stop: a string or a list of strings that end the output when they appear (the stop string
        is not returned).
    stop_token_ids: token ids that end the output (the id is kept in `token_ids`).
    ignore_eos: keep going past the end-of-sequence token.
    detokenize: build the output text (benchmarks turn it off to time the model alone).

    Every setting is checked here; a bad one raises `ValueError` naming it.
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
        self.stop = list(stop)
        ids = self.stop_token_ids if self.stop_token_ids is not None else []
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids, got "
                             f"{type(ids).__name__}")
        self.stop_token_ids = [_integer("stop_token_ids", t, 0, what=" each") for t in ids]
        self.max_tokens = _integer("max_tokens", self.max_tokens, 1)
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
            self.seed = _integer("seed", self.seed, 0)
        for name in ("ignore_eos", "detokenize"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
