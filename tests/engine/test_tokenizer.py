"""Tokenizers: a checkpoint's tokenizer.json, the byte fallback, incremental detokenization."""

import pytest

from hwattn.data import tokenizer as data_tokenizer
from hwattn.data.tokenizer import (ByteTokenizer, IncrementalDetokenizer, StreamDetokenizer, chat_prompt,
                                   incremental_detokenizer, load_tokenizer)
from hwattn.engine import LLM, SamplingParams


def test_incremental_detokenizer_holds_back_split_utf8():
    tok = ByteTokenizer(512)
    ids = tok.encode("añb€")
    detok, text = IncrementalDetokenizer(tok), []
    for i in range(1, len(ids) + 1):
        text.append(detok.step(ids[:i]))
    assert "".join(text) == "añb€"
    assert "\ufffd" not in "".join(text)
    assert tok.decode([300, 256, 65]) == chr(32 + 300 % 95) + "A"  # eos prints nothing


def test_incremental_detokenizer_reads_the_output_in_place():
    """`step(ids, start, end)` over a whole token list (prompt, output, then tokens not to
    show) gives the text `step(ids[start:end])` gives, step by step."""
    import random

    tok = ByteTokenizer(512)
    rng = random.Random(0)
    prompt = tok.encode("prompt: ")
    out = tok.encode("añb€ xyz 😀 ok") + [rng.randrange(256, 512) for _ in range(20)]
    rng.shuffle(out)
    copied, in_place = IncrementalDetokenizer(tok), IncrementalDetokenizer(tok)
    for n in range(1, len(out) + 1):
        ids = prompt + out[:n] + [7, 7]  # two trailing tokens the step must not show
        assert in_place.step(ids, len(prompt), len(ids) - 2) == copied.step(out[:n])
    assert (in_place.prefix, in_place.read) == (copied.prefix, copied.read)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE whose merges cut multi-byte characters apart."""
    text = "plain words, añb€ 😀 日本語のテキスト ok; code: x += 1\n" * 40
    return data_tokenizer.train_bpe([text], 400)


@pytest.mark.parametrize("skip", [False, True])
def test_stream_detokenizer_gives_the_window_detokenizers_text(bpe, skip):
    """`StreamDetokenizer` (tokenizers' DecodeStream) against `IncrementalDetokenizer` on
    hostile ids: split UTF-8, the end-of-text token mid-output, ids past the vocabulary, read
    in place behind a prompt with tokens not to show. Shown a token at a time (as the engine
    does) they give the same text at every step; shown several at once, the stream never
    holds back more text than the window does, and both end with the same text."""
    import random


    rng = random.Random(0)
    prompt = bpe.encode("prompt: ")
    for trial in range(80):
        out = [rng.choice((bpe.eot_id, rng.randrange(bpe.vocab_size), rng.randrange(300),
                           rng.randrange(bpe.vocab_size, bpe.vocab_size + 50)))
               for _ in range(30)]
        if trial % 4 == 0:
            out = bpe.encode("añb€ 😀 日本語 ok x += 1")
        jumps = trial % 2 == 1  # several tokens shown at once now and then
        window, stream = IncrementalDetokenizer(bpe, skip), StreamDetokenizer(bpe, skip)
        shown, w_text, s_text = 0, "", ""
        for n in range(1, len(out) + 1):
            ids = prompt + out[:n] + [7, 7]  # two trailing tokens the step must not show
            if n == len(out) or rng.random() > (0.4 if jumps else 0.0):
                shown = n
            s_delta = stream.step(ids, len(prompt), len(prompt) + shown)
            w_delta = window.step(ids, len(prompt), len(prompt) + shown)
            s_text, w_text = s_text + s_delta, w_text + w_delta
            if not jumps:
                assert s_delta == w_delta, (trial, n)
            assert s_text.startswith(w_text), (trial, n)
        whole = bpe.decode(out, skip_special_tokens=skip)
        if not whole.endswith("\ufffd"):  # nothing left to hold back: all of it shown
            assert s_text == w_text == whole, trial


def test_the_engine_streams_a_tokenizers_text(bpe):

    assert isinstance(incremental_detokenizer(bpe), StreamDetokenizer)
    assert isinstance(incremental_detokenizer(ByteTokenizer(512)), IncrementalDetokenizer)


def test_checkpoint_tokenizer_json_is_used(checkpoints, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, "hello": 2, "world": 3}
    vocab.update({f"w{i}": i for i in range(4, 2048)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = checkpoints("gqa-2")
    tok.save(f"{path}/tokenizer.json")
    try:
        loaded = load_tokenizer(path, 2048)
        assert isinstance(loaded, data_tokenizer.Tokenizer)  # the one wrapper training uses too
        assert loaded.encode("hello world") == [2, 3] and loaded.eos_token_id == 0
        out = LLM(path, page_size=8, memory_budget=1 << 20).generate(
            "hello world", SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
        assert out.prompt_token_ids == [2, 3]
        assert out.text == loaded.decode(out.token_ids)
    finally:
        import os

        os.remove(f"{path}/tokenizer.json")


def test_served_tokenizer_may_lack_the_end_of_text_token():
    from tokenizers import Tokenizer, models

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "hi": 2}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="endoftext"):
        data_tokenizer.Tokenizer(tok)  # training needs it to separate documents
    served = data_tokenizer.Tokenizer(tok, require_eot=False, skip_special_tokens=True)
    assert served.eot_id is None and served.eos_token_id == 1 and served.max_token_chars == 5


def test_chat_template():
    text = chat_prompt([{"role": "system", "content": "s"},
                        {"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert text == "<|system|>\ns\n<|user|>\nhi\n<|assistant|>\n"


def test_engine_text_and_stop_strings_through_the_stream(bpe, tmp_path):
    """With a BPE tokenizer the engine detokenizes through `StreamDetokenizer`: a request's
    text is its tokens' text, and a stop string found in one run's text cuts the next run's
    text right before it, at the token that completed it."""

    bpe.save(tmp_path)
    kw = dict(device="cpu", max_model_len=96, num_pages=40, max_num_seqs=4, cpu_threads=1)
    llm = LLM("tiny", tokenizer=str(tmp_path), **kw)
    assert isinstance(llm.get_tokenizer(), data_tokenizer.Tokenizer)
    prompts = [bpe.encode("plain words, añb€"), bpe.encode("code: x")]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    rid = llm.engine.add_request(prompts[0], params)
    assert all(isinstance(d, StreamDetokenizer) for d in llm.engine.detok.values())
    llm.engine.abort_request(rid)
    outs = llm.generate(prompts, params)
    for out in outs:
        whole = bpe.decode(out.token_ids, skip_special_tokens=True)
        assert out.text == whole or whole.endswith("\ufffd") and whole.startswith(out.text)
    text = outs[0].text
    assert len(text) > 12, text
    stop = text[8:11]
    first = text.find(stop)
    cut = llm.generate(prompts[:1], SamplingParams(max_tokens=40, temperature=0,
                                                   ignore_eos=True, stop=[stop]))[0]
    assert cut.text == text[:first] and cut.finish_reason == "stop"
    assert cut.outputs[0].stop_reason == stop
    assert len(cut.token_ids) < len(outs[0].token_ids)


@pytest.fixture(scope="module")
def byte_fallback():
    """A SentencePiece-style tokenizer.json (Llama, Mistral): byte-fallback tokens <0xNN>,
    a Metaspace-like decoder. An invalid run of byte tokens decodes to one U+FFFD per byte,
    so a byte token already shown can turn into U+FFFD once the next byte arrives."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{i:02X}>": 3 + i for i in range(256)})  # in the vocabulary, as Llama's
    for ch in "\u2581abcdefghijklmnopqrstuvwxyz,.":
        vocab[ch] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                           normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return data_tokenizer.Tokenizer(tok, require_eot=False, skip_special_tokens=True)


