"""Server test helpers: a tiny CPU engine and a real uvicorn on a loopback port."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

TINY = dict(model="tiny", attention="gla-2", page_size=8, memory_budget=1 << 22,
            model_overrides=dict(max_seq_len=320, n_layers=2), device="cpu", seed=0)


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: the engine thread and the test's clients share two busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextmanager
def serving(app):
    """Run `app` under uvicorn on a free loopback port; yields the base URL."""
    uvicorn = pytest.importorskip("uvicorn")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        assert thread.is_alive() and time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive()


NAME = "tiny-gla-2"  # the name the test apps serve `TINY` under
C, H = "/v1/completions", "/v1/chat/completions"


@contextmanager
def tiny_server(**app_kw):
    """A fresh `TINY` engine served by `build_app(..., NAME, **app_kw)` under uvicorn; yields
    (base URL, engine)."""
    from hwattn.engine import create_engine
    from hwattn.server import AsyncEngine
    from hwattn.server.app import build_app

    engine = create_engine(**TINY)
    with serving(build_app(AsyncEngine(engine), NAME, **app_kw)) as base:
        yield base, engine


POISON = "<poison>"  # a stop string that makes a poisoned engine fail the request mid-generation


def poisoned_engine(**overrides):
    """A tiny engine (`TINY` with `overrides`) that fails a request holding the stop string
    `POISON` once it has 2 output tokens, as a detokenizer fault would: after the 200 and
    the first streamed chunks."""
    from hwattn.engine import create_engine

    engine = create_engine(**{**TINY, **overrides})
    real_append = engine.output_processor._append

    def append(seq, tokens):
        if POISON in seq.params.stop and seq.num_output_tokens >= 2:
            raise RuntimeError("injected detokenizer fault")
        return real_append(seq, tokens)

    engine.output_processor._append = append
    return engine


def wait_idle(engine, timeout: float = 20.0) -> dict:
    """The engine's stats once nothing runs, waits or holds a page (it steps in a thread)."""
    deadline = time.time() + timeout
    while True:
        stats = engine.stats()
        if stats["running"] == stats["waiting"] == stats["pages_used"] == 0:
            return stats
        assert time.time() < deadline, f"engine still busy: {stats}"
        time.sleep(0.02)


TEXT = ("the cat sat on the mat. the dog sat on the log. a bird sang in the tree.\n"
        "one two three four five six seven eight nine ten.\n") * 20
TEMPLATE = ("{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}### assistant:{% endif %}")


def make_bpe_checkpoint(path, chat_template: str | None = TEMPLATE) -> str:
    """A tiny random-weight checkpoint with a byte-level BPE tokenizer.json (320 ids,
    <|endoftext|> its end of text) and, in tokenizer_config.json, `chat_template`."""
    import json

    from hwattn.data.tokenizer import EOT, train_bpe
    from hwattn.engine.loader import build_model
    from hwattn.models.checkpoint import save_checkpoint

    tok = train_bpe([TEXT], 320)
    model = build_model("tiny", attention="gqa-2", seed=0,
                        overrides=dict(n_layers=2, max_seq_len=256, vocab_size=tok.vocab_size))
    save_checkpoint(model, path, eos_token_id=tok.tok.token_to_id(EOT))
    tok.save(path)
    if chat_template is not None:
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def bpe_checkpoint(tmp_path_factory):
    return make_bpe_checkpoint(tmp_path_factory.mktemp("bpe") / "ckpt")
