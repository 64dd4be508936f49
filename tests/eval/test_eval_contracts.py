"""Contracts of the scoring and of the lm-eval adapter, on a small random-weight model and a
byte tokenizer (no dataset, no training)."""

from __future__ import annotations

import pytest
import torch

from hwattn.config import ModelConfig
from hwattn.eval.tasks import loglikelihoods
from hwattn.models.transformer import Transformer

pytest.importorskip("lm_eval")


class _Bytes:
    """UTF-8 bytes as ids 0..255, <|endoftext|> at 256."""

    vocab_size, eot_id = 257, 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class _Request:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny", attention="gqa", n_kv_heads=2, n_layers=2,
                                  vocab_size=257, max_seq_len=128)
    return Transformer(cfg).eval()


def test_a_long_continuation_does_not_change_the_other_requests_scores(model):
    """Each request is scored on its own window: one request whose continuation is longer
    than max_len used to widen every other request's context in the same call, so a score
    depended on which requests it was sent with (lm-eval sends every task's at once)."""
    g = torch.Generator().manual_seed(3)
    short = (torch.randint(0, 256, (40,), generator=g).tolist(), [5, 6])
    long = ([7], torch.randint(0, 256, (24,), generator=g).tolist())
    alone = loglikelihoods(model, [short], max_len=16)[0]
    together = loglikelihoods(model, [short, long], max_len=16)[0]
    assert together == alone


class _NeverEnds(torch.nn.Module):
    """`model` with <|endoftext|> never the argmax, so that generation runs to its limit."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, x):
        logits = self.inner(x).clone()
        logits[..., _Bytes.eot_id] = -torch.inf
        return logits


def _lm(model, **kw):
    from hwattn.eval.lm_eval_adapter import HwattnLM

    return HwattnLM(model=_NeverEnds(model), tokenizer=_Bytes(), **kw)


def test_generation_longer_than_the_window_is_refused_not_promptless(model):
    """max_gen_toks >= max_length left no room for the prompt: the context was cut to
    ids[max_gen_toks - max_length:], so a prompt shorter than that became <|endoftext|> alone
    and the text was generated without it. lm-eval's --model hf refuses it too."""
    lm = _lm(model, max_length=16)
    with pytest.raises(ValueError, match="max_gen_toks"):
        lm.generate_until([_Request("The cat sat", {"until": ["\n"], "max_gen_toks": 20})])


def test_generation_ignores_an_empty_stop_string(model):
    """An empty `until` string stopped after one token and then failed in str.split("")
    (lm-eval skips '' stop sequences)."""
    lm = _lm(model, max_length=32)
    want = lm.generate_until([_Request("The cat sat", {"until": ["\x00\x01"],
                                                       "max_gen_toks": 5})])
    got = lm.generate_until([_Request("The cat sat", {"until": ["", "\x00\x01"],
                                                      "max_gen_toks": 5})])
    assert got == want


def test_generation_reads_the_harness_max_token_aliases(model):
    """lm-eval accepts max_new_tokens (and max_tokens, max_completion_tokens) for max_gen_toks;
    they were ignored, and 64 tokens generated."""
    lm = _lm(model, max_length=100)
    assert len(lm.generate_until([_Request("abc", {"until": []})])[0]) > 3  # the default
    for key in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens"):
        out = lm.generate_until([_Request("abc", {"until": [], key: 3})])[0]
        assert len(out) <= 3, (key, out)


def test_sampling_is_refused_not_silently_greedy(model):
    lm = _lm(model, max_length=32)
    for gen in ({"do_sample": True, "temperature": 0.8}, {"temperature": 0.7}):
        with pytest.raises(ValueError, match="do_sample|temperature"):
            lm.generate_until([_Request("abc", {"until": [], "max_gen_toks": 2, **gen})])
    # greedy asked for explicitly is fine
    lm.generate_until([_Request("abc", {"until": [], "max_gen_toks": 2, "do_sample": False,
                                        "temperature": 0.0})])


class _Widths(torch.nn.Module):
    """`model`, recording the width of every batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.widths = model, model.config, []

    def forward(self, x):
        self.widths.append(x.shape[1])
        return self.inner(x)


@pytest.mark.parametrize("n_cont", [16, 20])
def test_a_long_continuation_is_scored_after_one_context_token(model, n_cont):
    """A continuation of max_len tokens or more is scored after exactly one context token: one
    of max_len tokens fits the window as it is (lm-eval's `--model hf` feeds
    (context + continuation)[-(max_length + 1):][:-1]), a longer one widens the window to hold
    it plus one context token. Both were given two context tokens, so a max_len-token
    continuation was fed max_len + 1 tokens, past the max_length asked for."""
    g = torch.Generator().manual_seed(5)
    ctx = torch.randint(0, 256, (10,), generator=g).tolist()
    cont = torch.randint(0, 256, (n_cont,), generator=g).tolist()
    spy = _Widths(model)
    got = loglikelihoods(spy, [(ctx, cont)], max_len=16)[0][0]
    assert spy.widths == [max(16, n_cont)]
    seq = torch.tensor([(ctx + cont)[-(n_cont + 1):]])  # the last context token, then cont
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]).float(), -1)[0]
    want = float(logp.gather(1, seq[0, 1:, None]).sum())
    assert got == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("kwargs, named", [
    ({"device": "cuda"}, "device"),      # the model stayed where it was
    ({"cpu_threads": 2}, "cpu_threads"),  # the thread count was not set
    ({"pretrained": "runs/x/checkpoint"}, "pretrained"),  # the checkpoint was not read
])
def test_what_only_a_checkpoint_load_reads_is_refused_beside_a_model(model, kwargs, named):
    """`device`, `cpu_threads` and `pretrained` are read only when the adapter loads a
    checkpoint: beside a model they were dropped without a word."""
    from hwattn.eval.lm_eval_adapter import HwattnLM

    with pytest.raises(ValueError, match=f"{named} cannot be given with a model"):
        HwattnLM(model=model, tokenizer=_Bytes(), **kwargs)
    assert HwattnLM(model=model, tokenizer=_Bytes(), device="auto").model is model


def test_a_tokenizer_beside_a_checkpoint_is_refused_not_replaced():
    from hwattn.eval.lm_eval_adapter import HwattnLM

    with pytest.raises(ValueError, match="tokenizer cannot be given with pretrained="):
        HwattnLM(pretrained="no/such/checkpoint", tokenizer=_Bytes())
