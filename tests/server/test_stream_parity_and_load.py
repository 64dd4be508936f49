"""What a streamed answer says is what the same request says unstreamed (stop strings that
span tokens, logprobs' text offsets); huge bodies do not stall the event loop for everyone
else; the router's own errors come back in OpenAI's format."""

import asyncio
import json
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.server import app as app_module  # noqa: E402
from hwattn.server.protocol import APIError, CompletionRequest, ServerLimits, parse  # noqa: E402
from tests.server.conftest import C, H, NAME, tiny_server, wait_idle  # noqa: E402

# Seeded sampling: varied text (greedy output of the random tiny model repeats one character).
SEEDED = {"model": NAME, "max_tokens": 16, "temperature": 0.8, "seed": 7, "ignore_eos": True}


@pytest.fixture(scope="module")
def server():
    with tiny_server() as (base, engine):
        yield base, engine


def streamed(base, path, body) -> list[dict]:
    chunks = []
    with httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream("POST", base + path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    doc = json.loads(line[6:])
                    assert "error" not in doc, doc
                    chunks.append(doc)
    return chunks


def joined(chunks, n) -> tuple[list[str], list]:
    texts, reasons = [""] * n, [None] * n
    for doc in chunks:
        for c in doc["choices"]:
            texts[c["index"]] += c.get("text") or (c.get("delta") or {}).get("content") or ""
            reasons[c["index"]] = c["finish_reason"] or reasons[c["index"]]
    return texts, reasons


def unstreamed(base, path, body) -> dict:
    r = httpx.post(base + path, json=body, trust_env=False, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("path", [C, H])
def test_a_stop_string_spanning_tokens_streams_the_unstreamed_text(server, path):
    """A stop string made of several tokens: its first tokens' text was already streamed when
    the last one ends the output and the engine cuts the text back, so the stream said more
    than the answer (e.g. 'h<Oz' streamed, 'h<O' unstreamed, for stop 'zS')."""
    base, engine = server
    extra = {"prompt": "hello"} if path == C else \
        {"messages": [{"role": "user", "content": "hello"}]}

    def text_of(doc):
        return [c["text"] if path == C else c["message"]["content"] for c in doc["choices"]]

    full = text_of(unstreamed(base, path, {**SEEDED, **extra}))[0]
    assert len(full) >= 9
    for stop in (full[3:5], full[5:9], [full[6:8], full[4:7]]):
        body = {**SEEDED, **extra, "stop": stop}
        want = text_of(unstreamed(base, path, body))
        stops = [stop] if isinstance(stop, str) else stop
        assert want[0] == full[:min(full.find(s) for s in stops)]
        texts, reasons = joined(streamed(base, path, body), 1)
        assert texts == want, (stop, texts, want)
        assert reasons == ["stop"]
        # Kept in the output, nothing is cut back: nothing needs holding back.
        body["include_stop_str_in_output"] = True
        assert joined(streamed(base, path, body), 1)[0] == text_of(unstreamed(base, path, body))
    wait_idle(engine)
    engine.check_invariants()


def test_streamed_n_choices_with_stop_strings_match_unstreamed(server):
    base, engine = server
    body = {**SEEDED, "prompt": ["ab", "cd"], "n": 2}
    full = [c["text"] for c in unstreamed(base, C, body)["choices"]]
    body["stop"] = [t[4:6] for t in full]
    want = [c["text"] for c in unstreamed(base, C, body)["choices"]]
    assert joined(streamed(base, C, body), 4)[0] == want
    wait_idle(engine)
    engine.check_invariants()


def test_streamed_logprobs_text_offsets_count_on_across_chunks(server):
    """vLLM's streamed `text_offset` counts from the start of the choice's text (its
    `previous_text_lens`), as the unstreamed answer's does; here every chunk restarted at 0."""
    base, engine = server
    for extra in ({"prompt": "hello there", "n": 2, "logprobs": 2},
                  {"prompt": ["ab", "cd"], "n": 2, "logprobs": 1, "echo": True}):
        body = {**SEEDED, "max_tokens": 8, **extra}
        want = unstreamed(base, C, body)["choices"]
        got = {}
        for doc in streamed(base, C, body):
            for c in doc["choices"]:
                lp = got.setdefault(c["index"], {"tokens": [], "text_offset": []})
                if c["logprobs"] is not None:
                    lp["tokens"] += c["logprobs"]["tokens"]
                    lp["text_offset"] += c["logprobs"]["text_offset"]
        for c in want:
            assert got[c["index"]]["tokens"] == c["logprobs"]["tokens"]
            assert got[c["index"]]["text_offset"] == c["logprobs"]["text_offset"], extra
    wait_idle(engine)
    engine.check_invariants()


def test_a_stop_string_seen_before_min_tokens_does_not_cut_the_output_later(server):
    """A stop string that appeared while `min_tokens` held stops off does not end the output
    once they are allowed (vLLM looks for each stop string only where it may end in the new
    text). With a longer stop string beside it, the engine searched a window as long as the
    longest one and found the old match: 'h' after 4 tokens, shorter than min_tokens."""
    base, engine = server
    body = {**SEEDED, "prompt": "hello"}
    full = unstreamed(base, C, body)["choices"][0]["text"]
    assert full.isascii() and len(full) == 16  # a character a token
    early = full[1]
    body.update(min_tokens=3, stop=[early, "a stop string that never shows up"])
    later = full.find(early, 3)
    want = full if later < 0 else full[:later]
    got = unstreamed(base, C, body)["choices"][0]
    assert got["text"] == want, (early, got)
    assert joined(streamed(base, C, body), 1)[0] == [want]
    wait_idle(engine)


def test_every_chunk_of_a_stream_has_the_same_created_time(server, monkeypatch):
    """OpenAI: each chunk of a stream has the same `created` timestamp (vLLM's too). Every
    chunk read the clock again (here a clock a second later at each reading)."""
    base, _ = server
    clock = iter(range(1_000_000_000, 2_000_000_000))
    monkeypatch.setattr(app_module, "time", SimpleNamespace(time=lambda: next(clock)))
    for path, extra in ((C, {"prompt": "hello"}),
                        (H, {"messages": [{"role": "user", "content": "hello"}]})):
        chunks = streamed(base, path, {**SEEDED, **extra, "max_tokens": 4,
                                       "stream_options": {"include_usage": True}})
        assert len(chunks) >= 3
        assert len({c["created"] for c in chunks}) == 1, [c["created"] for c in chunks]


def test_millions_of_tiny_prompts_are_refused_without_looking_at_each():
    """`prompt` with 3 million one-token prompts: every prompt was type-checked (on the event
    loop, about 2 s on the test machine, /health stalled as long) before they were counted."""
    body = {"model": NAME, "prompt": [[1]] * 3_000_000, "max_tokens": 1}
    start = time.perf_counter()
    with pytest.raises(APIError) as err:
        parse(CompletionRequest, body, ServerLimits())
    assert time.perf_counter() - start < 0.2
    assert err.value.param == "prompt" and "3000000 prompts" in err.value.message


def health_during(base, path, body, after_s):
    """POST `body` to `path`, then `after_s` later time GET /health while it is still pending:
    (the POST's response, /health's response, its seconds)."""
    async def main():
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=60) as http:
            pending = asyncio.create_task(http.post(path, json=body))
            await asyncio.sleep(after_s)
            start = time.perf_counter()
            health = await http.get("/health")
            health_s = time.perf_counter() - start
            assert not pending.done()
            return await pending, health, health_s

    return asyncio.run(main())


def test_detokenize_runs_off_the_event_loop(server, monkeypatch):
    """A slow detokenization (2 s, injected: as millions of ids in a 16 MB body take) holds
    its own request only; /health answers meanwhile. It ran on the event loop."""
    base, engine = server
    decode = engine.tokenizer.decode

    def slow(ids, *args, **kw):
        if ids[:2] == [115, 108]:  # "sl"
            time.sleep(2.0)
        return decode(ids, *args, **kw)

    monkeypatch.setattr(engine.tokenizer, "decode", slow)

    detok, health, health_s = health_during(base, "/detokenize", {"tokens": [115, 108]}, 0.2)
    assert detok.status_code == 200 and detok.json() == {"prompt": "sl"}
    assert health.status_code == 200 and health_s < 1.0


def test_a_large_body_is_validated_off_the_event_loop(server, monkeypatch):
    """Validating a body of millions of list items (a flat 7-million-id prompt: 0.5 s here)
    ran on the event loop after its JSON had been parsed off it. Injected: 2 s to validate
    any body over 64 KiB."""
    base, _ = server
    real = app_module.parse

    def slow(schema, body, limits):
        if len(json.dumps(body)) > 1 << 16:
            time.sleep(2.0)
        return real(schema, body, limits)

    monkeypatch.setattr(app_module, "parse", slow)

    big = {"model": NAME, "prompt": [1] * 40_000, "max_tokens": 1}
    r, health, health_s = health_during(base, C, big, 0.3)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert health.status_code == 200 and health_s < 1.0


@pytest.mark.parametrize("method,path,status", [("POST", "/v1/embeddings", 404),
                                                ("GET", "/v1/completions", 405),
                                                ("DELETE", "/tokenize", 405)])
def test_unknown_routes_and_methods_get_openai_style_errors(server, method, path, status):
    """They came back as FastAPI's `{"detail": "Not Found"}`, unlike every other error."""
    base, _ = server
    r = httpx.request(method, base + path, trust_env=False, timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and path in err["message"]
    if status == 405:
        assert "POST" in r.headers["allow"]
