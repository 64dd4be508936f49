"""The split-KV planner, the Triton store (interpreted) and the layers on the Triton backend."""

from __future__ import annotations

import pytest
import torch

from hwattn import AttentionMetadata, ModelConfig, ops
from hwattn.layers import build_attention
from hwattn.ops.plan import MIN_PIECE, PIECE_ALIGN, SMALL_BATCH
from tests.ops.paged import DEVICE


def _pieces(plan):
    """{sequence: [(start, end), ...]} read back from the plan's tensors."""
    out = {}
    for seq, start, end in plan.items.tolist():
        if seq >= 0:
            out.setdefault(seq, []).append((start, end))
    for seq, (first, count) in enumerate(plan.splits.tolist()):
        assert [tuple(r[1:]) for r in plan.items[first:first + count].tolist()] == out[seq]
    return out


def _assert_partition(plan, lengths):
    pieces = _pieces(plan)
    for seq, n in enumerate(lengths):
        bounds = pieces[seq]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(s % PIECE_ALIGN == 0 and e > s for s, e in bounds)
    return pieces


def test_large_batch_is_not_split():
    lengths = [8192] * 128
    plan = ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), num_heads_kv=4, num_sms=132)
    assert plan.capacity == 128 and not plan.may_split
    assert all(len(p) == 1 for p in _assert_partition(plan, lengths).values())


@pytest.mark.parametrize("batch", [SMALL_BATCH, 128])
def test_a_full_batch_splits_a_sequence_far_longer_than_its_share(batch):
    """One 128K-token sequence among short ones in a batch that fills the GPU one piece per
    sequence (GTA-4's 4 KV heads at B 128 on 132 SMs): kept whole, it would be one program's
    work (33x the even share) while every other SM idles. It is cut near the share; the short
    ones stay whole; a plan refreshed with equal lengths keeps its room for pieces."""
    kw = dict(num_heads_kv=4, num_sms=132 if batch == 128 else 8)
    lengths = [131072] + [1024] * (batch - 1)
    plan = ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), **kw)
    wanted = -(-2 * kw["num_sms"] // 4)
    assert batch >= wanted  # a full batch
    pieces = _assert_partition(plan, lengths)
    share = -(-sum(lengths) // wanted)
    assert len(pieces[0]) == round(131072 / share) > 1 and plan.max_pieces == len(pieces[0])
    assert all(e - s <= 1.1 * share + PIECE_ALIGN for s, e in pieces[0])  # rounded count
    assert all(len(pieces[b]) == 1 for b in range(1, batch))
    assert plan.capacity == batch + wanted and plan.may_split
    ops.plan_decode(torch.full((batch,), 1024, dtype=torch.int32), **kw, out=plan)
    assert plan.max_pieces == 1 and plan.capacity == batch + wanted
    # Sized without room (fresh on equal lengths, as a captured graph's plan), a refresh
    # with the long sequence keeps every sequence whole rather than overflowing the grid.
    even = ops.plan_decode(torch.full((batch,), 131072, dtype=torch.int32), **kw)
    assert even.capacity == batch and not even.may_split
    ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), **kw, out=even)
    assert even.max_pieces == 1
    assert all(len(p) == 1 for p in _assert_partition(even, lengths).values())
    # Sized with room (`reserve_pieces`, as the engine captures its graphs' plans), the same
    # even lengths keep every sequence whole, and the refresh cuts as a fresh plan does.
    room = ops.plan_decode(torch.full((batch,), 131072, dtype=torch.int32), **kw,
                           reserve_pieces=True)
    assert room.capacity == batch + wanted and room.may_split and room.max_pieces == 1
    assert all(len(p) == 1 for p in _assert_partition(room, [131072] * batch).values())
    ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), **kw, out=room)
    fresh = ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), **kw)
    total = int(fresh.splits[:, 1].sum())
    assert room.max_pieces == fresh.max_pieces > 1
    assert torch.equal(room.splits, fresh.splits)
    assert torch.equal(room.items[:total], fresh.items[:total])


