"""vLLM's extra body fields allowed_token_ids, bad_words and truncate_prompt_tokens on
/v1/completions and /v1/chat/completions: they reach the engine as the Python API's
`SamplingParams` do, and bad values get a 400 naming the field."""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import LLM, SamplingParams  # noqa: E402
from tests.server.conftest import C, H, NAME, TINY, tiny_server, wait_idle  # noqa: E402



@pytest.fixture(scope="module")
def server():
    with tiny_server() as (base, engine):
        yield base, engine


def post(base, path, body):
    return httpx.post(base + path, content=json.dumps(body).encode(), trust_env=False,
                      headers={"content-type": "application/json"}, timeout=60)


def chat(**kw):
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}


def cmpl(**kw):
    return {"model": NAME, "prompt": "hi", "max_tokens": 2, **kw}


BAD = [  # (id, path, body, param)
    ("allowed_token_ids empty", C, cmpl(allowed_token_ids=[]), "allowed_token_ids"),
    ("chat allowed_token_ids empty", H, chat(allowed_token_ids=[]), "allowed_token_ids"),
    ("allowed_token_ids negative", C, cmpl(allowed_token_ids=[-1]), "allowed_token_ids"),
    ("allowed_token_ids past the vocabulary", H, chat(allowed_token_ids=[5, 100000]),
     "allowed_token_ids"),
    ("allowed_token_ids str", C, cmpl(allowed_token_ids="5"), "allowed_token_ids"),
    ("allowed_token_ids float", C, cmpl(allowed_token_ids=[5.0]), "allowed_token_ids[0]"),
    ("bad_words str", C, cmpl(bad_words="word"), "bad_words"),
    ("bad_words empty word", H, chat(bad_words=["ok", ""]), "bad_words"),
    ("bad_words blank word", C, cmpl(bad_words=["  "]), "bad_words"),
    ("bad_words many", C, cmpl(bad_words=[f"w{i}" for i in range(100)]), "bad_words"),
    ("bad_words long", H, chat(bad_words=["x" * 5000]), "bad_words"),
    ("truncate_prompt_tokens 0", C, cmpl(truncate_prompt_tokens=0), "truncate_prompt_tokens"),
    ("truncate_prompt_tokens -2", H, chat(truncate_prompt_tokens=-2), "truncate_prompt_tokens"),
    ("truncate_prompt_tokens str", C, cmpl(truncate_prompt_tokens="5"),
     "truncate_prompt_tokens"),
    ("truncate_prompt_tokens past the context", C, cmpl(truncate_prompt_tokens=321),
     "truncate_prompt_tokens"),
    ("chat truncate_prompt_tokens past the context", H, chat(truncate_prompt_tokens=10 ** 6),
     "truncate_prompt_tokens"),
]


@pytest.mark.parametrize("path,body,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_values_get_a_400_naming_the_field(server, path, body, param):
    base, _ = server
    r = post(base, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err


def _text(r, path):
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["text"] if path == C else choice["message"]["content"]


def _prompt(base, path):
    return [5, 6, 7] if path == C else post(base, "/tokenize", {
        "model": NAME, "messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]


@pytest.mark.parametrize("path", [C, H], ids=["completions", "chat"])
def test_allowed_token_ids_and_bad_words_reach_the_sampler(server, path):
    base, engine = server
    body = (lambda **kw: cmpl(prompt=[5, 6, 7], **kw)) if path == C else chat
    greedy = dict(max_tokens=8, temperature=0, ignore_eos=True)
    assert _text(post(base, path, body(allowed_token_ids=[65], **greedy)), path) == "A" * 8
    printable = list(range(97, 123))  # a-z: outputs that spell words
    llm = LLM(**TINY)
    prompt = _prompt(base, path)
    plain = llm.generate([prompt], SamplingParams(allowed_token_ids=printable, **greedy))[0]
    assert _text(post(base, path, body(allowed_token_ids=printable, **greedy)), path) == \
        plain.text
    word = plain.text[:2]
    want = llm.generate([prompt], SamplingParams(allowed_token_ids=printable, bad_words=[word],
                                                 **greedy))[0]
    assert word not in want.text and want.text != plain.text
    got = _text(post(base, path, body(allowed_token_ids=printable, bad_words=[word], **greedy)),
                path)
    assert got == want.text
    wait_idle(engine)


def test_completions_truncate_the_prompt(server):
    base, engine = server
    long = [3 + i % 90 for i in range(400)]  # past the 320-token context
    r = post(base, C, cmpl(prompt=long, max_tokens=6, temperature=0, ignore_eos=True))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = post(base, C, cmpl(prompt=long, max_tokens=6, temperature=0, ignore_eos=True,
                           truncate_prompt_tokens=12, echo=True))
    assert r.status_code == 200, r.text
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    llm = LLM(**TINY)
    want = llm.generate([long[-12:]], greedy)[0]
    assert r.json()["usage"]["prompt_tokens"] == 12
    assert r.json()["choices"][0]["text"] == llm.engine.tokenizer.decode(long[-12:]) + want.text
    # A text too long for the context, cut to its last tokens: -1 keeps as many as leave
    # room for one (max_tokens still has to fit beside them, as in vLLM).
    text = "ab" * 400 + "cd"
    r = post(base, C, cmpl(prompt=text, max_tokens=6, truncate_prompt_tokens=-1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    r = post(base, C, cmpl(prompt=text, max_tokens=1, temperature=0, ignore_eos=True,
                           truncate_prompt_tokens=-1))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 319
    wait_idle(engine)


def test_chat_truncates_the_conversation(server):
    base, engine = server
    messages = [{"role": "user", "content": "x" * 2000 + " the end"}]
    r = post(base, H, {"model": NAME, "messages": messages, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = post(base, H, {"model": NAME, "messages": messages, "max_tokens": 4, "temperature": 0,
                       "ignore_eos": True, "truncate_prompt_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 16
    ids = post(base, "/tokenize", {"model": NAME, "messages": [{"role": "user",
                                                                "content": "the end"}]}).json()
    want = LLM(**TINY).generate([ids["tokens"][-16:]], SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert r.json()["choices"][0]["message"]["content"] == want.text
    wait_idle(engine)
