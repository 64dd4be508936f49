"""A hostile review of `data pack` / `data unpack` and of what a build refuses; each test
failed before the fix it names."""

from __future__ import annotations

import json
import os

import pytest

from hwattn.data import pack as P
from hwattn.data.build import BuildOptions, is_validation
from hwattn.data.corpora import build_dataset

QUIET = dict(log=lambda *a: None, progress=False)


def test_unpack_writes_a_part_that_one_pwrite_writes_only_in_part(dataset_dir, tmp_path,
                                                                 monkeypatch):
    """Linux's pwrite writes at most 2 GiB - 4 KiB a call; the unpack wrote each part with
    one call and no look at what it returned. Observed (pwrite capped at 4 KiB here, as for
    parts of --part-mb 2048 and up): "expanded file has SHA-256 ..., the manifest says ...",
    a pack that is whole refused as damaged."""
    pack = tmp_path / "pack"
    P.pack_dataset(dataset_dir, pack, part_bytes=1 << 20, workers=1, **QUIET)
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: real(fd, data[:4096], offset))
    out = tmp_path / "ds"
    P.unpack_dataset(pack, out, workers=1, **QUIET)
    monkeypatch.undo()
    for p in out.iterdir():
        assert p.read_bytes() == (dataset_dir / p.name).read_bytes(), p.name


def test_a_corpus_with_nothing_to_hold_out_is_refused_by_the_build(tmp_path):
    """One document per domain: each went to training and the build had no validation shard
    and said nothing. Observed: `hwattn train` on it trained every step, then failed with
    `KeyError: 'average'` at the final evaluation, before its final checkpoint."""
    docs, i = [], 0
    while len(docs) < 2:  # two domains of one document each, both hashed to training
        doc_id, i = f"d/{i}", i + 1
        if not is_validation(doc_id, 0.03):
            docs.append({"id": doc_id, "domain": f"dom{len(docs)}",
                         "text": " ".join(f"word{j % 97} thing{j % 13}." for j in range(400))})
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    with pytest.raises(ValueError, match="held out for validation"):
        build_dataset(tmp_path / "ds", f"jsonl:{src}", "bpe:300", BuildOptions(), **QUIET)
    assert not (tmp_path / "ds" / "manifest.json").exists()


@pytest.mark.parametrize("far", [1000, 70_000], ids=["gap", "gap-past-uint16"])
def test_a_tokenizer_whose_ids_have_a_gap_builds_shards_a_model_can_read(tmp_path, far):
    """`vocab_size` counted the ids (`get_vocab_size`) instead of taking the highest one plus
    one, as tiktoken's cl100k and o200k (special tokens past a gap) need. Observed: id 70000
    in a tokenizer of 53 ids was an OverflowError traceback from the build (uint16 chosen);
    id 1000 built, and `hwattn train` then failed at its first step with "tokens holds id
    1000, outside [0, vocab_size = 64)"."""
    import numpy as np
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hwattn.data.loader import TokenDataset

    vocab = {f"w{i}": i for i in range(50)} | {"<|endoftext|>": 50, "[UNK]": 51, "far": far}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "tok" / "tokenizer_config.json").write_text("{}")
    docs = [{"id": f"d/{i}", "domain": "a",
             "text": " ".join("far" if j % 7 == 0 else f"w{(i * j) % 50}" for j in range(300))}
            for i in range(40)]
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps(d) + "\n" for d in docs))
    man = build_dataset(tmp_path / "ds", f"jsonl:{src}", str(tmp_path / "tok" / "tokenizer.json"),
                        BuildOptions(val_fraction=0.2), **QUIET)
    data = TokenDataset(tmp_path / "ds")
    top = max(int(np.max(data.train)), *(int(np.max(v)) for v in data.val.values()))
    assert top == far and man["tokenizer"]["vocab_size"] == data.vocab_size == far + 1