def test_small_batch_fills_the_gpu_and_balances_uneven_lengths():
    lengths = [131072, 1024, 1000, 3]
    plan = ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), num_heads_kv=1, num_sms=132)
    pieces = _assert_partition(plan, lengths)
    sizes = [e - s for s, e in pieces[0]]
    assert len(sizes) >= 200  # the long sequence gets nearly all 264 programs
    assert max(sizes) - min(sizes) <= PIECE_ALIGN
    assert len(pieces[3]) == 1 and len(pieces[1]) <= 2
    assert min(sizes) >= MIN_PIECE
    assert plan.capacity == 4 + 264  # fixed by B and heads, not by the lengths


def test_longest_pieces_start_first_wherever_they_sit():
    """Items are laid out longest pieces first (a sequence's pieces together), so a long
    sequence at the end of the batch does not start its pieces after every short one."""
    short, long = [1024] * 63, [131072]
    for lengths in (long + short, short + long, short[:30] + long + short[30:]):
        plan = ops.plan_decode(torch.tensor(lengths, dtype=torch.int32), num_heads_kv=1,
                               head_blocks=2, num_sms=132, programs_per_sm=1, min_piece=256)
        pieces = _assert_partition(plan, lengths)
        items = [tuple(r) for r in plan.items.tolist() if r[0] >= 0]
        sizes = [e - s for _, s, e in items]
        n_long = len(pieces[lengths.index(131072)])
        assert n_long > 20 and all(seq == lengths.index(131072) for seq, _, _ in items[:n_long])
        assert sizes[:n_long - 1] == sorted(sizes[:n_long - 1], reverse=True)
        assert min(sizes[:n_long - 1]) > max(sizes[n_long:])
        # Short sequences keep their batch order behind it (a stable order).
        assert [seq for seq, _, _ in items[n_long:]] == [b for b, n in enumerate(lengths) if n == 1024]


def test_one_program_per_sm_fills_one_wave():
    """A kernel that fits one program per SM asks for half as many, twice as long pieces."""
    seqlens = torch.tensor([32768], dtype=torch.int32)
    two = ops.plan_decode(seqlens, num_heads_kv=1, head_blocks=2, num_sms=132)
    one = ops.plan_decode(seqlens, num_heads_kv=1, head_blocks=2, num_sms=132, programs_per_sm=1)
    n_two, n_one = len(_assert_partition(two, [32768])[0]), len(_assert_partition(one, [32768])[0])
    assert 0.9 * 132 < 2 * n_one <= 132  # programs: pieces × 2 head blocks, one per SM
    assert abs(n_two - 2 * n_one) <= 2
    with pytest.raises(ValueError, match="programs_per_sm"):
        ops.plan_decode(seqlens, num_heads_kv=1, programs_per_sm=0)


def test_capacity_is_stable_and_refresh_in_place():
    seqlens = torch.tensor([5000, 70000], dtype=torch.int32)
    plan = ops.plan_decode(seqlens, num_heads_kv=2, num_sms=132)
    items_ptr = plan.items.data_ptr()
    again = ops.plan_decode(torch.tensor([9, 300], dtype=torch.int32), num_heads_kv=2,
                            num_sms=132, out=plan)
    assert again is plan and plan.items.data_ptr() == items_ptr
    _assert_partition(plan, [9, 300])
    assert plan.max_seqlen == 300
    with pytest.raises(ValueError, match="out"):
        ops.plan_decode(torch.tensor([9, 300, 4], dtype=torch.int32), num_heads_kv=2, out=plan)


