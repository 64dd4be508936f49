"""greedy_generate checks its arguments at entry, each error naming the argument."""

import pytest
import torch

from hwattn import ModelConfig, Transformer, greedy_generate


@pytest.fixture(scope="module")
def model():
    return Transformer(ModelConfig.from_preset("tiny", attention="gla", n_layers=1)).eval()


PROMPT = torch.zeros(1, 3, dtype=torch.long)


@pytest.mark.parametrize("kwargs, match", [
    pytest.param(dict(prompt=torch.zeros(3, dtype=torch.long)), "prompt must be .*batch, length",
                 id="1-D prompt"),
    pytest.param(dict(prompt=torch.zeros(1, 0, dtype=torch.long)), "prompt must hold at least one",
                 id="empty prompt"),
    pytest.param(dict(prompt=torch.zeros(1, 3)), "prompt must hold integer", id="float prompt"),
    pytest.param(dict(prompt=torch.full((1, 3), 2048)), "vocab_size", id="id=vocab_size"),
    pytest.param(dict(prompt=torch.full((1, 3), -2)), "vocab_size", id="negative id"),
    pytest.param(dict(max_new_tokens=0), "max_new_tokens", id="0 new"),
    pytest.param(dict(max_new_tokens=-3), "max_new_tokens", id="negative new"),
    pytest.param(dict(max_new_tokens=2.5), "max_new_tokens must be an integer", id="float new"),
    pytest.param(dict(max_new_tokens=True), "max_new_tokens must be an integer", id="bool new"),
    pytest.param(dict(page_size=0), "page_size", id="page 0"),
    pytest.param(dict(page_size=-4), "page_size", id="negative page"),
    pytest.param(dict(page_size=4.0), "page_size", id="float page"),
])
def test_bad_arguments_are_refused_by_name(model, kwargs, match):
    args = {"prompt": PROMPT, "max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        greedy_generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args)


def test_numpy_integer_counts_are_accepted(model):
    import numpy as np
    tokens, _ = greedy_generate(model, PROMPT, np.int64(2), page_size=np.int32(4))
    ref, _ = greedy_generate(model, PROMPT, 2, page_size=4)
    assert torch.equal(tokens, ref)


@pytest.mark.parametrize("model_dtype, cache_dtype", [(torch.float32, torch.bfloat16),
                                                      (torch.bfloat16, torch.float32)])
def test_a_cache_dtype_other_than_the_models_is_refused_before_any_step(model_dtype, cache_dtype,
                                                                        monkeypatch):
    # Observed: the prompt was prefilled (densely, whatever the cache dtype), then the first
    # decode step failed inside the op: "kv_cache dtype torch.bfloat16 must match the query
    # dtype torch.float32".
    model = Transformer(ModelConfig.from_preset("tiny", attention="gta", n_layers=1),
                        dtype=model_dtype).eval()
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="cache_dtype"):
        greedy_generate(model, PROMPT, 3, cache_dtype=cache_dtype)
    assert not calls
    with pytest.raises(ValueError, match="cache dtype torch.float64"):
        greedy_generate(model.double(), PROMPT, 3, backend="triton")  # Triton reads no fp64


@pytest.mark.parametrize("new", [2, 5])
def test_decode_rate_counts_the_tokens_the_decode_steps_made(model, new):
    # Observed: every new token over the decode time, though the prefill makes the first of
    # each sequence: the rate read n / (n - 1) too high (2x for two new tokens).
    prompt = torch.zeros(3, 4, dtype=torch.long)
    _, stats = greedy_generate(model, prompt, new)
    assert stats.new_tokens == 3 * new and stats.decode_tokens == 3 * (new - 1)
    assert stats.decode_tokens_per_s == pytest.approx(3 * (new - 1) / stats.decode_s)
    _, single = greedy_generate(model, prompt, 1)  # no decode step: no rate
    assert single.decode_tokens == 0 and single.decode_tokens_per_s != single.decode_tokens_per_s
