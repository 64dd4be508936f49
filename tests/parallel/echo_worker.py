"""A minimal `WorkerGroup` worker for tests of `hwattn.parallel.launch` (started as
`python -m tests.parallel.echo_worker`): answers ("echo", x) with ("result", x), and
("unreadable",) with a reply the parent cannot unpickle, until ("stop",)."""

from __future__ import annotations

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
            link.send(("result", Local() if message[0] == "unreadable" else message[1]))
    link.send(("bye",))
    link.exit(0)


if __name__ == "__main__":
    main()
