"""Streamed chunks in OpenAI's format where a client may check it field by field."""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from tests.server.conftest import C, H, NAME, tiny_server, wait_idle  # noqa: E402



@pytest.fixture(scope="module")
def server():
    with tiny_server() as (base, engine), \
            httpx.Client(base_url=base, trust_env=False, timeout=60) as http:
        yield http, engine


def events(response) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:])
            for line in response.text.splitlines() if line.startswith("data: ")]


@pytest.mark.parametrize("path", [C, H], ids=["completions", "chat"])
def test_with_include_usage_every_chunk_but_the_last_has_a_null_usage(server, path):
    """OpenAI's stream_options.include_usage: "an additional chunk will be streamed before
    the data: [DONE] message [...] with the usage [...] and the choices field will always be
    an empty array. All other chunks will also include a usage field, but with a null value."
    Observed: the other chunks had no usage field at all."""
    http, engine = server
    body = {"model": NAME, "max_tokens": 5, "ignore_eos": True, "n": 2, "stream": True,
            "stream_options": {"include_usage": True}}
    body |= {"prompt": "ab"} if path == C else {"messages": [{"role": "user", "content": "ab"}]}
    docs = events(http.post(path, json=body))
    assert docs[-1] == "[DONE]"
    *chunks, last = docs[:-1]
    assert chunks and all("usage" in d and d["usage"] is None for d in chunks), chunks
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    # Without include_usage no chunk speaks of usage.
    body.pop("stream_options")
    assert all("usage" not in d for d in events(http.post(path, json=body))[:-1])
    wait_idle(engine)
