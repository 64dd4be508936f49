"""The benchmarks on CPU: the decode benchmark's kernels run under Triton's interpreter (switched
on before triton is imported), and the engines they time use one intra-op thread."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
