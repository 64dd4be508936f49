"""lm-evaluation-harness's own `local-completions` model against a live `hwattn serve` process:
a log-likelihood (multiple-choice) task through echo + logprobs and a generation task through
plain completions, both local, on a tiny checkpoint with a BPE tokenizer. lm-eval finds the
server's tokenizer through /tokenizer_info and /tokenize, as it does with vLLM; its scores
are checked against the model's own forward and the offline engine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models need it
httpx = pytest.importorskip("httpx")

import hwattn  # noqa: E402

REPO = Path(hwattn.__file__).resolve().parent.parent
NAME = "bpe"
MC = [  # (context, choices, gold)
    ("the cat sat on the", [" mat", " tree", " one"], 0),
    ("the dog sat on the", [" log", " cat", " bird"], 0),
    ("a bird sang in the", [" tree", " mat", " ten"], 0),
    ("one two three", [" four", " nine", " dog"], 0),
]
GEN = [("one two three four", " five"), ("the dog sat", " on"), ("a bird", " sang")]
GEN_YAML = """task: hw_gen
dataset_path: json
dataset_kwargs:
  data_files: {files}
test_split: test
output_type: generate_until
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["."]
  max_gen_toks: 6
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(bpe_checkpoint, tmp_path_factory):
    """`hwattn serve` of the checkpoint in its own process; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), NO_PROXY="127.0.0.1,localhost")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hwattn", "serve", "--model", bpe_checkpoint,
             "--served-model-name", NAME, "--port", str(port), "--device", "cpu",
             "--page-size", "8", "--memory-budget", "4e6", "--cpu-threads", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "hwattn serve did not come up"
            try:
                if httpx.get(f"{base}/health", timeout=1, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_tasks(tmp_path: Path) -> Path:
    from hwattn.eval.lm_eval_adapter import local_tasks
    from hwattn.eval.tasks import write_jsonl

    mc = write_jsonl([{"context": c, "choices": ch, "gold": g} for c, ch, g in MC],
                     tmp_path / "mc.jsonl")
    yaml = local_tasks({"hw_mc": mc}, tmp_path / "yaml")
    gen = write_jsonl([{"context": c, "target": t} for c, t in GEN], tmp_path / "gen.jsonl")
    (yaml / "hw_gen.yaml").write_text(GEN_YAML.format(files=json.dumps({"test": str(gen)})))
    return yaml


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context) from the model's dense forward, split into tokens the
    way lm-eval's API models do (trailing spaces of the context move to the continuation)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.no_grad():
        logp = model(torch.tensor([whole]))[0].float().log_softmax(-1)
    return sum(logp[p - 1, whole[p]].item() for p in range(start, len(whole)))


def test_lm_eval_local_completions_scores_a_live_hwattn_serve(live_server, bpe_checkpoint,
                                                              tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from hwattn.engine import LLM, SamplingParams

    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    manager = TaskManager(include_path=str(write_tasks(tmp_path)))
    res = simple_evaluate(
        model="local-completions",
        model_args=dict(model=NAME, base_url=f"{live_server}/v1/completions", max_length=200,
                        num_concurrent=1, max_retries=1, tokenizer_backend="remote"),
        tasks=["hw_mc", "hw_gen"], task_manager=manager, log_samples=True, verbosity="ERROR")

    offline = LLM(bpe_checkpoint, device="cpu", page_size=8, memory_budget=1 << 22)
    model, tok = offline.engine.model, offline.tokenizer
    correct = 0
    samples = sorted(res["samples"]["hw_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(MC)
    for sample, (context, choices, gold) in zip(samples, MC):
        ours = [loglikelihood(model, tok, context, c) for c in choices]
        theirs = [r[0][0] for r in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-3)
        correct += max(range(len(choices)), key=ours.__getitem__) == gold
    assert res["results"]["hw_mc"]["acc,none"] == pytest.approx(correct / len(MC))

    gens = sorted(res["samples"]["hw_gen"], key=lambda s: s["doc_id"])
    greedy = SamplingParams(max_tokens=6, temperature=0, stop=["."])
    want = [o.text for o in offline.generate([c for c, _ in GEN], greedy)]
    assert any(want)  # something was generated, not only stopped at once
    assert [s["resps"][0][0] for s in gens] == want
    matches = sum(w == t for w, (_, t) in zip(want, GEN))
    assert res["results"]["hw_gen"]["exact_match,none"] == pytest.approx(matches / len(GEN))
