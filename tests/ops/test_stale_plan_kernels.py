"""The Triton kernels, and the Hopper decode kernel, given a stale plan, as a GPU call may be
(it cannot compare the plan with the device's lengths without reading them back): no read past
a sequence's pages or the block table, no write past `out`, no hang.

The launchers are called directly, below the host checks that refuse such a plan where the
lengths are in host memory (tests/ops/test_plan_checked_once.py). What lies past the memory a
kernel may touch is poisoned: NaN pages behind the table entries past a sequence's pages, and
a sentinel after the rows of `out` and `lse`. The Triton kernels run on HWATTN_TEST_DEVICE
(the CPU under Triton's interpreter, or compiled on a GPU, where a read past the table
faults), the Hopper kernel on an sm_90 GPU only; the references on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from hwattn import ops
from tests.ops.paged import DEVICE, fill_cache, on_device, paged_table

SENTINEL = 1234.5


def _spare_page(table: torch.Tensor, lengths: list[int], n_pool: int, page: int) -> int:
    """A page of the pool that no sequence owns (NaN in every slot, see `fill_cache`)."""
    owned = {int(table[b, i]) for b, n in enumerate(lengths) for i in range(-(-n // page))}
    return min(set(range(n_pool)) - owned)


@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("page", [16, 64])
def test_decode_kernel_reads_no_token_past_the_length_a_stale_plan_covers(page, split):
    """A plan made for a longer sequence 1 (70, 30 -> 90): its items ran to 90, reading the
    table entries past the sequence's pages (here a NaN page; on a GPU any id the table holds)
    and the NaN slots past its length; split into 64-token pieces, one item starts past the
    length. Each item now ends at the call's length: the output is the call's own attention."""
    from hwattn.ops import triton_decode

    lengths = [70, 30]
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    table[1, -(-30 // page):] = _spare_page(table, lengths, n_pool, page)  # in range, all NaN
    q = torch.randn(2, 1, 4, 16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    stale = ops.plan_decode(torch.tensor([70, 90], dtype=torch.int32), num_heads_kv=2,
                            split_tokens=64 if split else None)
    assert stale.max_pieces == (2 if split else 1)
    out, lse = triton_decode.decode(*on_device(q, k_cache, v_cache, table, seqlens),
                                    softmax_scale=0.25, plan=stale.to(DEVICE))
    out, lse = out.cpu(), lse.cpu()
    want, want_lse = ops.decode(q, k_cache, v_cache, table, seqlens, softmax_scale=0.25,
                                return_lse=True, backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


class _PaddedEmpty:
    """Stands in for `torch` in the prefill launcher: `empty` hands out the leading part of a
    buffer PAD elements longer along the dimension of the N query rows, filled with SENTINEL
    (out (N, H, D): rows after N; lse (H, N): columns after N), so that a write past either
    tensor lands where the test sees it. Everything else is torch's."""

    PAD = 8

    def __init__(self, n_rows: int):
        self.n_rows = n_rows
        self.buffers: list[tuple[torch.Tensor, int]] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def empty(self, *shape, dtype=None, device=None):
        dim = shape.index(self.n_rows)
        padded = list(shape)
        padded[dim] += self.PAD
        buffer = torch.full(padded, SENTINEL, dtype=dtype, device=device)
        self.buffers.append((buffer, dim))
        return buffer.narrow(dim, 0, self.n_rows)

    def past_the_end(self) -> list[torch.Tensor]:
        return [buffer.narrow(dim, self.n_rows, self.PAD) for buffer, dim in self.buffers]


def _prefill_inputs(page: int = 16):
    """Two sequences of 40 and 9 cached tokens on a hostile paged cache, H_q 4, H_kv 2, D 16."""
    lengths = [40, 9]
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    return lengths, table, n_pool, k_cache, v_cache


def test_prefill_kernel_writes_no_row_past_out_for_offsets_of_another_step(monkeypatch):
    """The plan is for offsets [0, 3, 12] (N = 12), the device's offsets are another step's,
    [0, 9, 15]: the plan's grid covers them, and sequence 1's queries 3..5 were rows 12..14,
    past `out` and `lse` (and past q). Rows past N are masked now: nothing past the tensors
    is written, and rows 0..11 are what the reference computes over the device's offsets."""
    from hwattn.ops import triton_prefill

    lengths, table, _, k_cache, v_cache = _prefill_inputs()
    q_rows = torch.randn(15, 4, 16)
    q = q_rows[:12]  # the rows past N are memory the kernel may not read, but we own
    cu_device = torch.tensor([0, 9, 15], dtype=torch.int32)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    stale = ops.plan_prefill([0, 3, 12], lengths)
    padded = _PaddedEmpty(12)
    monkeypatch.setattr(triton_prefill, "torch", padded)
    out, lse = triton_prefill.prefill(*on_device(q, k_cache, v_cache, table, cu_device, seqlens),
                                      softmax_scale=0.25, plan=stale)
    monkeypatch.undo()
    for past in padded.past_the_end():
        assert (past == SENTINEL).all(), "the kernel wrote past out or lse"
    out, lse = out.cpu(), lse.cpu()
    want, want_lse = ops.prefill(q_rows, k_cache, v_cache, table, cu_device, seqlens,
                                 softmax_scale=0.25, return_lse=True, backend="torch")
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, want[:12], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse[:, :12], rtol=1e-5, atol=1e-5)


