"""`argmax_last` (hwattn/ops/argmax.py) against `torch.argmax`: the same indices, ties and NaN
included, on the device the tests run on (HWATTN_TEST_DEVICE)."""

import pytest
import torch

from hwattn.ops.argmax import MAX_ROWS, argmax_last, chunk_length
from tests.ops.paged import DEVICE


def _check(x: torch.Tensor) -> None:
    got, want = argmax_last(x), x.argmax(-1)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got, want), (got, want)


def test_chunk_lengths():
    assert chunk_length(128256) == 1336  # Llama 3's vocabulary: 96 chunks a row
    assert chunk_length(32000) == 1280
    assert chunk_length(4096) is None  # short rows go to argmax directly
    assert chunk_length(65537) is None  # a prime: no divisor, argmax directly


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128256), (3, 1, 128256), (1, 32000), (2, 4, 151936),
                                   (7, 50257), (0, 128256), (5, 65537)])
def test_random_rows(dtype, shape):
    _check(torch.randn(*shape).to(dtype).to(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_nan_and_infinities(dtype):
    """The first maximal index wins wherever the ties sit (inside a chunk, across chunks,
    the whole row), a NaN is the maximum (its first index), a row of -inf gives 0."""
    v, d = 128256, chunk_length(128256)
    x = torch.randn(8, v).to(dtype)
    x[0] = 1.0  # all equal
    x[1, [5 * d + 3, 70, d - 1, 2 * d]] = 100  # ties in several chunks: the first chunk's
    x[2, [9000, 20000]] = float("nan")
    x[2, 100] = float("inf")
    x[3] = float("-inf")
    x[4, [d + 5, d + 9]] = 50  # a tie inside one chunk
    x[5, -1] = float("inf")  # the last entry of the last chunk
    x[6, 0] = float("nan")
    x[7, [3 * d, 3 * d - 1]] = 7  # either side of a chunk boundary
    _check(x.to(DEVICE))


def test_layouts_and_sizes():
    x = torch.randn(4, 3, 128256).to(DEVICE)
    _check(x[:, -1])  # a step's last positions: strided rows, contiguous entries
    _check(x.transpose(0, 1))  # rows in any order
    _check(x[..., ::2])  # entries not contiguous: argmax directly
    _check(torch.randn(MAX_ROWS + 1, 8192).to(DEVICE))  # many rows: argmax directly
    _check(torch.tensor(1.0).to(DEVICE))  # 0-d: index 0, as argmax gives
