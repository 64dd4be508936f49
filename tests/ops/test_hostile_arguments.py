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


BAD_SOFTMAX_SCALES = [float("nan"), float("inf"), -float("inf"), torch.tensor(0.25), "0.25"]


@pytest.mark.parametrize("scale", BAD_SOFTMAX_SCALES,
                         ids=["nan", "inf", "-inf", "tensor", "string"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_softmax_scale_must_be_a_finite_number(backend, scale):
    """A NaN or infinite softmax_scale returned NaN everywhere on both backends without a
    word; a 0-d tensor ran on the reference but reached the Triton kernel as a pointer (an
    InterpreterError about pointer<fp32>; on the GPU it would need a device read); a string
    failed in a TypeError naming nothing."""
    match = "softmax_scale must be a finite number"
    with pytest.raises(ValueError, match=match):
        ops.decode(**_decode_case(), softmax_scale=scale, backend=backend)
    with pytest.raises(ValueError, match=match):
        ops.decode_tied(**_tied_case(), softmax_scale=scale, backend=backend)
    with pytest.raises(ValueError, match=match):
        ops.prefill(**_prefill_case(), softmax_scale=scale, backend=backend)
    tied = _tied_case()
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        ops.prefill_tied(tied["q_nope"][:, 0], tied["q_rope"][:, 0], tied["kv_cache"],
                         tied["rope_cache"], tied["block_table"], cu, tied["cache_seqlens"],
                         softmax_scale=scale, backend=backend)


@pytest.mark.parametrize("scale", [0.0, -0.3, 2, np.float32(0.5)],
                         ids=["zero", "negative", "int", "numpy"])
def test_finite_softmax_scales_agree_across_backends(scale):
    """Any finite scale is well defined (zero: uniform weights over the visible tokens;
    negative: the smallest scores weigh most), and the kernels compute it as the reference.
    A NumPy float32 scale failed inside the Triton launch ("cannot convert ... of type
    numpy.float32 to tensor"); it is passed on as a Python float now."""
    args = _decode_case(lengths=(65, 17), l_q=2)
    want = ops.decode(**args, softmax_scale=scale, return_lse=True, backend="torch")
    got = ops.decode(**args, softmax_scale=scale, return_lse=True, backend="triton")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    prefill = _prefill_case()
    torch.testing.assert_close(ops.prefill(**prefill, softmax_scale=scale, backend="triton"),
                               ops.prefill(**prefill, softmax_scale=scale, backend="torch"),
                               rtol=1e-5, atol=1e-5)


def _lengths_in_host_memory():
    """Skip on a GPU run: a GPU call trusts its plan (comparing would read the lengths back)."""
    if DEVICE.type != "cpu":
        pytest.skip("plans are held to the call's lengths only where these are in host memory")


def test_plan_decode_out_must_be_a_decode_plan():
    """`out=` of another kind (a prefill plan, a Hopper plan handed to the Triton backend)
    failed in an AttributeError naming neither `out` nor what it should be."""
    lengths = torch.tensor([40, 9], dtype=torch.int32)
    for out in (ops.plan_prefill([0, 1, 2], [40, 9]), object()):
        with pytest.raises(ValueError, match="out must be a DecodePlan from plan_decode"):
            ops.plan_decode(lengths, num_heads_kv=2, out=out)
        with pytest.raises(ValueError, match="out must be a DecodePlan"):
            ops.get_backend("triton").plan(lengths, num_heads_kv=2, page_size=16, out=out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_plan_for_other_lengths_is_refused_where_they_are_on_the_host(backend):
    """The kernels read the tokens of the plan's lengths and mask those past cache_seqlens.
    A plan of the same batch made for other lengths: shorter ones made the Triton kernel skip
    the sequence's last tokens (a silently wrong output); longer ones made it read the table
    entries past the sequence's pages (here out-of-range ids: a segmentation fault under the
    interpreter, a read outside the cache on a GPU) and, through pages in range, the slots
    past its length (NaN here: a NaN output, as 0 x NaN is NaN). With the lengths in host
    memory, checking costs nothing. The reference ignored the plan (it reads the lengths);
    it refuses one made for other lengths alike."""
    _lengths_in_host_memory()
    args = _decode_case(lengths=(70, 30))  # sequence 1: pages 0-1 of its row, garbage after
    want = ops.decode(**args, backend="torch")
    shorter = ops.plan_decode(torch.tensor([70, 9], dtype=torch.int32), num_heads_kv=2)
    with pytest.raises(ValueError, match="sequence 1 was planned with 9 tokens, but "
                                         "cache_seqlens gives it 30"):
        ops.decode(**args, plan=shorter, backend=backend)
    longer = ops.plan_decode(torch.tensor([70, 40], dtype=torch.int32), num_heads_kv=2)
    table = args["block_table"].clone()
    table[1, 2] = table[0, 0]  # the extra page in range: only the NaN slots remain
    for block_table in (args["block_table"], table):
        with pytest.raises(ValueError, match="sequence 1 was planned with 40 tokens, but "
                                             "cache_seqlens gives it 30"):
            ops.decode(**{**args, "block_table": block_table}, plan=longer, backend=backend)
    # Plans of the call's own lengths, in one piece or split, still run.
    split = ops.plan_decode(args["cache_seqlens"], num_heads_kv=2, split_tokens=64)
    assert split.max_pieces == 2
    for plan in (ops.plan_decode(args["cache_seqlens"], num_heads_kv=2), split):
        torch.testing.assert_close(ops.decode(**args, plan=plan, backend=backend), want,
                                   rtol=1e-5, atol=1e-5)


def test_hopper_plan_for_other_lengths_is_refused_where_they_are_on_the_host():
    """The Hopper backend's step plan (the lengths it read, one DecodePlan per launch shape)
    is held to the call's lengths the same way."""
    _lengths_in_host_memory()
    pytest.importorskip("triton.experimental.gluon")
    from hwattn.ops.backends.hopper_backend import HopperBackend

    backend = HopperBackend()
    args = _decode_case(lengths=(40, 30))
    plan = backend.plan(torch.tensor([40, 9], dtype=torch.int32), num_heads_kv=2,
                        page_size=16, device="cpu")
    with pytest.raises(ValueError, match="sequence 1 was planned with 9 tokens"):
        ops.decode(**args, plan=plan, backend=backend)
    backend.plan(args["cache_seqlens"], num_heads_kv=2, page_size=16, out=plan)
    torch.testing.assert_close(ops.decode(**args, plan=plan, backend=backend),
                               ops.decode(**args, backend="torch"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_plan_for_other_lengths_is_refused_where_they_are_on_the_host(backend):
    """The prefill kernel reads cu_seqlens_q and cache_seqlens from the tensors and sizes its
    grid by the plan. A plan of other lengths with the same batch and query rows: a shorter
    longest query run left rows of `out` unwritten (uninitialised memory); longer cached
    lengths on the device than in the plan read pages the plan's page check never saw (a
    segmentation fault under the interpreter); offsets not starting at 0 on the device wrote
    past `out`. The reference ignored the plan. With the lengths on the host, both refuse."""
    _lengths_in_host_memory()
    args = _prefill_case()  # cu [0, 3, 12], cache_seqlens [40, 9]
    cases = [(ops.plan_prefill([0, 6, 12], [40, 9]), {},
              "sequence 0 was planned with 6 queries over 40 tokens, but cu_seqlens_q and "
              "cache_seqlens give it 3 over 40"),
             (ops.plan_prefill([0, 3, 12], [40, 9]),
              {"cache_seqlens": torch.tensor([40, 33], dtype=torch.int32, device=DEVICE)},
              "sequence 1 was planned with 9 queries over 9 tokens.* give it 9 over 33"),
             (ops.plan_prefill([0, 3, 12], [40, 9]),
              {"cu_seqlens_q": torch.tensor([1, 4, 13], dtype=torch.int32, device=DEVICE)},
              "cu_seqlens_q must start at 0")]
    for plan, override, match in cases:
        with pytest.raises(ValueError, match=match):
            ops.prefill(**{**args, **override}, plan=plan, backend=backend)
    plan = ops.plan_prefill(args["cu_seqlens_q"], args["cache_seqlens"])
    torch.testing.assert_close(ops.prefill(**args, plan=plan, backend=backend),
                               ops.prefill(**args, backend="torch"), rtol=1e-5, atol=1e-5)


def test_numpy_float32_scales_reach_the_kernels_as_python_floats():
    """Scales that are NumPy float32 scalars (what arithmetic on float32 arrays yields) passed
    the checks as real numbers, then failed inside the Triton launch ("cannot convert ... of
    type numpy.float32 to tensor"); the reference took them."""
    half = np.float32(0.5)
    args = _decode_case()
    torch.testing.assert_close(
        ops.decode(**args, k_scale=half, v_scale=np.float32(2), backend="triton"),
        ops.decode(**args, k_scale=half, v_scale=np.float32(2), backend="torch"),
        rtol=1e-5, atol=1e-5)
    tied = _tied_case()
    torch.testing.assert_close(
        ops.decode_tied(**tied, softmax_scale=0.1, kv_scale=half, backend="triton"),
        ops.decode_tied(**tied, softmax_scale=0.1, kv_scale=half, backend="torch"),
        rtol=1e-5, atol=1e-5)
    prefill = _prefill_case()
    torch.testing.assert_close(ops.prefill(**prefill, k_scale=half, backend="triton"),
                               ops.prefill(**prefill, k_scale=half, backend="torch"),
                               rtol=1e-5, atol=1e-5)
    new, slots = torch.randn(3, 2, 8, device=DEVICE), torch.tensor([5, 0, 17], device=DEVICE)
    caches = {}
    for backend in BACKENDS:
        caches[backend] = torch.zeros(4, 16, 2, 8, device=DEVICE)
        ops.store_kv(caches[backend], new, slots, scale=half, backend=backend)
    torch.testing.assert_close(caches["triton"], caches["torch"], rtol=0, atol=0)


@pytest.mark.parametrize("fields, name", [
    (dict(block_n=128), "block_n"), (dict(block_n=8), "block_n"), (dict(num_warps=3), "num_warps"),
    (dict(num_stages=0), "num_stages"), (dict(max_rows=0), "max_rows")])
def test_decode_kernel_config_is_checked_when_made(fields, name):
    """A forced decode tile shape (TritonBackend(config=...)) was taken as made: block_n 128
    failed at the first launch, far from where it was chosen, and a num_warps Triton does not
    launch with only inside the GPU compiler; the prefill config already checked itself."""
    from hwattn.ops.triton_decode import KernelConfig

    with pytest.raises(ValueError, match=name):
        KernelConfig(**fields)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_queries_without_any_key_width_are_refused(backend):
    """q_nope and q_rope both 0 wide (no key to score with): the default softmax scale
    1/sqrt(D_nope + D_R) failed in a ZeroDivisionError naming neither. One of them empty is
    a key of the other's width alone, and runs."""
    tied = _tied_case()
    empty = {**tied, "q_nope": tied["q_nope"][..., :0], "q_rope": tied["q_rope"][..., :0],
             "rope_cache": tied["rope_cache"][..., :0]}
    with pytest.raises(ValueError, match="q_nope and q_rope must not both be empty"):
        ops.decode_tied(**empty, backend=backend)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="q_nope and q_rope must not both be empty"):
        ops.prefill_tied(empty["q_nope"][:, 0], empty["q_rope"][:, 0], empty["kv_cache"],
                         empty["rope_cache"], empty["block_table"], cu, empty["cache_seqlens"],
                         backend=backend)
    no_rope = {**empty, "q_nope": tied["q_nope"]}
    torch.testing.assert_close(ops.decode_tied(**no_rope, backend=backend),
                               ops.decode_tied(**no_rope, backend="torch"), rtol=1e-5, atol=1e-5)
