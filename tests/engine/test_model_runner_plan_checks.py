"""The runner's steps on host lengths: each step's plan is held to its lengths once, in the
first layer, not in every layer (`hwattn.ops.plan.CheckedLengths`), and lengths written in
place between two layers are still refused by the next one."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

from hwattn.engine.loader import build_model  # noqa: E402
from hwattn.engine.model_runner import ModelRunner, StepInput  # noqa: E402
from hwattn.ops.backends import base  # noqa: E402

PAGE = 16
BATCH = 3
PROMPT = 20


@pytest.fixture(scope="module")
def runner():
    """A 4-layer model behind the Triton backend (interpreted), its prompts prefilled."""
    model = build_model("tiny", attention="gqa-4", dtype="fp32", device="cpu")
    assert len(model.layers) > 1
    run = ModelRunner(model, num_pages=40, page_size=PAGE, max_model_len=128, max_num_seqs=4,
                      backend="triton", cuda_graphs=False)
    run.execute(StepInput("prefill", [[b + 1] * PROMPT for b in range(BATCH)], [0] * BATCH,
                          _tables(), need_logits=[True] * BATCH))
    return run


def _tables() -> list[list[int]]:
    """Each sequence's 8 pages (128 tokens), pages 1..24 of the pool."""
    return [list(range(1 + 8 * b, 9 + 8 * b)) for b in range(BATCH)]


def _decode(cached: int) -> StepInput:
    """One token per sequence after `cached` cached ones."""
    return StepInput("decode", [[7]] * BATCH, [cached] * BATCH, _tables())


def _chunk() -> StepInput:
    """A prompt chunk over each sequence's cached prompt: attended through the paged op."""
    return StepInput("prefill", [[5, 6, 7]] * BATCH, [PROMPT] * BATCH, _tables(),
                     need_logits=[True] * BATCH)


def _count(monkeypatch, owner, name: str) -> list:
    """A list that grows by one with each call of `owner.name` from here on."""
    calls, fn = [], getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_a_decode_step_checks_its_plan_in_one_layer(runner, monkeypatch):
    """Deriving the plan's lengths in every layer cost ~15 µs a layer on the CPU."""
    calls = _count(monkeypatch, runner.backend, "plan_lengths")
    for step in range(2):
        logits = runner.execute(_decode(PROMPT + step))
        assert torch.isfinite(logits).all()
        assert len(calls) == step + 1


def test_a_prefill_step_checks_its_plan_in_one_layer(runner, monkeypatch):
    calls = _count(monkeypatch, base, "_check_prefill_plan")
    assert torch.isfinite(runner.execute(_chunk())).all()
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_lengths_written_between_layers_are_refused(runner, kind):
    """The first layer's check does not vouch for lengths the step changes in place after it:
    the second layer sees the plan and the lengths part and refuses the call."""
    def shorten(module, args):
        meta = args[3]  # Block.forward(x, cos, sin, meta, cache)
        meta.cache_seqlens[0] -= 1

    hook = runner.model.layers[1].register_forward_pre_hook(shorten)
    try:
        with pytest.raises(ValueError, match="plan was made for other lengths"):
            runner.execute(_decode(PROMPT + 4) if kind == "decode" else _chunk())
    finally:
        hook.remove()
