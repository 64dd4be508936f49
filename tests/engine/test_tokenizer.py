"""Tokenizers: a checkpoint's tokenizer.json, the byte fallback, incremental detokenization."""

import pytest

from hwattn.data import tokenizer as data_tokenizer
from hwattn.data.tokenizer import ByteTokenizer, IncrementalDetokenizer, chat_prompt, load_tokenizer
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

    from hwattn.data.tokenizer import StreamDetokenizer

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
    from hwattn.data.tokenizer import StreamDetokenizer, incremental_detokenizer

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
    from hwattn.data.tokenizer import StreamDetokenizer

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
