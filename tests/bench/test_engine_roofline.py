"""benchmarks/engine_roofline.py on the tiny preset (CPU): the decode part runs eager and
compiled runners and the engine loop, and its tables carry the host phases; the prefill part
times whole prompts of unequal lengths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def roofline(tmp_path, *args) -> tuple[dict, str]:
    """Run the script with --tiny and `args`; its JSON document and its markdown tables."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_roofline.py"), "--tiny",
           "--out", str(tmp_path), *args]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=280, capture_output=True)
    return (json.loads((tmp_path / "engine_roofline.json").read_text()),
            (tmp_path / "engine_roofline.md").read_text())


@pytest.mark.timeout(300)
def test_engine_roofline_tiny_decode(tmp_path):
    doc, table = roofline(tmp_path, "--parts", "decode", "--variants", "gla-2", "--threaded")
    compiled = [r for r in doc["rows"] if r["part"] == "decode" and r["compiled"]]
    assert compiled and all("argmax_agreement" in r["vs_eager"] for r in compiled)
    for r in compiled:
        phases = r["host_phases_us"]
        assert set(phases) >= {"schedule", "launch", "wait", "resolve", "output", "gc", "host"}
        assert 0 < phases["host"] <= r["engine_step_s"] * 1e6 * 1.05
    assert "Host per engine decode step" in table
    assert all(r["threaded"]["engine_step_s"] > 0 for r in compiled)
    assert all(r["launch_queued_s"] > 0 for r in compiled) and "launch loop ms" in table
    assert "launches made from a thread of their own" in table
    assert doc["skinny_gemm"] is False and "`F.linear`" in table  # the CPU has no skinny kernel


@pytest.mark.parametrize("flag", ["--decode-modes", "--prefill-modes", "--ttft-prefill-modes"])
def test_engine_roofline_rejects_unknown_modes(tmp_path, flag):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "engine_roofline.py"), "--tiny",
           "--out", str(tmp_path), "--parts", "decode", flag, "eager,fast"]
    done = subprocess.run(cmd, cwd=ROOT, timeout=120, capture_output=True, text=True)
    allowed = "compiled, eager" if flag == "--decode-modes" else "compiled, eager, pieces"
    assert done.returncode == 2 and f"{flag} takes {allowed} (one or more)" in done.stderr


@pytest.mark.timeout(300)
def test_engine_roofline_tiny_prefill_with_unequal_prompts(tmp_path):
    doc, table = roofline(tmp_path, "--parts", "prefill", "--variants", "gqa-4")
    unequal = [r for r in doc["rows"] if r["part"] == "prefill_unequal"]
    # The CPU's reference backend has no variable-length kernel: the dense loop alone.
    assert [r["route"] for r in unequal] == ["dense loop"]
    assert unequal[0]["lengths"] == [4, 16, 28] and unequal[0]["tokens_per_s"] > 0
    assert "prompts of unequal lengths" in table
    # Whole and chunked prompts through the eager and the compiled prefill blocks.
    whole = [(r["chunk"], r["compiled"]) for r in doc["rows"] if r["part"] == "prefill"]
    assert whole == [(48, False), (16, False), (48, True), (16, True)]
    assert "| gqa-4 | 1 x 48 | 16 | compiled |" in table
    for r in doc["rows"]:
        if r["part"] == "prefill" and r["compiled"]:  # the same logits as the eager rows'
            assert r["argmax_agree"] == 1.0 and r["logits_max_diff"] < 1e-3, r


@pytest.mark.parametrize("variant, tied", [("gqa-4", True), ("mla", True), ("gla-2", False)])
def test_prefill_flops_count_the_output_head_once_per_prompt(variant, tied):
    """The prefill MFU's FLOPs: the matrix products a whole-prompt prefill runs (counted by
    PyTorch's FlopCounterMode: the output head on each prompt's last token only, as the
    runner does) plus attention over the full context (the convention)."""
    import importlib.util

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from hwattn.engine.loader import build_model

    spec = importlib.util.spec_from_file_location("engine_roofline_mod",
                                                  ROOT / "benchmarks" / "engine_roofline.py")
    er = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(er)
    net = build_model("tiny", attention=variant, dtype=torch.float32, device=torch.device("cpu"),
                      seed=0, overrides=dict(max_seq_len=128, tie_embeddings=tied))
    lengths = [48, 20]
    counted = 0
    for n in lengths:
        tokens = torch.randint(0, net.config.vocab_size, (1, n))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            hidden = net(tokens, hidden_only=True)
            net.output(hidden[:, -1:])
        # SDPA is not counted on the CPU; its full-context count is added (the convention).
        sdpa = sum(v for k, v in fc.get_flop_counts()["Global"].items() if "attention" in str(k))
        counted += fc.get_total_flops() - sdpa + net.attention_flops_per_token(n) / 3 * n
    assert er.prefill_flops(net, lengths) == pytest.approx(counted, rel=1e-9)
