"""Arguments of the scoring functions are checked before any forward pass, and a bad one
is named (`evaluate_perplexity`, `recall_accuracy`, `loglikelihoods`, `score_mc`); task
files keep their task's name and refuse rows that are not objects (`task_yaml`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hwattn.config import ModelConfig
from hwattn.eval.perplexity import evaluate_perplexity
from hwattn.eval.recall import recall_accuracy
from hwattn.eval.tasks import loglikelihoods
from hwattn.models.transformer import Transformer


class _Counted(torch.nn.Module):
    """`model`, counting its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.calls = model, model.config, 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention="gqa", n_kv_heads=2, n_layers=1,
                                  vocab_size=64, max_seq_len=32)
    return Transformer(cfg).eval()


TOKENS = (np.arange(300) * 7 % 64).astype(np.int64)


@pytest.mark.parametrize("kwargs, needle", [
    ({"seq_len": 0}, "seq_len must be an integer >= 1, got 0"),  # ZeroDivisionError
    ({"seq_len": 16, "batch_size": 0}, "batch_size must be an integer >= 1"),  # range() arg 3
    ({"seq_len": 16, "max_tokens": -5}, "max_tokens must be an integer >= 1"),  # "-4 tokens"
    ({"seq_len": 40}, "seq_len 40 exceeds the model's context of 32"),  # inside the model
    ({"seq_len": 16, "token_bytes": np.ones(10, np.int64)},
     "token_bytes has 10 entries but the tokens hold id 63"),  # IndexError after the run
], ids=["seq_len-0", "batch-0", "max_tokens-negative", "seq_len-past-context", "bytes-short"])
def test_perplexity_names_a_bad_argument_before_scoring(model, kwargs, needle):
    spy = _Counted(model)
    with pytest.raises(ValueError, match=needle):
        evaluate_perplexity(spy, TOKENS, **kwargs)
    assert spy.calls == 0
    ok = evaluate_perplexity(spy, TOKENS, 16, np.ones(64, np.int64), max_tokens=32)
    assert ok["tokens"] == 32 and ok["bytes"] == 32


@pytest.mark.parametrize("kwargs, needle", [
    ({"n_queries": 0}, "n_queries must be an integer >= 1"),  # ZeroDivisionError
    ({"n_seqs": 0}, "n_seqs must be an integer >= 1"),  # ZeroDivisionError
    ({"batch_size": 0}, "batch_size must be an integer >= 1"),  # range() arg 3
    # 15 pairs and 2 queries are 34 tokens: within max_len, past the context, so the probe
    # failed inside the model after scoring the 4 pairs
    ({"max_len": 64, "pair_counts": (4, 15)},
     "max_len must be an integer from 1 to the model's context of 32"),
    ({"pair_counts": (4, 0)}, "pair_counts must be integers >= 1, got 0"),
], ids=["queries-0", "seqs-0", "batch-0", "max_len-past-context", "pairs-0"])
def test_recall_names_a_bad_argument_before_scoring(model, kwargs, needle):
    class Words:  # ids 0..63 as " aaa", " aab", ...: all of them word tokens
        vocab_size, eot_id = 64, None

        def decode(self, ids):
            return " " + "".join("abcd"[(ids[0] >> s) & 3] for s in (4, 2, 0))

    spy = _Counted(model)
    args = {"pair_counts": (4,), "n_queries": 2, "n_seqs": 2, **kwargs}
    with pytest.raises(ValueError, match=needle):
        recall_accuracy(spy, Words(), **args)
    assert spy.calls == 0
    assert set(recall_accuracy(spy, Words(), (4,), 2, 2)) == {"pairs_4", "mean", "chance"}


def test_loglikelihoods_refuse_a_window_past_the_context(model):
    """max_len beyond the model's context failed inside the model on the first long pair
    ("position 60 exceeds max_seq_len 32"), after the shorter pairs' batches had run."""
    spy = _Counted(model)
    pairs = [([1, 2], [3]), (list(range(60)), [1, 2])]
    with pytest.raises(ValueError, match="max_len 64 exceeds the model's context of 32"):
        loglikelihoods(spy, pairs, max_len=64)
    assert spy.calls == 0
    assert len(loglikelihoods(spy, pairs, max_len=32)) == 2


