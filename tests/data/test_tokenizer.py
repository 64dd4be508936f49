"""Tokenizers: our own byte-level BPE, and GPT-2-style rank files turned into merges."""

from __future__ import annotations

import hashlib

import pytest
import tiktoken

from hwattn.data.tokenizer import (EOT, Tokenizer, bpe_split, byte_to_unicode, from_tiktoken_ranks,
                                   merges_from_ranks, ranks_of, read_tiktoken_ranks, train_bpe)
from hwattn.data.corpora import embedded_documents

try:  # GPT-2's pre-tokenizer pattern as tiktoken ships it
    from tiktoken_ext.openai_public import r50k_pat_str as R50K_PAT
except ImportError:  # pragma: no cover - older tiktoken layouts
    R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

AWKWARD = ["", " ", "a", "  leading and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
           "naïve café — “quotes” 日本語 🙂 ∑x²", "numbers 1234567 3.14159 -42",
           "it's we'll they've I'M", "x" * 300, "\u200b zero width", "don't stop\n\n\n"]


@pytest.fixture(scope="module")
def texts():
    docs = list(embedded_documents())
    return [d["text"] for d in docs[:40]], [d["text"] for d in docs[40:60]]


@pytest.fixture(scope="module")
def bpe(texts):
    return train_bpe(texts[0], 700)


def test_byte_map_is_a_bijection():
    m = byte_to_unicode()
    assert sorted(m) == list(range(256))
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())


def test_trained_bpe_round_trips_and_counts_bytes(bpe, texts):
    assert bpe.vocab_size == 700
    assert bpe.decode([bpe.eot_id]) == EOT
    for text in AWKWARD + texts[1][:3]:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text
        assert int(bpe.token_byte_lengths[ids].sum()) == len(text.encode("utf-8"))
    assert bpe.token_byte_lengths[bpe.eot_id] == 0


def test_ranks_to_merges_reproduces_the_tokenizer(bpe, texts):
    """A rank table (what gpt2.tiktoken holds) turned back into merges must encode exactly as
    the tokenizer the ranks came from, and as tiktoken itself with those ranks."""
    ranks = ranks_of(bpe)
    assert bpe.eot_id not in ranks.values()
    # Our trained BPE puts <|endoftext|> first; rebuild with ids shifted so EOT follows the ranks.
    shifted = {t: r - 1 for t, r in ranks.items()}
    rebuilt = from_tiktoken_ranks(shifted)
    enc = tiktoken.Encoding("test", pat_str=R50K_PAT, mergeable_ranks=shifted,
                            special_tokens={EOT: len(shifted)})
    for text in AWKWARD + texts[1]:
        ours = [i - 1 for i in bpe.encode(text)]
        assert rebuilt.encode(text) == ours
        assert enc.encode_ordinary(text) == ours
    assert rebuilt.eot_id == len(shifted)


def test_tiktoken_file_is_hash_checked(tmp_path, bpe):
    import base64

    ranks = {t: r - 1 for t, r in ranks_of(bpe).items()}
    body = "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1]))
    path = tmp_path / "toy.tiktoken"
    path.write_text(body)
    with pytest.raises(ValueError, match="sha256"):
        read_tiktoken_ranks(path)  # not GPT-2's published hash
    digest = hashlib.sha256(body.encode()).hexdigest()
    assert read_tiktoken_ranks(path, expected_sha256=digest) == ranks


def test_inconsistent_ranks_are_refused():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # no rank for "ab" or "bc": not one merge of lower-ranked tokens
    with pytest.raises(ValueError, match="not one merge"):
        merges_from_ranks(ranks)
    assert bpe_split(ranks, b"abc") == [b"a", b"b", b"c"]


def test_save_and_load(tmp_path, bpe):
    bpe.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.encode("hello world") == bpe.encode("hello world")
    assert again.sha256() == bpe.sha256()
    assert (tmp_path / "tokenizer_config.json").is_file()
    with pytest.raises(ValueError, match="no tokenizer"):
        Tokenizer.load(tmp_path / "missing")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], 100)


def test_load_of_a_damaged_file_names_it(tmp_path):
    """tokenizers raises a bare `Exception` for a file it cannot parse."""
    (tmp_path / "tokenizer.json").write_text('{"version": ')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe\0")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.load(tmp_path / "tokenizer.json")


def test_load_with_a_damaged_config_names_it(tmp_path, bpe):
    bpe.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.load(tmp_path)