def _hostile_output(tok):
    """A newline byte token, the first byte of a 4-byte character, then a word: the text is
    "\n", then "\ufffd\ufffd" (held back), then "\ufffd\ufffd hello". The window detokenizer
    shows "\n" and then "\ufffd hello" (its usual slice past what it showed); DecodeStream
    finds "\n" no longer a prefix and raises (tokenizers 0.21.1 to 0.23.3 at least), which
    `OutputProcessor.append_or_fail` turns into finish_reason "error" for the request and its
    siblings."""
    word = tok.encode("hello")
    return [tok.tok.token_to_id("<0x0A>"), tok.tok.token_to_id("<0xF0>"), *word]


def test_stream_detokenizer_does_not_raise_on_a_byte_fallback_tokenizer(byte_fallback):
    out = _hostile_output(byte_fallback)
    prompt = byte_fallback.encode("hi")
    window, stream = IncrementalDetokenizer(byte_fallback), incremental_detokenizer(byte_fallback)
    for n in range(1, len(out) + 1):
        ids = prompt + out[:n]
        assert stream.step(ids, len(prompt)) == window.step(ids, len(prompt)), n


def test_engine_does_not_fail_a_request_on_a_byte_fallback_tokenizer(byte_fallback, tmp_path):
    """Through the engine's `OutputProcessor._append` (one step call per token): the request
    is not failed."""
    from hwattn.engine import LLM

    byte_fallback.save(tmp_path)
    llm = LLM("tiny", tokenizer=str(tmp_path), device="cpu", max_model_len=64, num_pages=16,
              max_num_seqs=2, cpu_threads=1)
    engine = llm.engine
    rid = engine.add_request([5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
    seq = engine.requests[rid][0]
    out = _hostile_output(llm.get_tokenizer())
    for token in out:
        engine.output_processor.append_or_fail(seq, [token])
    assert seq.finish_reason is None, seq.error
    window, text = IncrementalDetokenizer(llm.get_tokenizer(), True), ""
    for n in range(1, len(out) + 1):
        text += window.step([5, 6, 7] + out[:n], 3)
    assert seq.text == text
    engine.abort_request(rid)


@pytest.mark.parametrize("version,stream", [("0.21.0", False), ("0.21.1", True),
                                            ("0.22.0", True)])
def test_no_decode_stream_from_tokenizers_0_21_0(monkeypatch, version, stream):
    """tokenizers 0.21.0's DecodeStream panics on ordinary text (huggingface/tokenizers#1705,
    fixed in 0.21.1 by #1716): a pyo3 PanicException, a BaseException that
    `OutputProcessor.append_or_fail` does not catch, so one request's text would fail the
    whole engine step. pyproject allows tokenizers >= 0.19: such an install keeps the window
    detokenizer."""
    import tokenizers

    bpe = data_tokenizer.train_bpe(["plain words, x += 1\n"] * 10, 300)
    monkeypatch.setattr(tokenizers, "__version__", version)
    assert isinstance(incremental_detokenizer(bpe), StreamDetokenizer) == stream
