"""`hwattn serve` driven through the official `openai` client against a real uvicorn on a
loopback port: completions, chat, streaming, errors, disconnects, metrics."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from hwattn.engine import LLM, SamplingParams, create_engine  # noqa: E402
from hwattn.server import AsyncEngine  # noqa: E402
from hwattn.server.app import build_app  # noqa: E402
from hwattn.server.metrics import read_metrics  # noqa: E402

NAME = "tiny-gla-2"
ENGINE = dict(model="tiny", attention="gla-2", page_size=8, memory_budget=1 << 22,
              model_overrides=dict(max_seq_len=320, n_layers=2), device="cpu", seed=0)


@pytest.fixture(scope="module")
def server():
    engine = create_engine(**ENGINE)
    app = build_app(AsyncEngine(engine), NAME)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=30)
    sock.close()
    assert not thread.is_alive()


@pytest.fixture
def client(server):
    base, _ = server
    with httpx.Client(trust_env=False, timeout=60) as http:
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http,
                            max_retries=0)


def metrics(base):
    return read_metrics(httpx.get(f"{base}/metrics", trust_env=False).text)


def wait_idle(base, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics(base)
        if m["hwattn_requests_running"] == 0 and m["hwattn_requests_waiting"] == 0 \
                and m["hwattn_kv_pages_used"] == 0:
            return m
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {metrics(base)}")


def test_models_health_and_greedy_completion_matches_the_library(server, client):
    base, _ = server
    assert httpx.get(f"{base}/health", trust_env=False).json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [NAME]
    r = client.completions.create(model=NAME, prompt="The cat", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    want = LLM(**ENGINE).generate("The cat", SamplingParams(max_tokens=12, temperature=0,
                                                            ignore_eos=True))[0]
    assert r.choices[0].text == want.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len("The cat")


def test_streaming_equals_non_streaming_and_batches(server, client):
    kw = dict(model=NAME, prompt="abc", max_tokens=20, temperature=0.7, seed=5)
    whole = client.completions.create(**kw).choices[0]
    pieces, reasons, usage = [], [], None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            reasons.append(chunk.choices[0].finish_reason)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.text
    assert reasons[-1] == whole.finish_reason and all(r is None for r in reasons[:-1])
    assert usage.prompt_tokens == 3
    batch = client.completions.create(model=NAME, prompt=["abc", "defg"], max_tokens=5,
                                      temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert batch.usage.prompt_tokens == 7


def test_chat_completions_plain_and_streamed(server, client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=8, temperature=0)
    assert r.choices[0].message.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert text == r.choices[0].message.content


@pytest.mark.parametrize("body,status,param", [
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": 5, "prompt": "x"}, 400, "model"),  # left out it is the served model
    ({"model": NAME, "prompt": "x" * 400}, 400, "prompt"),
    ({"model": NAME, "prompt": "x" * 300, "max_tokens": 100}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": NAME, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ({"model": NAME, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": NAME, "prompt": "x", "n": 100}, 400, "n"),
    ({"model": NAME, "prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ({"model": NAME, "prompt": "x", "n": 2, "best_of": 3}, 400, "best_of"),
    ({"model": NAME, "prompt": [1, 99999]}, 400, "prompt"),
    ({"model": NAME, "prompt": {"a": 1}}, 400, "prompt"),
    ({"model": NAME, "prompt": "x", "stop": 3}, 400, "stop"),
])
def test_bad_requests_get_openai_style_errors(server, body, status, param):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", json=body, trust_env=False)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_malformed_json_and_bad_chat_then_still_serving(server, client):
    base, _ = server
    r = httpx.post(f"{base}/v1/completions", content=b"{not json", trust_env=False,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": NAME, "messages": "hi"},
                   trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="x", temperature=-0.5)
    assert client.completions.create(model=NAME, prompt="ok", max_tokens=2).choices[0].text is not None


def test_disconnecting_clients_abort_and_free_pages(server):
    base, engine = server
    before = metrics(base)["hwattn_requests_aborted_total"]
    body = {"model": NAME, "prompt": "a long one", "max_tokens": 300, "ignore_eos": True,
            "stream": True}
    with httpx.Client(trust_env=False, timeout=30) as http:
        with http.stream("POST", f"{base}/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    json.loads(line[5:])
                    break
    # A non-streaming client that gives up before the answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", trust_env=False, timeout=0.3,
                   json={**body, "stream": False})
    m = wait_idle(base)
    assert m["hwattn_requests_aborted_total"] >= before + 2
    engine.check_invariants()


def test_concurrent_clients_and_metrics(server, client):
    base, _ = server
    prompts = [f"request {i}" for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: client.completions.create(
            model=NAME, prompt=p, max_tokens=16, temperature=0.5, seed=1,
            extra_body={"ignore_eos": True}), prompts))
    assert all(o.usage.completion_tokens == 16 for o in outs)
    m = wait_idle(base)
    assert m["hwattn_generation_tokens_total"] >= 8 * 16
    assert m["hwattn_kv_pages_capacity"] > 0
    assert "hwattn_generation_tokens_per_second" in m


def test_metrics_page_parses_with_the_model_name_on_every_sample(server, client):
    """The whole page through prometheus_client's parser: every sample labelled with the
    served name; one request of n = 2 adds one queue time (at least 0, at most its time to
    first token), two times per output token (one per completion), and its prompt and
    generation tokens once."""
    from prometheus_client.parser import text_string_to_metric_families

    base, _ = server
    before = wait_idle(base)
    out = client.completions.create(model=NAME, prompt="queue and tokens", max_tokens=5, n=2,
                                    temperature=0.8, seed=3, extra_body={"ignore_eos": True})
    after = wait_idle(base)
    text = httpx.get(f"{base}/metrics", trust_env=False).text
    families = list(text_string_to_metric_families(text))
    samples = [s for f in families for s in f.samples]
    assert len(families) > 20 and samples
    assert {s.labels.get("model_name") for s in samples} == {NAME}
    types = {f.name: f.type for f in families}
    assert types["hwattn_kv_pages_capacity"] == "gauge" and "hwattn_kv_pages_total" not in text

    def delta(name):
        return after[name] - before[name]

    assert delta("hwattn_request_queue_time_seconds_count") == 1
    queued, ttft = (delta("hwattn_request_queue_time_seconds_sum"),
                    delta("hwattn_time_to_first_token_seconds_sum"))
    assert delta("hwattn_time_to_first_token_seconds_count") == 1 and 0 <= queued <= ttft
    assert delta("hwattn_request_time_per_output_token_seconds_count") == 2
    assert delta("hwattn_request_time_per_output_token_seconds_sum") > 0
    assert delta("hwattn_request_prompt_tokens_count") == 1
    assert delta("hwattn_request_prompt_tokens_sum") == out.usage.prompt_tokens
    assert delta("hwattn_request_generation_tokens_count") == 1
    assert delta("hwattn_request_generation_tokens_sum") == out.usage.completion_tokens == 10


@pytest.mark.slow
def test_hwattn_serve_command_with_two_tensor_parallel_ranks(tmp_path):
    """`hwattn serve --tp 2` as a user starts it: a subprocess with a spawned worker rank;
    its greedy output equals the single-process library's, and SIGINT stops both."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "hwattn", "serve", "tiny", "--attention", "gqa-4", "--tp", "2",
           "--device", "cpu", "--dtype", "fp64", "--port", str(port), "--max-seq-len", "256",
           "--memory-budget", "4e6", "--page-size", "16"]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                if httpx.get(f"{base}/health", trust_env=False, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "server did not come up"
            time.sleep(0.2)
        with httpx.Client(trust_env=False, timeout=60) as http:
            c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", http_client=http,
                              max_retries=0)
            r = c.completions.create(model="tiny-gqa-4", prompt=[5, 6, 7, 8], max_tokens=10,
                                     temperature=0, extra_body={"ignore_eos": True})
        want = LLM("tiny", attention="gqa-4", device="cpu", dtype="fp64", page_size=16,
                   memory_budget=4_000_000, model_overrides=dict(max_seq_len=256)).generate(
            [5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
        assert r.choices[0].text == want.text
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    # The spawned worker belongs to the server's session: nothing of it may be left.
    deadline = time.time() + 15
    while True:
        rows = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(proc.pid)],
                              capture_output=True, text=True).stdout.splitlines()
        left = "\n".join(r for r in rows if r.split()[1][0] != "Z")  # zombies are just unreaped
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes left: {left}"
