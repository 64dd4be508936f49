"""The figure of the engine's decode step against its floor (`hwattn.bench.plot`), drawn from
small made-up documents shaped as `benchmarks/engine_roofline.py` writes them, and from
run 9's recorded one."""

import copy
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from hwattn.bench.plot import plot_engine_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUN9 = (ROOT / "benchmarks/results/engine_check_h200_2026-12-04/run9_queued_forward"
        / "engine_roofline.json")


def row(variant, context, attention, gemm, cache, other, queued, engine, floor, compiled=True):
    """One decode row, times in ms (stored in seconds, as the script stores them)."""
    s = 1e-3
    kernels = dict(attention_s=attention * s, gemm_s=gemm * s, cache_write_s=cache * s,
                   other_s=other * s, kernels_s=(attention + gemm + cache + other) * s,
                   kernels_per_step=359.0)
    r = dict(part="decode", variant=variant, batch=8, context=context, compiled=compiled,
             step_wall_s=engine * 1.1 * s, forward_device_s=queued * 1.02 * s,
             forward_queued_s=queued * s, kernels=kernels,
             floor=dict(bytes_s=floor * s, flops_s=floor / 3 * s, floor_s=floor * s))
    if compiled:
        r["engine_step_s"] = engine * s
    return r


def doc(rows):
    return dict(device_name="Test GPU", peaks=[3000.0, 600.0], args=dict(tiny=False), rows=rows)


ROWS = [
    row("gqa-4", 1024, 0.9, 1.1, 0.04, 0.3, 2.5, 2.6, 1.5),
    row("gqa-4", 1024, 1.9, 2.1, 0.04, 0.6, 5.0, 5.2, 1.5, compiled=False),  # not drawn
    row("gla-2", 1024, 0.6, 1.4, 0.04, 0.4, 2.6, 2.75, 1.2),
    row("gqa-4", 8192, 6.0, 1.1, 0.04, 0.3, 7.6, 7.7, 7.0),
    row("gla-2", 8192, 3.5, 1.4, 0.04, 0.4, 5.5, 5.4, 4.2),  # engine below its queued forward
]


def overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_bars_add_up_to_the_engine_step_with_the_floor_and_its_ratio(tmp_path):
    path = tmp_path / "step.png"
    drawn = plot_engine_step(doc(ROWS), path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    texts = drawn.pop("texts_px")
    compiled = [r for r in ROWS if r["compiled"]]
    assert set(drawn) == {(r["variant"], r["batch"], r["context"]) for r in compiled}
    for r in compiled:
        d = drawn[(r["variant"], r["batch"], r["context"])]
        segs = d["segments"]
        assert list(segs) == ["attention", "gemm", "cache_write", "other", "gaps", "beyond"]
        assert d["bottom_ms"] == 0
        assert sum(segs.values()) == pytest.approx(r["engine_step_s"] * 1e3)
        assert segs["attention"] == pytest.approx(r["kernels"]["attention_s"] * 1e3)
        kernels_ms = r["kernels"]["kernels_s"] * 1e3
        assert segs["gaps"] == pytest.approx(r["forward_queued_s"] * 1e3 - kernels_ms)
        assert segs["beyond"] == pytest.approx((r["engine_step_s"] - r["forward_queued_s"]) * 1e3)
        assert d["floor_ms"] == pytest.approx(r["floor"]["floor_s"] * 1e3)
        ratio = r["engine_step_s"] / r["floor"]["floor_s"]
        assert d["label"] == f"{r['engine_step_s'] * 1e3:.2f} ms\n{ratio:.2f}× floor"
    assert drawn[("gla-2", 8, 8192)]["segments"]["beyond"] < 0  # drawn downward, still adds up
    labels = [d["label_px"] for d in drawn.values()]
    for a, b in itertools.combinations(labels + texts, 2):
        assert not overlap(a, b), (a, b)


def test_run9_figure_states_the_ratios_its_rows_recorded(tmp_path):
    """The figure in docs/results/engine.md: every row of run 9 drawn, each label the ratio
    the script itself recorded (`engine_floor_ratio`)."""
    recorded = json.loads(RUN9.read_text())
    drawn = plot_engine_step(recorded, tmp_path / "run9.png")
    drawn.pop("texts_px")
    assert len(drawn) == 8
    for r in recorded["rows"]:
        label = drawn[(r["variant"], r["batch"], r["context"])]["label"]
        assert label.endswith(f"{r['engine_floor_ratio']:.2f}× floor")


def _without(rows, path):
    """`rows` with the field at `path` (keys into the gla-2 8K row) taken out."""
    rows = copy.deepcopy(rows)
    target = rows[-1]
    for key in path[:-1]:
        target = target[key]
    if path[-1] == "kernels":
        target["kernels"] = None  # as CPU runs write it
    else:
        del target[path[-1]]
    return rows


@pytest.mark.parametrize("path, field", [
    (("forward_queued_s",), "forward_queued_s"),
    (("engine_step_s",), "engine_step_s"),
    (("kernels",), "kernels"),
    (("kernels", "gemm_s"), "gemm_s"),
    (("floor", "floor_s"), "floor_s"),
])
def test_a_row_without_a_field_is_refused_by_name(tmp_path, path, field):
    with pytest.raises(ValueError, match=rf"gla-2 B=8 L=8192 has no '{field}'"):
        plot_engine_step(doc(_without(ROWS, path)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_documents_without_peaks_or_compiled_decode_rows_are_refused(tmp_path):
    no_peaks = doc(ROWS)
    no_peaks["peaks"] = None
    with pytest.raises(ValueError, match="'peaks'"):
        plot_engine_step(no_peaks, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no compiled decode rows"):
        plot_engine_step(doc([r for r in ROWS if not r["compiled"]]), tmp_path / "x.png")


def test_the_script_redraws_from_a_json_without_a_gpu(tmp_path):
    script = [sys.executable, str(ROOT / "benchmarks" / "engine_roofline.py")]
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps(doc(ROWS)))
    bad.write_text(json.dumps(doc(_without(ROWS, ("forward_queued_s",)))))
    png = tmp_path / "out" / "step.png"
    subprocess.run(script + ["--replot", str(good), "--plot", str(png)], check=True, cwd=ROOT,
                   timeout=120, capture_output=True)
    assert png.read_bytes()[:4] == b"\x89PNG"
    done = subprocess.run(script + ["--replot", str(bad), "--plot", str(tmp_path / "b.png")],
                          cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert done.returncode == 2 and "has no 'forward_queued_s'" in done.stderr
    done = subprocess.run(script + ["--replot", str(good)], cwd=ROOT, timeout=120,
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--replot needs --plot" in done.stderr
