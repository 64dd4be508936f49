"""A refused token limit is named as the client sent it: `max_completion_tokens` is not
reported as `max_tokens`, and a `min_tokens` beyond the limit says which limit."""

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import TINY  # noqa: E402

NAME = "tiny-gla-2"
C, H = "/v1/completions", "/v1/chat/completions"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def http():
    # No lifespan: each request here is refused before it would reach the engine.
    return TestClient(build_app(AsyncEngine(create_engine(**TINY)), NAME))


@pytest.mark.parametrize("path, body, param, needle", [
    # Observed: refused as "max_tokens must be an integer in [1, 2**63)", param max_tokens.
    (H, {**CHAT, "max_completion_tokens": 2 ** 63}, "max_completion_tokens",
     "max_completion_tokens"),
    (H, {**CHAT, "max_completion_tokens": 2 ** 70, "max_tokens": 5}, "max_completion_tokens",
     "max_completion_tokens"),
    (C, {"prompt": "a", "max_tokens": 2 ** 63}, "max_tokens", "max_tokens"),
    # Observed: "min_tokens must be at most max_tokens (5)": the client sent no max_tokens.
    (H, {**CHAT, "max_completion_tokens": 5, "min_tokens": 9}, "min_tokens",
     "min_tokens must be at most max_completion_tokens (5), got 9"),
    # Observed: "at most max_tokens (294)", a number the client never sent.
    (H, {**CHAT, "min_tokens": 400}, "min_tokens",
     "min_tokens must be at most the 294 tokens the context leaves after the prompt"),
], ids=["max_completion_tokens", "both", "completions", "min-over-max", "min-over-context"])
def test_token_limits_are_refused_by_the_name_sent(http, path, body, param, needle):
    r = http.post(path, json={"model": NAME, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and needle in error["message"], error
