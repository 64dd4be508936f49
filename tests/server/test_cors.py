"""CORS as vLLM's options set it (allowed origins, methods, headers, credentials), but off
unless an origin is named: without one no Access-Control-* header is ever sent, so no web
page a user opens can read the server's answers."""

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import TINY  # noqa: E402

NAME = "tiny-gla-2"
SITE = "http://localhost:3000"


def preflight(http, origin=SITE, method="POST", path="/v1/completions"):
    return http.options(path, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers":
                                           "authorization, content-type"})


def cors_headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


@pytest.fixture(scope="module")
def engine():
    return create_engine(**TINY)


def app(engine, **kw):
    return TestClient(build_app(AsyncEngine(engine), NAME, **kw))  # no lifespan: none needed


def test_no_origin_no_cors(engine):
    http = app(engine)
    r = preflight(http)
    assert r.status_code == 405 and not cors_headers(r), r.headers
    r = http.get("/v1/models", headers={"Origin": SITE})
    assert r.status_code == 200 and not cors_headers(r), r.headers


def test_a_named_origin_passes_preflight_before_the_api_key(engine):
    http = app(engine, api_key="k", allowed_origins=[SITE])
    r = preflight(http)  # a browser's preflight carries no Authorization header
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == SITE
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in r.headers
    r = http.get("/v1/models", headers={"Origin": SITE, "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == SITE
    assert http.get("/v1/models", headers={"Origin": SITE}).status_code == 401
    other = preflight(http, origin="http://evil.example")
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    r = http.get("/v1/models", headers={"Origin": "http://evil.example",
                                        "Authorization": "Bearer k"})
    assert "access-control-allow-origin" not in r.headers


def test_methods_headers_and_credentials_are_honoured(engine):
    http = app(engine, allowed_origins=["*"], allowed_methods=["GET"],
               allowed_headers=["content-type"], allow_credentials=True)
    r = preflight(http, method="GET", path="/v1/models")
    assert r.status_code == 400, r.text  # authorization is not an allowed header
    r = http.options("/v1/models", headers={"Origin": SITE,
                                             "Access-Control-Request-Method": "GET"})
    assert r.status_code == 200 and r.headers["access-control-allow-credentials"] == "true"
    # With credentials a wildcard is answered with the caller's origin, as browsers require.
    assert r.headers["access-control-allow-origin"] == SITE
    r = http.options("/v1/completions", headers={"Origin": SITE,
                                                  "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400, r.text


@pytest.mark.parametrize("kw, name", [
    (dict(allowed_methods=["GET"]), "allowed_methods"),
    (dict(allowed_headers=["x-a"]), "allowed_headers"),
    (dict(allow_credentials=True), "allow_credentials"),
])
def test_cors_options_without_an_origin_are_refused(engine, kw, name):
    with pytest.raises(ValueError, match=f"{name} need allowed_origins"):
        build_app(AsyncEngine(engine), NAME, **kw)


def test_an_unexpected_error_still_carries_the_cors_headers(engine):
    """A route failing unexpectedly answers its 500 (in the OpenAI format) with the CORS
    headers too: without them the page sees a network error, not the server's answer."""
    async_engine = AsyncEngine(engine)

    def broken():
        raise RuntimeError("health check broke")

    async_engine.health = broken
    http = TestClient(build_app(async_engine, NAME, allowed_origins=[SITE]),
                      raise_server_exceptions=False)
    r = http.get("/health", headers={"Origin": SITE})
    assert r.status_code == 500, r.text
    assert r.json()["error"] == {"message": "internal error: RuntimeError",
                                 "type": "server_error", "param": None, "code": None}
    assert r.headers["access-control-allow-origin"] == SITE
    # Without CORS the same 500 comes from starlette's outermost handler, as before.
    plain = TestClient(build_app(async_engine, NAME), raise_server_exceptions=False)
    r = plain.get("/health", headers={"Origin": SITE})
    assert r.status_code == 500 and not cors_headers(r)


def test_an_empty_list_of_methods_or_headers_allows_none(engine):
    """`allowed_methods=[]` (`--allowed-methods '[]'`) allows no method rather than every one
    (only None means the default "*"), and is refused without an origin as any list is."""
    http = app(engine, allowed_origins=[SITE], allowed_methods=[])
    assert preflight(http).status_code == 400
    http = app(engine, allowed_origins=[SITE], allowed_headers=[])
    r = preflight(http)  # asks for authorization and content-type
    assert r.status_code == 400, r.text
    with pytest.raises(ValueError, match="allowed_headers need allowed_origins"):
        build_app(AsyncEngine(engine), NAME, allowed_headers=[])
