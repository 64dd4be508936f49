"""How many CPU threads torch uses: one for small models, else the cores that are idle.

PyTorch starts one OpenMP thread per core. For the small models hwattn runs on CPUs, each
operation is a few microseconds of work, less than waking and synchronising threads costs;
and when other processes keep the cores busy, a thread waiting at a barrier for a peer that
was descheduled stalls every operation. Measured on a 2-core machine shared with other jobs:
greedy decoding of the tiny model ran at 10-30 tokens/s with torch's 2 threads and 300-450
with one; a tiny training step took 4-8 s instead of 1-1.4 s.

Precedence: an explicit count (`--cpu-threads N`, `set_cpu_threads`), then OMP_NUM_THREADS
from the environment, then `default_threads` for the model at hand.
"""

from __future__ import annotations

import os

import torch

# Below this many parameters one thread is the default (the tiny preset has about 1M).
SMALL_MODEL_PARAMS = 20_000_000

_explicit: int | None = None


def available_cores() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def idle_cores() -> int:
    """Cores not kept busy by other work, from the one-minute load average (at least 1)."""
    cores = available_cores()
    try:
        busy = int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0
    return max(1, min(cores, cores - busy))


def default_threads(params: int | None) -> int:
    """1 for a model under SMALL_MODEL_PARAMS parameters, else the idle cores."""
    if params is not None and params < SMALL_MODEL_PARAMS:
        return 1
    return idle_cores()


def set_cpu_threads(n: int) -> int:
    """Use exactly `n` threads from now on (defaults no longer apply)."""
    global _explicit
    if n < 1:
        raise ValueError(f"cpu_threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    _explicit = n
    return n


def use_default_cpu_threads(params: int | None, device=None) -> int:
    """Apply `default_threads(params)` for work on `device` (CPU when None), unless a count was
    given explicitly or through OMP_NUM_THREADS, or the work runs on a GPU. Returns the number
    of threads in effect."""
    on_cpu = device is None or torch.device(device).type == "cpu"
    if _explicit is None and on_cpu and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads(params))
    return torch.get_num_threads()


def describe() -> str:
    """One line for command output: the thread count and where it came from."""
    n = torch.get_num_threads()
    if _explicit is not None:
        return f"{n} CPU thread{'s' * (n != 1)} (--cpu-threads)"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{n} CPU thread{'s' * (n != 1)} (OMP_NUM_THREADS)"
    return f"{n} CPU thread{'s' * (n != 1)} (default for this model size; --cpu-threads N to change)"
