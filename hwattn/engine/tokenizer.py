"""Tokenizers the engine can use: a checkpoint's `tokenizer.json` (Hugging Face `tokenizers`)
or, for random-weight presets, a byte-level fallback. Also incremental detokenization and the
simple chat template of `/v1/chat/completions`."""

from __future__ import annotations

import json
from pathlib import Path

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
CHAT_ROLES = ("system", "user", "assistant")  # the roles `chat_prompt` knows


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and id 256 is end-of-sequence (when the vocabulary has room).

    Ids past 256 have no text of their own; they print as one ASCII character
    (space + id mod 95) so that random-weight models still produce readable output.
    """

    max_token_chars = 1  # most characters one token can stand for (every character is >= 1 byte)

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = 256 if vocab_size > 256 else None
        self.eos_token = None  # id 256 has no text

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if i != self.eos_token_id:
                out.append(chr(32 + i % 95))
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A `tokenizers.Tokenizer` loaded from a checkpoint's tokenizer.json."""

    def __init__(self, path: str | Path, eos_token_id: int | None = None):
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(path))
        self.vocab_size = self.tok.get_vocab_size()
        # A token's vocabulary string has at least as many characters as the text it stands for
        # (one per byte in byte-level BPE), so no text longer than this many characters per
        # token fits a token budget: long prompts can be refused before they are tokenized.
        self.max_token_chars = max(1, max(map(len, self.tok.get_vocab()), default=1))
        if eos_token_id is None:
            for name in EOS_NAMES:
                eos_token_id = self.tok.token_to_id(name)
                if eos_token_id is not None:
                    break
        self.eos_token_id = eos_token_id
        self.eos_token = None if eos_token_id is None else self.tok.id_to_token(eos_token_id)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int):
    """The checkpoint's tokenizer.json if there is one, else a `ByteTokenizer`."""
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            eos = None
            config = Path(model_dir) / "config.json"
            if config.is_file():
                eos = json.loads(config.read_text()).get("eos_token_id")
            return HFTokenizer(path, eos if isinstance(eos, int) else None)
    return ByteTokenizer(vocab_size)


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text without re-decoding it all each step.

    Decodes a short window (`prefix` .. end) and emits what goes beyond the window's already
    emitted part; holds back text ending in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.prefix = 0
        self.read = 0

    def step(self, ids: list[int]) -> str:
        """New text for `ids` (the whole output so far)."""
        before = self.tokenizer.decode(ids[self.prefix:self.read])
        after = self.tokenizer.decode(ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(ids)
            return after[len(before):]
        return ""


def chat_prompt(messages: list[dict]) -> str:
    """The chat template: `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`.

    Each message is {"role": one of `CHAT_ROLES`, "content": a string or a list of OpenAI text
    parts {"type": "text", "text": str}}; anything else raises `ValueError` (a free-form role
    could write its own markers into the template)."""
    parts = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, "
                             f"got {role!r}")
        content = m.get("content")
        if isinstance(content, list) and all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string or a list of text parts, "
                             f"got {type(content).__name__}")
        parts.append(f"<|{role}|>\n{content}\n")
    return "".join(parts) + "<|assistant|>\n"
