"""What a client written for vLLM's OpenAI server sends, answered the same way: echo and
logprobs in the completions format, logprobs / top_logprobs in the chat format, n choices
(streamed too), vLLM's sampling extras, /tokenize /detokenize /tokenizer_info /version, the
checkpoint's chat template (and an override), latency histograms on /metrics, and
`hwattn serve MODEL` / `--model MODEL`."""

import json

import pytest
import torch

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from hwattn.engine import LLM, SamplingParams, create_engine  # noqa: E402
from hwattn.engine.chat import ChatTemplate  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.server.metrics import read_metrics  # noqa: E402
from tests.server.conftest import serving, wait_idle  # noqa: E402

NAME = "bpe"
KW = dict(device="cpu", page_size=8, memory_budget=1 << 22, seed=0)


@pytest.fixture(scope="module")
def server(bpe_checkpoint):
    engine = create_engine(bpe_checkpoint, **KW)
    app = build_app(AsyncEngine(engine), NAME, chat_template=ChatTemplate(bpe_checkpoint))
    with serving(app) as base, httpx.Client(base_url=base, trust_env=False, timeout=60) as http:
        yield http, engine, base


@pytest.fixture(scope="module")
def offline(bpe_checkpoint):
    return LLM(bpe_checkpoint, **KW)


def test_echo_with_logprobs_gives_the_prompt_its_model_logprobs(server, offline):
    http, engine, _ = server
    prompt = offline.tokenizer.encode("the cat sat on the")
    r = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 1,
                                            "temperature": 0, "logprobs": 1, "echo": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        ids = prompt + offline.tokenizer.encode(choice["text"][len("the cat sat on the"):])
        ref = engine.model(torch.tensor([ids]))[0].float().log_softmax(-1)
    for p in range(1, len(ids)):
        assert lp["token_logprobs"][p] == pytest.approx(ref[p - 1, ids[p]].item(), abs=1e-4)
        assert max(lp["top_logprobs"][p].values()) == pytest.approx(ref[p - 1].max().item(),
                                                                    abs=1e-4)
    assert choice["text"].startswith("the cat sat on the")
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    # Greedy: the generated token is the most likely one.
    assert lp["token_logprobs"][-1] == pytest.approx(max(lp["top_logprobs"][-1].values()))
    only = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 0,
                                               "logprobs": 0, "echo": True}).json()
    assert only["choices"][0]["text"] == "the cat sat on the"
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]
    assert only["usage"]["completion_tokens"] == 0
    wait_idle(engine)


