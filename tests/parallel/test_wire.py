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
