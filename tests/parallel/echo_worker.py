"""A minimal `WorkerGroup` worker for tests of `hwattn.parallel.launch` (started as
`python -m tests.parallel.echo_worker`): answers ("echo", x) with ("result", x),
("unreadable",) with a reply the parent cannot unpickle, and ("corrupt", n) with a bare frame
header announcing n bytes that never come, until ("stop",)."""

from __future__ import annotations

from hwattn.parallel.wire import HEADER
from hwattn.parallel.worker import ParentLink


class Local:
    """Defined in the worker's `__main__`: pickled as `__main__.Local`, which the parent's
    `__main__` does not hold, so the parent cannot load it."""


def main() -> None:
    link = ParentLink()
    with link.phase("step"):
        while True:
            message = link.recv()
            if message[0] == "stop":
                break
            if message[0] == "corrupt":
                link.sock.sendall(HEADER.pack(message[1]))
                continue
            link.send(("result", Local() if message[0] == "unreadable" else message[1]))
    link.send(("bye",))
    link.exit(0)


if __name__ == "__main__":
    main()