@pytest.mark.parametrize("name", ["a: b", "run #2", "123", "yes", "hwattn_cloze", "my-task.v2"])
def test_task_yaml_keeps_the_task_name_as_given(tmp_path, name):
    """The task name was written into the YAML unquoted: "a: b" made a YAML error (the
    harness skips such a file and then finds no task of that name), "run #2" the task
    "run", "123" a number and "yes" true."""
    yaml = pytest.importorskip("yaml")
    from hwattn.eval.lm_eval_tasks import task_yaml

    rows = tmp_path / "t.jsonl"
    rows.write_text('{"context": "a b", "target": " c"}\n')
    assert yaml.safe_load(task_yaml(name, rows))["task"] == name


@pytest.mark.parametrize("first, needle", [
    # a string row made a cloze task ("context" and "target" are substrings of it)
    ('"context and target"', "the rows of .* must be JSON objects, the first is str"),
    ("{oops", "the first row of .* is not JSON"),
])
def test_task_rows_must_be_json_objects(tmp_path, first, needle):
    from hwattn.eval.lm_eval_tasks import task_yaml

    rows = tmp_path / "t.jsonl"
    rows.write_text(first + "\n")
    with pytest.raises(ValueError, match=f"task t: {needle}"):
        task_yaml("t", rows)


@pytest.mark.parametrize("item, needle", [
    ({"context": "a", "choices": [" b", " c"], "gold": 2}, "2 choice\\(s\\) and gold 2"),
    ({"context": "a", "choices": [" b", " c"], "gold": -1}, "gold -1"),
    ({"context": "a", "choices": [" b", " c"], "gold": "0"}, "gold '0'"),
    ({"context": "a", "choices": [" b"], "gold": 0}, "1 choice\\(s\\)"),
], ids=["gold-past-end", "gold-negative", "gold-text", "one-choice"])
def test_multiple_choice_items_are_checked_before_scoring(model, item, needle):
    """A gold that indexes no choice was never right: the item counted as a miss (gold -1 or
    "0" never equals an argmax), and accuracy fell without a word."""
    from hwattn.eval.tasks import score_mc

    class Ids:
        def encode(self, text):
            return [ord(c) % 64 for c in text]

    spy = _Counted(model)
    good = {"context": "a", "choices": [" b", " c"], "gold": 1}
    with pytest.raises(ValueError, match=f"multiple-choice item 1: .*{needle}"):
        score_mc(spy, Ids(), [good, item], max_len=16)
    assert spy.calls == 0
    assert score_mc(spy, Ids(), [good], max_len=16)["n"] == 1


def test_domain_perplexity_names_a_zero_window(model):
    """`evaluate_domains` sized its progress bar first: a seq_len of 0 was a ZeroDivisionError
    there, before `evaluate_perplexity` could name it."""
    from types import SimpleNamespace

    from hwattn.eval.perplexity import evaluate_domains

    data = SimpleNamespace(domains=["a"], val={"a": TOKENS},
                           tokenizer=SimpleNamespace(token_byte_lengths=np.ones(64, np.int64)))
    with pytest.raises(ValueError, match="seq_len must be an integer >= 1, got 0"):
        evaluate_domains(model, data, 0)
    assert evaluate_domains(model, data, 16, max_tokens=32)["a"]["tokens"] == 32


def test_a_failed_evaluation_gives_the_model_back_in_training_mode(model):
    """`evaluate_model` switched the model to eval mode and back only when every measurement
    returned: one that raised (here a multiple-choice item without a valid gold) left a model
    that was training in eval mode, dropout and all, for whoever caught the error."""
    from types import SimpleNamespace

    from hwattn.eval.suite import EvalConfig, evaluate_model

    class Ids:
        token_byte_lengths = np.ones(64, np.int64)

        def encode(self, text):
            return [ord(c) % 64 for c in text]

    data = SimpleNamespace(domains=["a"], val={"a": TOKENS}, tokenizer=Ids())
    cfg = EvalConfig(seq_len=16, ppl_tokens=32, n_cloze=0, n_mc=1, recall_pairs=())
    bad = {"cloze": [], "mc": [{"context": "a", "choices": [" b", " c"], "gold": 5}]}
    model.train()
    try:
        with pytest.raises(ValueError, match="multiple-choice item 0"):
            evaluate_model(model, data, cfg, bad)
        assert model.training
        bad["mc"][0]["gold"] = 1
        assert evaluate_model(model, data, cfg, bad)["mc"]["n"] == 1 and model.training
    finally:
        model.eval()
