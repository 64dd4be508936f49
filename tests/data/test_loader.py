"""The stateless batch order and the evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwattn.data.loader import BatchSampler, TokenDataset, eval_window_count, eval_windows


def test_batches_are_a_function_of_the_step():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, 4, accum_steps=2, seed=3)
    b = BatchSampler(tokens, 16, 4, accum_steps=2, seed=3)
    x1, y1 = a.batch(7, 1)
    _ = b.batch(0, 0), b.batch(3, 1)  # a different history
    x2, y2 = b.batch(7, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1]) and x1.dtype == torch.int64
    assert not torch.equal(BatchSampler(tokens, 16, 4, 2, seed=4).batch(7, 1)[0], x1)


def test_each_epoch_visits_every_window_once():
    tokens = np.arange(1 + 16 * 50, dtype=np.int64)
    s = BatchSampler(tokens, 16, 5, seed=0)
    assert s.n_windows == 50
    seen = np.concatenate([s.window_ids(step) for step in range(10)])
    assert sorted(seen.tolist()) == list(range(50))
    nxt = np.concatenate([s.window_ids(step) for step in range(10, 20)])
    assert sorted(nxt.tolist()) == list(range(50)) and not np.array_equal(seen, nxt)


def test_ranks_take_disjoint_rows():
    tokens = np.arange(1 + 8 * 400, dtype=np.int64)
    full = BatchSampler(tokens, 8, 6, seed=1)
    r0 = BatchSampler(tokens, 8, 3, seed=1, rank=0, world=2)
    r1 = BatchSampler(tokens, 8, 3, seed=1, rank=1, world=2)
    for step in range(5):
        assert np.array_equal(np.concatenate([r0.window_ids(step), r1.window_ids(step)]),
                              full.window_ids(step))


def test_eval_windows_predict_each_token_once():
    tokens = np.arange(101)
    w = eval_windows(tokens, 10)
    assert w.shape == (10, 11)
    targets = w[:, 1:].flatten().tolist()
    assert targets == list(range(1, 101))
    assert eval_windows(tokens, 10, max_tokens=35).shape == (3, 11)
    with pytest.raises(ValueError, match="fewer"):
        eval_windows(np.arange(5), 10)
    # the count progress bars are sized by, without cutting the windows
    assert [eval_window_count(101, 10), eval_window_count(101, 10, 35)] == [10, 3]
    assert eval_window_count(5, 10) == eval_window_count(0, 10) == 0


def test_dataset_errors(tmp_path):
    with pytest.raises(ValueError, match="hwattn data build"):
        TokenDataset(tmp_path)
    with pytest.raises(ValueError, match="shorter"):
        BatchSampler(np.arange(5), 16, 1)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(seq_len=16.0), "seq_len"), (dict(batch_size=2.5), "batch_size"),
])
def test_sampler_arguments_are_checked_at_construction(kwargs, needle):
    """A negative or fractional seed was accepted and failed at the first batch with numpy's
    "expected non-negative integer"; a float length failed there too."""
    args = dict(seq_len=16, batch_size=4, seed=0) | kwargs
    with pytest.raises(ValueError, match=needle):
        BatchSampler(np.arange(1000), **args)


def test_numpy_integer_arguments_give_the_same_batches():
    tokens = np.arange(2000, dtype=np.uint16)
    a = BatchSampler(tokens, 16, 4, accum_steps=2, seed=3)
    b = BatchSampler(tokens, np.int64(16), np.int32(4), accum_steps=np.int64(2), seed=np.uint32(3))
    assert all(torch.equal(a.batch(s, m)[0], b.batch(s, m)[0]) for s in range(40) for m in (0, 1))


def test_resumed_sampler_reads_the_uninterrupted_batches_across_epochs():
    """A run resumed at any step (a new sampler, nothing carried over) reads exactly the
    batches of the run that never stopped, through several epoch boundaries, on every rank."""
    tokens = np.arange(1 + 8 * 37, dtype=np.int64)  # 37 windows: batches straddle epochs
    for world in (1, 2):
        whole = [BatchSampler(tokens, 8, 3, accum_steps=2, seed=5, rank=r, world=world)
                 for r in range(world)]
        ref = {(s, m, r): whole[r].batch(s, m)[0] for s in range(30) for m in (0, 1)
               for r in range(world)}
        for resume_at in (1, 6, 13, 29):
            again = [BatchSampler(tokens, 8, 3, accum_steps=2, seed=5, rank=r, world=world)
                     for r in range(world)]
            for s in range(resume_at, 30):
                for m in (0, 1):
                    for r in range(world):
                        assert torch.equal(again[r].batch(s, m)[0], ref[(s, m, r)])
