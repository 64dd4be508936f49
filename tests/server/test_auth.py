"""`--api-key` / HWATTN_API_KEY: every /v1 route wants `Authorization: Bearer KEY` (compared
as UTF-8 bytes in constant time, so any Unicode key works) and answers 401 in OpenAI's error
format without it; /health stays open, /metrics and the API docs too unless
`--protect-metrics`; the official client and the load generator authenticate with the key."""

import asyncio

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from starlette.testclient import TestClient  # noqa: E402

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server import app as app_module  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.bench.serve import HttpTarget, run_load  # noqa: E402
from tests.server.conftest import NAME, TINY, tiny_server, wait_idle  # noqa: E402

KEY = "sekrit-0123"
BODY = {"model": NAME, "prompt": "hi", "max_tokens": 3}


@pytest.fixture(scope="module")
def server():
    with tiny_server(api_key=KEY) as (base, engine):
        yield base, engine


def test_requests_without_the_key_get_401(server, monkeypatch):
    base, engine = server
    compared = []
    digest = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest",
                        lambda a, b: compared.append(1) or digest(a, b))
    with httpx.Client(base_url=base, trust_env=False, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"),
                                 ("POST", "/v1/chat/completions")):
                r = http.request(method, path, headers=headers, json=BODY)
                assert r.status_code == 401, (path, headers, r.text)
                err = r.json()["error"]
                assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
                assert r.headers["www-authenticate"] == "Bearer"
        assert compared, "the key must be compared with hmac.compare_digest"
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200
        ok = {"Authorization": f"Bearer {KEY}"}
        assert http.post("/v1/completions", headers=ok, json=BODY).status_code == 200
    wait_idle(engine)


def test_clients_with_the_key_are_served(server, monkeypatch):
    base, engine = server
    with httpx.Client(trust_env=False, timeout=60) as http:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, http_client=http, max_retries=0)
        assert [m.id for m in client.models.list().data] == [NAME]
        r = client.chat.completions.create(model=NAME, max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.role == "assistant"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="nope", http_client=http,
                          max_retries=0).completions.create(model=NAME, prompt="x")
    monkeypatch.setenv("HWATTN_API_KEY", KEY)  # the load generator takes the key from there
    doc = asyncio.run(run_load(HttpTarget(base), [[1, 2, 3]] * 4, max_tokens=4,
                               max_concurrency=2, request_rate=None, seed=0))
    assert doc["completed"] == 4, doc
    wait_idle(engine)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_command_takes_an_api_key(server, monkeypatch, how):
    from hwattn.cli import build_parser
    from hwattn.cli import serve as serve_cli

    _, engine = server
    apps = []
    monkeypatch.setattr(serve_cli, "engine_from_args", lambda args: engine)
    monkeypatch.setattr(engine, "shutdown", lambda: None)
    monkeypatch.setattr(serve_cli, "listen", lambda app, sock, log_level: apps.append(app))
    monkeypatch.delenv("HWATTN_API_KEY", raising=False)
    argv = ["serve", "tiny", "--attention", "gla-2", "--port", "0"]
    if how == "flag":
        argv += ["--api-key", "k1"]
    else:
        monkeypatch.setenv("HWATTN_API_KEY", "k1")
    args = build_parser().parse_args(argv)
    assert args.func(args) == 0
    http = TestClient(apps[0])  # no lifespan: only routes that need no generation are called
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200


UNICODE_KEY = "schlüssel-ключ-🔑"


def test_a_non_ascii_key_works_and_metrics_and_docs_can_be_protected(monkeypatch):
    """A key outside ASCII is compared as the UTF-8 bytes a client sends; /metrics and the API
    docs are open unless `protect_metrics`, and then want the key like /v1."""
    engine = create_engine(**TINY)
    good = {"Authorization": b"Bearer " + UNICODE_KEY.encode()}
    bad = {"Authorization": b"Bearer " + "schlussel-ключ-🔑".encode()}
    for protect in (False, True):
        # No lifespan: only routes that need no generation are called.
        http = TestClient(build_app(AsyncEngine(engine), NAME, api_key=UNICODE_KEY,
                                    protect_metrics=protect))
        assert http.get("/v1/models", headers=good).status_code == 200
        assert http.get("/v1/models", headers=bad).status_code == 401
        assert http.get("/v1/models").status_code == 401
        # Open, no key asked (503: no engine thread runs without the lifespan).
        assert http.get("/health").status_code == 503
        for path in ("/metrics", "/docs", "/redoc", "/openapi.json"):
            assert http.get(path).status_code == (401 if protect else 200), (path, protect)
            assert http.get(path, headers=good).status_code == 200, path
        assert "/v1/completions" in http.get("/openapi.json", headers=good).json()["paths"]
    with pytest.raises(ValueError, match="protect_metrics needs an api_key"):
        build_app(AsyncEngine(engine), NAME, protect_metrics=True)


def test_serve_command_takes_a_non_ascii_key_and_protects_metrics(server, monkeypatch):
    from hwattn.cli import build_parser
    from hwattn.cli import serve as serve_cli

    _, engine = server
    apps = []
    monkeypatch.setattr(serve_cli, "engine_from_args", lambda args: engine)
    monkeypatch.setattr(engine, "shutdown", lambda: None)
    monkeypatch.setattr(serve_cli, "listen", lambda app, sock, log_level: apps.append(app))
    monkeypatch.setenv("HWATTN_API_KEY", UNICODE_KEY)
    args = build_parser().parse_args(["serve", "tiny", "--protect-metrics", "--port", "0"])
    assert args.func(args) == 0
    http = TestClient(apps[0])
    assert http.get("/metrics").status_code == 401
    ok = {"Authorization": b"Bearer " + UNICODE_KEY.encode()}
    assert http.get("/metrics", headers=ok).status_code == 200
    monkeypatch.delenv("HWATTN_API_KEY")
    args = build_parser().parse_args(["serve", "tiny", "--protect-metrics", "--port", "0"])
    with pytest.raises(ValueError, match="--protect-metrics needs an API key"):
        args.func(args)
