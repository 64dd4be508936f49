"""`hwattn.train.memory`: what the device has free for a run's micro-batch."""

from __future__ import annotations

import torch

from hwattn.train import memory


def test_a_gpus_free_memory_counts_the_blocks_this_process_has_cached(monkeypatch):
    """Observed: the check compared the bound with `mem_get_info`'s free bytes alone, which
    leave out what PyTorch's allocator has cached for this process but not handed out: a
    run after another in the same process (a second `run_compare`, a notebook) was refused
    for memory it would have allocated from. The engine's page planner counts it as free."""
    gib = memory.GIB
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 50 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert memory.free_bytes(torch.device("cuda")) == 42 * gib
