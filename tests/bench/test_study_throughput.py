"""benchmarks/study_throughput.py's MFU column on the CPU: the same steady rate as its tokens/s
and TFLOP/s columns."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_mfu_comes_from_the_rows_steady_rate(dataset_dir, tmp_path, monkeypatch):
    """With profiling on (the default) the row's tokens/s leaves the profiled window out; its
    MFU must too: MFU = tokens/s × FLOPs per token / the peak, = TFLOP/s / the peak."""
    import json

    from hwattn.train import trainer

    real = trainer.TrainConfig
    # The smoke run passes no peak (no MFU on a CPU): give it one, as a GPU run has.
    monkeypatch.setattr(trainer, "TrainConfig", lambda **kw: real(**{**kw, "peak_tflops": 1e-6}))
    spec = importlib.util.spec_from_file_location("study_throughput",
                                                  ROOT / "benchmarks" / "study_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--data", str(dataset_dir), "--variants", "gqa-4",
                     "--profile-steps", "2", "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "study_throughput.json").read_text())["rows"]
    assert row["mfu"] == pytest.approx(row["tokens_per_s"] * row["flops_per_token"] / 1e6, rel=1e-9)
    assert row["mfu"] == pytest.approx(row["tflops"] / 1e-6, rel=1e-9)
