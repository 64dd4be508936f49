"""Hostile arguments to the public ops: each one gets a ValueError naming it before any
kernel runs (or, where only a device read could tell, is made harmless in the kernel), and
the caller's tensors are left as they were."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwattn import ops
from tests.ops.paged import DEVICE, fill_cache, paged_table

BACKENDS = ["torch", "triton"]


def _decode_case(lengths=(40, 9), l_q=1, page=16):
    """Separate K/V decode arguments on hostile paged caches (fp32, tiny)."""
    lengths = list(lengths)
    table, n_pool = paged_table(lengths, page)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, page, torch.float32)
    args = dict(q=torch.randn(len(lengths), l_q, 4, 16), k_cache=k_cache, v_cache=v_cache,
                block_table=table, cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    return {k: v.to(DEVICE) for k, v in args.items()}


def _prefill_case():
    lengths, cu = [40, 9], [0, 3, 12]
    table, n_pool = paged_table(lengths, 16)
    k_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    v_cache, _ = fill_cache((2, 16), lengths, table, n_pool, 16, torch.float32)
    args = dict(q=torch.randn(12, 4, 16), k_cache=k_cache, v_cache=v_cache, block_table=table,
                cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
                cache_seqlens=torch.tensor(lengths, dtype=torch.int32))
    return {k: v.to(DEVICE) for k, v in args.items()}


def _tied_case(batch=2, l_q=1, heads=4):
    args = dict(q_nope=torch.randn(batch, l_q, heads, 16),
                q_rope=torch.randn(batch, l_q, heads, 16),
                kv_cache=torch.randn(6, 16, 2, 32), rope_cache=torch.randn(6, 16, 16),
                block_table=torch.arange(2 * 3, dtype=torch.int32).view(2, 3)[:batch],
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32)[:batch])
    return {k: v.to(DEVICE) for k, v in args.items()}


def _strided(values, dtype=torch.int32):
    """A 1-D view of `values` with stride 2 (every other element of a larger buffer)."""
    buf = torch.full((2 * len(values),), 10**6, dtype=dtype)
    buf[::2] = torch.tensor(values, dtype=dtype)
    return buf.to(DEVICE)[::2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_index_tensors_must_have_unit_stride(backend):
    """The kernels address block-table rows and lengths as dense int32 runs (only the table's
    row stride is passed): a column-major table or a strided length vector was read as
    neighbouring memory, giving NaN or silently wrong attention."""
    args = _decode_case()
    table = args["block_table"]
    column_major = table.t().contiguous().t()
    assert torch.equal(column_major, table) and column_major.stride(-1) != 1
    with pytest.raises(ValueError, match="block_table must be contiguous in its last dimension"):
        ops.decode(**{**args, "block_table": column_major}, backend=backend)
    lengths = _strided(args["cache_seqlens"].tolist())
    with pytest.raises(ValueError, match="cache_seqlens must be contiguous"):
        ops.decode(**{**args, "cache_seqlens": lengths}, backend=backend)
    # A table whose rows are slices of a wider one (unit stride along a row) still works.
    wide = torch.full((2, table.shape[1] + 5), -7, dtype=torch.int32, device=DEVICE)
    wide[:, :table.shape[1]] = table
    got = ops.decode(**{**args, "block_table": wide[:, :table.shape[1]]}, backend=backend)
    torch.testing.assert_close(got, ops.decode(**args, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_index_tensors_must_have_unit_stride(backend):
    """A strided cu_seqlens_q sent the prefill kernel to wrong query rows (values ~1e38)."""
    args = _prefill_case()
    cu = _strided(args["cu_seqlens_q"].tolist())
    with pytest.raises(ValueError, match="cu_seqlens_q must be contiguous"):
        ops.prefill(**{**args, "cu_seqlens_q": cu}, backend=backend)
    with pytest.raises(ValueError, match="cu_seqlens_q must be contiguous"):
        ops.prefill(**{**args, "cu_seqlens_q": cu},
                    plan=ops.plan_prefill(cu, args["cache_seqlens"]), backend=backend)
    with pytest.raises(ValueError, match="block_table must be contiguous"):
        ops.prefill(**{**args, "block_table": args["block_table"].t().contiguous().t()},
                    backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_slot_mapping_must_have_unit_stride_and_nothing_is_written(backend):
    """A strided slot_mapping made the Triton store write token i to slot_mapping's i-th
    element in memory: other sequences' slots overwritten."""
    cache = torch.zeros(4, 16, 2, 8, device=DEVICE)
    slots = _strided([5, 7, 9], dtype=torch.int64)
    with pytest.raises(ValueError, match="slot_mapping must be contiguous"):
        ops.store_kv(cache, torch.randn(3, 2, 8, device=DEVICE), slots, backend=backend)
    assert not cache.any()


