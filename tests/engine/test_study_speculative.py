"""benchmarks/study_speculative.py --tiny on the CPU: a study run trained with the study's
smoke configuration, its held-out prompts decoded with and without n-gram drafting at each
batch size (1 and 3), with the fallback row (plain steps from 3 running sequences), the
document's numbers consistent with each other, and greedy outputs unchanged by speculation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KS = ("1", "2", "3", "4")
BATCHES = ("1", "3")  # --tiny's default batch sizes: 1 and --prompts


def _script():
    spec = importlib.util.spec_from_file_location(
        "study_speculative", ROOT / "benchmarks" / "study_speculative.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc(out: Path) -> dict:
    return json.loads((out / "study_speculative.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset_dir):
    """One --tiny command that trains gqa-4 seed 0 first. Returns (module, root, argv, doc)."""
    mod = _script()
    root = tmp_path_factory.mktemp("spec")
    argv = ["--tiny", "--train", "gqa-4", "--seed", "0", "--data", str(dataset_dir),
            "--work", str(root / "work")]
    assert mod.main(argv + ["--out", str(root / "out")]) == 0
    return mod, root, argv, _doc(root / "out")


def test_tiny_run_trains_as_the_study_and_reports_every_k(trained, dataset_dir):
    from hwattn.data.loader import TokenDataset

    mod, root, _, doc = trained
    study = mod.quality_study.parse_args(["--smoke"])
    run = doc["model"]["training"]
    assert run["finished"] and not run["reused"]
    assert (run["preset"], run["steps"], run["steps_done"], run["batch_size"], run["seq_len"],
            run["lr"]) == (study.preset, study.steps, study.steps, study.batch_size,
                           study.seq_len, study.lr)
    assert doc["model"]["label"] == "gqa-4"
    assert Path(doc["model"]["checkpoint"]) == root / "work" / "gqa-4-s0" / "checkpoint"
    assert sorted(doc["domains"]) == TokenDataset(dataset_dir).domains
    s = doc["setup"]
    assert (s["prompts"], s["prompt_len"], s["output_len"], s["dtype"]) == (3, 48, 24, "float64")
    assert (s["batch_sizes"], s["disable_batch_size"]) == ([1, 3], 3)
    for domain, part in doc["domains"].items():
        assert len(set(part["documents"])) == 3
        assert list(part["batches"]) == list(BATCHES)
        for batch, group in part["batches"].items():
            rows = group["rows"]
            assert group["batch"] == int(batch)
            assert list(rows) == ["0", *KS, "fallback"]
            plain = rows["0"]
            assert plain["output_tokens"] == 3 * 24 and plain["acceptance"] is None
            for row in rows.values():  # the median of --repeats (2 under --tiny) timed runs
                runs = row["decode_tokens_per_s_runs"]
                assert len(runs) == 2 and row["decode_tokens_per_s"] == sorted(runs)[1]
                assert row["decode_tokens_per_s_spread"] == pytest.approx(
                    (max(runs) - min(runs)) / row["decode_tokens_per_s"])
                assert row["repeats_equal"] is True  # fp64 greedy repeats itself
            for k in KS:
                row = rows[k]
                assert row["batch"] == int(batch)
                assert row["output_tokens"] == plain["output_tokens"]
                assert row["speedup"] == row["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
                assert row["itl_over_plain"] == row["itl_median_s"] / plain["itl_median_s"]
                assert 0 <= row["acceptance"] <= 1 and 0 <= row["ngram_match_share"] <= 1
                assert row["verify_step_share"] == 1.0  # nothing asks for a plain step
                # A verify step yields at least one token a sequence: never more steps than
                # plain decoding.
                assert 0 < row["decode_steps"] <= plain["decode_steps"]
                assert row["outputs_equal"] == 1.0 and row["tokens_before_divergence"] == 1.0
                assert row["first_divergence_mean"] is None
            # The fallback row: the best k, its steps plain from 3 running sequences on. At
            # batch 1 it runs as that k's row does, at batch 3 as plain decoding does.
            fb = rows["fallback"]
            best = max(KS, key=lambda k: rows[k]["speedup"])
            assert (fb["k"], fb["disable_batch_size"], fb["batch"]) == (int(best), 3, int(batch))
            assert fb["outputs_equal"] == 1.0
            assert fb["speedup"] == fb["decode_tokens_per_s"] / plain["decode_tokens_per_s"]
            if batch == "1":
                assert fb["verify_step_share"] == 1.0
                assert fb["decode_steps"] == rows[best]["decode_steps"]
                assert fb["acceptance"] == rows[best]["acceptance"]
            else:
                assert fb["verify_step_share"] == 0.0 and fb["acceptance"] is None
                assert fb["ngram_match_share"] is None
                assert fb["decode_steps"] == plain["decode_steps"]
        assert part["sample"]["prompt_tail"]
    assert list(doc["step_time"]) == list(BATCHES)
    for batch, step in doc["step_time"].items():
        assert (step["batch"], step["context_len"]) == (int(batch), 48 + 12)
        assert list(step["rows"]) == ["0", *KS]
        for k, row in step["rows"].items():
            assert row["query_len"] == int(k) + 1 and row["step_wall_s"] > 0
            assert row["step_over_plain"] == row["step_wall_s"] / step["rows"]["0"]["step_wall_s"]
    assert doc["targets"] is None  # the embedded corpus has no C code
    table = (root / "out" / "study_speculative.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    # Two tables, header + rows: per domain and batch 5 k rows and the fallback row.
    assert len(rows) == (1 + 6 * 2 * len(doc["domains"])) + (1 + 5 * 2)
    assert "| 1 | 4 | 5 |" in table and "| 3 | 4 | 5 |" in table  # k = 4 verifies 5 tokens
    assert f"| {best}, plain at >= 3 running |" in table


def test_rerun_reuses_the_finished_run(trained):
    mod, root, argv, first = trained
    domain = sorted(first["domains"])[0]
    assert mod.main(argv + ["--out", str(root / "again"), "--ks", "2", "--domains", domain]) == 0
    doc = _doc(root / "again")
    assert doc["model"]["training"]["reused"] is True
    assert doc["model"]["checkpoint"] == first["model"]["checkpoint"]
    assert list(doc["domains"]) == [domain]
    assert doc["domains"][domain]["documents"] == first["domains"][domain]["documents"]
    assert list(doc["domains"][domain]["batches"]) == list(BATCHES)
    for group in doc["domains"][domain]["batches"].values():
        assert list(group["rows"]) == ["0", "2", "fallback"]
    assert [list(st["rows"]) for st in doc["step_time"].values()] == [["0", "2"], ["0", "2"]]


def test_batch_sizes_and_no_fallback_row(trained):
    """--batch-sizes picks the batches measured; --disable-batch-size 0 drops the fallback row."""
    mod, root, argv, first = trained
    domain = sorted(first["domains"])[0]
    assert mod.main(argv + ["--out", str(root / "b2"), "--ks", "3", "--domains", domain,
                            "--batch-sizes", "2", "--disable-batch-size", "0"]) == 0
    doc = _doc(root / "b2")
    assert (doc["setup"]["batch_sizes"], doc["setup"]["disable_batch_size"]) == ([2], None)
    group = doc["domains"][domain]["batches"]["2"]
    assert list(group["rows"]) == ["0", "3"] and group["rows"]["3"]["outputs_equal"] == 1.0
    assert list(doc["step_time"]) == ["2"] and doc["step_time"]["2"]["batch"] == 2


def test_greedy_outputs_survive_rejected_drafts(tmp_path, dataset_dir, checkpoints):
    """A random model with scaled-up weights varies its output, so drafts are sometimes
    accepted and sometimes rejected; the outputs must still be plain decoding's."""
    mod = _script()
    ckpt = checkpoints("gla-2")
    assert mod.main(["--tiny", "--checkpoint", ckpt, "--data", str(dataset_dir),
                     "--out", str(tmp_path)]) == 0
    doc = _doc(tmp_path)
    assert doc["model"]["training"] is None and doc["model"]["label"] == "gla-2"
    rows = [r for part in doc["domains"].values() for group in part["batches"].values()
            for k, r in group["rows"].items() if k not in ("0", "fallback")]
    assert len(rows) == 4 * len(BATCHES) * len(doc["domains"])
    assert any(0 < r["acceptance"] < 1 for r in rows), "no run both accepted and rejected drafts"
    assert all(r["outputs_equal"] == 1.0 for part in doc["domains"].values()
               for group in part["batches"].values() for k, r in group["rows"].items()
               if k != "0")  # the fallback rows too


