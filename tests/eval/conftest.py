"""A small dataset from the shipped corpus and one short training run, shared by these tests."""

from __future__ import annotations

import os

import pytest

from hwattn.data.build import BuildOptions
from hwattn.data.corpora import build_dataset

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def dataset_dir(tmp_path_factory):
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


SMALL = {"n_layers": 2, "dim": 64, "n_heads": 4, "mha_hidden_dim": 192}
