"""Engine test helpers: one intra-op thread, and stepping an engine to completion while
checking its invariants. The small checkpoints (`checkpoints`) are built once per run in
tests/conftest.py."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and a shared 2-core machine makes
    OpenMP's spinning threads slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def drain(engine, after_step=None) -> dict:
    """Step the engine until nothing is left, checking its invariants (and `after_step(engine)`,
    if given) after every step; {request id: final output} of what finished."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
        if after_step is not None:
            after_step(engine)
    return done


def step_to_completion(engine, prompts, params, after_step=None) -> list:
    """Add `prompts` and `drain` the engine; the finished outputs in prompt order."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = drain(engine, after_step)
    return [done[i] for i in ids]
