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


def make_draft(target_path, path, n_layers: int = 1):
    """A draft model made of the target's embeddings and first `n_layers` layers: it agrees
    with the target often, not always."""
    import dataclasses

    from hwattn.models.checkpoint import load_checkpoint

    model = load_checkpoint(target_path)
    model.layers = model.layers[:n_layers]
    model.config = dataclasses.replace(model.config, n_layers=n_layers)
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

    def get(attention: str, draft_layers: int = 0, **kw):
        key = (attention, draft_layers, tuple(sorted(kw.items())))
        if key not in cache:
            path = root / f"{attention}-{len(cache)}"
            if draft_layers:
                cache[key] = make_draft(get(attention, **kw), path, draft_layers)
            else:
                cache[key] = make_checkpoint(path, attention, **kw)
        return cache[key]

    return get


def step_to_completion(engine, prompts, params, after_step=None) -> list:
    """Add `prompts`, step the engine until nothing is left, checking its invariants (and
    `after_step(engine)`, if given) after every step; the finished outputs in prompt order."""
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_invariants()
        if after_step is not None:
            after_step(engine)
    return [done[i] for i in ids]
