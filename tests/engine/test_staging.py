"""The staging buffers of captured decode steps (hwattn/engine/staging.py) and the feed fast
path of `ModelRunner._feed_into`."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hwattn.engine.block_manager import NULL_PAGE
from hwattn.engine.model_runner import ModelRunner
from hwattn.engine.staging import HostBlockTable, PinnedRing, StagedInputs

FIELDS = {"ids": ((4, 3), torch.int64), "lens": ((4,), torch.int32),
          "table": ((4, 5), torch.int32)}


def test_fields_are_aligned_views_of_one_device_buffer():
    stage = StagedInputs(FIELDS, torch.device("cpu"))
    for name, (shape, dtype) in FIELDS.items():
        view = stage.device[name]
        assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
        assert view.untyped_storage().data_ptr() == stage.device["ids"].untyped_storage().data_ptr()
    # ids 96 bytes, lens 16, the table from byte 112 (a multiple of 16)
    assert stage.end("ids", 4) == 96 and stage.end("lens", 0) == 96
    assert stage.end("table", 0) == 112 and stage.end("table", 2) == 112 + 2 * 5 * 4
    assert stage.nbytes == stage.end("table", 4)


def test_upload_sends_a_prefix_and_slots_take_turns():
    stage = StagedInputs(FIELDS, torch.device("cpu"), slots=2)
    assert stage.index == 0
    host = stage.slot()
    host["ids"][:] = np.arange(12).reshape(4, 3)
    host["lens"][:] = [7, 8, 9, 10]
    host["table"][:] = 3
    stage.upload(stage.end("table", 2))  # ids, lens and the table's first 2 rows
    assert stage.index == 1
    assert stage.device["ids"].tolist() == np.arange(12).reshape(4, 3).tolist()
    assert stage.device["lens"].tolist() == [7, 8, 9, 10]
    assert stage.device["table"][:2].eq(3).all() and stage.device["table"][2:].eq(0).all()
    other = stage.slot()
    assert other is stage.slots[1] and other["ids"].sum() == 0  # a slot of its own
    other["lens"][:] = 1
    stage.upload()
    assert stage.index == 0 and stage.device["lens"].tolist() == [1, 1, 1, 1]
    assert stage.device["table"].eq(0).all()  # slot 1's table, sent whole
    with pytest.raises(ValueError, match="slots"):
        StagedInputs(FIELDS, torch.device("cpu"), slots=0)


def test_upload_sends_a_range():
    """`upload(end, start)` leaves the bytes before `start` as they were on the device."""
    stage = StagedInputs(FIELDS, torch.device("cpu"), slots=1)
    host = stage.slot()
    host["ids"][:] = 5
    host["lens"][:] = 6
    stage.upload(stage.end("lens", 4), start=stage.start("lens"))
    assert stage.device["ids"].eq(0).all() and stage.device["lens"].eq(6).all()
    assert stage.start("ids") == 0 and stage.start("table") == 112
    for start, end in ((-1, 8), (16, 8), (0, stage.nbytes + 1)):
        with pytest.raises(ValueError, match="outside"):
            stage.upload(end, start=start)


def test_host_block_table_kept_in_a_given_array():
    array = np.zeros((3, 4), dtype=np.int32)
    table = HostBlockTable(3, 4, array=array)
    assert (array == NULL_PAGE).all()  # starts as the null page throughout
    table.update([[5, 6], [7]], 3)
    assert array.tolist() == [[5, 6, NULL_PAGE, NULL_PAGE], [7] + [NULL_PAGE] * 3,
                              [NULL_PAGE] * 4]
    with pytest.raises(ValueError, match="array must be"):
        HostBlockTable(3, 4, array=np.zeros((3, 4), dtype=np.int64))


@pytest.mark.parametrize("feed", [[0, 1, 2], [1, 0, 2], [0, -1, 2], [2, 1, -1]])
def test_feed_writes_each_row_its_token_from_last_step(feed):
    """The steady batch's one-copy path (feed = 0, 1, ..., B-1) and the indexed path write
    the same tokens: row i's last token becomes last_sampled[feed[i]] where feed[i] >= 0."""
    runner = SimpleNamespace(last_sampled=torch.tensor([100, 101, 102, 103]),
                             _upload=lambda t: t)
    tokens = torch.arange(6).reshape(3, 2)
    ModelRunner._feed_into(runner, tokens, feed)
    want = torch.arange(6).reshape(3, 2)
    for i, f in enumerate(feed):
        if f >= 0:
            want[i, -1] = 100 + f
    assert tokens.tolist() == want.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_ring_hands_out_free_buffers_only():
    ring = PinnedRing(8, slots=2)
    a = ring.take(5, torch.int64)
    b = ring.take(8, torch.int64)
    assert a[0].shape == (5,) and a[0].is_pinned() and b[2] != a[2]
    assert ring.take(1, torch.int64) is None  # both held
    ring.release(a[2])
    assert ring.take(9, torch.int64) is None and ring.take(1, torch.int32) is None
    assert ring.take(1, torch.int64)[2] == a[2]
    # Staged uploads to the GPU land whole.
    stage = StagedInputs(FIELDS, torch.device("cuda"))
    for step in range(3):
        host = stage.slot()
        host["ids"][:] = step
        host["table"][:] = step + 1
        stage.upload()
    torch.cuda.synchronize()
    assert stage.device["ids"].eq(2).all() and stage.device["table"].eq(3).all()
