"""Shared test helpers: deterministic seeds and derived tolerances."""

from __future__ import annotations

import os

import pytest
import torch

# Tests compare against fp64 references; keep the CPU deterministic and small.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


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
