"""The server asks the engine for "delta" outputs (what is new each step), streamed or not,
and streams exactly the bytes it streamed when it read cumulative outputs: each stream is
compared with today's stream rebuilt from the same request's cumulative outputs (stop
strings held back and cut, multi-byte characters split over tokens, log-probabilities and
their text offsets, n > 1, echo, include_usage)."""

import asyncio
import dataclasses
import json
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.server.formats import chat_logprobs, completion_logprobs, top  # noqa: E402
from hwattn.server.protocol import (ChatRequest, CompletionRequest, ServerLimits,  # noqa: E402
                                    parse)
from tests.server.conftest import TINY, serving, wait_idle  # noqa: E402

NAME = "tiny-gla-2"
C, H = "/v1/completions", "/v1/chat/completions"
# A few ASCII letters and the UTF-8 bytes of "é" and "€": multi-byte characters split over
# tokens, and stop strings that begin in one step and end in a later one.
ALPHABET = [ord(c) for c in "abc "] + [0xC3, 0xA9, 0xE2, 0x82, 0xAC]
BASE = {"model": NAME, "max_tokens": 24, "temperature": 0.9, "ignore_eos": True,
        "allowed_token_ids": ALPHABET}
BODIES = [
    (C, {**BASE, "prompt": "hello", "seed": 3, "n": 2, "logprobs": 2, "stop": ["bb", "c é"],
         "stream_options": {"include_usage": True}}),
    (C, {**BASE, "prompt": "hi", "seed": 4, "logprobs": 1, "echo": True, "stop": ["aa"]}),
    (C, {**BASE, "prompt": "x", "seed": 5, "stop": ["ab"], "include_stop_str_in_output": True,
         "stream_options": {"include_usage": True}}),
    (C, {**BASE, "prompt": "yo", "seed": 9, "n": 3, "stop": ["cab é€ a", "ba"]}),
    (H, {**BASE, "messages": [{"role": "user", "content": "hello"}], "seed": 6, "n": 2,
         "logprobs": True, "top_logprobs": 2, "stop": ["cc", "é"],
         "stream_options": {"include_usage": True}}),
    (H, {**BASE, "messages": [{"role": "user", "content": "hey"}], "temperature": 0,
         "stop": ["  a"]}),
]


@pytest.fixture(scope="module")
def server():
    # No prefix cache: the second run of a prompt computes it as the first did (a cached
    # prefix may change the last bits of a log-probability).
    engine = create_engine(**TINY, enable_prefix_caching=False)
    kinds = []
    real_add, real_step = engine.add_request, engine.step

    def add_request(prompt, params, **kw):
        kinds.append(params.output_kind)
        return real_add(prompt, params, **kw)

    def step():
        # A step that takes a while: the server's stream sends each step's output before
        # the next comes (outputs it joins would make fewer, longer chunks).
        outputs = real_step()
        time.sleep(0.01)
        return outputs

    engine.add_request, engine.step = add_request, step
    async_engine = AsyncEngine(engine)
    with serving(build_app(async_engine, NAME)) as base:
        yield base, engine, async_engine, kinds


def stream_bytes(base, path, body) -> str:
    with httpx.Client(trust_env=False, timeout=60) as http:
        with http.stream("POST", base + path, json={**body, "stream": True}) as r:
            assert r.status_code == 200, r.read()
            return b"".join(r.iter_bytes()).decode()


def cumulative_outputs(async_engine, ids, params) -> list:
    """The request's outputs step by step, asked for as "cumulative" ones."""
    params = dataclasses.replace(params, output_kind="cumulative")

    async def collect():
        return [out async for out in async_engine.generate(ids, params, f"ref-{time.time()}")]

    return asyncio.run(collect())


def sse(doc) -> str:
    return f"data: {json.dumps(doc) if not isinstance(doc, str) else doc}\n\n"


