"""CPU thread defaults: one thread for small models, explicit counts and OMP_NUM_THREADS win,
every subcommand takes --cpu-threads, and the demo ranks variants only beyond the noise."""

from __future__ import annotations

import argparse

import pytest
import torch

from hwattn import cpu_threads
from hwattn.cli import build_parser, main
from hwattn.cli.demo import speed_verdict


def _leaf_parsers(parser: argparse.ArgumentParser, path=()):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield " ".join(path), parser
    for action in subs:
        for name, child in action.choices.items():
            yield from _leaf_parsers(child, (*path, name))


def test_every_subcommand_takes_cpu_threads():
    leaves = dict(_leaf_parsers(build_parser()))
    assert {"train", "eval", "demo", "serve", "compare", "bench engine"} <= set(leaves)
    missing = [name for name, p in leaves.items() if name != "data sources"
               and "--cpu-threads" not in p._option_string_actions]
    assert not missing


def test_defaults_follow_model_size_and_yield_to_explicit_choices(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(cpu_threads, "available_cores", lambda: 2)
    torch.set_num_threads(2)
    assert cpu_threads.use_default_cpu_threads(1_000_000, "cpu") == 1
    assert cpu_threads.use_default_cpu_threads(400_000_000, "cpu") == 2
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (5.2, 5.0, 4.0))  # a busy machine
    assert cpu_threads.use_default_cpu_threads(400_000_000, "cpu") == 1
    torch.set_num_threads(2)
    assert cpu_threads.use_default_cpu_threads(1_000_000, "meta") == 2  # not CPU work: untouched
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads.use_default_cpu_threads(1_000_000, "cpu") == 2
    assert "OMP_NUM_THREADS" in cpu_threads.describe()
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpu_threads.set_cpu_threads(2)
    assert cpu_threads.use_default_cpu_threads(1_000_000, "cpu") == 2
    assert "--cpu-threads" in cpu_threads.describe()
    with pytest.raises(ValueError, match="cpu_threads"):
        cpu_threads.set_cpu_threads(0)


def test_cli_rejects_a_bad_thread_count(capsys):
    assert main(["analyze", "--preset", "tiny", "--cpu-threads", "0"]) == 2
    assert "--cpu-threads must be >= 1, got 0" in capsys.readouterr().err


def test_speed_verdict_ranks_only_beyond_the_spread():
    noisy = [("mha", [300, 310, 290]), ("gla-2", [305, 280, 295])]
    assert "no variant is faster" in speed_verdict(noisy)
    clear = [("mha", [300, 310, 305]), ("gla-2", [250, 260, 255]), ("mla", [258, 262, 270])]
    verdict = speed_verdict(clear)
    assert "mha > " in verdict and "gla-2" in verdict and "mla" in verdict
    assert "gla-2 >" not in verdict and "mla >" not in verdict


def test_demo_reports_median_and_spread_after_warm_up(capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert main(["demo", "--batch", "1", "--prompt-len", "4", "--new-tokens", "3",
                 "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 CPU thread (default for this model size" in out
    assert "median, range of 2" in out and "decode tokens/s" in out
    assert torch.get_num_threads() == 1


def test_llm_applies_the_thread_default_of_the_commands(monkeypatch):
    """`LLM(...)` in Python chooses CPU threads as `hwattn serve` does: one for the tiny
    model on an idle 2-core machine, OMP_NUM_THREADS or an explicit cpu_threads if given."""
    from hwattn.engine import LLM

    small = dict(device="cpu", max_model_len=64, num_pages=12)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(cpu_threads, "available_cores", lambda: 2)
    torch.set_num_threads(2)
    llm = LLM("tiny", **small)
    assert torch.get_num_threads() == llm.cpu_threads == cpu_threads.default_threads(1_000_000) == 1
    torch.set_num_threads(1)
    big = LLM("tiny", model_overrides={"vocab_size": 200_000}, **small)  # over 20M parameters
    assert big.engine.model.num_params() > cpu_threads.SMALL_MODEL_PARAMS
    assert torch.get_num_threads() == 2  # the idle cores
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    LLM("tiny", **small)
    assert torch.get_num_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    assert LLM("tiny", cpu_threads=2, **small).cpu_threads == 2 == torch.get_num_threads()
    with pytest.raises(ValueError, match="cpu_threads"):
        LLM("tiny", cpu_threads=0, **small)
