"""A stand-in data-parallel replica for tests of `hwattn.engine.replicas` (started as
`python -m tests.parallel.last_words_worker`): answers ("build", spec) with a ready message,
and ("add", key, payload) with the outputs that finish that request, then fails at once (its
error report right behind them on the socket)."""

from __future__ import annotations

from hwattn.parallel.worker import ParentLink


def main() -> None:
    link = ParentLink()
    with link.phase("build"):
        link.recv()
        link.send(("ready", dict(stats={})))
    with link.phase("step"):
        while True:
            message = link.recv()
            if message[0] == "add":
                key = message[1]
                link.send(("outputs", [(key, [5, 6], 0, "ab", "length", None, None, 0, None)],
                           ("decode", 0.0), {}))
                raise RuntimeError("failed right after finishing a request")


if __name__ == "__main__":
    main()
