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

    def listen(app, sock, log_level):
        seen.append((app, sock.getsockname()[1]))

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
