"""Shared test helpers: deterministic seeds and derived tolerances."""

from __future__ import annotations

import os

import pytest
import torch

# Tests compare against fp64 references; keep the CPU deterministic and small.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Triton kernels run on CPU tensors under its interpreter, which must be chosen before the
# first import of triton, whichever test module comes first (GPU runs set
# HWATTN_TEST_DEVICE=cuda TRITON_INTERPRET=0 explicitly).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing in the tests may reach the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# A model small enough to train in seconds, for the data / train / eval / hf tests.
SMALL = {"n_layers": 2, "dim": 64, "n_heads": 4, "mha_hidden_dim": 192}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _cpu_threads():
    """CLI calls choose thread counts for their model; give later tests back the suite's."""
    from hwattn import cpu_threads

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
    cpu_threads._explicit = None


def assert_close_derived(actual: torch.Tensor, truth: torch.Tensor, baseline: torch.Tensor,
                         factor: float = 4.0, what: str = "output") -> None:
    """`actual` may differ from the fp64 `truth` by at most `factor` times the error of
    `baseline` (the same quantity computed another way in the same dtype), plus one ulp of
    the truth's magnitude. NaN or inf never passes."""
    assert torch.isfinite(actual).all(), f"{what} has NaN/inf"
    truth = truth.double()
    err = (actual.double() - truth).abs().max().item()
    base = (baseline.double() - truth).abs().max().item()
    ulp = torch.finfo(actual.dtype).eps * truth.abs().max().item()
    assert err <= factor * base + ulp, f"{what}: error {err:.3e} > {factor} x baseline {base:.3e} + {ulp:.3e}"


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
    """A small dataset (own BPE of 512 ids) built from the shipped corpus."""
    from hwattn.data.build import BuildOptions
    from hwattn.data.corpora import build_dataset

    out = tmp_path_factory.mktemp("data") / "ds"
    build_dataset(out, "embedded", "bpe:512", BuildOptions(val_fraction=0.1), progress=False,
                  log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def trained(tmp_path_factory, dataset_dir):
    """A tiny model (2 layers, 64 wide) trained for 40 steps; returns (run dir, summary)."""
    from hwattn.train.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("run") / "gta"
    cfg = TrainConfig(data=str(dataset_dir), out=str(out), variant="gta-4", seq_len=64, batch_size=8,
                      steps=40, lr=1e-2, warmup_steps=4, eval_every=20, eval_tokens=2048,
                      log_every=5, model_overrides=SMALL)
    res = train(cfg, progress=False, log=lambda *a: None)
    return out, res


def failing_on_call(real, n: int, error: Exception):
    """`real` wrapped to raise `error` on its n-th call (from 1) and pass every other call
    through (a function, or a method when set on the class)."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    return wrapped


def make_checkpoint(path, attention: str, scale: float = 5.0, seed: int = 0, n_layers: int = 2):
    """A tiny model (random weights scaled up by `scale`, so its greedy continuations vary
    and n-gram drafts are sometimes right, sometimes wrong) saved to `path`."""
    from hwattn.engine.loader import build_model
    from hwattn.models.checkpoint import save_checkpoint

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

    from hwattn.models.checkpoint import load_checkpoint, save_checkpoint

    model = load_checkpoint(target_path)
    model.layers = model.layers[:n_layers]
    model.config = dataclasses.replace(model.config, n_layers=n_layers)
    save_checkpoint(model, path)
    return str(path)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """`checkpoints(attention, draft_layers=0, **make_checkpoint keywords)`: the path of a
    small checkpoint (`make_checkpoint`), or of a draft made from its first `draft_layers`
    layers (`make_draft`), each built once per test run."""
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
