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
