"""What parent and worker send each other over a worker's Unix socket: first the worker's
hello (its one-time token and rank, plain bytes, so that nothing is unpickled from a
connection that has not shown the token), then pickled messages framed by their length.
A frame that does not unpickle (say, an object of a class the reader cannot import) is
dropped and refused with `MessageError`."""

from __future__ import annotations

import pickle
import socket
import struct

HEADER = struct.Struct("!Q")  # a message's length in bytes
HELLO = struct.Struct("!32sI")  # one-time token (hex), rank


class MessageError(ValueError):
    """A whole frame arrived but does not unpickle; the frame has been dropped. `messages`:
    those that came before it in the same read."""

    def __init__(self, message: str, messages: list):
        super().__init__(message)
        self.messages = messages


def pack(obj) -> bytes:
    """`obj` pickled, after its length."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return HEADER.pack(len(data)) + data


class Conn:
    """The parent's end of one worker's socket: non-blocking, frames reassembled."""

    def __init__(self, sock: socket.socket, rank: int):
        sock.setblocking(False)
        self.sock = sock
        self.rank = rank
        self.buf = bytearray()
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list:
        """Messages completed by what the socket holds now; EOFError once it is closed.
        MessageError for a frame that does not unpickle (dropped, so the next read goes on
        with the frames behind it)."""
        self._fill()
        out = []
        while len(self.buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self.buf)
            if len(self.buf) < HEADER.size + n:
                break
            frame = bytes(self.buf[HEADER.size:HEADER.size + n])
            del self.buf[:HEADER.size + n]
            try:
                out.append(pickle.loads(frame))
            except Exception as err:  # noqa: BLE001 - whatever the bytes trip over
                raise MessageError(f"a message of {n} bytes does not unpickle "
                                   f"({type(err).__name__}: {err})", out) from None
        if self.closed and not out:
            raise EOFError("socket closed")
        return out

    def hello(self) -> tuple[str, int] | None:
        """The (token, rank) a new worker opens with (plain bytes, read before any message
        is unpickled), once all of it has arrived; EOFError if the socket closes first."""
        self._fill()
        if len(self.buf) < HELLO.size:
            if self.closed:
                raise EOFError("socket closed")
            return None
        token, rank = HELLO.unpack_from(self.buf)
        del self.buf[:HELLO.size]
        return token.decode("ascii", errors="replace"), rank

    def _fill(self) -> None:
        while True:
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as err:
                raise EOFError(str(err)) from None
            if not chunk:
                self.closed = True
                break
            self.buf += chunk
