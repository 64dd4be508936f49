"""The frames parent and worker exchange (`hwattn.parallel.wire`): a frame that does not
unpickle is refused with a clear error and dropped, not left to fail every later read."""

from __future__ import annotations

import pickle
import socket

import pytest

from hwattn.parallel.wire import HEADER, Conn, MessageError, pack


def test_a_frame_that_does_not_unpickle_is_refused_and_dropped():
    """Observed: pickle's own error (here UnpicklingError) escaped `Conn.read` and the frame
    stayed in the buffer, so the next read raised it again and the messages behind it were
    never delivered."""
    parent, worker = socket.socketpair()
    conn = Conn(parent, rank=1)
    worker.sendall(pack(("result", 1)) + HEADER.pack(5) + b"\x00\x01\x02\x03\x04")
    with pytest.raises(MessageError, match="5 bytes") as info:
        conn.read()
    assert info.value.messages == [("result", 1)]  # what came before it is not lost
    worker.sendall(pack(("result", 2)))
    assert conn.read() == [("result", 2)]
    worker.close()
    with pytest.raises(EOFError):
        conn.read()


def test_well_formed_frames_split_anywhere_arrive_whole():
    parent, worker = socket.socketpair()
    conn = Conn(parent, rank=0)
    data = pack({"a": list(range(1000))}) + pack(("bye",))
    worker.sendall(data[:5])
    assert conn.read() == []
    worker.sendall(data[5:-3])
    assert conn.read() == [{"a": list(range(1000))}]
    worker.sendall(data[-3:])
    assert conn.read() == [("bye",)]
    assert pickle.loads(pack(7)[HEADER.size:]) == 7


def test_a_length_header_beyond_the_limit_is_refused_at_once_naming_the_length():
    """Observed: a corrupted header (here announcing 2**40 bytes) was taken at its word: the
    reader waited for bytes that never came, until the caller's deadline."""
    parent, worker = socket.socketpair()
    conn = Conn(parent, rank=0)
    worker.sendall(pack(("result", 1)) + HEADER.pack(1 << 40))
    with pytest.raises(MessageError, match="1099511627776 bytes") as info:
        conn.read()
    assert info.value.messages == [("result", 1)]
    worker.sendall(pack(("result", 2)))  # nothing behind a bad header can be framed
    with pytest.raises(MessageError, match="1099511627776 bytes"):
        conn.read()


def test_the_limit_is_enforced_on_both_sides(monkeypatch):
    import hwattn.parallel.wire as wire
    from hwattn.parallel.worker import ParentLink

    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 64)
    with pytest.raises(MessageError, match=r"a message of \d+ bytes pickled is longer than "
                                           r"the 64 a frame may hold"):
        pack(list(range(100)))
    frame = pack(b"x" * 40)  # at most the limit: sent and read as ever
    assert HEADER.unpack_from(frame)[0] <= 64
    parent, worker = socket.socketpair()
    conn = Conn(parent, rank=0)
    worker.sendall(frame)
    assert conn.read() == [b"x" * 40]
    # The worker's side: the parent's frames, read blocking.
    link = ParentLink.__new__(ParentLink)  # without the bootstrap record
    link.sock = worker
    parent.sendall(frame + HEADER.pack(65))
    assert link.recv() == b"x" * 40
    with pytest.raises(MessageError, match="announces a message of 65 bytes"):
        link.recv()  # was MemoryError (recv of 2**40 bytes) or a wait for good


def test_the_limit_fits_the_largest_real_messages():
    """Each rank loads its own weights, so no weights travel today; the limit still holds the
    float32 weights of every preset, should a `call` return them, and any prompt's tokens."""
    from hwattn.cli import model_params
    from hwattn.config import PRESETS, ModelConfig
    from hwattn.parallel.wire import MAX_MESSAGE_BYTES

    for name in PRESETS:
        config = ModelConfig.from_preset(name)
        assert 4 * model_params(config) < MAX_MESSAGE_BYTES / 2, name
        prompt = pack(("add", "r0", [config.vocab_size - 1] * config.max_seq_len, None, None))
        assert len(prompt) < MAX_MESSAGE_BYTES
    assert MAX_MESSAGE_BYTES < 1 << 40  # a random header is refused: below 1 in 2**24
