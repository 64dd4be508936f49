"""How a worker's failure is told: `WorkerError`, one-line summaries of exceptions and process
exits, and the seconds settings read from the environment."""

from __future__ import annotations

import math
import numbers
import os
import signal


class WorkerError(RuntimeError):
    """A worker process failed. `rank` and `phase` say which and when; the message carries the
    worker's traceback (or, for a worker that died without one, how it died). `reason` is the
    same in one line without the traceback, for logs' summaries and for clients."""

    def __init__(self, message: str, rank: int | None = None, phase: str | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.rank = rank
        self.phase = phase
        lines = message.strip().splitlines()
        self.reason = reason or (lines[0] if lines else "a worker process failed")


def check_seconds(name: str, value, allow_zero: bool = False) -> float:
    """`value` as a float; ValueError naming `name` unless it is a finite number of seconds
    > 0 (>= 0 where `allow_zero`). NaN, infinity (a worker's `timedelta` cannot hold it) and
    True / False are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not (math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)):
        raise ValueError(f"{name} must be a finite number of seconds "
                         f"{'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return seconds


def env_seconds(name: str, default: float, allow_zero: bool = False) -> float:
    """The number of seconds in environment variable `name` (`default` when unset);
    ValueError naming it when it is not a finite positive number (or zero, where allowed)."""
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and (seconds >= 0 if allow_zero else seconds > 0)):
        raise ValueError(f"{name} must be a finite number of seconds "
                         f"{'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return seconds


def seconds_or_env(name: str, value, env: str, default: float) -> float:
    """A timeout argument: `value` when given (`check_seconds`: a finite number > 0, else
    ValueError naming `name`), else environment variable `env` (`env_seconds`), else
    `default`. None alone means "the default": 0 is refused, not taken for it."""
    if value is None:
        return env_seconds(env, default)
    return check_seconds(name, value)


def summarize(exc: BaseException) -> str:
    """`Type: first line of the message` (a `WorkerError`'s reason), without the traceback."""
    text = getattr(exc, "reason", None) or (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit yet"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
