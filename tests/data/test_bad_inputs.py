"""`data build` on bad input: one clear line naming file, line and field, never a traceback;
dead builds' folders cleaned up; identical inputs give identical bytes."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time

import pytest

from hwattn.cli import main
from hwattn.data import build as B
from hwattn.data.corpora import build_dataset


def _rows(n=40):
    return [{"text": f"Document {i}. " + "Plain words in a row. " * (4 + i % 6)} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _build(capsys, src, out, *extra):
    code = main(["data", "build", "--corpus", f"jsonl:{src}", "--out", str(out),
                 "--tokenizer", "bpe:300", *extra])
    err = capsys.readouterr().err
    return code, err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def test_missing_file_and_directory(tmp_path, capsys):
    code, err = _build(capsys, tmp_path / "nope.jsonl", tmp_path / "out")
    _one_line_error(code, err, "nope.jsonl")
    (tmp_path / "adir").mkdir()
    code, err = _build(capsys, tmp_path / "adir", tmp_path / "out")
    _one_line_error(code, err, "adir", "directory")


def test_truncated_gzip(tmp_path, capsys):
    blob = gzip.compress("".join(json.dumps(r) + "\n" for r in _rows(400)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    code, err = _build(capsys, path, tmp_path / "out")
    _one_line_error(code, err, "cut.jsonl.gz", "truncated")


@pytest.mark.parametrize("bad", [7, None, ["a"]], ids=["int", "null", "list"])
def test_text_field_of_the_wrong_type(tmp_path, capsys, bad):
    rows = _rows(5)
    rows[3] = {"text": bad}
    code, err = _build(capsys, _write(tmp_path / "typed.jsonl", rows), tmp_path / "out")
    _one_line_error(code, err, "typed.jsonl:4", "'text'")


def test_malformed_json_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in _rows(6)]
    lines[4] = '{"text": "unterminated'
    path.write_text("\n".join(lines) + "\n")
    code, err = _build(capsys, path, tmp_path / "out")
    _one_line_error(code, err, "broken.jsonl:5", "JSON")
    path.write_text(json.dumps(_rows(1)[0]) + "\n[1, 2]\n")
    code, err = _build(capsys, path, tmp_path / "out")
    _one_line_error(code, err, "broken.jsonl:2", "object")


def test_empty_input_is_an_error(tmp_path, capsys):
    for content in ("", "\n\n", json.dumps({"text": "   "}) + "\n"):
        path = tmp_path / "empty.jsonl"
        path.write_text(content)
        code, err = _build(capsys, path, tmp_path / "out")
        _one_line_error(code, err, "no documents")
        assert not (tmp_path / "out" / "manifest.json").exists()


def test_stale_staging_and_work_folders_are_removed(tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    for name in (f".staging-{dead.pid}", ".work-0123456789abcdef"):
        (out / name).mkdir(parents=True)
        (out / name / "train.bin").write_bytes(b"\0" * 64)
    (out / ".work-0123456789abcdef" / "pid").write_text(f"{dead.pid}\n")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = out / f".staging-{running.pid}"  # a build still running: left alone
        alive.mkdir()
        code, err = _build(capsys, _write(tmp_path / "ok.jsonl", _rows()), out)
    finally:
        running.kill()
        running.wait()
    assert code == 0, err
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left == [alive.name]


def test_identical_inputs_give_identical_bytes(tmp_path, monkeypatch):
    src = _write(tmp_path / "same.jsonl", _rows(60))
    quiet = dict(progress=False, log=lambda *a: None)
    a = build_dataset(tmp_path / "a", f"jsonl:{src}", "bpe:300", B.BuildOptions(val_fraction=0.2),
                      **quiet)
    later = time.time() + 3600  # a build an hour later must not differ (gzip timestamps)
    monkeypatch.setattr(time, "time", lambda: later)
    b = build_dataset(tmp_path / "b", f"jsonl:{src}", "bpe:300", B.BuildOptions(val_fraction=0.2),
                      **quiet)
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