def test_agreement_finds_the_first_difference():
    mod = _script()
    plain = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    spec = [[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]]
    got = mod.agreement(plain, spec)
    assert got["outputs_equal"] == pytest.approx(1 / 3)
    assert got["tokens_before_divergence"] == pytest.approx((4 + 2 + 0) / 12)
    assert got["first_divergence_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 speculative outputs for 3"):
        mod.agreement(plain, spec[:2])


def test_bad_arguments_are_refused(tmp_path, dataset_dir, checkpoints):
    mod = _script()
    base = ["--tiny", "--data", str(dataset_dir), "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="--ks"):
        mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--ks", "0,2"])
    with pytest.raises(SystemExit, match="--checkpoint: .* holds no config.json"):
        mod.main(base + ["--checkpoint", str(tmp_path)])
    with pytest.raises(SystemExit, match="--domains: nosuch"):
        mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--domains", "nosuch"])
    with pytest.raises(SystemExit, match="--prompt-len"):
        mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--prompt-len", "0"])
    for sizes in ("0,2", "4", "x"):  # --tiny decodes 3 prompts
        with pytest.raises(SystemExit, match="--batch-sizes"):
            mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--batch-sizes", sizes])
    with pytest.raises(SystemExit, match="--disable-batch-size must be >= 0"):
        mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--disable-batch-size", "-1"])
    with pytest.raises(SystemExit):  # a model comes from one place
        mod.main(base + ["--checkpoint", checkpoints("gla-2"), "--train", "mha"])


def test_targets_read_the_code_domain(trained):
    """The targets come, per batch size, from the code domain's best k at that batch (never
    the fallback row) and that k's verify step timed at that batch."""
    mod, _, _, doc = trained
    doc = json.loads(json.dumps(doc))
    first = sorted(doc["domains"])[0]
    doc["domains"] = {"code": doc["domains"][first]}
    one, three = (doc["domains"]["code"]["batches"][b]["rows"] for b in BATCHES)
    one["2"]["speedup"], one["3"]["speedup"] = 1.6, 1.4
    one["1"]["speedup"] = one["4"]["speedup"] = 1.1
    one["fallback"]["speedup"] = 9.0
    for k in KS:
        three[k]["speedup"] = 0.9 if k == "4" else 0.5
    doc["step_time"]["1"]["rows"]["2"]["step_over_plain"] = 1.35
    doc["step_time"]["3"]["rows"]["4"]["step_over_plain"] = 1.2
    t = mod.targets(doc)
    assert list(t) == list(BATCHES)
    assert (t["1"]["batch"], t["1"]["k"], t["1"]["speedup"], t["1"]["speedup_met"]) == \
        (1, 2, 1.6, True)
    assert (t["1"]["verify_over_plain"], t["1"]["verify_met"]) == (1.35, False)
    assert (t["3"]["k"], t["3"]["speedup_met"], t["3"]["verify_met"]) == (4, False, True)
    text = mod.markdown({**doc, "targets": t})
    assert "at batch 1, at the best k = 2: speed-up 1.60x (>= 1.5x: met)" in text
    assert "verify step 1.35x a plain step (<= 1.3x: not met)" in text
    assert "at batch 3, at the best k = 4: speed-up 0.90x (>= 1.5x: not met); verify step " \
        "1.20x a plain step (<= 1.3x: met)" in text


def test_inputs_are_checked_before_training(tmp_path, dataset_dir):
    mod = _script()
    with pytest.raises(SystemExit, match="--prompts asks for 50"):
        mod.main(["--tiny", "--train", "mha", "--data", str(dataset_dir), "--prompts", "50",
                  "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "work" / "mha-s0").exists()


def test_every_run_of_a_row_prefills_its_prompts_whole(dataset_dir, checkpoints):
    """A row's timed runs repeat the same prompts on one engine; with prefix caching the
    later runs would prefill only the last page over a cached prefix, another kernel path
    whose bf16 rounding changed greedy outputs between the runs on a GPU."""
    import torch

    from hwattn.bench.engine import run_offline

    mod = _script()
    ckpt = checkpoints("gqa-4")
    args = mod.parse_args(["--tiny", "--checkpoint", ckpt, "--data", str(dataset_dir)])
    shared = mod.SharedRunner(Path(ckpt), args, "cpu", torch.float64)
    engine = shared.engine(0)
    prompts = [[7 + i] * (2 * args.page_size + 3) for i in range(2)]
    first = run_offline(engine, prompts, 4).outputs
    assert run_offline(engine, prompts, 4).outputs == first
    assert engine.block_manager.prefix_queries > 0 and engine.block_manager.prefix_hits == 0
