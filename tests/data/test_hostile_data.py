"""Cases found by a hostile review of the data pipeline: each failed before its fix."""

from __future__ import annotations

import numpy as np
import pytest

from hwattn.data import build as B
from hwattn.data.corpora import build_dataset
from hwattn.data.pack import pack_dataset, unpack_dataset
from hwattn.data.tokenizer import EOT, train_bpe

QUIET = dict(progress=False, log=lambda *a: None)


def _doc(i, text, domain="web", source="s"):
    return {"id": f"{source}/{i}", "source": source, "domain": domain, "title": "", "text": text}


@pytest.fixture(scope="module")
def tok():
    return train_bpe([f"Document {i}. Some plain words follow here. " * 4 for i in range(40)], 300)


@pytest.mark.parametrize("text", ["a\ud800b", "\udfff"])
def test_lone_surrogate_is_refused_by_name_not_a_type_error(tok, text):
    """tokenizers raised TypeError("TextInputSequence must be str") for a str."""
    for fn in (tok.encode, tok.encode_text, lambda t: tok.encode_batch([t])):
        with pytest.raises(ValueError, match="surrogate"):
            fn(text)


def test_end_of_text_written_in_a_document_is_no_document_boundary(tmp_path, tok):
    """A document holding the text "<|endoftext|>" got the end-of-text id in the middle of
    its tokens: two documents in the shard where the manifest counts one."""
    docs = [_doc(i, f"Document {i}. Some plain words follow here. " * 3) for i in range(20)]
    docs[3]["text"] = f"Before the marker {EOT} and after it, plain words. " * 2
    man = B.write_build(tmp_path / "out", docs, lambda t: tok, B.BuildOptions(val_fraction=0.2),
                        "k" * 64, [], **QUIET)
    for entry in [man["splits"]["train"], *man["splits"]["val"].values()]:
        shard = np.fromfile(tmp_path / "out" / entry["file"], dtype=np.uint16)
        assert int((shard == tok.eot_id).sum()) == entry["documents"]
    shard = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    text = tok.decode(shard.tolist())
    assert f"marker {EOT} and" in text  # still there as text


@pytest.mark.xfail(strict=True, reason="not fixed: a Unicode-aware key changes the study build "
                   "26ca15401cf2 (6 zh_TW kernel translations, now dropped as mostly duplicates "
                   "of zh_CN, would be kept)")
def test_documents_in_other_scripts_are_not_duplicates_of_each_other():
    """The key keeps ASCII letters and digits only: every Cyrillic, Greek or CJK document
    (and paragraph) has the key of the empty text (or of its few ASCII characters), so all
    but the first are dropped as duplicates."""
    docs = [_doc(0, "Привет, мир. Это первый документ."), _doc(1, "Совсем другой текст здесь."),
            _doc(2, "Ελληνικό κείμενο."), _doc(3, "日本語の文章です。"),
            _doc(4, "привет, МИР! это   первый документ")]  # a real duplicate of 0
    para = "Абзац достаточно длинный, чтобы его проверяли на повторы во всём корпусе. "
    other = "Совершенно другой абзац, тоже длинный, и он не повторяет первый ни в чём. "
    docs += [_doc(5, "Начало пятого.\n\n" + para), _doc(6, "Начало шестого.\n\n" + other)]
    stats = B.DedupeStats()
    out = B.deduplicate(docs, 64, stats)
    assert [d["id"] for d in out] == ["s/0", "s/1", "s/2", "s/3", "s/5", "s/6"]
    assert stats.duplicate_documents == 1 and stats.duplicate_paragraphs == 0


def _fake_registry(monkeypatch, tmp_path):
    """Two registry sources whose archives are local files and whose documents are fixed."""
    import hwattn.data.corpora as C

    texts = {"gutenberg": [f"Book page {i}. The words of an old book, page {i}. " * 4
                           for i in range(12)],
             "sotu": [f"Speech {i}. My fellow citizens, the state of the union {i}. " * 4
                      for i in range(12)]}
    for name in texts:
        (tmp_path / f"{name}.tgz").write_bytes(name.encode())

    def fetch(source, cache_dir, timeout=600):
        return tmp_path / f"{source.name}.tgz"

    def extract(source, archive):
        for i, t in enumerate(texts[source.name]):
            yield {"id": f"{source.name}/{i}", "source": source.name, "domain": "prose",
                   "title": "", "text": t}

    monkeypatch.setattr(C, "fetch", fetch)
    monkeypatch.setattr(C, "extract", extract)


def test_registry_source_order_gives_one_build(tmp_path, monkeypatch):
    """--sources a,b and --sources b,a had the same build key but different shards (the
    training shard holds documents in source order): `up_to_date` then accepted one as the
    other. And a source named twice was read twice and listed twice in the manifest."""
    _fake_registry(monkeypatch, tmp_path)
    opts = B.BuildOptions(val_fraction=0.2)
    a = build_dataset(tmp_path / "a", "registry", "bpe:300", opts, ["gutenberg", "sotu"],
                      cache_dir=tmp_path, **QUIET)
    b = build_dataset(tmp_path / "b", "registry", "bpe:300", opts, ["sotu", "gutenberg"],
                      cache_dir=tmp_path, **QUIET)
    c = build_dataset(tmp_path / "c", "registry", "bpe:300", opts, ["sotu", "gutenberg", "sotu"],
                      cache_dir=tmp_path, **QUIET)
    assert a["build_key"] == b["build_key"] == c["build_key"]
    for other in ("b", "c"):
        for p in (tmp_path / "a").iterdir():
            assert p.read_bytes() == (tmp_path / other / p.name).read_bytes(), (other, p.name)


