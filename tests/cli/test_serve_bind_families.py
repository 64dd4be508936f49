"""`hwattn serve` binds before loading, one socket per address its --host names, as uvicorn's
asyncio server binds them; and, as that server does, it passes over an address of a family
the machine cannot make sockets of (a kernel without IPv6, booted with ipv6.disable=1: its
/etc/hosts still lists "::1 localhost", but socket(AF_INET6) fails with EAFNOSUPPORT),
serving on the others, rather than refusing to start."""

from __future__ import annotations

import asyncio
import socket

import pytest

NO_FAMILY = 9999  # no kernel has this address family: socket() fails as for IPv6 turned off


def _names(monkeypatch, entries):
    """`socket.getaddrinfo` lists `entries` ((family, address) pairs) for the host "dual"."""
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kw):
        if host != "dual":
            return real(host, port, *args, **kw)
        return [(family, socket.SOCK_STREAM, 6, "",
                 (address, port or 0) if family == socket.AF_INET else (address, port or 0, 0, 0))
                for family, address in entries]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def _asyncio_binds(host: str) -> list[str]:
    """The addresses asyncio's `create_server` (uvicorn's server) listens on for `host`."""
    async def main():
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, 0)
        try:
            return [s.getsockname()[0] for s in server.sockets]
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_an_address_family_the_machine_lacks_is_passed_over_as_uvicorn_does(monkeypatch):
    import hwattn.cli.serve as serve_cli

    _names(monkeypatch, [(NO_FAMILY, "::1"), (socket.AF_INET, "127.0.0.1")])
    assert _asyncio_binds("dual") == ["127.0.0.1"]  # uvicorn serves the IPv4 loopback
    socks = serve_cli.bind("dual", 0)
    try:
        assert [s.getsockname()[0] for s in socks] == ["127.0.0.1"]
        assert socks[0].getsockname()[1] != 0
    finally:
        for s in socks:
            s.close()


def test_a_host_with_no_address_to_bind_is_refused_by_name(monkeypatch):
    """Where asyncio would serve on no socket at all, `hwattn serve` says so at once."""
    import hwattn.cli.serve as serve_cli

    _names(monkeypatch, [(NO_FAMILY, "::1")])
    with pytest.raises(OSError, match="--host dual --port 0: cannot listen there"):
        serve_cli.bind("dual", 0)


def test_a_port_in_use_is_still_refused(monkeypatch):
    import hwattn.cli.serve as serve_cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _names(monkeypatch, [(socket.AF_INET, "127.0.0.1")])
        with pytest.raises(OSError, match=f"--host dual --port {port}: cannot listen there"):
            serve_cli.bind("dual", port)
