"""The page pool: allocation, growth, trimming, prefix sharing and the no-leak invariant."""

import pytest

from hwattn.config import ModelConfig
from hwattn.engine.block_manager import NULL_PAGE, BlockManager, num_pages_for_budget
from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.sequence import Sequence
from hwattn.models import Transformer


def seq(ids, rid="r"):
    return Sequence(rid, list(ids), SamplingParams(), seed=0)


def test_allocate_grow_trim_free_keeps_counts():
    bm = BlockManager(num_pages=10, page_size=4)
    a = seq(range(10), "a")
    bm.allocate(a)
    assert len(a.block_table) == 3 and NULL_PAGE not in a.block_table
    assert bm.num_free_pages == 9 - 3
    bm.grow(a, 17)  # 5 pages
    assert len(a.block_table) == 5
    bm.trim(a, 11)  # 3 pages
    assert len(a.block_table) == 3
    bm.check([a])
    bm.free_sequence(a)
    assert bm.num_free_pages == 9
    bm.check([])


def test_grow_all_grows_every_sequence_or_none():
    """`grow_all` (the scheduler's one pass over a decode batch) gives each sequence the
    pages `grow` would, and when the pool cannot cover all of them changes nothing."""
    bm = BlockManager(num_pages=12, page_size=4)
    a, b, c = seq(range(8), "a"), seq(range(5), "b"), seq(range(3), "c")
    for s in (a, b, c):
        bm.allocate(s)
        s.num_cached = len(s.token_ids)
    tables = [list(s.block_table) for s in (a, b, c)]  # 2, 2, 1 pages
    free = bm.num_free_pages  # 11 - 5
    # a needs 1 more page for 1 token, b none (room in its last page), c none.
    assert bm.grow_all([a, b, c], 1)
    assert [len(s.block_table) for s in (a, b, c)] == [3, 2, 1]
    assert [s.block_table[:len(t)] for s, t in zip((a, b, c), tables)] == tables
    assert bm.num_free_pages == free - 1
    # 9 more tokens each: a 5 pages (+2), b 4 (+2), c 3 (+2) = 6 > the 5 left.
    before = [list(s.block_table) for s in (a, b, c)]
    assert not bm.grow_all([a, b, c], 9)
    assert [s.block_table for s in (a, b, c)] == before and bm.num_free_pages == free - 1
    assert bm.grow_all([a, b], 9)  # 4 pages
    assert [len(s.block_table) for s in (a, b)] == [5, 4] and bm.num_free_pages == free - 5
    assert bm.grow_all([], 9)
    bm.check([a, b, c])


def test_prefix_pages_are_shared_and_revived_after_free():
    bm = BlockManager(num_pages=12, page_size=4)
    a = seq(list(range(12)) + [99], "a")
    bm.allocate(a)
    a.num_cached = len(a)
    bm.register_full_pages(a)
    b = seq(list(range(12)) + [50, 51], "b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table[:3] == a.block_table[:3] and b.num_cached == 12
    assert all(bm.ref_count[p] == 2 for p in a.block_table[:3])
    bm.check([a, b])
    bm.free_sequence(a)
    bm.free_sequence(b)
    bm.check([])
    # The freed pages keep their contents: a third prompt revives them.
    c = seq(list(range(8)) + [7], "c")
    bm.allocate(c)
    assert c.num_cached == 8
    bm.check([c])


def test_a_fully_cached_prompt_still_computes_its_last_token():
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq(range(8), "a")
    bm.allocate(a)
    a.num_cached = 8
    bm.register_full_pages(a)
    b = seq(range(8), "b")
    bm.allocate(b)
    assert b.num_cached == 4  # the second page is recomputed for the last token's logits


def test_prefix_cache_eviction_hands_out_unhashed_pages_first():
    bm = BlockManager(num_pages=5, page_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a)
    a.num_cached = 4
    bm.register_full_pages(a)
    hashed = a.block_table[:2]
    bm.free_sequence(a)
    b = seq([9], "b")
    bm.allocate(b)
    assert b.block_table[0] not in hashed
    big = seq(range(100, 108), "big")  # needs all 4 pages: the cached ones are evicted
    bm.free_sequence(b)
    bm.allocate(big)
    assert not bm.hash_to_page
    bm.check([big])


def test_can_allocate_counts_revived_pages():
    bm = BlockManager(num_pages=4, page_size=2)
    a = seq([1, 2, 3, 4, 5], "a")
    bm.allocate(a)  # 3 pages, pool full
    assert not bm.can_allocate(seq([1, 2, 9], "b"))
    with pytest.raises(RuntimeError):
        bm.grow(a, 8)


def test_pool_size_from_budget_uses_the_models_own_accounting():
    model = Transformer(ModelConfig.from_preset("tiny", attention="gla"))
    per_token = model.kv_bytes_per_token(1, __import__("torch").float32)
    pages = num_pages_for_budget(1 << 20, per_token, 16)
    assert pages == (1 << 20) // (per_token * 16)
    with pytest.raises(ValueError, match="memory_budget"):
        num_pages_for_budget(0, per_token, 16)
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(1, 16)


def test_borrowed_pages_come_back_even_on_error():
    bm = BlockManager(num_pages=6, page_size=4)
    with bm.borrow_pages(3) as pages:
        assert len(set(pages)) == 3 and NULL_PAGE not in pages
        assert bm.num_free_pages == 2
    assert bm.num_free_pages == 5
    with pytest.raises(KeyError):
        with bm.borrow_pages(5):
            raise KeyError("inside")
    assert bm.num_free_pages == 5
    with pytest.raises(ValueError, match="5 free"):
        with bm.borrow_pages(6):
            pass
    bm.check([])


def test_a_prompt_no_cache_holds_costs_one_hash_per_check(monkeypatch):
    """A waiting 40-page prompt whose first page no cache holds is checked every step: each
    check hashes its first page once (the chain is kept on the sequence and extended only as
    far as asked), not all 40 pages; registering its chunks extends the same chain, whose
    hashes equal the chain built from scratch."""
    bm = BlockManager(num_pages=64, page_size=4)
    calls = []
    chain_hash = BlockManager.chain_hash
    monkeypatch.setattr(BlockManager, "chain_hash",
                        staticmethod(lambda prev, tokens: calls.append(1) or chain_hash(prev, tokens)))
    a = seq(range(161), "a")
    for _ in range(3):
        assert bm.can_allocate(a)
    assert len(calls) == 1 and len(a.prompt_hashes) == 1
    assert not bm.awaits_pages(a, {b"not a page"})
    bm.allocate(a)
    a.num_cached = 80  # a first chunk of 20 pages
    bm.register_full_pages(a)
    assert len(a.prompt_hashes) == 20 and a.page_hashes == a.prompt_hashes
    fresh, previous = [], None
    for i in range(20):
        previous = chain_hash(previous, tuple(range(4 * i, 4 * i + 4)))
        fresh.append(previous)
    assert a.page_hashes == fresh
