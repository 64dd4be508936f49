"""The combine kernels (hwattn/ops/kernels/combine.py) against the merge written in PyTorch:
both program shapes, rows that a piece never saw (lse = -inf), sequences left alone."""

from __future__ import annotations

import pytest
import torch

import hwattn.ops.triton_decode  # noqa: F401 - applies kernels/interpreter.py's fixes
from hwattn.ops.kernels.combine import ROWS_MAX_PIECES, combine, one_row_blocks
from tests.ops.paged import DEVICE


def _partials(pieces: list[int], query_len: int, n_heads: int, d_v: int, seed: int):
    """Random partials of sequences cut into `pieces` (count per sequence), some rows of some
    pieces empty (-inf), and the splits that index them."""
    g = torch.Generator().manual_seed(seed)
    capacity = sum(pieces) + 3  # idle slots after the items, as a plan leaves them
    part_out = torch.randn(capacity, query_len, n_heads, d_v, generator=g)
    part_lse = 4 * torch.randn(capacity, query_len, n_heads, generator=g)
    part_lse[torch.rand(part_lse.shape, generator=g) < 0.2] = float("-inf")
    firsts = torch.tensor([0, *pieces[:-1]]).cumsum(0)
    splits = torch.stack([firsts, torch.tensor(pieces)], 1).to(torch.int32)
    if len(pieces) > 1 and pieces[1] > 1:  # one row no piece of sequence 1 saw at all
        part_lse[firsts[1]:firsts[1] + pieces[1], 0, 0] = float("-inf")
    return part_out, part_lse, splits


def _merged(part_out, part_lse, splits, out, lse):
    """The merge in PyTorch (float64), on copies of out (B, L_q, H, D) and lse (B, H, L_q)."""
    out, lse = out.clone(), lse.clone()
    for b, (first, n) in enumerate(splits.tolist()):
        if n <= 1:
            continue
        p_lse = part_lse[first:first + n].double()  # (n, L_q, H)
        whole = torch.logsumexp(p_lse, 0)  # (L_q, H)
        weight = torch.exp(p_lse - torch.where(whole.isinf(), 0.0, whole))
        merged = (weight[..., None] * part_out[first:first + n].double()).sum(0)
        out[b] = merged.to(out.dtype)
        lse[b] = whole.transpose(0, 1).float()
    return out, lse


@pytest.mark.parametrize("pieces, query_len, n_heads, d_v", [
    pytest.param([2, 2, 1, 3], 1, 16, 512, id="mla-h16"),
    pytest.param([3, 1, 2], 2, 8, 256, id="gla-lq2"),
    pytest.param([2] * 5, 1, 32, 128, id="gqa-h32"),
    pytest.param([4, 2], 3, 3, 192, id="dv192-lq3"),
    pytest.param([20, 1, 7], 1, 4, 64, id="many-pieces"),
    pytest.param([30], 1, 4, 128, id="one-long-sequence"),
])
@pytest.mark.parametrize("max_pieces, num_sms, schedule", [
    (2, None, None), (ROWS_MAX_PIECES + 1, None, "grid"), (ROWS_MAX_PIECES + 1, 1, "grid"),
    (ROWS_MAX_PIECES + 1, None, "strided"), (ROWS_MAX_PIECES + 1, 1, "strided")],
    ids=["rows", "tiles", "wide-tiles", "strided", "strided-one-sm"])
def test_combine_matches_the_merge_written_in_pytorch(pieces, query_len, n_heads, d_v, max_pieces,
                                                      num_sms, schedule):
    part_out, part_lse, splits = _partials(pieces, query_len, n_heads, d_v, seed=len(pieces))
    batch = len(pieces)
    out = torch.full((batch, query_len, n_heads, d_v), 7.0, dtype=torch.bfloat16)
    lse = torch.full((batch, n_heads, query_len), 7.0)
    want_out, want_lse = _merged(part_out, part_lse, splits, out, lse)
    got_out, got_lse = out.to(DEVICE), lse.to(DEVICE)
    # max_pieces picks the program shape; a refreshed plan may hold more pieces than it says
    # (num_sms 1: the one-row kernel's widest column blocks, `one_row_blocks`; strided: a few
    # programs, each merging many rows)
    combine(part_out.to(DEVICE), part_lse.to(DEVICE), splits.to(DEVICE), got_out, got_lse,
            max_pieces=max_pieces, num_sms=num_sms, schedule=schedule)
    torch.testing.assert_close(got_out.cpu().float(), want_out.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got_lse.cpu(), want_lse, atol=1e-4, rtol=1e-5)
    single = [b for b, n in enumerate(pieces) if n == 1]
    assert got_out.cpu()[single].eq(7.0).all() and got_lse.cpu()[single].eq(7.0).all()
    if len(pieces) > 1 and pieces[1] > 1:  # a row nothing saw: -inf, and no NaN in its output
        assert got_lse.cpu()[1, 0, 0] == float("-inf") and got_out.cpu()[1, 0, 0].eq(0).all()


def test_one_row_blocks_widen_where_the_grid_stays_full():
    """Whole rows where B × rows × column blocks keeps 4 programs per SM (a long-context
    batch, most of whose programs return at once), 128 columns for a batch of one; the tile
    of pieces shrinks as the columns widen, never below 8 nor past the pieces."""
    assert one_row_blocks(64, 128, 512, 44, 132) == (512, 16)  # MLA, 1 x 128K + 63 x 1K
    assert one_row_blocks(64, 128, 256, 44, 132) == (256, 32)  # GLA-2's latent heads
    assert one_row_blocks(4, 128, 512, 16, 132) == (256, 16)  # MLA, 4 x 32K: 1024 programs
    assert one_row_blocks(1, 128, 512, 66, 132) == (128, 64)  # one long sequence
    assert one_row_blocks(1, 32, 128, 200, 132) == (128, 64)
    assert one_row_blocks(8, 16, 192, 9, 1) == (256, 16)  # a width that is not a power of two
    assert one_row_blocks(64, 128, 512, 3, 132)[1] == 8


def test_combine_refuses_an_unknown_schedule():
    part_out, part_lse, splits = _partials([3, 1], 1, 2, 64, seed=0)
    out, lse = torch.zeros(2, 1, 2, 64), torch.zeros(2, 2, 1)
    with pytest.raises(ValueError, match="schedule must be one of"):
        combine(part_out, part_lse, splits, out, lse, max_pieces=9, schedule="persistent")
