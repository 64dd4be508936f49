"""Evaluation: perplexity and bits per byte, the tasks, the recall probe, lm-eval, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hwattn.data.loader import TokenDataset
from hwattn.eval.perplexity import evaluate_perplexity
from hwattn.eval.recall import make_recall_batch, recall_accuracy, word_tokens
from hwattn.eval.suite import EvalConfig, build_tasks, evaluate_model
from hwattn.eval.tasks import build_cloze, build_mc, loglikelihoods, score_cloze, score_mc, write_jsonl
from hwattn.models.checkpoint import load_model


@pytest.fixture(scope="module")
def data(dataset_dir):
    return TokenDataset(dataset_dir)


@pytest.fixture(scope="module")
def model(trained):
    return load_model(trained[0] / "checkpoint").eval()


def test_uniform_model_has_vocabulary_perplexity(data, model):
    """Zero output weights give uniform predictions: ppl = V, bits/byte = log2(V)·tokens/bytes."""
    m = model
    saved = m.output.weight.detach().clone()
    with torch.no_grad():
        m.output.weight.zero_()  # tied: the embedding goes to zero too; logits are all 0
    try:
        tokens = data.val["books"]
        r = evaluate_perplexity(m, tokens, 64, data.tokenizer.token_byte_lengths, max_tokens=1000)
    finally:
        with torch.no_grad():
            m.output.weight.copy_(saved)
    v = m.config.vocab_size
    assert r["ppl"] == pytest.approx(v, rel=1e-5)
    n_bytes = int(data.tokenizer.token_byte_lengths[np.asarray(tokens[1:r["tokens"] + 1])].sum())
    assert r["bytes"] == n_bytes
    assert r["bpb"] == pytest.approx(r["tokens"] * math.log2(v) / n_bytes, rel=1e-5)


def test_loglikelihoods_match_a_direct_computation(model):
    g = torch.Generator().manual_seed(1)
    pairs = [(torch.randint(0, 500, (n,), generator=g).tolist(),
              torch.randint(0, 500, (k,), generator=g).tolist()) for n, k in ((5, 1), (30, 4), (12, 2))]
    res = loglikelihoods(model, pairs, max_len=64, batch_size=2)
    for (ctx, cont), (ll, greedy) in zip(pairs, res):
        seq = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = F.log_softmax(model(seq[:, :-1]).float(), -1)[0]
        pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
        want = logp[pos, torch.tensor(cont)]
        assert ll == pytest.approx(float(want.sum()), abs=1e-4)
        assert greedy == bool((logp[pos].argmax(-1) == torch.tensor(cont)).all())
    # A continuation the model itself produces greedily is reported as greedy.
    ctx = pairs[1][0]
    with torch.no_grad():
        nxt = int(model(torch.tensor([ctx]))[0, -1].argmax())
    assert loglikelihoods(model, [(ctx, [nxt])], 64)[0][1] is True


def test_tasks_are_built_from_held_out_text(data):
    docs = data.val_documents()
    cloze = build_cloze(docs, 40, seed=0)
    assert len(cloze) == 40 and cloze == build_cloze(docs, 40, seed=0)
    joined = {d["domain"]: d["text"].replace("\n", " ") for d in docs}
    for x in cloze:
        assert x["target"].startswith(" ") and x["target"][1:].isalpha()
        assert (x["context"] + x["target"]) in " ".join(d["text"].replace("\n", " ") for d in docs)
    assert {x["domain"] for x in cloze} == set(joined)
    mc = build_mc(docs, 30, seed=0)
    assert len(mc) == 30
    for x in mc:
        assert len(x["choices"]) == 4 and len(set(x["choices"])) == 4 and 0 <= x["gold"] < 4
    assert len({x["gold"] for x in mc}) > 1


def test_multiple_choice_distractors_are_drawn_as_from_the_filtered_list():
    """build_mc draws each item's distractors from a view of the other documents' sentences
    (`_Without`), not a list built per item: the view must hold what that list held, in its
    order, so that `random.choice` draws the same sentences and a study's items stay the same
    across its sittings."""
    import random

    from hwattn.eval.tasks import _doc_blocks, _Without

    rng = random.Random(7)
    pool = [(doc, k, f"s{doc}.{k}") for doc in range(9) for k in range(rng.randrange(0, 5))]
    blocks = _doc_blocks(pool)
    for doc in range(10):  # documents 9 (and any without sentences) remove nothing
        listed = [x for x in pool if x[0] != doc]
        view = _Without(pool, *blocks.get(doc, (0, 0)))
        assert len(view) == len(listed) and list(view) == listed
        a, b = random.Random(doc), random.Random(doc)
        assert [a.choice(view) for _ in range(20)] == [b.choice(listed) for _ in range(20)]
        with pytest.raises(IndexError):
            view[len(view)]


def test_one_document_per_domain_still_gives_multiple_choice(data, tmp_path):
    """`hwattn data build` holds out 3% of the documents: on the shipped corpus that is one
    document per domain. Distractors then come from later in the same document."""
    from hwattn.eval.lm_eval_adapter import local_tasks

    docs = data.val_documents()
    one_each = [next(d for d in docs if d["domain"] == dom) for dom in ("books", "speeches")]
    mc = build_mc(one_each, 20, seed=0)
    assert len(mc) == 20 and {x["domain"] for x in mc} == {"books", "speeches"}
    for x in mc:
        text = " ".join(next(d["text"] for d in one_each if d["domain"] == x["domain"]).split())
        gold = x["choices"][x["gold"]]
        assert (x["context"] + gold) in text
        for wrong in x["choices"]:
            if wrong != gold:
                assert wrong.strip() in text and wrong.strip() not in x["context"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no rows"):
        local_tasks({"empty": tmp_path / "empty.jsonl"}, tmp_path / "yaml")


def test_no_items_is_an_error_not_an_empty_task(data, monkeypatch):
    tiny = [{"domain": "books", "text": "Too short. To hold anything."}]
    monkeypatch.setattr(data, "val_documents", lambda: tiny)
    with pytest.raises(ValueError, match="no cloze items.*--cloze 0"):
        build_tasks(data, EvalConfig(n_cloze=5, n_mc=0))
    with pytest.raises(ValueError, match="no mc items.*--mc 0"):
        build_tasks(data, EvalConfig(n_cloze=0, n_mc=5))
    assert build_tasks(data, EvalConfig(n_cloze=0, n_mc=0)) == {"cloze": [], "mc": []}


def test_scores_agree_with_their_definitions(data, model):
    tasks = build_tasks(data, EvalConfig(n_cloze=12, n_mc=12))
    c = score_cloze(model, data.tokenizer, tasks["cloze"], 256)
    m = score_mc(model, data.tokenizer, tasks["mc"], 256)
    assert c["n"] == 12 and 0 <= c["acc"] <= 1
    assert sum(v["n"] for v in m["by_domain"].values()) == 12
    # acc recomputed by hand from log-likelihoods of each choice
    hits = 0
    for x in tasks["mc"]:
        ctx = data.tokenizer.encode(x["context"])
        lls = [ll for ll, _ in loglikelihoods(model, [(ctx, data.tokenizer.encode(ch)) for ch in x["choices"]], 256)]
        hits += int(np.argmax(lls) == x["gold"])
    assert m["acc"] == pytest.approx(hits / 12)


def test_recall_probe(data, model):
    words = word_tokens(data.tokenizer)
    assert len(words) > 30 and all(data.tokenizer.decode([w]).startswith(" ") for w in words)
    tokens, qpos, ans = make_recall_batch(words, 3, 6, 4, seed=0)
    assert tokens.shape == (3, 20) and qpos.shape == ans.shape == (3, 4)
    for s in range(3):
        pairs = dict(zip(tokens[s, :12:2].tolist(), tokens[s, 1:12:2].tolist()))
        for q, a in zip(qpos[s].tolist(), ans[s].tolist()):
            assert pairs[int(tokens[s, q])] == a and tokens[s, q + 1] == a
    r = recall_accuracy(model, data.tokenizer, (4, 8, 1000), n_queries=4, n_seqs=4, max_len=64)
    assert set(r) == {"pairs_4", "pairs_8", "mean", "chance"}  # 1000 pairs do not fit
    assert all(0 <= v <= 1 for v in r.values())
    with pytest.raises(ValueError, match="word tokens"):
        make_recall_batch(words[:10], 1, 6, 2)


def test_copying_model_solves_the_recall_probe(data):
    """A model that predicts 'the token that followed the previous occurrence of the current
    token' (a perfect induction head) scores 100%; one that never copies scores 0%."""

    class Copier(torch.nn.Module):
        def __init__(self, v, copy=True):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.v, self.copy = v, copy
            self.config = type("C", (), {"max_seq_len": 256})()

        def forward(self, x):
            b, t = x.shape
            out = torch.zeros(b, t, self.v)
            for i in range(b):
                for j in range(t):
                    prev = [k for k in range(j) if x[i, k] == x[i, j]]
                    nxt = int(x[i, prev[-1] + 1]) if prev and self.copy else 0
                    out[i, j, nxt] = 1.0
            return out

    v = data.tokenizer.vocab_size
    assert recall_accuracy(Copier(v), data.tokenizer, (8,), 8, 4)["pairs_8"] == 1.0
    assert recall_accuracy(Copier(v, copy=False), data.tokenizer, (8,), 8, 4)["pairs_8"] == 0.0


