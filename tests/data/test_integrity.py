"""Hostile inputs to the data pipeline: damaged packs, packs and unpacks aimed at the
wrong folder, hand-edited manifests, damaged shards, killed builds and unpacks, odd JSONL.
Every case either works or is refused with one clear error; nothing damaged passes as a
valid dataset, and nothing the user owns is deleted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hwattn.cli import main
from hwattn.data import build as B
from hwattn.data.corpora import build_dataset
from hwattn.data.loader import BatchSampler, TokenDataset
from hwattn.data.pack import PACK_FILE, pack_dataset, unpack_dataset
from hwattn.data.tokenizer import Tokenizer, train_bpe
from tests.conftest import failing_on_call

QUIET = dict(progress=False, log=lambda *a: None)
OPTS = B.BuildOptions(val_fraction=0.2)


def _rows(n=40, word="Plain"):
    return [{"text": f"Document {i}. " + f"{word} words in a row, {i * 7}. " * (4 + i % 6)}
            for i in range(n)]


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _build(src, out):
    return build_dataset(out, f"jsonl:{src}", "bpe:300", OPTS, **QUIET)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small build (one JSONL, bpe:300) and its pack; tests copy them before changing them."""
    root = tmp_path_factory.mktemp("adv")
    src = _write(root / "src.jsonl", _rows())
    man = _build(src, root / "ds")
    pack_dataset(root / "ds", root / "pack", workers=1, log=lambda *a: None)
    return root, src, man


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _cli(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


def _one_line_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for n in needles:
        assert n in err, (n, err)


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- pack / unpack: wrong folders


def test_pack_keeps_files_it_did_not_write(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a part")
    pack_dataset(root / "ds", out, workers=1, log=lambda *a: None)
    assert (out / "notes.txt").read_text() == "not a part"


def refused_untouched(folder: Path, call, match: str) -> None:
    """`call()` raises ValueError matching `match` and leaves `folder`'s files as they were."""
    before = _files(folder)
    with pytest.raises(ValueError, match=match):
        call()
    assert _files(folder) == before


def test_pack_into_the_dataset_itself_is_refused(tiny, tmp_path):
    ds = _copy(tiny[0] / "ds", tmp_path / "ds")
    refused_untouched(ds, lambda: pack_dataset(ds, ds, workers=1, log=lambda *a: None),
                      "dataset folder itself")


def test_pack_into_another_dataset_is_refused(tiny, tmp_path):
    root = tiny[0]
    other = _copy(root / "ds", tmp_path / "other")
    refused_untouched(other, lambda: pack_dataset(root / "ds", other, workers=1,
                                                  log=lambda *a: None), str(other))


def test_unpack_into_the_pack_itself_is_refused(tiny, tmp_path):
    pack = _copy(tiny[0] / "pack", tmp_path / "pack")
    refused_untouched(pack, lambda: unpack_dataset(pack, pack, workers=1, log=lambda *a: None),
                      "pack folder itself")


def test_damaged_pack_leaves_the_build_already_there_intact(tiny, dataset_dir, tmp_path):
    """Unpacking a damaged pack of build B over a good build A must fail before A is touched."""
    root, _, man_a = tiny
    ds = _copy(root / "ds", tmp_path / "ds")
    pack = tmp_path / "pack_b"
    pack_dataset(dataset_dir, pack, workers=1, log=lambda *a: None)
    part = next(p for p in sorted(pack.iterdir()) if p.name.startswith("train.bin"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 1
    part.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged"):
        unpack_dataset(pack, ds, workers=1, log=lambda *a: None)
    assert B.up_to_date(ds, man_a["build_key"])
    assert TokenDataset(ds).manifest == man_a


@pytest.mark.parametrize("damage", ["no manifest", "pack.json cut", "pack.json not an object",
                                    "pack.json without parts", "out is a file"])
def test_unpack_of_a_broken_pack_is_one_clear_error(tiny, tmp_path, damage):
    root, _, _ = tiny
    pack = _copy(root / "pack", tmp_path / "pack")
    out = tmp_path / "out"
    meta = pack / PACK_FILE
    needle = str(meta)
    if damage == "no manifest":
        (pack / "manifest.json").unlink()
        needle = str(pack / "manifest.json")
    elif damage == "pack.json cut":
        meta.write_text(meta.read_text()[:300])
    elif damage == "pack.json not an object":
        meta.write_text("[]\n")
    elif damage == "pack.json without parts":
        doc = json.loads(meta.read_text())
        for rec in doc["files"].values():
            rec.pop("parts", None)
        meta.write_text(json.dumps(doc))
    else:
        out.write_text("a file where the dataset folder should go")
        needle = str(out)
    with pytest.raises(ValueError) as info:
        unpack_dataset(pack, out, workers=1, log=lambda *a: None)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert not (out / "manifest.json").exists() if out.is_dir() else True


def test_unpack_checks_the_manifest_against_pack_json(tiny, tmp_path):
    """pack.json and manifest.json of the same pack must list the same files and hashes: a
    pack.json that leaves a file out would otherwise give a dataset missing that file."""
    root, _, _ = tiny
    pack = _copy(root / "pack", tmp_path / "pack")
    doc = json.loads((pack / PACK_FILE).read_text())
    del doc["files"]["val_web.bin"]
    (pack / PACK_FILE).write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="val_web.bin"):
        unpack_dataset(pack, tmp_path / "out", workers=1, log=lambda *a: None)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_killed_unpack_leaves_no_temporary_files_behind(tiny, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".train.bin.{dead.pid}.tmp"  # what a killed unpack leaves
    stale.write_bytes(b"\0" * 100)
    unpack_dataset(root / "pack", out, workers=1, log=lambda *a: None)
    assert not stale.exists()
    assert _files(out) == _files(root / "ds")


# ---------------------------------------------------------------- the loader and the manifest


def _flip(path: Path, at: int = 1) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit(fn):
    def mutate(d: Path):
        man = json.loads((d / "manifest.json").read_text())
        fn(man)
        (d / "manifest.json").write_text(json.dumps(man, indent=2))
    return mutate


DAMAGE = {
    "train.bin cut by 100 tokens": lambda d: (d / "train.bin").write_bytes(
        (d / "train.bin").read_bytes()[:-200]),
    "train.bin of an odd byte count": lambda d: (d / "train.bin").write_bytes(
        (d / "train.bin").read_bytes()[:-1]),
    "train.bin one byte flipped": lambda d: _flip(d / "train.bin"),
    "train.bin empty": lambda d: (d / "train.bin").write_bytes(b""),
    "train.bin missing": lambda d: (d / "train.bin").unlink(),
    "val shard missing": lambda d: (d / "val_web.bin").unlink(),
    "manifest: wrong split sha": _edit(lambda m: m["splits"]["train"].update(sha256="0" * 64)),
    "manifest: wrong token count": _edit(lambda m: m["splits"]["train"].update(tokens=10)),
    "manifest: no val split": _edit(lambda m: m["splits"].pop("val")),
    "manifest: no train split": _edit(lambda m: m["splits"].pop("train")),
    "manifest: no files": _edit(lambda m: m.pop("files")),
    "manifest: wrong vocab size": _edit(lambda m: m["tokenizer"].update(vocab_size=100)),
    "manifest: unknown dtype": _edit(lambda m: m.update(dtype="float99")),
    "manifest: uint32": _edit(lambda m: m.update(dtype="uint32")),
    "manifest: not JSON": lambda d: (d / "manifest.json").write_text("{"),
    "manifest: empty object": lambda d: (d / "manifest.json").write_text("{}"),
    "tokenizer.json of another build": "swap",
    "tokenizer.json garbage": lambda d: (d / "tokenizer.json").write_text("{}"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_loader_refuses_inconsistent_data(tiny, tmp_path, dataset_dir, damage):
    root, _, man = tiny
    d = _copy(root / "ds", tmp_path / "ds")
    if DAMAGE[damage] == "swap":
        shutil.copyfile(dataset_dir / "tokenizer.json", d / "tokenizer.json")
    else:
        DAMAGE[damage](d)
    with pytest.raises(ValueError, match=str(d)):
        TokenDataset(d)
    # ... and the build does not take it for an up-to-date build either.
    assert not B.up_to_date(d, man["build_key"])


def test_loader_accepts_the_build_and_its_unpacked_copy(tiny, tmp_path):
    root, _, man = tiny
    out = tmp_path / "out"
    unpack_dataset(root / "pack", out, workers=1, log=lambda *a: None)
    for d in (root / "ds", out):
        ds = TokenDataset(d)
        assert len(ds.train) == man["splits"]["train"]["tokens"]
        assert ds.tokenizer.vocab_size == ds.vocab_size == 300


def test_sampler_refuses_a_rank_outside_the_world():
    tokens = np.arange(1000, dtype=np.uint16)
    for rank, world in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="rank"):
            BatchSampler(tokens, 8, 2, rank=rank, world=world)


# ---------------------------------------------------------------- build: JSONL, domains, resume


def test_non_utf8_bytes_name_the_right_line(tmp_path, capsys):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes("".join(json.dumps(r) + "\n" for r in _rows(5)).encode()
                     + b'{"text": "caf\xe9"}\n')
    code, err = _cli(capsys, "data", "build", "--corpus", f"jsonl:{path}", "--out",
                     str(tmp_path / "out"), "--tokenizer", "bpe:300", "--json")
    _one_line_error(code, err, "latin1.jsonl:6:", "UTF-8")


@pytest.mark.parametrize("field", ["text", "title", "id"])
def test_lone_surrogate_names_file_line_and_field(tmp_path, capsys, field):
    lines = [json.dumps(r) for r in _rows(6)]
    lines[3] = '{"text": "fine words", "%s": "bad \\ud800 here"}' % field
    path = _write(tmp_path / "sur.jsonl", lines)
    code, err = _cli(capsys, "data", "build", "--corpus", f"jsonl:{path}", "--out",
                     str(tmp_path / "out"), "--tokenizer", "bpe:300", "--json")
    _one_line_error(code, err, "sur.jsonl:4", repr(field))


@pytest.mark.parametrize("domain", ["docs", "a/b", ""])
def test_domain_that_cannot_name_a_shard_is_an_error(tmp_path, capsys, domain):
    """Domain "docs" made `val_docs.bin` collide with the `val_docs` entry of the manifest's
    files: the build succeeded, left the shard out, and the dataset could not be loaded."""
    rows = [dict(r, domain=(domain if i % 2 else "web")) for i, r in enumerate(_rows())]
    path = _write(tmp_path / "dom.jsonl", rows)
    out = tmp_path / "out"
    code, err = _cli(capsys, "data", "build", "--corpus", f"jsonl:{path}", "--out", str(out),
                     "--tokenizer", "bpe:300", "--json")
    _one_line_error(code, err, "domain", repr(domain))
    assert not (out / "manifest.json").exists()


def test_hf_build_of_a_changed_local_file_is_not_up_to_date(tmp_path):
    pytest.importorskip("datasets")
    path = _write(tmp_path / "web.jsonl", _rows())
    hf = {"data_files": str(path)}
    a = build_dataset(tmp_path / "hf", "hf:json", "bpe:300", OPTS, hf=hf, **QUIET)
    _write(path, _rows(word="Other"))
    b = build_dataset(tmp_path / "hf", "hf:json", "bpe:300", OPTS, hf=hf, **QUIET)
    assert b["build_key"] != a["build_key"]
    assert b["splits"]["train"]["sha256"] != a["splits"]["train"]["sha256"]


def test_resume_never_reuses_chunks_of_other_documents(tmp_path, monkeypatch):
    """A killed build resumed under the same key with other documents (a streamed dataset
    that changed in between) must give what a fresh build of the new documents gives."""
    monkeypatch.setattr(B._Work, "CHUNK_DOCS", 8)
    tok = train_bpe([r["text"] for r in _rows()], 300)

    def docs(word):
        return [{"id": f"s/{i}", "source": "s", "domain": "web", "title": "", "text": r["text"]}
                for i, r in enumerate(_rows(word=word))]

    real = Tokenizer.encode_batch
    monkeypatch.setattr(Tokenizer, "encode_batch", failing_on_call(real, 3, RuntimeError("killed")))
    with pytest.raises(RuntimeError, match="killed"):
        B.write_build(tmp_path / "out", docs("Plain"), lambda t: tok, OPTS, "k" * 64, [],
                      **QUIET)
    monkeypatch.setattr(Tokenizer, "encode_batch", real)
    resumed = B.write_build(tmp_path / "out", docs("Other"), lambda t: tok, OPTS, "k" * 64, [],
                            **QUIET)
    fresh = B.write_build(tmp_path / "fresh", docs("Other"), lambda t: tok, OPTS, "k" * 64, [],
                          **QUIET)
    assert resumed == fresh
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")


def test_corrupt_work_chunk_is_encoded_again(tmp_path, monkeypatch):
    monkeypatch.setattr(B._Work, "CHUNK_DOCS", 8)
    tok = train_bpe([r["text"] for r in _rows()], 300)
    docs = [{"id": f"s/{i}", "source": "s", "domain": "web", "title": "", "text": r["text"]}
            for i, r in enumerate(_rows())]
    fresh = B.write_build(tmp_path / "fresh", docs, lambda t: tok, OPTS, "k" * 64, [], **QUIET)
    work = tmp_path / "out" / (".work-" + "k" * 16)
    work.mkdir(parents=True)
    (work / "train-00000.npz").write_bytes(b"PK\x03\x04 not a zip")
    again = B.write_build(tmp_path / "out", docs, lambda t: tok, OPTS, "k" * 64, [], **QUIET)
    assert again == fresh
    assert _files(tmp_path / "out") == _files(tmp_path / "fresh")


def test_build_killed_after_its_manifest_leaves_no_work_folder(tiny, tmp_path):
    """Killed between writing the manifest and removing `.work-<key>/`: the next run finds
    the build up to date, and must still remove the dead build's work folder."""
    root, src, man = tiny
    ds = _copy(root / "ds", tmp_path / "ds")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    work = ds / f".work-{man['build_key'][:16]}"
    work.mkdir()
    (work / "pid").write_text(f"{dead.pid}\n")
    (work / "train-00000.npz").write_bytes(b"\0" * 1000)
    msgs = []
    build_dataset(ds, f"jsonl:{src}", "bpe:300", OPTS, progress=False, log=msgs.append)
    assert any("up to date" in m for m in msgs)
    assert not work.exists()


def test_head_build_keeps_the_prefix_tokenizer_and_validation(built, tmp_path):
    """A head build (benchmarks/study_carry.sh head) checks out, its training shard is the
    source's first N tokens, its validation shards and tokenizer are the source's, and its
    build key is not the source's; bad sizes and writing over the source are refused."""
    from hwattn.data.build import check_build, head_build
    from hwattn.data.loader import TokenDataset

    src, manifest = built
    n = manifest["splits"]["train"]["tokens"] // 3
    man = head_build(src, tmp_path / "head", n)
    check_build(tmp_path / "head")
    whole, head = TokenDataset(src), TokenDataset(tmp_path / "head")
    assert len(head.train) == n and (head.train[:] == whole.train[:n]).all()
    for d in whole.domains:
        assert (head.val[d][:] == whole.val[d][:]).all()
    assert man["build_key"] == f"{manifest['build_key']}-head{n}"
    assert head.tokenizer.sha256() == whole.tokenizer.sha256()
    for bad in (0, manifest["splits"]["train"]["tokens"] + 1, 2.5):
        with pytest.raises(ValueError, match="train_tokens"):
            head_build(src, tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="out must differ"):
        head_build(src, src, n)


# ---------------------------------------------------------------- builds aimed at a pack

def test_build_into_a_pack_is_refused_and_the_pack_kept(tiny, tmp_path, capsys):
    """`data build --out PACK` replaced the pack's manifest.json with the new build's and
    wrote shards among its parts: the pack no longer unpacked (its manifest no longer matched
    pack.json)."""
    root, src, _ = tiny
    pack = _copy(root / "pack", tmp_path / "pack")
    refused_untouched(pack, lambda: build_dataset(pack, f"jsonl:{src}", "bpe:280", OPTS, **QUIET),
                      PACK_FILE)
    before = _files(pack)
    code, err = _cli(capsys, "data", "build", "--corpus", f"jsonl:{src}", "--out", str(pack),
                     "--tokenizer", "bpe:280")
    _one_line_error(code, err, "--out", PACK_FILE)
    assert _files(pack) == before
    unpack_dataset(pack, tmp_path / "un", workers=1, log=lambda *a: None)  # still a good pack


def test_head_build_into_a_pack_or_a_file_is_refused(tiny, tmp_path):
    root = tiny[0]
    pack = _copy(root / "pack", tmp_path / "pack")
    refused_untouched(pack, lambda: B.head_build(root / "ds", pack, 100), PACK_FILE)
    a_file = tmp_path / "afile"
    a_file.write_text("mine\n")
    with pytest.raises(ValueError, match="afile"):
        B.head_build(root / "ds", a_file, 100)
    assert a_file.read_text() == "mine\n"


def test_head_build_over_another_build_removes_its_manifest_first(tiny, tmp_path, monkeypatch):
    """A head build over an existing dataset that fails half way must not leave the old
    manifest beside the new training shard: the manifest goes first and comes back last, as in
    `write_build` (a copy failing here stands for a full disk)."""
    root = tiny[0]
    other = _copy(root / "ds", tmp_path / "other")

    def fail(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(B.shutil, "copyfile", fail)
    with pytest.raises(OSError):
        B.head_build(root / "ds", other, 100)
    assert not (other / B.MANIFEST).exists()
    with pytest.raises(ValueError, match="not a built dataset"):
        TokenDataset(other, verify=False)


def test_head_build_takes_numpy_integers(tiny, tmp_path):
    root = tiny[0]
    man = B.head_build(root / "ds", tmp_path / "head", np.int64(100))
    assert man["splits"]["train"]["tokens"] == 100 and man["build_key"].endswith("-head100")
    with pytest.raises(ValueError, match="train_tokens"):
        B.head_build(root / "ds", tmp_path / "bad", True)


# ---------------------------------------------------------------- tokenizer and sources

def test_unreadable_tokenizer_file_is_one_line_naming_it(tiny, tmp_path, capsys):
    """A --tokenizer file that is not a tokenizer was a traceback of tokenizers' bare
    `Exception` ("key must be a string at line 1 column 2")."""
    src = tiny[1]
    for name, content in (("broken.json", b"{not json"), ("binary.json", b"\xff\xfe\0\1")):
        (tmp_path / name).write_bytes(content)
        code, err = _cli(capsys, "data", "build", "--corpus", f"jsonl:{src}", "--out",
                         str(tmp_path / "out"), "--tokenizer", str(tmp_path / name))
        _one_line_error(code, err, name)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["bpe:0", "bpe:-5", "bpe:257"])
def test_bpe_size_is_checked_before_the_corpus_is_read(tiny, tmp_path, monkeypatch, spec):
    """bpe:N below 258 was refused only by `train_bpe`, after every document had been read
    and deduplicated (for --corpus registry: fetched)."""
    import hwattn.data.corpora as C

    monkeypatch.setattr(C, "jsonl_documents",
                        lambda *a, **k: pytest.fail("corpus read before the spec was checked"))
    with pytest.raises(ValueError, match=spec):
        build_dataset(tmp_path / "out", f"jsonl:{tiny[1]}", spec, OPTS, **QUIET)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sources, corpus", [("", "registry"), (" , ", "registry"),
                                             ("", "embedded")])
def test_empty_sources_is_refused_not_all_sources(tmp_path, capsys, monkeypatch, sources, corpus):
    """`--sources ""` built from every registry source (and was ignored by other corpora)."""
    import hwattn.data.corpora as C

    monkeypatch.setattr(C, "fetch", lambda *a, **k: pytest.fail("fetched before the check"))
    code, err = _cli(capsys, "data", "build", "--corpus", corpus, "--sources", sources,
                     "--out", str(tmp_path / "out"))
    _one_line_error(code, err, "--sources")
    assert not (tmp_path / "out").exists()