SCALES = [0.0, -0.5, float("nan"), float("inf")]


@pytest.mark.parametrize("scale", SCALES, ids=["zero", "negative", "nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dequantisation_scales_must_be_positive_and_finite(backend, scale):
    """The Triton launchers took a zero scale for "no scale" (`scale or 1.0`) while the
    reference multiplied by it: the two backends disagreed silently; a NaN or negative scale
    gave garbage on both."""
    args = _decode_case()
    with pytest.raises(ValueError, match="k_scale must be a positive finite number"):
        ops.decode(**args, k_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="v_scale must be a positive finite number"):
        ops.decode(**args, v_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="kv_scale must be a positive finite number"):
        ops.decode_tied(**_tied_case(), softmax_scale=0.1, kv_scale=scale, backend=backend)
    with pytest.raises(ValueError, match="k_scale must be a positive finite number"):
        ops.prefill(**_prefill_case(), k_scale=scale, backend=backend)
    cache = torch.zeros(4, 16, 8, device=DEVICE)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        ops.store_kv(cache, torch.randn(2, 8, device=DEVICE),
                     torch.tensor([0, 1], device=DEVICE), scale=scale, backend=backend)
    assert not cache.any()
    ops.decode(**args, k_scale=1, v_scale=0.5, backend=backend)  # any positive number goes


EMPTY_DECODE = [
    pytest.param(dict(batch=0), "B", id="no-sequences"),
    pytest.param(dict(l_q=0), "L_q", id="no-query-tokens"),
    pytest.param(dict(heads=0), "H_q", id="no-heads"),
]


@pytest.mark.parametrize("shape, dim", EMPTY_DECODE)
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_query_dimensions_are_refused(backend, shape, dim):
    """B = 0 failed in torch.min ("Expected reduction dim"), L_q = 0 or H_q = 0 in a
    ZeroDivisionError inside the Triton launcher, D = 0 in the default softmax scale."""
    batch, l_q, heads = shape.get("batch", 2), shape.get("l_q", 1), shape.get("heads", 4)
    args = _decode_case()
    args["q"] = torch.randn(batch, l_q, heads, 16, device=DEVICE)
    for name in ("block_table", "cache_seqlens"):
        args[name] = args[name][:batch]
    with pytest.raises(ValueError, match=f"q must not be empty.*{dim}"):
        ops.decode(**args, backend=backend)
    with pytest.raises(ValueError, match=f"q_nope must not be empty.*{dim}"):
        ops.decode_tied(**_tied_case(batch, l_q, heads), softmax_scale=0.1, backend=backend)
    no_width = _decode_case()
    no_width["q"] = no_width["q"][..., :0]
    for name in ("k_cache", "v_cache"):
        no_width[name] = no_width[name][..., :0]
    with pytest.raises(ValueError, match="q must not be empty.*D"):
        ops.decode(**no_width, backend=backend)
    prefill = _prefill_case()
    with pytest.raises(ValueError, match="q must not be empty.*H_q"):
        ops.prefill(**{**prefill, "q": prefill["q"][:, :0]}, backend=backend)


def test_decode_plan_made_for_a_shorter_query_is_refused():
    """A plan made with query_len=1 over a 1-token sequence, then used by an L_q = 2 call:
    without a plan the call is refused (the sequence cannot hold its 2 new tokens), with it
    the Triton kernel returned zeros and an LSE of -inf for the first query row."""
    lengths = torch.tensor([1, 9], dtype=torch.int32, device=DEVICE)
    args = {**_decode_case(lengths=(9, 9), l_q=2), "cache_seqlens": lengths}
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode(**args, backend="triton")
    plan = ops.plan_decode(lengths, num_heads_kv=2)  # query_len=1 by default
    with pytest.raises(ValueError, match="plan: .*shortest sequence holds 1 tokens.*length 2"):
        ops.decode(**args, plan=plan, backend="triton")
    # A refreshed plan is judged by its new lengths: long enough now, so the call runs.
    args["cache_seqlens"] = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    ops.plan_decode(args["cache_seqlens"], num_heads_kv=2, out=plan)
    torch.testing.assert_close(ops.decode(**args, plan=plan, backend="triton"),
                               ops.decode(**args, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_decode_plan_does_not_vouch_for_lengths_a_backend_never_reads_it_for(backend):
    """The torch backend ignores a plan but took one as vouching for the lengths, so it
    skipped the checks it makes without one: a plan made with query_len=1 over a 1-token
    sequence, used by an L_q = 2 call, returned NaN there (the first query row saw nothing)."""
    lengths = torch.tensor([1, 9], dtype=torch.int32, device=DEVICE)
    args = {**_decode_case(lengths=(9, 9), l_q=2), "cache_seqlens": lengths}
    plan = ops.plan_decode(lengths, num_heads_kv=2)  # query_len=1 by default
    with pytest.raises(ValueError, match="query length 2"):
        ops.decode(**args, plan=plan, backend=backend)
    # A wrong plan is still refused by name, and a right one still runs.
    with pytest.raises(ValueError, match="plan"):
        ops.decode(**args, plan=ops.plan_decode(lengths[:1], num_heads_kv=2), backend=backend)
    args["cache_seqlens"] = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    plan = ops.plan_decode(args["cache_seqlens"], num_heads_kv=2, query_len=2)
    torch.testing.assert_close(ops.decode(**args, plan=plan, backend=backend),
                               ops.decode(**args, backend="torch"), rtol=1e-5, atol=1e-5)


def test_store_never_writes_past_the_cache():
    """A slot past the cache's last one: the Triton store wrote it anyway, into whatever
    memory follows the cache (here the rest of the caller's buffer), and the reference raised
    an IndexError that does not name slot_mapping."""
    page, feat = 16, (2, 8)
    new = torch.randn(3, *feat, device=DEVICE)
    slots = torch.tensor([5, 4 * page, 4 * page + 6], device=DEVICE)  # two past the end
    buf = torch.zeros(5, page, *feat, device=DEVICE)
    cache = buf[:4]  # contiguous, with a fifth page of someone else's memory after it
    ops.store_kv(cache, new, slots, backend="triton")
    assert not buf[4].any(), "the store wrote past the cache"
    torch.testing.assert_close(cache.flatten(0, 1)[5], new[0])  # in-range tokens are stored
    cache = torch.zeros(4, page, *feat, device=DEVICE)
    with pytest.raises(ValueError, match="slot_mapping holds slot 70, past the cache's 64 slots"):
        ops.store_kv(cache, new, slots, backend="torch")
    assert not cache.any()


def test_plan_prefill_takes_integer_vectors_only():
    """A 2-D or 0-d tensor failed in int() with a TypeError naming neither argument; float
    offsets or lengths were truncated without a word (2.7 queries read as 2)."""
    cases = [(torch.tensor([0, 3, 12]), torch.tensor([[40, 9]]), "cache_seqlens"),
             (torch.tensor(3), torch.tensor([40]), "cu_seqlens_q"),
             (torch.tensor([0.0, 2.7, 12.0]), [40, 9], "cu_seqlens_q"),
             ([0, 2.5, 12], [40, 9], "cu_seqlens_q"),
             ([0, 3, 12], [40.5, 9], "cache_seqlens")]
    for cu, seqlens, name in cases:
        with pytest.raises(ValueError, match=name):
            ops.plan_prefill(cu, seqlens)
    # Integers of any kind still pass: numpy arrays and scalars, integer tensors.
    plan = ops.plan_prefill(np.array([0, 3, 12]), [np.int64(40), torch.tensor(9)])
    assert plan.query_lens == (3, 9) and plan.seqlens == (40, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_needs_a_paged_cache(backend):
    """A 1-D `cache` has no page size, so its slots mean nothing: the store used to write
    through it as if every element were a slot."""
    cache = torch.zeros(64, device=DEVICE)
    with pytest.raises(ValueError, match=r"cache must be paged as \(P, page_size"):
        ops.store_kv(cache, torch.randn(3, device=DEVICE), torch.tensor([1, 2, 3], device=DEVICE),
                     backend=backend)
    assert not cache.any()


def test_hopper_plan_checks_its_sizes_when_made():
    """The Hopper backend's step plan took num_heads_kv=0, page_size=0 or query_len=0 and only
    failed on a layer's first decode call, far from the call that made it."""
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops.backends.hopper_backend import HopperBackend

    backend = HopperBackend()
    lengths = torch.tensor([40, 9], dtype=torch.int32)
    for name, sizes in (("num_heads_kv", dict(num_heads_kv=0, page_size=64)),
                        ("page_size", dict(num_heads_kv=2, page_size=0)),
                        ("query_len", dict(num_heads_kv=2, page_size=64, query_len=0))):
        with pytest.raises(ValueError, match=f"{name} must be positive"):
            backend.plan(lengths, device="cpu", **sizes)


def test_hopper_plan_refused_refresh_leaves_the_plan_as_it_was():
    """A refresh whose lengths do not count the plan's query tokens used to store the new
    lengths and then fail, leaving launch plans of the old lengths behind lengths (and a
    max_seqlen) of the new ones; a refresh for a shorter query length failed that way too."""
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops.backends.hopper_backend import HopperBackend

    backend = HopperBackend()
    plan = backend.plan(torch.tensor([300, 9], dtype=torch.int32), num_heads_kv=2, query_len=2,
                        page_size=64, device="cpu")
    launch = plan.for_launch(1, 2, 64)
    items = launch.items.clone()
    with pytest.raises(ValueError, match="cache_seqlens must be >= the query length 2"):
        plan.refresh(torch.tensor([1, 9], dtype=torch.int32))
    assert plan.lengths.tolist() == [300, 9] and plan.max_seqlen == 300
    assert torch.equal(launch.items, items)
    # The step's own query length is what the lengths are checked against, and kept.
    shorter = torch.tensor([1, 9], dtype=torch.int32)
    assert backend.plan(shorter, num_heads_kv=2, query_len=1, page_size=64, out=plan) is plan
    assert plan.query_len == 1 and plan.lengths.tolist() == [1, 9] and launch.min_seqlen == 1


# A page id a sequence reads, outside the cache's pages: one before the first, the first past
# the last, and far past it.
BAD_PAGES = [-1, "P", 2**30]


def _bad_page(args, name_cache, row, col, bad):
    """`args` with block_table[row, col] set to `bad` ("P": the cache's page count)."""
    table = args["block_table"].clone()
    table[row, col] = args[name_cache].shape[0] if bad == "P" else bad
    return {**args, "block_table": table}


def _host_backends():
    """The backends that must refuse a bad page id: the reference anywhere, and any backend
    whose block table is in host memory (reading it costs no device synchronisation)."""
    return BACKENDS if DEVICE.type == "cpu" else ["torch"]


@pytest.mark.parametrize("bad", BAD_PAGES)
@pytest.mark.parametrize("backend", _host_backends())
def test_decode_page_ids_out_of_the_cache_are_refused(backend, bad):
    """A page id outside [0, P) among the pages a sequence reads: the reference raised an
    IndexError naming no argument for ids past the cache and silently read the wrong page for
    negative ones (NaN here); the Triton kernel read outside the cache (a crash under the
    interpreter). Entries past a sequence's last page are never read, and stay unchecked (the
    hostile tables of tests/ops/paged.py hold garbage there)."""
    args = _bad_page(_decode_case(), "k_cache", 1, 0, bad)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] is page .*outside the "
                                         r"cache's 7 pages"):
        ops.decode(**args, backend=backend)
    tied = _bad_page(_tied_case(), "kv_cache", 0, 2, bad)
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] is page .*outside the "
                                         r"cache's 6 pages"):
        ops.decode_tied(**tied, backend=backend)


@pytest.mark.parametrize("bad", BAD_PAGES)
@pytest.mark.parametrize("backend", _host_backends())
def test_prefill_page_ids_out_of_the_cache_are_refused(backend, bad):
    args = _prefill_case()  # sequence 0 holds 40 tokens: pages 0-2 of its row are read
    with pytest.raises(ValueError, match=r"block_table\[0, 2\] is page"):
        ops.prefill(**_bad_page(args, "k_cache", 0, 2, bad), backend=backend)
    # A sequence with no queries this step reads none of its pages.
    quiet = {**args, "q": args["q"][:3],
             "cu_seqlens_q": torch.tensor([0, 3, 3], dtype=torch.int32, device=DEVICE)}
    want = ops.prefill(**quiet, backend="torch")
    torch.testing.assert_close(ops.prefill(**_bad_page(quiet, "k_cache", 1, 0, bad),
                                           backend=backend), want, rtol=1e-5, atol=1e-5)
    tied = dict(q_nope=torch.randn(12, 4, 16), q_rope=torch.randn(12, 4, 16),
                kv_cache=torch.randn(6, 16, 2, 32), rope_cache=torch.randn(6, 16, 16),
                block_table=torch.arange(6, dtype=torch.int32).view(2, 3),
                cu_seqlens_q=torch.tensor([0, 3, 12], dtype=torch.int32),
                cache_seqlens=torch.tensor([40, 9], dtype=torch.int32))
    tied = {k: v.to(DEVICE) for k, v in tied.items()}
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] is page"):
        ops.prefill_tied(**_bad_page(tied, "kv_cache", 1, 0, bad), backend=backend)


def test_reference_ops_refuse_page_ids_out_of_the_cache():
    """The references themselves (the CPU path, and what tests compare against) refuse them
    when called directly, naming the entry."""
    from hwattn.ops import reference

    args = _bad_page(_decode_case(), "k_cache", 0, 1, -1)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\] is page -1"):
        reference.decode_reference(*args.values())
    args = _bad_page(_prefill_case(), "k_cache", 1, 0, 7)
    with pytest.raises(ValueError, match=r"block_table\[1, 0\] is page 7"):
        reference.prefill_reference(*args.values())
