"""/v1/chat/completions takes vLLM's template extras: `continue_final_message` (the prompt ends
inside the final message, a prefilled answer the model continues, with no end-of-turn token
after it), `chat_template_kwargs` (extra template variables) and the booleans checked by name,
each refusal a 400 naming its field. The prompt's token ids are read back exactly through
`prompt_logprobs` and compared with hand-built ones; the greedy answer is the offline
engine's greedy continuation of those ids."""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.data.tokenizer import EOT  # noqa: E402
from hwattn.engine import LLM, SamplingParams, create_engine  # noqa: E402
from hwattn.engine.chat import ChatTemplate  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from tests.server.conftest import serving, wait_idle  # noqa: E402

NAME = "m"
H = "/v1/chat/completions"
KW = dict(device="cpu", page_size=8, memory_budget=1 << 22, seed=0)
# The tests' tiny template, with an optional system line from a template variable and an
# end-of-turn special token after every message.
TEMPLATE = ("{% if persona %}### system: {{ persona }}\n{% endif %}"
            "{% for m in messages %}### {{ m.role }}: {{ m.content }}" + EOT + "\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:{% endif %}")
PREFILL = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the cat"}]


@pytest.fixture(scope="module")
def server(bpe_checkpoint):
    engine = create_engine(bpe_checkpoint, **KW)
    app = build_app(AsyncEngine(engine), NAME,
                    chat_template=ChatTemplate(bpe_checkpoint, TEMPLATE))
    with serving(app) as base, httpx.Client(base_url=base, trust_env=False, timeout=60) as http:
        yield http, engine


@pytest.fixture(scope="module")
def offline(bpe_checkpoint):
    return LLM(bpe_checkpoint, **KW)


def chat(http, **body):
    return http.post(H, json={"model": NAME, "max_tokens": 6, "temperature": 0,
                              "ignore_eos": True, **body})


def prompt_ids(answer: dict) -> list[int]:
    """The prompt's token ids, read from the answer's `prompt_logprobs` (0: each token's own
    entry alone; the first token has none, so it is returned as None)."""
    entries = answer["prompt_logprobs"]
    return [None] + [int(next(iter(e))) for e in entries[1:]]


def test_continue_final_message_continues_the_partial_answer(server, offline):
    http, engine = server
    tok = offline.tokenizer
    want = (tok.encode("### user: ") + tok.encode_text("hi")
            + tok.encode(EOT + "\n### assistant: ") + tok.encode_text("the cat"))
    r = chat(http, messages=PREFILL, add_generation_prompt=False, continue_final_message=True,
             prompt_logprobs=0)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert prompt_ids(answer)[1:] == want[1:] and answer["usage"]["prompt_tokens"] == len(want)
    greedy = offline.generate([want], SamplingParams(max_tokens=6, temperature=0,
                                                     ignore_eos=True))[0].outputs[0]
    message = answer["choices"][0]["message"]
    assert message == {"role": "assistant", "content": greedy.text}
    # Without it the final turn is closed (its end-of-turn token) and the answer differs.
    closed = chat(http, messages=PREFILL, add_generation_prompt=False, prompt_logprobs=0).json()
    assert prompt_ids(closed)[1:] == want[1:] + tok.encode(EOT + "\n")
    assert closed["choices"][0]["message"]["content"] != greedy.text
    # Streamed, the same text, the role said first.
    r = chat(http, messages=PREFILL, add_generation_prompt=False, continue_final_message=True,
             stream=True)
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == greedy.text
    wait_idle(engine)


def test_the_answer_is_the_final_messages_authors_without_a_generation_prompt(server):
    """As vLLM says it: without add_generation_prompt the answer continues the final
    message's author (here a user's unfinished question), not a new assistant turn."""
    http, engine = server
    messages = [{"role": "user", "content": "the dog sat"}]
    r = chat(http, messages=messages, add_generation_prompt=False, continue_final_message=True)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "user"
    r = chat(http, messages=messages)
    assert r.json()["choices"][0]["message"]["role"] == "assistant"
    wait_idle(engine)


def test_chat_template_kwargs_reach_the_template(server, offline):
    http, engine = server
    tok = offline.tokenizer
    messages = PREFILL[:1]
    r = chat(http, messages=messages, chat_template_kwargs={"persona": "a dog"},
             prompt_logprobs=0)
    assert r.status_code == 200, r.text
    want = (tok.encode("### system: a dog\n### user: ") + tok.encode_text("hi")
            + tok.encode(EOT + "\n### assistant:"))
    assert prompt_ids(r.json())[1:] == want[1:]
    assert r.json()["usage"]["prompt_tokens"] == len(want)
    # With it and continue_final_message together.
    r = chat(http, messages=PREFILL, chat_template_kwargs={"persona": "a dog"},
             add_generation_prompt=False, continue_final_message=True, prompt_logprobs=0)
    assert prompt_ids(r.json())[-len(tok.encode_text("the cat")):] == tok.encode_text("the cat")
    assert r.json()["usage"]["prompt_tokens"] == len(
        tok.encode("### system: a dog\n### user: ") + tok.encode_text("hi")
        + tok.encode(EOT + "\n### assistant: ") + tok.encode_text("the cat"))
    # null means not given, as for every optional field.
    plain = chat(http, messages=messages, chat_template_kwargs=None,
                 continue_final_message=None).json()
    assert plain["usage"]["prompt_tokens"] == len(
        tok.encode("### user: ") + tok.encode_text("hi") + tok.encode(EOT + "\n### assistant:"))
    wait_idle(engine)


