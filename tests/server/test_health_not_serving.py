"""/health says what a request would meet: an app whose engine thread never started (its
lifespan never ran) answers every request 503 at once, so its /health answers 503 too, with
the same reason, rather than "ok" to a load balancer that then sends it all its traffic."""

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import NAME, TINY  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return create_engine(**TINY)


def test_health_is_503_while_no_engine_thread_takes_requests(engine):
    async_engine = AsyncEngine(engine)
    app = build_app(async_engine, NAME)
    http = TestClient(app)  # no `with`: no lifespan, no engine thread
    request = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert request.status_code == 503
    health = http.get("/health")
    assert health.status_code == 503, health.text
    assert health.json() == {"status": "error", "message": request.json()["error"]["message"]}
    with TestClient(app) as served:  # the lifespan starts the engine thread: serving
        assert served.get("/health").json() == {"status": "ok"}
        assert served.post("/v1/completions",
                           json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    health = http.get("/health")  # shut down with the lifespan
    assert health.status_code == 503 and "shutting down" in health.json()["message"]