@pytest.mark.slow
def test_lm_eval_adapter_matches_our_scoring(data, model, trained, tmp_path):
    from hwattn.eval.lm_eval_adapter import HwattnLM, local_tasks, run_lm_eval

    tasks = build_tasks(data, EvalConfig(n_cloze=10, n_mc=10))
    write_jsonl(tasks["cloze"], tmp_path / "cloze.jsonl")
    write_jsonl(tasks["mc"], tmp_path / "mc.jsonl")
    lm = HwattnLM.from_checkpoint(trained[0] / "checkpoint", max_length=256)
    res = run_lm_eval(lm, {"hw_cloze": tmp_path / "cloze.jsonl", "hw_mc": tmp_path / "mc.jsonl"})
    ours_c = score_cloze(lm.model, data.tokenizer, tasks["cloze"], 256)
    ours_m = score_mc(lm.model, data.tokenizer, tasks["mc"], 256)
    assert res["hw_cloze"]["acc"] == pytest.approx(ours_c["acc"])
    assert res["hw_mc"]["acc"] == pytest.approx(ours_m["acc"])
    assert res["hw_mc"]["acc_norm"] == pytest.approx(ours_m["acc_norm"])
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    with pytest.raises(ValueError, match="rows need"):
        local_tasks({"bad": tmp_path / "bad.jsonl"}, tmp_path / "yaml")

    class Req:
        def __init__(self, *args):
            self.args = args

    lm.max_length = 64
    text = data.val_documents()[0]["text"][:400]
    rolling = lm.loglikelihood_rolling([Req(text)])[0]
    ids = [data.tokenizer.eot_id] + data.tokenizer.encode(text)
    assert len(ids) > 64  # several windows
    whole = sum(ll for ll, _ in loglikelihoods(lm.model, [(ids[max(0, e - 65):s], ids[s:e])
                for s, e in [(p, min(len(ids), p + 64)) for p in range(1, len(ids), 64)]], 64))
    assert rolling == pytest.approx(whole, abs=1e-3)
    gen = lm.generate_until([Req("Fellow-Citizens of the", {"until": ["."], "max_gen_toks": 8})])[0]
    assert isinstance(gen, str) and "." not in gen