def test_n_choices_per_prompt_streamed_or_not(server):
    http, engine, _ = server
    body = {"model": NAME, "prompt": ["the dog", "one two"], "max_tokens": 5, "n": 2,
            "temperature": 1.0, "seed": 3, "ignore_eos": True, "logprobs": 2}
    doc = http.post("/v1/completions", json=body).json()
    choices = sorted(doc["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert all(len(c["logprobs"]["tokens"]) == 5 for c in choices)
    assert doc["usage"]["completion_tokens"] == 20
    texts, logprobs = {}, {}
    with http.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
                    logprobs.setdefault(c["index"], []).extend(c["logprobs"]["token_logprobs"])
    assert texts == {c["index"]: c["text"] for c in choices}
    assert logprobs == {c["index"]: c["logprobs"]["token_logprobs"] for c in choices}
    wait_idle(engine)


def test_vllm_sampling_extras_reach_the_engine(server, offline):
    http, engine, _ = server
    extras = dict(repetition_penalty=1.6, presence_penalty=0.5, frequency_penalty=0.5,
                  min_p=0.05, min_tokens=3)
    r = http.post("/v1/completions", json={"model": NAME, "prompt": "the cat", "max_tokens": 8,
                                            "temperature": 0, **extras})
    want = offline.generate("the cat", SamplingParams(max_tokens=8, temperature=0, **extras))[0]
    assert r.json()["choices"][0]["text"] == want.text
    plain = offline.generate("the cat", SamplingParams(max_tokens=8, temperature=0))[0]
    assert plain.token_ids != want.token_ids  # the extras changed the output


def test_chat_uses_the_checkpoints_template_and_reports_logprobs(server, offline):
    http, engine, base = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", http_client=http, max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=3, n=2)
    prompt = "### user: hi\n### assistant:"
    want = offline.generate(prompt, SamplingParams(max_tokens=4, temperature=0))[0]
    assert [c.message.content for c in r.choices] == [want.text] * 2
    content = r.choices[0].logprobs.content
    assert len(content) == len(want.token_ids)
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token
    tok = http.post("/tokenize", json={"messages": messages}).json()
    assert tok["tokens"] == offline.tokenizer.encode(prompt)
    info = http.get("/tokenizer_info").json()
    assert info["chat_template"] and info["eos_token"] == "<|endoftext|>"


def test_tokenize_detokenize_version(server, offline):
    http, _, _ = server
    r = http.post("/tokenize", json={"prompt": "the bird sang", "add_special_tokens": False})
    ids = r.json()["tokens"]
    assert ids == offline.tokenizer.encode("the bird sang") and r.json()["count"] == len(ids)
    assert http.post("/detokenize", json={"tokens": ids}).json()["prompt"] == "the bird sang"
    bad = http.post("/detokenize", json={"tokens": [1 << 20]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    both = http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user",
                                                                     "content": "b"}]})
    assert both.status_code == 400
    extra = http.post("/tokenize", json={"prompt": "a", "truncate": 3})
    assert extra.json()["error"]["param"] == "truncate"
    from hwattn import __version__

    assert http.get("/version").json() == {"version": __version__}


def test_metrics_have_latency_histograms(server):
    http, engine, _ = server
    http.post("/v1/completions", json={"model": NAME, "prompt": "one", "max_tokens": 4,
                                       "ignore_eos": True})
    text = http.get("/metrics").text
    values = read_metrics(text)
    for name in ("hwattn_time_to_first_token_seconds", "hwattn_inter_token_latency_seconds",
                 "hwattn_e2e_request_latency_seconds"):
        assert f"# TYPE {name} histogram" in text
        assert values[f"{name}_count"] >= 1 and values[f"{name}_sum"] > 0
    assert values["hwattn_inter_token_latency_seconds_count"] >= 3


def test_chat_template_override_and_fallback(bpe_checkpoint, tmp_path):
    assert ChatTemplate(bpe_checkpoint).source == "tokenizer_config.json"
    over = ChatTemplate(bpe_checkpoint, "{{ messages[0].content }}!")
    assert over.source == "override" and over.render([{"role": "user", "content": "x"}]) == "x!"
    assert ChatTemplate(None).render([{"role": "user", "content": "x"}]) == \
        "<|user|>\nx\n<|assistant|>\n"
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate(None, "{% for %}")
    loud = ChatTemplate(None, "{{ raise_exception('only user turns') }}")
    with pytest.raises(ValueError, match="only user turns"):
        loud.render([{"role": "user", "content": "x"}])


def test_serve_takes_the_model_positionally_or_by_flag(monkeypatch):
    from hwattn.cli import build_parser
    from hwattn.cli import serve as serve_cli

    seen = []
    monkeypatch.setattr(serve_cli, "engine_from_args", lambda args: seen.append(args.model) or
                        create_engine("tiny", attention="gla-2", device="cpu", num_pages=8,
                                      page_size=8, model_overrides=dict(n_layers=1,
                                                                        max_seq_len=32)))
    monkeypatch.setattr(serve_cli, "listen", lambda app, sock, log_level: None)
    parser = build_parser()
    for argv in (["serve", "tiny"], ["serve", "--model", "tiny"], ["serve", "tiny", "--model", "tiny"]):
        args = parser.parse_args(argv + ["--attention", "gla-2", "--port", "0"])
        assert args.func(args) == 0
    assert seen == ["tiny"] * 3
    for argv, message in ((["serve", "tiny", "--model", "small"], "differ"),
                          (["serve"], "needs a model")):
        args = parser.parse_args(argv)
        with pytest.raises(ValueError, match=message):
            args.func(args)
