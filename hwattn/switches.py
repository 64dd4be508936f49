"""The environment switches (HWATTN_*) that choose between measured alternatives of a kernel
or a step: each is read once, at import, and a value the switch does not know is refused
naming the variable rather than read as its default."""

from __future__ import annotations

import os

ON_OFF = ("0", "1")


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """Environment variable `name` (`default` when unset), one of `choices`; ValueError
    naming the variable otherwise."""
    value = os.environ.get(name, default)
    if value not in choices:
        allowed = " or ".join(choices) if len(choices) == 2 else f"one of {choices}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """Environment variable `name` as an on / off switch: "1" on, "0" off, unset `default`."""
    return env_choice(name, ON_OFF, "1" if default else "0") == "1"
