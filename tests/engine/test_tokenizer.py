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
