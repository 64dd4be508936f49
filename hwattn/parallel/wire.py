"""What parent and worker send each other over a worker's Unix socket: first the worker's
hello (its one-time token and rank, plain bytes, so that nothing is unpickled from a
connection that has not shown the token), then pickled messages framed by their length.
A frame that does not unpickle (say, an object of a class the reader cannot import) is
dropped and refused with `MessageError`.

A frame holds at most `MAX_MESSAGE_BYTES` (16 GiB) of pickle. No message hwattn sends comes
near it: the largest are a build spec (names and settings: each rank loads its own weights),
a step's token lists and page tables (at most max_num_batched_tokens tokens, a few MB), and
rank 0's step results carrying prompt log-probabilities (a few MB at the usual top-k). The
limit still leaves room for the full float32 weights of the largest preset ("serving", 1.7B
parameters, 7 GB) should a `call` return them. A length header above it is a corrupted or
out-of-step stream: `pack` refuses to write such a frame, and a reader refuses its header with
`MessageError` naming the length as soon as the 8 header bytes arrive, instead of waiting for
bytes that never come until the caller's deadline (a random 8-byte length is below the limit
once in 2**30)."""

from __future__ import annotations

import pickle
import socket
import struct

HEADER = struct.Struct("!Q")  # a message's length in bytes
HELLO = struct.Struct("!32sI")  # one-time token (hex), rank
HELLO_MAX_RANK = (1 << 32) - 1  # the largest rank HELLO carries
MAX_MESSAGE_BYTES = 1 << 34  # 16 GiB: the longest frame written or read (see above)


class MessageError(ValueError):
    """A whole frame arrived but does not unpickle (the frame has been dropped), or a frame's
    length header is above `MAX_MESSAGE_BYTES` (the stream is out of step: every later read of
    that connection raises it again). `messages`: those that came before it in the same read."""

    def __init__(self, message: str, messages: list):
        super().__init__(message)
        self.messages = messages


def check_length(n: int) -> None:
    """MessageError naming `n` when a frame header read announces more than
    `MAX_MESSAGE_BYTES`."""
    if n > MAX_MESSAGE_BYTES:
        raise MessageError(f"a frame header announces a message of {n} bytes, more than the "
                           f"{MAX_MESSAGE_BYTES} a frame may hold (MAX_MESSAGE_BYTES): the "
                           "stream is corrupted or out of step", [])


def pack(obj) -> bytes:
    """`obj` pickled, after its length; MessageError when the pickle is longer than
    `MAX_MESSAGE_BYTES` (nothing is sent)."""
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"a message of {len(data)} bytes pickled is longer than the "
                           f"{MAX_MESSAGE_BYTES} a frame may hold (MAX_MESSAGE_BYTES): send it "
                           "in parts, or through a file", [])
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
        with the frames behind it), or for a length header above `MAX_MESSAGE_BYTES` (kept:
        nothing behind it can be framed, so every later read raises it again)."""
        self._fill()
        out = []
        while len(self.buf) >= HEADER.size:
            (n,) = HEADER.unpack_from(self.buf)
            try:
                check_length(n)
            except MessageError as err:
                raise MessageError(str(err), out) from None
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
