"""Engine test helpers: small checkpoints whose greedy outputs are not one repeated token."""

from __future__ import annotations

import pytest
import torch

from hwattn.engine.loader import build_model
from hwattn.models.checkpoint import save_checkpoint


def make_checkpoint(path, attention: str, scale: float = 5.0, seed: int = 0, n_layers: int = 2):
    """A tiny model (random weights scaled up by `scale`, so its greedy continuations vary
    and n-gram drafts are sometimes right, sometimes wrong) saved to `path`."""
    model = build_model("tiny", attention=attention, seed=seed,
                        overrides=dict(n_layers=n_layers, max_seq_len=256))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.mul_(scale)
    save_checkpoint(model, path)
    return str(path)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: these models are tiny, and a shared 2-core machine makes
    OpenMP's spinning threads slower than one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    cache = {}

    def get(attention: str, **kw):
        key = (attention, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_checkpoint(root / f"{attention}-{len(cache)}", attention, **kw)
        return cache[key]

    return get