def spy_bars(monkeypatch, *modules) -> dict:
    """{desc: bar} of every progress bar `modules` make from here on (the real bars)."""
    made = {}
    for module in modules:
        def spy(*args, real=module.progress_bar, **kwargs):
            made[kwargs["desc"]] = bar = real(*args, **kwargs)
            return bar

        monkeypatch.setattr(module, "progress_bar", spy)
    return made


def test_evaluate_model_progress_bars(data, model, capsys, monkeypatch):
    import hwattn.eval.perplexity as P
    import hwattn.eval.recall as R
    import hwattn.eval.tasks as T

    bars = spy_bars(monkeypatch, P, T, R)
    cfg = EvalConfig(seq_len=64, ppl_tokens=500, n_cloze=6, n_mc=6, recall_pairs=(4, 1000),
                     recall_seqs=5, batch_size=4)
    tasks = build_tasks(data, cfg)
    quiet = evaluate_model(model, data, cfg, tasks)  # off unless asked for
    assert capsys.readouterr() == ("", "")
    assert all(b.n == 0 for b in bars.values())
    loud = evaluate_model(model, data, cfg, tasks, progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    quiet.pop("seconds"), loud.pop("seconds")
    assert loud == quiet
    scored = sum(r["tokens"] for d, r in loud["ppl"].items() if d != "average")
    assert scored == 2 * 448  # 7 windows of 64 tokens in each domain's first 500
    want = {"perplexity": scored, "cloze": len(tasks["cloze"]),
            "multiple choice": sum(len(x["choices"]) for x in tasks["mc"]),
            "recall": 5}  # 1000 pairs do not fit: only the 4-pair sequences
    assert {d: (b.total, b.n) for d, b in bars.items()} == {d: (n, n) for d, n in want.items()}
    for desc in want:
        assert f"{desc}: 100%" in err, err


def test_eval_cli_shows_progress_on_stderr_unless_json(trained, dataset_dir, capsys):
    from hwattn.cli import main

    argv = ["eval", str(trained[0] / "checkpoint"), "--data", str(dataset_dir), "--seq-len", "64",
            "--ppl-tokens", "256", "--cloze", "2", "--mc", "2", "--recall-pairs", "4"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "average" in out and "%|" not in out
    for desc in ("perplexity", "cloze", "multiple choice", "recall"):
        assert f"{desc}: 100%" in err, err
    assert main(argv + ["--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["ppl"]["books"]["tokens"] == 256 and "%|" not in err


@pytest.mark.slow
def test_evaluate_model_and_cli(data, model, trained, dataset_dir, capsys, tmp_path):
    res = evaluate_model(model, data, EvalConfig(seq_len=64, ppl_tokens=512, n_cloze=6, n_mc=6,
                                                 recall_pairs=(4,), recall_seqs=4))
    assert set(res["ppl"]) == {"books", "speeches", "average"}
    assert res["ppl"]["books"]["tokens"] == 512
    from hwattn.cli import main

    ck = str(trained[0] / "checkpoint")
    assert main(["eval", ck, "--data", str(dataset_dir), "--ppl-tokens", "256", "--cloze", "4",
                 "--mc", "4", "--recall-pairs", "4", "--write-tasks", str(tmp_path / "t"),
                 "--lm-eval", f"mc={tmp_path / 't' / 'mc.jsonl'}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lm_eval"]["mc"]["acc"] == pytest.approx(out["mc"]["acc"])
    assert main(["eval", ck, "--data", str(dataset_dir), "--ppl-tokens", "256", "--cloze", "0",
                 "--mc", "0", "--recall-pairs", "4"]) == 0
    assert "average" in capsys.readouterr().out
    assert main(["eval", ck, "--data", str(dataset_dir), "--lm-eval", "nofile"]) == 2


class _Request:
    """An lm-eval request: what `HwattnLM` reads of one (`.args`)."""

    def __init__(self, *args):
        self.args = args


def test_a_space_ending_the_context_is_scored_with_the_continuation(data, model):
    """The harness's contract puts a word boundary's space in the continuation, and its `--model
    hf` moves a space that ends the context there: "... the " + "mat" is scored as "... the" +
    " mat". Encoded apart, it was a lone space token then "mat", another log-likelihood."""
    from hwattn.eval.lm_eval_adapter import HwattnLM
    from hwattn.eval.tasks import encode_pair

    tok = data.tokenizer
    assert encode_pair(tok, "the cat sat on the ", "mat") == (tok.encode("the cat sat on the"),
                                                               tok.encode(" mat"))
    assert encode_pair(tok, "the cat sat on the", " mat") == (tok.encode("the cat sat on the"),
                                                              tok.encode(" mat"))
    lm = HwattnLM(model=model, tokenizer=tok, max_length=64)
    spaced, plain, empty = lm.loglikelihood([_Request("the cat sat on the ", "mat"),
                                             _Request("the cat sat on the", " mat"),
                                             _Request("", "the cat")])
    assert spaced == plain
    want = loglikelihoods(model, [([tok.eot_id], tok.encode("the cat"))], 64)[0]
    assert empty == want


@pytest.mark.parametrize("kwargs, needle", [
    ({"batch_size": 0}, "batch_size"),        # was "range() arg 3 must not be zero"
    ({"batch_size": -1}, "batch_size"),       # scored nothing: every log-likelihood 0.0
    ({"max_length": 0}, "max_length"),        # silently the model's context
    ({"max_length": -5}, "max_length"),
    ({"max_length": 100_000}, "max_length"),  # was "position ... exceeds max_seq_len" inside
    ({"amp": "fp16"}, "amp"),                 # silently fp32
])
def test_adapter_settings_are_checked_when_it_is_made(data, model, kwargs, needle):
    from hwattn.eval.lm_eval_adapter import HwattnLM

    with pytest.raises(ValueError, match=needle):
        HwattnLM(model=model, tokenizer=data.tokenizer, **kwargs)


def test_loglikelihoods_refuse_what_they_cannot_score(model):
    with pytest.raises(ValueError, match="batch_size"):
        loglikelihoods(model, [([1, 2], [3])], 64, batch_size=-1)  # was [(0.0, False)]
    with pytest.raises(ValueError, match="context of at least one token"):
        loglikelihoods(model, [([], [3, 4])], 64)  # its first token predicted from nothing


class _Confident(torch.nn.Module):
    """Puts logit `margin` on id 0, which the held-out tokens never are: every token's loss
    is about `margin` nats."""

    def __init__(self, vocab: int, margin: float):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where the evaluation runs
        self.vocab, self.margin = vocab, margin

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        logits[..., 0] = self.margin
        return logits


def test_a_diverged_models_perplexity_is_inf_not_an_overflow_error():
    """Observed: `hwattn compare --lr 1000` (and `hwattn train`, `hwattn eval`) ended in an
    OverflowError traceback from math.exp once the validation loss passed 709 nats."""
    tokens = (np.arange(200) % 7 + 1).astype(np.int64)
    res = evaluate_perplexity(_Confident(8, 1e4), tokens, seq_len=16)
    assert res["loss"] == pytest.approx(1e4) and res["ppl"] == math.inf
    near = evaluate_perplexity(_Confident(8, 700.0), tokens, seq_len=16)
    assert near["ppl"] == pytest.approx(math.exp(near["loss"]))  # finite ones are unchanged
    nan = evaluate_perplexity(_Confident(8, math.nan), tokens, seq_len=16)
    assert math.isnan(nan["loss"]) and math.isnan(nan["ppl"])  # NaN stays NaN, not inf
