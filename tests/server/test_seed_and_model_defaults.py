"""Two request fields taken as vLLM takes them: `seed` is any signed 64-bit integer (negative
ones included; the sampler reads its 64 bits as two's complement), and `model` may be left
out (the served model), while a wrong name still gets the 404."""

import json

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from hwattn.engine import SamplingParams  # noqa: E402
from tests.server.conftest import C, H, NAME, tiny_server  # noqa: E402

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


@pytest.fixture(scope="module")
def base():
    with tiny_server() as (url, _):
        yield url


def post(base, path, body):
    return httpx.post(base + path, json=body, trust_env=False, timeout=60)


def sampled(base, seed) -> list[int]:
    """The tokens a seeded, sampled completion draws (its top-1 log-probability entries)."""
    r = post(base, C, {"model": NAME, "prompt": "the cat", "max_tokens": 12, "temperature": 1.0,
                       "ignore_eos": True, "seed": seed, "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize("seed", [-1, -7, INT64_MIN, INT64_MAX, 0])
def test_sampling_params_take_every_int64_seed(seed):
    assert SamplingParams(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [1 << 63, (1 << 64) - 1, INT64_MIN - 1, 1 << 64])
def test_sampling_params_refuse_seeds_beyond_int64_by_name(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"):
        SamplingParams(seed=seed)


def test_negative_seeds_draw_reproducibly_and_apart(base):
    """Equal seeds, equal draws; -1 is not folded onto 2**63 - 1 (the same low 63 bits), 1
    (its magnitude) or 0, and the int64 extremes differ from each other."""
    draws = {seed: sampled(base, seed) for seed in (-1, INT64_MAX, 1, 0, INT64_MIN, -2)}
    assert sampled(base, -1) == draws[-1]
    assert sampled(base, INT64_MIN) == draws[INT64_MIN]
    assert len({tuple(d) for d in draws.values()}) == len(draws), draws


@pytest.mark.parametrize("seed", [(1 << 64) - 1, 1 << 63, INT64_MIN - 1])
def test_seeds_beyond_int64_are_refused_by_name(base, seed):
    """2**64 - 1 is refused, not taken as -1 (as vLLM's server refuses it)."""
    r = post(base, C, {"model": NAME, "prompt": "a", "max_tokens": 2, "seed": seed})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "seed"


@pytest.mark.parametrize("path, body", [
    (C, {"prompt": "hi", "max_tokens": 2}),
    (H, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    (C, {"model": None, "prompt": "hi", "max_tokens": 2}),
], ids=["completions", "chat", "null"])
@pytest.mark.parametrize("stream", [False, True])
def test_model_may_be_left_out(base, path, body, stream):
    r = post(base, path, {**body, "stream": stream})
    assert r.status_code == 200, r.text
    if stream:
        docs = [json.loads(line[6:]) for line in r.text.splitlines()
                if line.startswith("data: {")]
        assert docs and all(d["model"] == NAME for d in docs), r.text
    else:
        assert r.json()["model"] == NAME


@pytest.mark.parametrize("path, body", [
    (C, {"prompt": "hi", "max_tokens": 2}),
    (H, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hi"}),
], ids=["completions", "chat", "tokenize"])
def test_a_wrong_model_is_still_404_and_a_non_string_400(base, path, body):
    r = post(base, path, {**body, "model": "gpt-4"})
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"
    r = post(base, path, {**body, "model": 5})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "model"


def test_the_further_completions_of_seeds_2_63_apart_differ(base):
    """With n = 2: -1 and 2**63 - 1 differ in their first completion (above) and should in
    their second too."""
    def second(seed):
        r = post(base, C, {"model": NAME, "prompt": "the cat", "max_tokens": 12, "n": 2,
                           "temperature": 1.0, "ignore_eos": True, "seed": seed})
        assert r.status_code == 200, r.text
        return next(c["text"] for c in r.json()["choices"] if c["index"] == 1)

    assert second(-1) != second(INT64_MAX)