@pytest.mark.parametrize("body, param, message", [
    (dict(continue_final_message=True), "continue_final_message",
     "continue_final_message and add_generation_prompt cannot both be true"),
    (dict(continue_final_message=True, add_generation_prompt=True), "continue_final_message",
     "cannot both be true"),
    (dict(continue_final_message="yes", add_generation_prompt=False), "continue_final_message",
     "continue_final_message"),
    (dict(continue_final_message=1, add_generation_prompt=False), "continue_final_message",
     "continue_final_message"),
    (dict(add_generation_prompt="false"), "add_generation_prompt", "add_generation_prompt"),
    (dict(add_generation_prompt=0), "add_generation_prompt", "add_generation_prompt"),
    (dict(chat_template_kwargs=["persona"]), "chat_template_kwargs",
     "chat_template_kwargs must be a dict of template variables, got list"),
    (dict(chat_template_kwargs="persona=x"), "chat_template_kwargs",
     "chat_template_kwargs must be a dict"),
    (dict(chat_template_kwargs={"messages": []}), "chat_template_kwargs",
     "chat_template_kwargs['messages'] would override the template's own variable messages"),
    (dict(chat_template_kwargs={"add_generation_prompt": False}), "chat_template_kwargs",
     "chat_template_kwargs['add_generation_prompt'] would override"),
    (dict(chat_template_kwargs={"bos_token": "<s>"}), "chat_template_kwargs",
     "chat_template_kwargs['bos_token'] would override"),
    (dict(chat_template_kwargs={"tools": []}), "chat_template_kwargs",
     "chat_template_kwargs['tools']: tool calling is not supported"),
    (dict(chat_template_kwargs={"persona": "a" + EOT}), "chat_template_kwargs",
     "chat_template_kwargs['persona'] holds the special token"),
    (dict(tools=[{"type": "function", "function": {"name": "f"}}]), "tools",
     "tools is not supported"),
])
def test_bad_chat_arguments_are_a_400_naming_them(server, body, param, message):
    http, engine = server
    r = chat(http, messages=PREFILL, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    # Streamed, the same 400 before any answer starts.
    r = chat(http, messages=PREFILL, stream=True, **body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert engine.stats()["waiting"] == engine.stats()["running"] == 0


def test_a_template_that_never_prints_the_final_message_cannot_continue_it(bpe_checkpoint):
    engine = create_engine(bpe_checkpoint, **KW)
    silent = ChatTemplate(None, "{% for m in messages %}{{ m.role }}\n{% endfor %}")
    with serving(build_app(AsyncEngine(engine), NAME, chat_template=silent)) as base, \
            httpx.Client(base_url=base, trust_env=False, timeout=60) as http:
        r = chat(http, messages=PREFILL, add_generation_prompt=False,
                 continue_final_message=True)
        assert r.status_code == 400
        error = r.json()["error"]
        assert error["param"] == "continue_final_message"
        assert "does not put the final message's content" in error["message"]


def test_tokenize_renders_messages_with_the_same_options(server, offline):
    """/tokenize takes the chat route's template options, so its ids are the prompt a chat
    completion with the same body reads; on a prompt they are refused by name."""
    http, engine = server
    tok = offline.tokenizer
    body = {"messages": PREFILL, "add_generation_prompt": False, "continue_final_message": True}
    r = http.post("/tokenize", json=body)
    assert r.status_code == 200, r.text
    want = (tok.encode("### user: ") + tok.encode_text("hi")
            + tok.encode(EOT + "\n### assistant: ") + tok.encode_text("the cat"))
    assert r.json()["tokens"] == want
    r = http.post("/tokenize", json={"messages": PREFILL[:1],
                                     "chat_template_kwargs": {"persona": "a dog"}})
    assert r.json()["tokens"] == (tok.encode("### system: a dog\n### user: ")
                                  + tok.encode_text("hi") + tok.encode(EOT + "\n### assistant:"))
    for bad, param in (({**body, "add_generation_prompt": True}, "continue_final_message"),
                       ({"prompt": "hi", "continue_final_message": True},
                        "continue_final_message"),
                       ({"prompt": "hi", "chat_template_kwargs": {"a": 1}},
                        "chat_template_kwargs"),
                       ({"messages": PREFILL, "chat_template_kwargs": [1]},
                        "chat_template_kwargs")):
        r = http.post("/tokenize", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (bad, r.text)
    wait_idle(engine)
