"""The argmax of a few long rows (greedy tokens over a vocabulary), in two passes.

`argmax_last(x)` returns `x.argmax(-1)`, the same indices bit for bit: the first maximal
value's index in each row, a NaN counting as the maximum (the first NaN's index then).

Why: a decode step's logits are a few rows (one per sequence) of a long vocabulary, e.g.
64 × 128,256 in the `xl` model, and PyTorch's argmax over them took 33 µs of a 2.6 ms step on
an H200, reading the 16 MB at about 12% of the copy rate (docs/results/engine.md, run 11):
64 outputs of 128,256 inputs each is a poor shape for a GPU reduction. Here each row is cut
into chunks of `d` entries (a divisor of the row's length, so the cut is a free view), `max`
runs over every chunk (rows × V/d outputs, 6,144 for the `xl` step), then `argmax` over each
row's chunk maxima and a gather of the index within that chunk. It ran in run 17's H100
decode steps, where its kernels' time could not be told from the step's other reductions.

Ties and NaN keep `argmax`'s rule: `max(-1)` returns the first maximal index within a chunk,
and `argmax` over the chunk maxima the first chunk holding the row's maximum, whose first
maximal entry is then the row's first (a NaN is every comparison's maximum in both passes).

The plain reference is `torch.argmax(x, -1)`; rows too short, too many, or of a length with
no suitable divisor take it directly.
"""

from __future__ import annotations

from functools import lru_cache

from torch import Tensor

# Chunk lengths tried (the row's length must be a multiple): long enough that the second
# pass is small, short enough that the first has many chunks per row.
MIN_CHUNK, MAX_CHUNK = 512, 4096
# Rows shorter than this, or more rows than this, gain nothing from the split.
MIN_ROW, MAX_ROWS = 8192, 1024


@lru_cache(maxsize=64)
def chunk_length(row: int) -> int | None:
    """The chunk length for rows of `row` entries: the smallest divisor of `row` in
    [1024, MAX_CHUNK], else the largest in [MIN_CHUNK, 1024); None if it has neither or the
    row is shorter than MIN_ROW."""
    if row < MIN_ROW:
        return None
    above = [d for d in range(1024, MAX_CHUNK + 1) if row % d == 0]
    if above:
        return above[0]
    below = [d for d in range(MIN_CHUNK, 1024) if row % d == 0]
    return below[-1] if below else None


def argmax_last(x: Tensor) -> Tensor:
    """x (..., V) -> (...) int64, equal to `x.argmax(-1)` (see the module docstring)."""
    if x.dim() == 0:
        return x.argmax(-1)
    d = chunk_length(x.shape[-1])
    rows = x.numel() // max(1, x.shape[-1])
    if d is None or rows > MAX_ROWS or rows == 0 or x.stride(-1) != 1:
        return x.argmax(-1)
    values, within = x.unflatten(-1, (x.shape[-1] // d, d)).max(-1)  # (..., V / d) each
    chunk = values.argmax(-1, keepdim=True)  # (..., 1): the first chunk holding the maximum
    return (within.gather(-1, chunk) + chunk * d).squeeze(-1)
