"""benchmarks/engine_host.py: the engine's host work per decode step with the graph replay
stubbed, on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "engine_host.py"


def run(*args, check=True):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, timeout=240,
                          capture_output=True, text=True, check=check)


def test_engine_host_times_every_phase_of_replayed_decode_steps(tmp_path):
    out = tmp_path / "host.jsonl"
    done = run("--batch", "6", "--context", "80", "--steps", "24", "--page-size", "16",
               "--out", str(out))
    res = json.loads(out.read_text().splitlines()[-1])
    assert res["device"] == "cpu" and res["batch"] == 6 and res["steps"] >= 24
    phases = res["phases_us"]
    assert set(phases) >= {"schedule", "launch", "resolve", "output", "inputs", "sampling", "host"}
    # The captured path ran (the plan refresh and the static inputs are its "inputs").
    assert phases["inputs"] > 0 and phases["launch"] >= phases["inputs"]
    assert 0 < phases["host"] <= res["step_us"] * 1.05
    # Greedy steps: the staged inputs (plan, tokens, lengths, block table) in one copy; a
    # steady batch feeds its tokens without an index upload (this count was 7 on the CPU,
    # 8 on a GPU, before the uploads were merged, then 2 with the plan copied apart).
    assert 0.9 <= res["copies_per_step"] <= 1
    assert "host work only" in done.stdout


def test_engine_host_checks_its_arguments():
    done = run("--steps", "400", "--context", "100", check=False)
    assert done.returncode == 2 and "--context must exceed" in done.stderr
    done = run("--batch", "0", check=False)
    assert done.returncode == 2 and "--batch must be >= 1" in done.stderr


def test_engine_host_times_speculative_verify_steps(tmp_path):
    """--speculative K: n-gram drafts verified by replays of the K + 1 graph that compute the
    scripted target, so some drafts are accepted and some rejected; --check decodes the same
    prompts plainly and requires the same greedy outputs."""
    out = tmp_path / "host.jsonl"
    done = run("--batch", "6", "--context", "80", "--steps", "24", "--page-size", "16",
               "--speculative", "2", "--check", "--out", str(out))
    res = json.loads(out.read_text().splitlines()[-1])
    assert res["speculative"] == 2 and res["target"] == "scripted"
    assert res["outputs_equal_plain"] is True
    assert 0 < res["acceptance"] < 1
    # Fewer steps than tokens per sequence: accepted drafts advance a step by more than one.
    assert res["tokens_per_step"] > res["batch"]
    phases = res["phases_us"]
    assert phases["draft"] > 0 and phases["resolve"] > 0 and phases["inputs"] > 0
    assert 0 < res["host_minus_forward_us"] <= res["step_us"] * 1.05
    assert 0.9 <= res["copies_per_step"] <= 1  # the verify step's inputs in one staged copy
    assert "acceptance" in done.stdout and "equal plain decoding" in done.stdout
    done = run("--speculative", "2", "--target", "none", check=False)
    assert done.returncode == 2 and "--target scripted" in done.stderr


def test_engine_host_with_speculation_disabled_at_the_batch_size(tmp_path):
    """--speculative-disable-batch-size N at --batch >= N: a speculative engine whose every
    decode step is plain and overlapped (nothing drafted, one token a sequence per step),
    with plain decoding's greedy outputs; below N it verifies drafts as before."""
    out = tmp_path / "host.jsonl"
    common = ("--batch", "6", "--context", "80", "--steps", "24", "--page-size", "16",
              "--speculative", "2", "--check", "--out", str(out))
    done = run(*common, "--speculative-disable-batch-size", "4")
    res = json.loads(out.read_text().splitlines()[-1])
    assert (res["speculative"], res["speculative_disable_batch_size"]) == (2, 4)
    assert res["outputs_equal_plain"] is True and res["acceptance"] is None
    assert res["tokens_per_step"] == res["batch"] and res["phases_us"]["draft"] == 0
    assert "no drafts verified" in done.stdout
    run(*common, "--speculative-disable-batch-size", "7")
    res = json.loads(out.read_text().splitlines()[-1])
    assert 0 < res["acceptance"] < 1 and res["tokens_per_step"] > res["batch"]
    done = run("--speculative-disable-batch-size", "4", check=False)
    assert done.returncode == 2 and "needs --speculative" in done.stderr


def test_engine_host_checks_delta_outputs_whole(tmp_path):
    """--check with --output-kind delta joins each request's deltas (the warm-up steps'
    included) before comparing with plain decoding; it compared each request's last delta
    alone, and reported outputs that were equal as different."""
    out = tmp_path / "host.jsonl"
    run("--batch", "4", "--context", "128", "--steps", "24", "--page-size", "16",
        "--speculative", "3", "--check", "--output-kind", "delta", "--out", str(out))
    res = json.loads(out.read_text().splitlines()[-1])
    assert res["outputs_equal_plain"] is True and res["output_kind"] == "delta"