def test_registry_refuses_a_source_that_is_not_a_corpus(tmp_path, monkeypatch):
    """`whisper` (the GPT-2 rank file's package) was accepted as a source, downloaded, and
    only then refused by the extractor."""
    import hwattn.data.corpora as C

    monkeypatch.setattr(C, "fetch", lambda *a, **k: pytest.fail("fetched before the check"))
    with pytest.raises(ValueError, match="whisper"):
        build_dataset(tmp_path / "out", "registry", "bpe:300", None, ["whisper"],
                      cache_dir=tmp_path, **QUIET)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(sources=["gutenberg"]), "sources"),
    (dict(hf={"limit": 3}), "hf"),
    (dict(gpt2_file="x.tiktoken"), "gpt2_file"),
])
def test_build_dataset_refuses_arguments_its_corpus_would_ignore(tmp_path, kwargs, needle):
    """`build_dataset(corpus="embedded", sources=[...])` built the embedded corpus and said
    nothing of the sources (the CLI refuses the same options by name)."""
    with pytest.raises(ValueError, match=needle):
        build_dataset(tmp_path / "out", "embedded", "bpe:300", **kwargs, **QUIET)
    assert not (tmp_path / "out").exists()


def test_repack_over_a_damaged_part_writes_it_again(dataset_dir, tmp_path):
    """A part already in the pack folder was trusted by its name alone: a truncated copy of
    it went into pack.json with its own SHA-256, so the pack looked complete and only the
    unpack on the other machine found it broken."""
    pack = tmp_path / "p"
    pack_dataset(dataset_dir, pack, part_bytes=1 << 20, workers=1, log=lambda *a: None,
                 progress=False)
    part = next(p for p in sorted(pack.iterdir()) if p.name.startswith("train.bin"))
    part.write_bytes(part.read_bytes()[:-50])
    pack_dataset(dataset_dir, pack, part_bytes=1 << 20, workers=1, log=lambda *a: None,
                 progress=False)
    unpack_dataset(pack, tmp_path / "d", workers=1, log=lambda *a: None, progress=False)
    assert (tmp_path / "d" / "train.bin").read_bytes() == (dataset_dir / "train.bin").read_bytes()


def test_cli_refuses_a_tokenizer_sample_for_a_tokenizer_that_is_not_trained(tmp_path, capsys,
                                                                             monkeypatch):
    """--tokenizer-sample-chars with a ready tokenizer (a tokenizer.json, gpt2) was taken and
    did nothing (only a bpe:N tokenizer is trained on a sample)."""
    import hwattn.data.corpora as C
    from hwattn.cli import main

    monkeypatch.setattr(C, "embedded_documents", lambda: pytest.fail("corpus read"))
    tok_dir = tmp_path / "tok"
    train_bpe([f"Some words {i}." for i in range(50)], 300).save(tok_dir)
    code = main(["data", "build", "--out", str(tmp_path / "out"), "--tokenizer",
                 str(tok_dir / "tokenizer.json"), "--tokenizer-sample-chars", "1000"])
    err = capsys.readouterr().err
    assert code == 2 and "--tokenizer-sample-chars" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.xfail(strict=True, reason="not fixed: the study build 26ca15401cf2 has 212 texts "
                   "cut at sentence ends; keeping the full stop changes its bytes")
def test_split_long_at_sentence_ends_keeps_the_full_stop():
    """A text with no line short enough is cut after sentences, and the ". " it is cut at
    is dropped: every piece but the last loses its full stop."""
    from hwattn.data.extract import split_long

    text = "First sentence here. " + "x" * 30 + ". Last one."
    pieces = split_long(text, 25)
    assert len(pieces) > 1
    assert " ".join(pieces) == text


def test_repack_removes_stale_parts_numbered_past_999(dataset_dir, tmp_path):
    """Parts are numbered {k:03d}, which is four digits from the 1001st part of a file on
    (a dataset over 1000 parts of --part-mb); the pattern that picks the files a pack may
    remove took three digits only, so such parts of an older build stayed in the folder for
    good and were carried with every copy of the pack."""
    pack = tmp_path / "p"
    pack.mkdir()
    stale = pack / "train.bin.1000-0123456789abcdef.xz"
    stale.write_bytes(b"an older build's part")
    pack_dataset(dataset_dir, pack, part_bytes=1 << 20, workers=1, log=lambda *a: None,
                 progress=False)
    assert not stale.exists()


@pytest.mark.parametrize("config", ["{not json", "[1, 2]"])
def test_load_tokenizer_names_a_damaged_config_json(tmp_path, tok, config):
    """A checkpoint folder's damaged config.json gave json's bare "Expecting property name"
    (or an AttributeError for a JSON list), naming no file."""
    from hwattn.data.tokenizer import load_tokenizer

    tok.save(tmp_path)
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="config.json"):
        load_tokenizer(tmp_path, 300)
