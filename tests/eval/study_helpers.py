"""What the quality-study tests share: the study script loaded as a module, and hand-made run
records (`fake_run`, `paired_runs`) written into a study folder (`write_study_folder`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def study_module():
    """benchmarks/quality_study.py, loaded as a module."""
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "benchmarks" / "quality_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def fake_run(v, seed, ppl_a, ppl_b):
    """A run record in the form the study writes, with perplexities `ppl_a` (code) and
    `ppl_b` (prose) and no curve."""
    avg = (ppl_a + ppl_b) / 2
    return {"variant": v, "seed": seed, "preset": "study", "params": 3.6e7,
            "non_embedding_params": 1.9e7, "hidden_dim": 1, "kv_bytes_per_token_per_layer": 256,
            "curve": [], "eval": {"ppl": {"code": {"ppl": ppl_a, "bpb": 1.0},
                                          "prose": {"ppl": ppl_b, "bpb": 1.0},
                                          "average": {"ppl": avg, "bpb": 1.0}}}}


def paired_runs(gaps, base=20.0):
    """gqa-4 and gta-4 runs of seeds 0, 1, ...: gta-4's perplexity `gaps[seed]` above gqa-4's."""
    runs = []
    for seed, g in enumerate(gaps):
        runs += [fake_run("gqa-4", seed, base, base),
                 fake_run("gta-4", seed, base * (1 + g), base * (1 + g))]
    return runs


def write_study_folder(study: Path, runs: list[dict], looks=None, next_looks=None) -> Path:
    study.mkdir()
    (study / "study_runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    if looks is not None:
        (study / "study_looks.json").write_text(json.dumps(looks, indent=1) + "\n")
    if next_looks is not None:
        (study / "study_next_looks.json").write_text(json.dumps(next_looks, indent=1) + "\n")
    return study