def test_prefill_kernel_reads_no_table_entry_past_its_row_for_lengths_of_another_step():
    """The plan is for lengths [40, 9]; the device says sequence 1 holds 200 tokens, more than
    its row of the table has slots (4 pages of 16). Its keys ran to 200, reading entries past
    the row: here a wider table's next columns, pointing at a NaN page; past the last row, on
    a GPU, whatever follows the table. Key positions stop at the row's capacity now (the
    row's own entries point at a page of finite values here: its slots past 9 are read)."""
    from hwattn.ops import triton_prefill

    lengths, table, n_pool, k_cache, v_cache = _prefill_inputs()
    spare = _spare_page(table, lengths, n_pool, 16)
    wide = torch.full((2, 16), spare, dtype=torch.int32)  # past column 4: the NaN page
    wide[:, :4] = table
    wide[1, :4] = table[0, 0]  # within the row: a page of 16 finite slots
    block_table = wide[:, :4]  # rows 16 entries apart, 4 entries each
    q = torch.randn(12, 4, 16)
    cu = torch.tensor([0, 3, 12], dtype=torch.int32)
    seqlens = torch.tensor([40, 200], dtype=torch.int32)
    out, lse = triton_prefill.prefill(*on_device(q, k_cache, v_cache, block_table, cu, seqlens),
                                      softmax_scale=0.25, plan=ops.plan_prefill(cu, lengths))
    out, lse = out.cpu(), lse.cpu()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # Sequence 0 is what the call asks for; sequence 1 read only its row's 64 slots.
    want, want_lse = ops.prefill(q, k_cache, v_cache, block_table, cu,
                                 torch.tensor([40, 64], dtype=torch.int32), softmax_scale=0.25,
                                 return_lse=True, backend="torch")
    torch.testing.assert_close(out[:3], want[:3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :3], want_lse[:, :3], rtol=1e-5, atol=1e-5)


# (H_q, H_kv, D_nope, D_v, D_R): GTA-4's state heads, MLA's latent.
HOPPER_SHAPES = [pytest.param((16, 4, 64, 128, 64), id="gta4"),
                 pytest.param((16, 1, 512, 512, 64), id="mla"),
                 pytest.param((128, 1, 64, 128, 64), id="gta-g128")]  # the pingpong schedule's


@pytest.mark.parametrize("variant", ["default", "specialised", "overlapped", "pipelined", "duo",
                                     "pingpong"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split"])
@pytest.mark.parametrize("shape", HOPPER_SHAPES)
def test_hopper_decode_kernel_reads_no_token_past_the_length_a_stale_plan_covers(shape, split,
                                                                                  variant):
    """The Hopper kernel under the plan of the Triton test above (sequence 1 planned at 90
    tokens, holding 30; its table entries past its page point at a NaN page). Before each item
    ended at the call's length, the kernel masked the scores past 30 but multiplied the NaN
    values by their zero weights: a NaN output. Split into 64-token pieces, sequence 1's second
    item, [64, 90), is empty once cut at 30: run through its schedule, its consumers would
    wait for a first block no producer sends; it writes the partial of attending nothing
    (zero, LSE -inf) instead."""
    from tests.ops.test_hopper_decode import _config, _on_hopper

    if not _on_hopper():
        pytest.skip("needs an sm_90 GPU (HWATTN_TEST_DEVICE=cuda)")
    from hwattn.ops import hopper_decode
    from hwattn.ops.hopper_decode import TiedShape

    h_q, h_kv, d_nope, d_v, d_rope = shape
    config = _config(TiedShape(d_nope, d_v, d_rope, h_q // h_kv, 1), variant)
    if config is None:
        pytest.skip(f"the {variant} schedule does not take this shape")
    lengths, page = [70, 30], 64
    table, n_pool = paged_table(lengths, page)
    kv_cache, _ = fill_cache((h_kv, d_v), lengths, table, n_pool, page, torch.bfloat16)
    rope_cache, _ = fill_cache((d_rope,), lengths, table, n_pool, page, torch.bfloat16)
    table[1, 1:] = _spare_page(table, lengths, n_pool, page)  # in range, all NaN
    q_nope = torch.randn(2, 1, h_q, d_nope).to(torch.bfloat16)
    q_rope = torch.randn(2, 1, h_q, d_rope).to(torch.bfloat16)
    seqlens = torch.tensor(lengths, dtype=torch.int32)
    stale = ops.plan_decode(torch.tensor([70, 90], dtype=torch.int32), num_heads_kv=h_kv,
                            page_size=page, split_tokens=64 if split else None)
    assert stale.max_pieces == (2 if split else 1)
    args = on_device(q_nope, q_rope, kv_cache, rope_cache, table, seqlens)
    out, lse = hopper_decode.decode_tied(*args, softmax_scale=0.1, plan=stale.to(DEVICE),
                                         config=config)
    torch.cuda.synchronize()  # a hang would stop here
    want, want_lse = ops.decode_tied(q_nope, q_rope, kv_cache, rope_cache, table, seqlens,
                                     softmax_scale=0.1, return_lse=True, backend="torch")
    out, lse = out.cpu().float(), lse.cpu()
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    torch.testing.assert_close(out, want.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, want_lse, rtol=1e-3, atol=1e-3)