def todays_stream(path, body, outs, rid, created, decode, prompt_text) -> str:
    """The stream the server sent for `outs` (one request's cumulative outputs) before it read
    deltas: each choice's text since its last chunk, less the last characters a stop string
    may still cut, with the log-probabilities of its tokens since its last chunk."""
    n, include_usage = body.get("n", 1), bool(body.get("stream_options"))
    stop = body.get("stop") or []
    hold = 0 if not stop or body.get("include_stop_str_in_output") else max(map(len, stop)) - 1
    chat, echo = path == H, body.get("echo", False)
    want = body.get("logprobs") is not None and not chat
    offsets = {}

    def chunk(index, text, c, start, out, is_first, usage=None):
        doc = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
               "created": created, "model": NAME, "choices": []}
        if index is not None and chat:
            lps = None if not body.get("logprobs") else chat_logprobs(
                zip(c.token_ids[start:], c.logprobs[start:]), decode, body["top_logprobs"])
            doc["choices"] = [{"index": index, "delta": {"content": text} if text else {},
                               "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                               "logprobs": lps}]
        elif index is not None:
            tokens = c.token_ids[start:]
            entries = list(zip(tokens, c.logprobs[start:] if want else [None] * len(tokens)))
            if echo and is_first:
                prompt = out.prompt_token_ids
                lps = [top(p, t, body["logprobs"]) for t, p in zip(prompt, out.prompt_logprobs)] \
                    if want else [None] * len(prompt)
                entries = list(zip(prompt, lps)) + entries
                text = prompt_text + text
            lps = None
            if want:
                lps = completion_logprobs(entries, decode, offsets.get(index, 0))
                if lps["tokens"]:
                    offsets[index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
            doc["choices"] = [{"index": index, "text": text, "logprobs": lps,
                               "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]
        if usage is not None:
            doc["usage"] = usage
        return doc

    lines = []

    def event(doc):
        if include_usage:
            doc.setdefault("usage", None)
        lines.append(sse(doc))

    if chat:
        event({"id": rid, "object": "chat.completion.chunk", "created": created, "model": NAME,
               "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                            "finish_reason": None, "logprobs": None} for i in range(n)]})
    sent, done = {}, set()
    for out in outs:
        for c in out.outputs:
            if c.index in done:
                continue
            is_first = c.index not in sent
            chars, tokens = sent.get(c.index, (0, 0))
            end = len(c.text)
            if hold and not c.finished:
                end = max(chars, end - hold)
            text = c.text[chars:end]
            if not (text or c.finished or (is_first and echo)):
                continue
            sent[c.index] = (chars + len(text), len(c.token_ids))
            if c.finished:
                done.add(c.index)
            event(chunk(c.index, text, c, tokens, out, is_first))
    if include_usage:
        p = len(outs[-1].prompt_token_ids)
        k = sum(len(c.token_ids) for c in outs[-1].outputs)
        event(chunk(None, None, None, None, None, None,
                    usage={"prompt_tokens": p, "completion_tokens": k, "total_tokens": p + k}))
    lines.append(sse("[DONE]"))
    return "".join(lines)


def engine_request(base, engine, path, body):
    """(prompt ids, params, echoed prompt text) as the server makes them for `body`."""
    if path == C:
        req = parse(CompletionRequest, body, ServerLimits())
        asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None)
                 if k is not None]
        params = req.sampling(req.max_tokens, logprobs=req.logprobs,
                              prompt_logprobs=max(asked) if asked else None)
        return engine.validate_prompt(req.prompt[0]), params, req.prompt[0]
    req = parse(ChatRequest, body, ServerLimits())
    r = httpx.post(base + "/tokenize", json={"model": NAME, "messages": body["messages"]},
                   trust_env=False, timeout=60)
    params = req.sampling(req.max_tokens, logprobs=req.top_logprobs if req.logprobs else None)
    return r.json()["tokens"], params, None


@pytest.mark.parametrize("path,body", BODIES, ids=[f"{p[4:]}-{i}" for i, (p, _) in
                                                   enumerate(BODIES)])
def test_a_stream_is_the_bytes_cumulative_outputs_made(server, path, body):
    base, engine, async_engine, _ = server
    got = stream_bytes(base, path, body)
    first = json.loads(got.split("\n\n")[0][len("data: "):])
    ids, params, prompt_text = engine_request(base, engine, path, body)
    outs = cumulative_outputs(async_engine, ids, params)
    want = todays_stream(path, body, outs, first["id"], first["created"],
                         lambda t: engine.tokenizer.decode([t]), prompt_text)
    assert got == want
    wait_idle(engine)
    engine.check_invariants()


def test_the_server_asks_for_delta_outputs_and_joins_them_unstreamed(server):
    """Streamed or not, the engine builds only what is new each step for the server's
    requests; an unstreamed answer (its text, tokens' log-probabilities, usage) is what the
    joined stream says."""
    base, engine, _, kinds = server
    body = dict(BODIES[0][1])
    del kinds[:]
    streamed = stream_bytes(base, C, body)
    del body["stream_options"]
    r = httpx.post(base + C, json=body, trust_env=False, timeout=60)
    assert r.status_code == 200, r.text
    assert kinds == ["delta", "delta"]
    texts, tokens = ["", ""], [[], []]
    usage = None
    for line in streamed.split("\n\n"):
        if line.startswith("data: {"):
            doc = json.loads(line[6:])
            usage = doc["usage"] or usage
            for c in doc["choices"]:
                texts[c["index"]] += c["text"]
                tokens[c["index"]] += (c["logprobs"] or {}).get("tokens", [])
    answer = r.json()
    assert [c["text"] for c in answer["choices"]] == texts
    assert [c["logprobs"]["tokens"] for c in answer["choices"]] == tokens
    assert answer["usage"] == usage
    assert any("é" in t or "\ufffd" in t for t in texts)
    wait_idle(engine)