def _loop_plan(lengths, *, num_heads_kv, num_sms, head_blocks=1, min_piece=MIN_PIECE,
               split_tokens=None, programs_per_sm=2):
    """The planner's rule written as a loop over sequences: (items, splits) as lists."""
    def cut(n, parts):
        size = -(-n // parts)
        size = -(-size // PIECE_ALIGN) * PIECE_ALIGN
        return [(s, min(s + size, n)) for s in range(0, n, size)]

    batch, per_item = len(lengths), num_heads_kv * head_blocks
    if split_tokens is not None:
        pieces = [cut(n, -(-n // split_tokens)) for n in lengths]
        capacity = sum(len(p) for p in pieces)
    else:
        wanted = -(-programs_per_sm * num_sms // per_item)
        chunk = max(min_piece, -(-sum(lengths) // wanted))
        pieces = [cut(n, max(1, round(n / chunk))) for n in lengths]
        # A full batch (one piece each fills the GPU) has room for pieces only if it splits.
        whole = all(len(p) == 1 for p in pieces)
        capacity = batch if batch >= wanted and whole else batch + wanted
    items, splits = [], [None] * batch
    # Longest pieces first (a sequence's first piece is its longest), ties in batch order.
    for seq in sorted(range(batch), key=lambda b: -(pieces[b][0][1] - pieces[b][0][0])):
        splits[seq] = [len(items), len(pieces[seq])]
        items += [[seq, s, e] for s, e in pieces[seq]]
    return items + [[-1, 0, 0]] * (capacity - len(items)), splits


@pytest.mark.parametrize("small", [False, True], ids=["any batch", "small batches"])
@pytest.mark.parametrize("seed", range(6))
def test_plan_matches_the_rule_written_as_a_loop(seed, small):
    """The planner (vectorised, or with Python ints up to `SMALL_BATCH` sequences) against the
    per-sequence loop, on random batches (lengths from 1 to 200K, some exact multiples of the
    piece alignment) and random launch shapes; a plan refreshed in place equals a fresh one."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(40):
        batch = int(torch.randint(1, SMALL_BATCH + 1 if small else 80, (1,), generator=g))
        top = int(torch.randint(2, 200_000, (1,), generator=g))
        lengths = torch.randint(1, top, (batch,), generator=g, dtype=torch.int32)
        lengths[::5] = (lengths[::5] // PIECE_ALIGN + 1) * PIECE_ALIGN
        kw = dict(num_heads_kv=int(torch.randint(1, 9, (1,), generator=g)),
                  num_sms=int(torch.randint(1, 140, (1,), generator=g)),
                  head_blocks=int(torch.randint(1, 3, (1,), generator=g)),
                  min_piece=int(torch.randint(1, 1024, (1,), generator=g)),
                  programs_per_sm=int(torch.randint(1, 3, (1,), generator=g)))
        if seed == 0:
            kw["split_tokens"] = PIECE_ALIGN * int(torch.randint(1, 40, (1,), generator=g))
        plan = ops.plan_decode(lengths, **kw)
        items, splits = _loop_plan(lengths.tolist(), **kw)
        assert plan.items.tolist() == items and plan.splits.tolist() == splits
        assert plan.max_pieces == max(n for _, n in splits)
        assert plan.max_seqlen == int(lengths.max()) and plan.packed is not None
        if "split_tokens" not in kw:
            shorter = torch.randint(1, top, (batch,), generator=g, dtype=torch.int32)
            fresh = ops.plan_decode(shorter, **kw)
            assert ops.plan_decode(shorter, **kw, out=plan) is plan
            assert plan.max_seqlen == fresh.max_seqlen
            if plan.capacity >= fresh.capacity:  # the fresh schedule, idle items after it
                assert torch.equal(plan.items[:fresh.capacity], fresh.items)
                assert (plan.items[fresh.capacity:] == torch.tensor([-1, 0, 0])).all()
                assert torch.equal(plan.splits, fresh.splits)
                assert plan.max_pieces == fresh.max_pieces
            else:  # a full batch refreshed into a plan without room for pieces: kept whole
                assert plan.max_pieces == 1
                assert all(len(p) == 1 for p in _assert_partition(plan, shorter.tolist()).values())


@pytest.mark.parametrize("batch", [2, SMALL_BATCH + 1])
def test_plan_rounds_a_half_piece_to_even(batch):
    """A sequence of exactly 2.5 chunks is cut in 2 (round half to even, numpy's rint and
    Python's round alike), in both the small-batch and the vectorised planner."""
    kw = dict(num_heads_kv=1, num_sms=8, programs_per_sm=2, min_piece=256)  # chunk = 256
    lengths = torch.tensor([640] + [128] * (batch - 1), dtype=torch.int32)
    plan = ops.plan_decode(lengths, **kw)
    assert plan.splits[0].tolist() == [0, 2]
    items, splits = _loop_plan(lengths.tolist(), **kw)
    assert plan.items.tolist() == items and plan.splits.tolist() == splits


@pytest.mark.parametrize("batch", [2, SMALL_BATCH + 1])
@pytest.mark.parametrize("longest, pieces", [(383, 1), (384, 2)])
def test_plan_longest_at_one_and_a_half_chunks(batch, longest, pieces):
    """Whether every sequence is one piece is decided from the longest alone (2n < 3 chunk):
    one token short of 1.5 chunks stays whole, exactly 1.5 chunks is cut in 2 (half to
    even); both as the loop rule, fresh and refreshed into a host mirror."""
    kw = dict(num_heads_kv=1, num_sms=8, programs_per_sm=2, min_piece=256)  # chunk = 256
    lengths = torch.tensor([100] * (batch - 1) + [longest], dtype=torch.int32)
    items, splits = _loop_plan(lengths.tolist(), **kw)
    plan = ops.plan_decode(lengths, **kw)
    assert plan.items.tolist() == items and plan.splits.tolist() == splits
    assert plan.max_pieces == pieces == splits[-1][1]
    refreshed = ops.plan_decode(torch.full((batch,), 9000, dtype=torch.int32), **kw)
    refreshed.host = torch.full_like(refreshed.packed, -7)
    assert ops.plan_decode(lengths, **kw, out=refreshed) is refreshed
    assert refreshed.max_pieces == pieces
    refreshed.packed.copy_(refreshed.host)
    assert refreshed.items.tolist() == items and refreshed.splits.tolist() == splits


@pytest.mark.parametrize("batch", [2, SMALL_BATCH + 1])
@pytest.mark.parametrize("longest, pieces", [(384, 1), (385, 2)])
def test_forced_pieces_of_the_longest_decide_one_piece(batch, longest, pieces):
    """With `split_tokens`, every sequence is one piece exactly when the longest fits one
    forced piece, as the loop rule cuts them."""
    kw = dict(num_heads_kv=1, num_sms=8, split_tokens=6 * PIECE_ALIGN)
    lengths = torch.tensor([100] * (batch - 1) + [longest], dtype=torch.int32)
    plan = ops.plan_decode(lengths, **kw)
    items, splits = _loop_plan(lengths.tolist(), **kw)
    assert plan.items.tolist() == items and plan.splits.tolist() == splits
    assert plan.max_pieces == pieces and plan.capacity == batch - 1 + pieces


def test_plan_moves_as_one_buffer():
    """`to` keeps items and splits views of one buffer, so a refresh is one copy."""
    plan = ops.plan_decode(torch.tensor([5000, 70], dtype=torch.int32), num_heads_kv=2, num_sms=8)
    moved = plan.to("meta")
    assert moved.items.device.type == "meta" and moved.packed.device.type == "meta"
    assert moved.items.untyped_storage().data_ptr() == moved.splits.untyped_storage().data_ptr()
    assert plan.to("cpu") is plan
    # A plan made of two separate tensors (as before) is refreshed through two copies.
    two = ops.DecodePlan(plan.batch, plan.max_seqlen, plan.items.clone(), plan.splits.clone(),
                         plan.max_pieces)
    again = ops.plan_decode(torch.tensor([64, 9000], dtype=torch.int32), num_heads_kv=2,
                            num_sms=8, out=two)
    fresh = ops.plan_decode(torch.tensor([64, 9000], dtype=torch.int32), num_heads_kv=2, num_sms=8)
    assert again is two and torch.equal(two.items, fresh.items)
    assert torch.equal(two.splits, fresh.splits)


def test_plan_rebound_into_a_buffer_and_refreshed_through_its_host_mirror():
    """`rebind` moves a plan into a view of a larger buffer (contents kept); with `host` set,
    a refresh writes the new schedule there and leaves the plan's own tensors alone, and the
    caller's copy of the mirror gives what a plain refresh gives."""
    plan = ops.plan_decode(torch.tensor([5000, 70], dtype=torch.int32), num_heads_kv=2, num_sms=8)
    before = plan.packed.clone()
    buffer = torch.full((plan.packed.numel() + 10,), -7, dtype=torch.int32)
    plan.rebind(buffer[4:4 + plan.packed.numel()])
    assert torch.equal(buffer[4:4 + before.numel()], before)
    assert buffer[:4].eq(-7).all() and buffer[4 + before.numel():].eq(-7).all()
    assert plan.items.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    lengths = torch.tensor([64, 9000], dtype=torch.int32)
    plan.host = torch.zeros_like(plan.packed)
    assert ops.plan_decode(lengths, num_heads_kv=2, num_sms=8, out=plan) is plan
    assert torch.equal(plan.packed, before)  # untouched until the caller uploads
    assert plan.max_seqlen == 9000
    plan.packed.copy_(plan.host)
    fresh = ops.plan_decode(lengths, num_heads_kv=2, num_sms=8, out=ops.plan_decode(
        torch.tensor([5000, 70], dtype=torch.int32), num_heads_kv=2, num_sms=8))
    assert torch.equal(plan.items, fresh.items) and torch.equal(plan.splits, fresh.splits)
    with pytest.raises(ValueError, match="packed must be"):
        plan.rebind(torch.zeros(3, dtype=torch.int32))
    two = ops.DecodePlan(plan.batch, plan.max_seqlen, plan.items.clone(), plan.splits.clone())
    with pytest.raises(ValueError, match="do not share one buffer"):
        two.rebind(buffer)


def test_plan_rejects():
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.plan_decode(torch.tensor([3, 1], dtype=torch.int32), num_heads_kv=1, query_len=2)
    with pytest.raises(ValueError, match="split_tokens"):
        ops.plan_decode(torch.tensor([300], dtype=torch.int32), num_heads_kv=1, split_tokens=48)
    with pytest.raises(ValueError, match="num_heads_kv"):
        ops.plan_decode(torch.tensor([300], dtype=torch.int32), num_heads_kv=0)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.plan_decode(torch.tensor([300]), num_heads_kv=1)


@pytest.mark.parametrize("dtype, cache_dtype, scale", [
    (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.float16, None),
    (torch.bfloat16, torch.float8_e4m3fn, 0.37), (torch.float32, torch.float8_e4m3fn, 0.01)],
    ids=["bf16", "fp32-into-fp16", "fp8-scaled", "fp8-saturating"])
def test_store_kv_matches_reference(dtype, cache_dtype, scale):
    n_tokens, page = 37, 16
    new = (torch.randn(n_tokens, 3, 24) * 5).to(dtype)
    slots = torch.randperm(5 * page)[:n_tokens]
    slots[::7] = -1  # padding tokens are skipped
    caches = []
    for backend in ("torch", "triton"):
        cache = torch.full((5, page, 3, 24), float("nan")).to(cache_dtype).to(DEVICE)
        ops.store_kv(cache, new.to(DEVICE), slots.to(DEVICE), scale=scale, backend=backend)
        caches.append(cache.cpu())
    torch.testing.assert_close(caches[1].view(torch.uint8), caches[0].view(torch.uint8), rtol=0, atol=0)
    written = caches[1].flatten(0, 1)[slots[slots >= 0]].float()
    assert torch.isfinite(written).all()
    untouched = torch.ones(5 * page, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert caches[1].flatten(0, 1)[untouched].float().isnan().all()


@pytest.mark.parametrize("dtype, cache_dtype, scale", [
    (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.float16, None),
    (torch.bfloat16, torch.float8_e4m3fn, 0.37)], ids=["bf16", "fp32-into-fp16", "fp8-scaled"])
def test_store_kvs_of_two_caches_writes_both_caches_as_two_stores_would(dtype, cache_dtype, scale):
    """One launch for a layer's two caches of different widths (a latent and its RoPE key),
    bit for bit what two reference stores write, padding slots and other slots untouched."""
    n_tokens, page = 29, 16
    news = ((torch.randn(n_tokens, 2, 40) * 5).to(dtype), (torch.randn(n_tokens, 24) * 5).to(dtype))
    slots = torch.randperm(4 * page)[:n_tokens]
    slots[1::5] = -1
    written = {}
    for backend in ("torch", "triton"):
        caches = tuple(torch.full((4, page, *n.shape[1:]), float("nan")).to(cache_dtype).to(DEVICE)
                       for n in news)
        ops.get_backend(backend, torch.device(DEVICE)).store_kvs(
            caches, tuple(n.to(DEVICE) for n in news), slots.to(DEVICE), scale=scale)
        written[backend] = [c.cpu() for c in caches]
    for ref, got in zip(written["torch"], written["triton"]):
        torch.testing.assert_close(got.view(torch.uint8), ref.view(torch.uint8), rtol=0, atol=0)
        flat = got.flatten(0, 1)
        assert torch.isfinite(flat[slots[slots >= 0]].float()).all()
        untouched = torch.ones(4 * page, dtype=torch.bool)
        untouched[slots[slots >= 0]] = False
        assert flat[untouched].float().isnan().all()


def test_store_kvs_of_two_cache_dtypes_and_bad_arguments():
    backend = ops.get_backend("triton", torch.device(DEVICE))
    slots = torch.tensor([3, -1, 0], device=DEVICE)
    news = (torch.randn(3, 8, device=DEVICE), torch.randn(3, 4, device=DEVICE))
    caches = (torch.zeros(2, 4, 8, device=DEVICE), torch.zeros(2, 4, 4, dtype=torch.float16, device=DEVICE))
    backend.store_kvs(caches, news, slots)  # two dtypes: a store each, same result
    for cache, new in zip(caches, news):
        torch.testing.assert_close(cache.flatten(0, 1)[[3, 0]].float(), new[[0, 2]].to(cache.dtype).float())
        assert cache.flatten(0, 1)[[1, 2, 4, 5, 6, 7]].abs().sum() == 0
    with pytest.raises(ValueError, match="new tokens .* do not fit cache"):
        backend.store_kvs(caches, news[::-1], slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        backend.store_kvs(caches, news, slots[:2])
    with pytest.raises(ValueError, match="a tensor of new tokens per cache"):
        backend.store_kvs(caches, news[:1], slots)
    backend.store_kvs(caches[:1], news[:1], slots)  # one cache: a plain store


def _rope_rows(n_tokens: int, rope_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (N, d_R / 2) fp32 of random positions, as `Transformer.rope` gives them."""
    from hwattn.layers.rope import rope_table

    cos, sin = rope_table(rope_dim, 4096, 10000.0)
    positions = torch.randint(0, 4096, (n_tokens,))
    return cos[positions], sin[positions]


@pytest.mark.parametrize("norm", [True, False], ids=["normed", "as-is"])
@pytest.mark.parametrize("dtype, cache_dtype, scale", [
    (torch.bfloat16, torch.bfloat16, None), (torch.float32, torch.float32, None),
    (torch.float32, torch.float16, None), (torch.bfloat16, torch.float8_e4m3fn, 0.37)],
    ids=["bf16", "fp32", "fp32-into-fp16", "fp8-scaled"])
def test_store_states_writes_what_finishing_and_storing_write(dtype, cache_dtype, scale, norm):
    """The Triton backend's one launch (per-head RMSNorm of the first state, RoPE of the second,
    both stored) against the reference (`finish_states_reference`, then the store), on the
    strided rows of a wider projection output as the layers pass them, with padding slots:
    equal to the stored dtype's rounding, padding and other slots untouched."""
    n_tokens, page, heads, d, d_r = 23, 8, 2, 48, 16
    wide = (torch.randn(n_tokens, 7 + heads * d + d_r) * 3).to(dtype)  # [other | latents | rope]
    news = (wide[:, 7:7 + heads * d].view(n_tokens, heads, d), wide[:, 7 + heads * d:])
    weight = (torch.rand(heads, d) + 0.5).to(dtype)
    cos, sin = _rope_rows(n_tokens, d_r)
    slots = torch.randperm(5 * page)[:n_tokens]
    slots[2::6] = -1
    written = {}
    for backend in ("torch", "triton"):
        caches = (torch.full((5, page, heads, d), float("nan")).to(cache_dtype).to(DEVICE),
                  torch.full((5, page, d_r), float("nan")).to(cache_dtype).to(DEVICE))
        ops.get_backend(backend, torch.device(DEVICE)).store_states(
            caches, tuple(n.to(DEVICE) for n in news), slots.to(DEVICE),
            norm=(weight.to(DEVICE), 1e-5) if norm else None,
            rope=(cos.to(DEVICE), sin.to(DEVICE)), scale=scale)
        written[backend] = [c.cpu() for c in caches]
    keep = slots[slots >= 0]
    finished = ops.reference.finish_states_reference(news, (weight, 1e-5) if norm else None,
                                                     (cos, sin))
    # Two roundings apart at most; fp32's norm sums in another order on a GPU, and its square
    # root and division are not IEEE-rounded there (2e-6 apart on an H100, 2026-12-07).
    tol = 1e-5 if cache_dtype == torch.float32 else 2 * torch.finfo(cache_dtype).eps
    for i, (ref, got) in enumerate(zip(written["torch"], written["triton"])):
        flat = got.flatten(0, 1)
        torch.testing.assert_close(flat[keep].float(), ref.flatten(0, 1)[keep].float(),
                                   rtol=tol, atol=tol * (scale or 1e-3))
        untouched = torch.ones(5 * page, dtype=torch.bool)
        untouched[keep] = False
        assert flat[untouched].float().isnan().all()
        # and the reference store holds the finished states (nothing left as it was)
        expect = finished[i][slots >= 0].float() / (scale or 1.0)
        torch.testing.assert_close(ref.flatten(0, 1)[keep].float(), expect.to(cache_dtype).float())
    if norm:  # the norm was applied: every stored latent row has an RMS near its weights'
        rms = written["triton"][0].flatten(0, 1)[keep].float().div(weight.float()).pow(2).mean(-1)
        assert ((rms.sqrt() * (scale or 1.0) - 1).abs() < 0.1).all()


def test_store_states_refuses_bad_arguments_naming_them():
    backend = ops.get_backend("triton", torch.device(DEVICE))
    slots = torch.tensor([3, -1, 0], device=DEVICE)
    caches = (torch.zeros(2, 4, 2, 8, device=DEVICE), torch.zeros(2, 4, 4, device=DEVICE))
    news = (torch.randn(3, 2, 8, device=DEVICE), torch.randn(3, 4, device=DEVICE))
    cos, sin = torch.ones(3, 2, device=DEVICE), torch.zeros(3, 2, device=DEVICE)
    with pytest.raises(ValueError, match="norm weight must be"):
        backend.store_states(caches, news, slots, norm=(torch.ones(8, device=DEVICE), 1e-5))
    with pytest.raises(ValueError, match="norm eps"):
        backend.store_states(caches, news, slots, norm=(torch.ones(2, 8, device=DEVICE), -1.0))
    with pytest.raises(ValueError, match="rope cos must be floating point"):
        backend.store_states(caches, news, slots, rope=(cos.int(), sin))
    with pytest.raises(ValueError, match=r"rope sin must be \(N, d_R / 2\)"):
        backend.store_states(caches, news, slots, rope=(cos, sin[:2]))
    with pytest.raises(ValueError, match="two caches and two tensors"):
        backend.store_states(caches[:1], news[:1], slots)
    with pytest.raises(ValueError, match="new tokens .* do not fit cache"):
        backend.store_states(caches, news[::-1], slots)
    assert caches[0].abs().sum() == 0 and caches[1].abs().sum() == 0  # nothing written
    backend.store_states(caches, news, slots, rope=(cos, sin))  # cos 1, sin 0: stored as is
    for cache, new in zip(caches, news):
        torch.testing.assert_close(cache.flatten(0, 1)[[3, 0]], new[[0, 2]])


@pytest.mark.parametrize("attention", ["gta", "mla", "gla"])
def test_decode_steps_finishing_states_in_the_store_match_the_unfused_layer(attention,
                                                                            monkeypatch):
    """A decode step whose states are finished in the cache write (Triton, one launch) leaves
    the cache and the output the unfused step (norm and RoPE first, then the store) leaves."""
    from hwattn.layers import base

    cfg = ModelConfig.from_preset("tiny", attention=attention)
    layer = build_attention(cfg, device=DEVICE).eval()
    if hasattr(layer, "kv_norm"):
        torch.nn.init.uniform_(layer.kv_norm.weight, 0.5, 1.5)
    batch, past, page = 3, 13, 4
    table = torch.randperm(batch * 5, device=DEVICE).to(torch.int32).view(batch, 5)
    positions = torch.full((batch, 1), past - 1, device=DEVICE)
    slots = AttentionMetadata.slots(table, positions, page)
    lens = torch.full((batch,), past, dtype=torch.int32, device=DEVICE)
    x = torch.randn(batch, 1, cfg.dim, device=DEVICE)
    cos, sin = _rope_rows(batch, cfg.rope_dim)
    cos, sin = cos[:, None].to(DEVICE), sin[:, None].to(DEVICE)
    start = layer.allocate_cache(batch * 5, page, dtype=torch.float32, device=DEVICE)
    for c in start:
        c.normal_()
    results = {}
    for fused in (False, True):
        monkeypatch.setattr(base, "FUSED_STATE_STORE", "1" if fused else "0")
        cache = tuple(c.clone() for c in start)
        meta = AttentionMetadata(table, lens, slots, backend="triton")
        assert layer.finishes_in_store(meta) == fused
        with torch.no_grad():
            results[fused] = (layer(x, cos, sin, meta, cache), cache)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-5, atol=1e-5)
    for got, ref in zip(results[True][1], results[False][1]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode, fused", [
    ("auto", {"gqa": False, "gta": False, "mla": True, "gla": True}),
    ("1", {"gqa": False, "gta": True, "mla": True, "gla": True}),
    ("0", {"gqa": False, "gta": False, "mla": False, "gla": False})])
def test_fused_state_store_switch_picks_the_families(mode, fused, monkeypatch):
    """HWATTN_FUSED_STATE_STORE: "auto" finishes in the store the families it measured faster
    for (MLA, GLA), "1" every family that can (GTA too), "0" none; prefill steps never."""
    from hwattn.layers import base

    monkeypatch.setattr(base, "FUSED_STATE_STORE", mode)
    table = torch.zeros(2, 2, dtype=torch.int32)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    decode = AttentionMetadata(table, lens, torch.tensor([2, 4]), backend="torch")
    prefill = AttentionMetadata(table, lens, torch.arange(8), backend="torch", is_prefill=True,
                                cu_seqlens_q=torch.tensor([0, 3, 8], dtype=torch.int32))
    for attention, want in fused.items():
        layer = build_attention(ModelConfig.from_preset("tiny", attention=attention),
                                device=torch.device("meta"))
        assert layer.finishes_in_store(decode) == want, attention
        assert not layer.finishes_in_store(prefill), attention
        assert not layer.finishes_in_store(None), attention


@pytest.mark.parametrize("attention", ["gqa", "mqa", "gta", "mla", "gla"])
def test_layer_decode_on_triton_matches_torch(attention):
    """Each family's decode hook through the Triton kernels equals the reference backend."""
    cfg = ModelConfig.from_preset("tiny", attention=attention)
    layer = build_attention(cfg, device=DEVICE).eval()
    batch, past, page = 2, 21, 4
    x = torch.randn(batch, past, cfg.dim, device=DEVICE)
    positions = torch.arange(past, device=DEVICE)[None].expand(batch, past)
    half = cfg.rope_dim // 2
    cos, sin = torch.ones(batch, past, half, device=DEVICE), torch.zeros(batch, past, half, device=DEVICE)
    with torch.no_grad():
        q, states = layer.project(x, cos, sin)
        table = torch.randperm(batch * 6, device=DEVICE).to(torch.int32).view(batch, 6)
        cache = layer.allocate_cache(batch * 6, page, dtype=torch.float32, device=DEVICE)
        for c in cache:
            c.fill_(float("nan"))
        slots = AttentionMetadata.slots(table, positions, page)
        for c, s in zip(cache, states):
            ops.store_kv(c, s.flatten(0, 1), slots)
        lens = torch.full((batch,), past, dtype=torch.int32, device=DEVICE)
        last = tuple(t[:, -2:] for t in q)  # L_q = 2
        outs = [layer.decode(last, cache, AttentionMetadata(table, lens, slots, backend=b))
                for b in ("torch", "triton")]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


def test_a_refresh_that_does_not_fit_its_plan_says_so():
    small = ops.plan_decode(torch.tensor([128], dtype=torch.int32), num_heads_kv=1,
                            split_tokens=64)  # two pieces: capacity 2
    with pytest.raises(ValueError, match="out: a plan for B=1 with 2 items cannot hold this "
                                         "step's 4 pieces"):
        ops.plan_decode(torch.tensor([256], dtype=torch.int32), num_heads_kv=1,
                        split_tokens=64, out=small)
