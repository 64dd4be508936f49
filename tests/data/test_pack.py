"""`data pack` / `data unpack`: byte-identical round trip, checks, idempotence, resumption."""

from __future__ import annotations

import json

import pytest

from hwattn.data.pack import PACK_FILE, pack_dataset, unpack_dataset
from hwattn.data.sources import sha256_file

QUIET = dict(log=lambda *a: None)


@pytest.fixture(scope="module")
def packed(tmp_path_factory, dataset_dir):
    out = tmp_path_factory.mktemp("pack") / "p"
    meta = pack_dataset(dataset_dir, out, part_bytes=1 << 20, workers=1, **QUIET)
    return out, meta


def test_round_trip_is_byte_identical(packed, dataset_dir, tmp_path):
    pack, meta = packed
    assert len(meta["files"]["train.bin"]["parts"]) >= 2  # the 1 MiB parts split the training shard
    raw = sum(p.stat().st_size for p in dataset_dir.iterdir() if p.is_file())
    packed_bytes = sum(p.stat().st_size for p in pack.iterdir())
    assert packed_bytes < raw / 2
    out = tmp_path / "ds"
    man = unpack_dataset(pack, out, workers=2, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in dataset_dir.iterdir()
                                                           if p.is_file())
    for p in out.iterdir():
        assert p.read_bytes() == (dataset_dir / p.name).read_bytes(), p.name
    assert man["build_key"] == json.loads((dataset_dir / "manifest.json").read_text())["build_key"]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    msgs = []
    unpack_dataset(pack, out, log=msgs.append)  # already there: nothing is written
    assert "nothing to do" in msgs[-1] and {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_repacking_reuses_finished_parts(packed, dataset_dir):
    pack, meta = packed
    stamps = {p.name: p.stat().st_mtime_ns for p in pack.iterdir() if p.suffix == ".xz"}
    again = pack_dataset(dataset_dir, pack, part_bytes=1 << 20, workers=1, **QUIET)
    assert again == meta
    assert {p.name: p.stat().st_mtime_ns for p in pack.iterdir() if p.suffix == ".xz"} == stamps


def test_damaged_or_missing_parts_are_errors(packed, tmp_path):
    import shutil

    pack, meta = packed
    bad = tmp_path / "bad"
    shutil.copytree(pack, bad)
    part = next(p for p in sorted(bad.iterdir()) if p.name.startswith("train.bin"))
    part.write_bytes(part.read_bytes()[:-50])
    with pytest.raises(ValueError, match="damaged"):
        unpack_dataset(bad, tmp_path / "o1", **QUIET)
    with pytest.raises(ValueError, match="does not decompress|expands"):
        unpack_dataset(bad, tmp_path / "o1", verify=False, **QUIET)
    part.unlink()
    with pytest.raises(ValueError, match="missing"):
        unpack_dataset(bad, tmp_path / "o2", **QUIET)
    assert not (tmp_path / "o2" / "manifest.json").exists()
    assert not [p for p in (tmp_path / "o1").iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="not a dataset pack"):
        unpack_dataset(tmp_path, tmp_path / "o3", **QUIET)
    (bad / PACK_FILE).unlink()
    with pytest.raises(ValueError, match="built dataset"):
        pack_dataset(tmp_path / "nowhere", tmp_path / "p", **QUIET)


def test_pack_refuses_a_dataset_that_no_longer_matches(dataset_dir, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(dataset_dir, ds)
    (ds / "val_books.bin").write_bytes(b"\0\0")
    with pytest.raises(ValueError, match="rebuild"):
        pack_dataset(ds, tmp_path / "p", **QUIET)
    assert sha256_file(dataset_dir / "train.bin")  # the shared fixture is untouched


def spy_bars(monkeypatch, module) -> dict:
    """{desc: bar} of every progress bar `module` makes from here on (the real bars)."""
    made = {}
    real = module.progress_bar

    def spy(*args, **kwargs):
        made[kwargs["desc"]] = bar = real(*args, **kwargs)
        return bar

    monkeypatch.setattr(module, "progress_bar", spy)
    return made


def test_progress_bars_count_the_bytes_on_stderr(dataset_dir, tmp_path, capsys, monkeypatch):
    import hwattn.data.pack as P

    bars = spy_bars(monkeypatch, P)
    meta = pack_dataset(dataset_dir, tmp_path / "p", part_bytes=1 << 20, workers=1, **QUIET)
    packed = sum(rec["size"] for rec in meta["files"].values() if "parts" in rec)
    assert packed > 1 << 20 and bars["pack"].total == bars["pack"].n == packed
    man = unpack_dataset(tmp_path / "p", tmp_path / "d", workers=2, **QUIET)
    assert bars["unpack"].total == bars["unpack"].n == packed
    files = sum(rec["size"] for rec in meta["files"].values())
    assert bars["verify"].total == bars["verify"].n == files
    out, err = capsys.readouterr()
    assert out == ""
    for desc in ("pack", "unpack", "verify"):
        assert f"{desc}: 100%" in err, err
    # Off: nothing on stderr, the same results.
    bars.clear()
    assert pack_dataset(dataset_dir, tmp_path / "p2", part_bytes=1 << 20, workers=1,
                        progress=False, **QUIET) == meta
    assert unpack_dataset(tmp_path / "p2", tmp_path / "d2", workers=2, progress=False,
                          **QUIET) == man
    assert capsys.readouterr() == ("", "")
    assert set(bars) == {"pack", "unpack", "verify"} and all(b.n == 0 for b in bars.values())
    # Nothing to unpack: no bar either.
    unpack_dataset(tmp_path / "p", tmp_path / "d", **QUIET)
    assert capsys.readouterr().err == ""


def test_cli(dataset_dir, tmp_path, capsys):
    from hwattn.cli import main

    assert main(["data", "pack", str(dataset_dir), "--out", str(tmp_path / "p"), "--workers", "1"]) == 0
    assert main(["data", "unpack", str(tmp_path / "p"), "--out", str(tmp_path / "d")]) == 0
    out, err = capsys.readouterr()
    assert "MiB" in out and "train" in out
    assert "%|" not in out  # the bars go to stderr only
    for desc in ("pack", "unpack", "verify"):
        assert f"{desc}: 100%" in err, err
    assert main(["data", "unpack", str(tmp_path / "nothing"), "--out", str(tmp_path / "d2")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # the error alone, no bar
