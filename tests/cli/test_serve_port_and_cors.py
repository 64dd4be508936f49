"""`hwattn serve` says the port it listens on (the kernel's choice for --port 0), refuses a port
in use before it loads the model, and takes vLLM's CORS options (--allowed-origins,
--allowed-methods, --allowed-headers, --allow-credentials) with CORS off unless an origin is
named."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from tests.cli.test_arguments import assert_error, no_server, run_cli

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

TINY = ["--device", "cpu", "--memory-budget", "4e6", "--max-seq-len", "128", "--cpu-threads", "1"]


@pytest.fixture
def served(monkeypatch):
    """Run `hwattn serve` in-process up to the point it would serve: yields the list the
    (app, bound socket) pairs it would have served land in."""
    import hwattn.cli.serve as serve_cli

    seen = []

    def listen(app, socks, log_level):
        seen.append((app, socks[0].getsockname()[1]))

    monkeypatch.setattr(serve_cli, "listen", listen)
    return seen


def test_port_0_prints_the_port_bound(capsys, served):
    code, out, err = run_cli(capsys, "serve", "tiny", "--port", "0", *TINY)
    assert code == 0, err
    (_, port), = served
    assert port != 0
    assert re.search(rf"on http://127\.0\.0\.1:{port}/v1", out), out
    assert ":0/" not in out, out


def test_a_served_port_0_answers_where_it_said():
    """The whole command, as a user runs it: the printed address is the one that answers."""
    proc = subprocess.Popen([sys.executable, "-m", "hwattn", "serve", "tiny", "--port", "0",
                             *TINY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        found = re.search(r"on (http://127\.0\.0\.1:(\d+))/v1", line)
        assert found and found.group(2) != "0", line
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.get(found.group(1) + "/health", trust_env=False, timeout=5)
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.time() < deadline, line
                time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_port_in_use_is_said_before_the_model_loads(capsys, monkeypatch):
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "engine_from_args",
                        lambda args: pytest.fail("the model loaded before the port was bound"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_error(run_cli(capsys, "serve", "tiny", "--port", port, *TINY), f"--port {port}",
                     "cannot listen there", status=1)


def preflight(app, origin="http://localhost:3000"):
    from fastapi.testclient import TestClient

    return TestClient(app).options("/v1/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST"})


@pytest.mark.parametrize("origins", ['["http://localhost:3000"]',
                                     "http://a.example, http://localhost:3000"],
                         ids=["json", "commas"])
def test_allowed_origins_turn_cors_on(capsys, served, origins):
    code, out, err = run_cli(capsys, "serve", "tiny", "--port", "0", *TINY,
                             "--allowed-origins", origins, "--allowed-methods", '["post"]',
                             "--allow-credentials")
    assert code == 0, err
    assert "CORS: " in out and "http://localhost:3000" in out, out
    r = preflight(served[0][0])
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert r.headers["access-control-allow-credentials"] == "true"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "access-control-allow-origin" not in preflight(served[0][0], "http://b.example").headers


def test_without_allowed_origins_no_cors(capsys, served):
    code, out, err = run_cli(capsys, "serve", "tiny", "--port", "0", *TINY)
    assert code == 0, err
    r = preflight(served[0][0])
    assert r.status_code == 405
    assert not [k for k in r.headers if k.startswith("access-control-")], r.headers


@pytest.mark.parametrize("argv, needle", [
    (["--allowed-methods", "GET"], "--allowed-methods applies only with --allowed-origins"),
    (["--allowed-headers", "x-a", "--allow-credentials"],
     "--allowed-headers, --allow-credentials apply only with --allowed-origins"),
])
def test_cors_options_without_an_origin_are_refused(capsys, monkeypatch, argv, needle):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", *TINY, *argv), needle)


@pytest.mark.parametrize("value", ["http://a.example/", "localhost:3000", '["http://a", 5]',
                                   "[not json", "http://a,,http://b"])
def test_bad_origins_are_refused_by_name(capsys, monkeypatch, value):
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", *TINY, "--allowed-origins", value),
                 "--allowed-origins", argparse_style=True)


def _lifespan_app(fail: bool):
    """An app whose startup fails, or that stops its server (SIGINT) once it has started."""
    import asyncio
    import os
    import signal
    from contextlib import asynccontextmanager

    from fastapi import FastAPI

    @asynccontextmanager
    async def lifespan(app):
        if fail:
            raise RuntimeError("the engine thread could not start")
        asyncio.get_running_loop().call_later(0.3, os.kill, os.getpid(), signal.SIGINT)
        yield

    return FastAPI(lifespan=lifespan)


def test_listen_on_a_bound_socket_logs_where_and_fails_as_uvicorn_run(capfd):
    """Serving a socket bound beforehand keeps what `uvicorn.run` did: the "Uvicorn running
    on" line once started (uvicorn leaves it out for a socket it did not bind), and exit
    status 3 when the app's startup fails (recent uvicorn exits so itself; older ones within
    `uvicorn>=0.29` returned, as if the server had run)."""
    import hwattn.cli.serve as serve_cli

    socks = serve_cli.bind("127.0.0.1", 0)
    port = socks[0].getsockname()[1]
    try:
        assert serve_cli.listen(_lifespan_app(fail=False), socks, "info") == 0
    finally:
        socks[0].close()
    assert f"Uvicorn running on http://127.0.0.1:{port}" in capfd.readouterr().err
    socks = serve_cli.bind("127.0.0.1", 0)
    try:
        status = serve_cli.listen(_lifespan_app(fail=True), socks, "info")
    except SystemExit as exit_:
        status = exit_.code
    finally:
        socks[0].close()
    assert status == serve_cli.STARTUP_FAILURE == 3
    err = capfd.readouterr().err
    assert "Application startup failed" in err and "Uvicorn running on" not in err


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_hosts_are_bound_as_uvicorn_bound_them():
    """Bound before loading, a host still gets the sockets uvicorn's own server gave it: every
    address of a name (localhost: IPv4 and IPv6 loopback, on one port even for port 0), and an
    IPv6 address IPv6 alone (a dual-stack "::" would also take every IPv4 address)."""
    import hwattn.cli.serve as serve_cli

    names = {a[4][0] for a in socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM)}
    socks = serve_cli.bind("localhost", 0)
    try:
        assert {s.getsockname()[0] for s in socks} == names
        assert len({s.getsockname()[1] for s in socks}) == 1
    finally:
        for s in socks:
            s.close()
    socks = serve_cli.bind("::", 0)
    try:
        assert [s.family for s in socks] == [socket.AF_INET6]
        assert socks[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        socks[0].close()


def test_an_empty_cors_list_is_not_taken_for_the_default(capsys, monkeypatch, served):
    """--allowed-methods '[]' allows no method (not every one, the default's "*"), and like
    any value it needs --allowed-origins."""
    no_server(monkeypatch)
    assert_error(run_cli(capsys, "serve", "tiny", *TINY, "--allowed-methods", "[]"),
                 "--allowed-methods applies only with --allowed-origins")
    monkeypatch.undo()
    import hwattn.cli.serve as serve_cli

    monkeypatch.setattr(serve_cli, "listen",
                        lambda app, socks, log_level: served.append((app, 0)))
    code, out, err = run_cli(capsys, "serve", "tiny", "--port", "0", *TINY,
                             "--allowed-origins", "http://localhost:3000",
                             "--allowed-methods", "[]")
    assert code == 0, err
    assert preflight(served[-1][0]).status_code == 400
