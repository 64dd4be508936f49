"""A stand-in worker that starts slowly and then never answers (started as
`python -m tests.parallel.slow_start_worker`): it sleeps HWATTN_TEST_CONNECT_DELAY_S seconds,
as a worker importing torch on a busy machine does, connects and opens with its hello, then
reads nothing more. The standard library alone, so that it starts in milliseconds otherwise
(a group of it needs heartbeat_timeout=0: it beats no heartbeat)."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import time


def main() -> None:
    boot = json.loads(sys.stdin.read())
    time.sleep(float(os.environ.get("HWATTN_TEST_CONNECT_DELAY_S", "0")))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(boot["address"])
    sock.sendall(struct.pack("!32sI", boot["token"].encode("ascii"), boot["rank"]))
    while os.getppid() == boot["parent_pid"]:  # silent, until killed or orphaned
        time.sleep(0.2)


if __name__ == "__main__":
    main()
