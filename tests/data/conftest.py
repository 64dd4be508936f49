"""A small dataset built from the shipped corpus, shared by the data tests."""

from __future__ import annotations

import os

import pytest

# Nothing in these tests may reach a hub: datasets reads local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hwattn.data.build import BuildOptions
from hwattn.data.corpora import build_dataset


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "ds"
    manifest = build_dataset(out, "embedded", "bpe:512", BuildOptions(val_fraction=0.1),
                             progress=False, log=lambda *a: None)
    return out, manifest
