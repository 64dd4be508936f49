"""`hwattn bench engine` end to end on a tiny model."""

import json

import pytest

from hwattn.cli import main


def test_bench_engine_reports_throughput_and_breakdown(capsys, tmp_path):
    out = tmp_path / "engine.json"
    rc = main(["bench", "engine", "tiny", "--attention", "gla-2", "--num-prompts", "4",
               "--prompt-len", "20", "--output-len", "6", "--page-size", "8", "--cpu-threads", "1",
               "--memory-budget", "2e6", "--max-seq-len", "128", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "output throughput" in text and "attention kernels" in text
    doc = json.loads(text.strip().splitlines()[-1])
    assert doc == json.loads(out.read_text())
    assert doc["offline"]["output_tokens"] == 4 * 6
    assert doc["offline"]["itl_s"]["n"] == 5  # one prefill step, then five decode steps
    step = doc["decode_step"]
    assert step["batch"] == 4 and step["context_len"] == 26
    assert 0 < step["attention_s"] < step["step_wall_s"] * 1.5
    assert doc["kv_bytes_per_token_per_rank"] == 4 * (2 * 2 * 16 + 8) * 4  # fp32, 4 layers


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_engine_breakdown_under_tensor_parallelism(capsys):
    """The decode-step breakdown drives its steps through the parallel runner: driving rank
    0 alone left rank 1 outside the all-reduce and hung."""
    rc = main(["bench", "engine", "tiny", "--attention", "gla-2", "--tp", "2", "--num-prompts",
               "2", "--prompt-len", "12", "--output-len", "3", "--page-size", "8",
               "--cpu-threads", "1", "--memory-budget", "2e6", "--max-seq-len", "64", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["tp"] == 2 and doc["decode_step"]["step_wall_s"] > 0


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_engine_with_two_replicas_reports_before_it_stops(capsys):
    """--dp 2: two replica processes; the decode-step breakdown runs inside replica 0."""
    rc = main(["bench", "engine", "tiny", "--attention", "gqa-4", "--dp", "2", "--num-prompts",
               "4", "--prompt-len", "12", "--output-len", "3", "--page-size", "8",
               "--cpu-threads", "1", "--memory-budget", "2e6", "--max-seq-len", "64", "--json"])
    assert rc == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["dp"] == 2 and doc["offline"]["output_tokens"] == 4 * 3
    assert doc["offline"]["itl_s"]["n"] >= 2  # the replicas' own decode steps
    assert doc["decode_step"]["step_wall_s"] > 0
