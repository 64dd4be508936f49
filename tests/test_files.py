"""Result files are replaced whole: a write that fails leaves the earlier file as it was."""

from __future__ import annotations

import json
import math

import pytest

from hwattn.files import finite_json, replace_file, write_json, write_text


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "result.json", "earlier\n")

    def cut(tmp):
        tmp.write_text("half a docu")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_file(path, cut)
    assert path.read_text() == "earlier\n"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_document_that_cannot_be_written_keeps_the_earlier_one(tmp_path):
    path = write_json(tmp_path / "doc.json", {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}


def test_json_results_hold_no_nan_or_inf(tmp_path):
    doc = {"ppl": math.inf, "rows": [{"loss": math.nan, "n": 3}], "pair": (1.5, -math.inf)}
    assert finite_json(doc) == {"ppl": None, "rows": [{"loss": None, "n": 3}], "pair": [1.5, None]}
    text = write_json(tmp_path / "d.json", doc).read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))["ppl"] is None


def test_figures_are_replaced_whole(tmp_path):
    from hwattn.plotting import pyplot, save_figure

    plt = pyplot()
    path = tmp_path / "fig.png"
    path.write_bytes(b"earlier")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    with pytest.raises(ValueError):
        save_figure(fig, path, format="no-such-format")
    assert path.read_bytes() == b"earlier" and len(list(tmp_path.iterdir())) == 1
    fig, ax = plt.subplots()
    save_figure(fig, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
