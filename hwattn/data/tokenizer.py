"""Tokenizers: GPT-2 r50k read offline from a registry package, or a byte-level BPE of our own;
the byte-level fallback of random-weight presets; incremental detokenization and the chat
template the server uses. One `Tokenizer` wrapper serves training, evaluation and serving.

Both end up as a Hugging Face `tokenizers.Tokenizer` (byte-level BPE, GPT-2 pre-tokenizer
regex), so encoding runs in Rust and the same `tokenizer.json` serves training, evaluation,
the serving engine and `transformers`.

GPT-2's ranks come as a `.tiktoken` file (base64 token bytes and rank per line), the one the
PyPI package `openai-whisper` ships as `whisper/assets/gpt2.tiktoken`. Its SHA-256 is checked
against the published r50k_base hash before use. A rank file has no merge list, so the merges
are recovered: the token of rank r is what byte-pair merging with the ranks below r builds
from its bytes, and that run ends in exactly one final merge of two smaller tokens.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
EOS_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")  # looked for in this order
CHAT_ROLES = ("system", "user", "assistant")  # the roles `chat_prompt` knows
MIN_BPE_VOCAB = 256 + 1 + 1  # the smallest `train_bpe`: 256 bytes, one merge, <|endoftext|>


def _tokenizers():
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("tokenizers is needed: pip install 'hwattn[train]'") from err
    return tokenizers


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def read_tiktoken_ranks(path: str | Path, expected_sha256: str | None = R50K_SHA256) -> dict[bytes, int]:
    """Token bytes -> rank from a `.tiktoken` file, after checking its SHA-256."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the expected {expected_sha256}")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def bpe_split(ranks: dict[bytes, int], word: bytes, max_rank: int | None = None) -> list[bytes]:
    """Byte-pair merge `word` using only ranks below `max_rank` (all when None):
    repeatedly merge the adjacent pair whose joined bytes have the lowest rank."""
    parts = [bytes([b]) for b in word]
    while len(parts) > 1:
        best, best_rank = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (max_rank is None or r < max_rank) and \
                    (best_rank is None or r < best_rank):
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list, in rank order, that rebuilds every multi-byte token of `ranks`."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = bpe_split(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"token {token!r} (rank {rank}) is not one merge of lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    return merges


def _refuse_unencodable(texts: Sequence) -> None:
    """ValueError naming the first lone surrogate among `texts` (a str UTF-8 cannot encode,
    which `tokenizers` refuses with a TypeError saying the text is not a str)."""
    for i, text in enumerate(texts):
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                where = f"text {i}" if len(texts) > 1 else "the text"
                raise ValueError(f"{where} holds a lone surrogate {text[err.start]!r} at "
                                 f"character {err.start}, which UTF-8 cannot encode") from None


class Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with the end-of-text token hwattn separates
    documents with.

    encode(text) -> list[int] (special tokens written in the text become their ids);
    encode_text(text) -> list[int] (special tokens' text stays ordinary text: for what a user
    wrote, e.g. chat message content); encode_batch(texts) -> list[list[int]]; decode(ids) -> str.
    `token_byte_lengths` (V,) int64 counts the UTF-8 bytes each id stands for (0 for special
    tokens), which turns a token-level loss into bits per byte exactly.

    require_eot: raise ValueError without the end-of-text token (training separates documents
        with it); a checkpoint's tokenizer served by the engine may lack it.
    eos_token_id: where generation stops (default: the first of `EOS_NAMES` it has).
    skip_special_tokens: whether `decode` drops special tokens (the engine's output does).
    """

    def __init__(self, tok, name: str = "custom", require_eot: bool = True,
                 eos_token_id: int | None = None, skip_special_tokens: bool = False):
        self.tok = tok
        self.name = name
        self.eot_id = tok.token_to_id(EOT)
        if self.eot_id is None and require_eot:
            raise ValueError(f"tokenizer has no {EOT} token")
        if eos_token_id is None:
            eos_token_id = next((i for i in map(tok.token_to_id, EOS_NAMES) if i is not None), None)
        self.eos_token_id = eos_token_id
        self.eos_token = None if eos_token_id is None else tok.id_to_token(eos_token_id)
        self.skip_special_tokens = skip_special_tokens

    @property
    def vocab_size(self) -> int:
        """One more than the highest id: the rows an embedding needs and the range a shard's
        dtype must hold. A tokenizer's ids need not be contiguous (cl100k's and o200k's
        special tokens sit past a gap), and the number of ids it has would then be too few."""
        vocab = self.tok.get_vocab(with_added_tokens=True)
        return max(vocab.values(), default=-1) + 1

    def encode(self, text: str) -> list[int]:
        try:
            return self.tok.encode(text, add_special_tokens=False).ids
        except TypeError:
            _refuse_unencodable([text])
            raise

    def encode_text(self, text: str) -> list[int]:
        """`text`'s ids with no special token among them: "<|endoftext|>" written in the text
        is encoded as the characters it is made of, never as the end-of-text id."""
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            _refuse_unencodable([text])
            raise

    @cached_property
    def special_token_texts(self) -> tuple[str, ...]:
        """The texts that `encode` turns into special token ids."""
        return tuple(t.content for t in self.tok.get_added_tokens_decoder().values() if t.special)

    @cached_property
    def _plain(self):
        """A copy of the tokenizer that encodes special tokens' text as ordinary text."""
        plain = _tokenizers().Tokenizer.from_str(self.tok.to_str())
        plain.encode_special_tokens = True
        return plain

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets nobody reads here.
        fn = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        texts = list(texts)
        try:
            return [e.ids for e in fn(texts, add_special_tokens=False)]
        except TypeError:
            _refuse_unencodable(texts)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool | None = None) -> str:
        """The text of `ids`; special tokens left out if `skip_special_tokens` (default: the
        tokenizer's own setting)."""
        skip = self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        return self.tok.decode(list(ids), skip_special_tokens=skip)

    @cached_property
    def max_token_chars(self) -> int:
        """Most characters one token can stand for. A token's vocabulary string has at least
        as many characters as the text it stands for (one per byte in byte-level BPE), so a
        text longer than this many characters per token cannot fit a token budget: long
        prompts are refused before they are tokenized."""
        return max(1, max(map(len, self.tok.get_vocab()), default=1))

    @cached_property
    def token_byte_lengths(self) -> np.ndarray:
        to_byte = {c: b for b, c in byte_to_unicode().items()}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        special = {t.content for t in self.tok.get_added_tokens_decoder().values()}
        for piece, idx in self.tok.get_vocab(with_added_tokens=True).items():
            if piece not in special and idx < len(lengths):
                lengths[idx] = sum(1 for ch in piece if ch in to_byte)
        return lengths

    def save(self, directory: str | Path) -> Path:
        """Write tokenizer.json, and a tokenizer_config.json that lets
        `transformers.AutoTokenizer` load the folder."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tok.save(str(path))
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT,
               "pad_token": EOT, "unk_token": EOT, "add_prefix_space": False,
               "hwattn_name": self.name}
        (path.parent / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return path

    def sha256(self) -> str:
        return hashlib.sha256(self.tok.to_str().encode()).hexdigest()

    @classmethod
    def load(cls, path: str | Path, **kwargs) -> "Tokenizer":
        """From a `tokenizer.json` file or a directory holding one; `kwargs` as for the
        constructor."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"no tokenizer at {path}")
        try:
            tok = _tokenizers().Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ValueError(f"{path} is not a readable tokenizer file ({err})") from None
        name = read_json_object(path.parent / "tokenizer_config.json").get("hwattn_name")
        return cls(tok, name=name or path.parent.name, **kwargs)


def read_json_object(path: Path) -> dict:
    """The JSON object in `path` ({} when there is no such file); ValueError naming the file
    when it is not valid JSON or holds something else (a checkpoint's config.json,
    tokenizer_config.json)."""
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def _byte_level_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]):
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def from_tiktoken_ranks(ranks: dict[bytes, int], eot_id: int | None = None,
                        name: str = "gpt2") -> Tokenizer:
    """Byte-level BPE tokenizer equivalent to a tiktoken rank table (GPT-2 regex), with
    `<|endoftext|>` at `eot_id` (default: right after the last rank)."""
    enc = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]
    tok = _byte_level_tokenizer(vocab, merges)
    eot_id = len(ranks) if eot_id is None else eot_id
    if eot_id != len(ranks):
        raise ValueError(f"eot_id must follow the ranks ({len(ranks)}), got {eot_id}")
    tok.add_special_tokens([EOT])
    return Tokenizer(tok, name=name)


def gpt2_tokenizer(tiktoken_file: str | Path) -> Tokenizer:
    """GPT-2 (r50k_base, 50,257 ids, <|endoftext|> = 50256) from a hash-checked rank file."""
    return from_tiktoken_ranks(read_tiktoken_ranks(tiktoken_file, R50K_SHA256), name="gpt2")


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (including <|endoftext|> and the 256 bytes)
    trained on `texts` with the GPT-2 pre-tokenizer."""
    if vocab_size < MIN_BPE_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_BPE_VOCAB} (256 bytes, one merge, "
                         f"<|endoftext|>), got {vocab_size}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                     show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(tok, name=name or f"bpe{vocab_size}")


def ranks_of(tokenizer: Tokenizer) -> dict[bytes, int]:
    """A tiktoken-style rank table (token bytes -> id) of a byte-level BPE tokenizer's
    non-special vocabulary; the inverse of `from_tiktoken_ranks` (used by the tests)."""
    dec = {c: b for b, c in byte_to_unicode().items()}
    special = {t.content for t in tokenizer.tok.get_added_tokens_decoder().values()}
    return {bytes(dec[ch] for ch in piece): idx
            for piece, idx in tokenizer.tok.get_vocab(with_added_tokens=True).items()
            if piece not in special}


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255 and id 256 is end-of-sequence (when the vocabulary has room):
    the tokenizer of random-weight presets, which ship none.

    Ids past 256 have no text of their own; they print as one ASCII character
    (space + id mod 95) so that random-weight models still produce readable output.
    """

    max_token_chars = 1  # most characters one token can stand for (every character is >= 1 byte)
    special_token_texts = ()  # no text encodes to the end-of-sequence id

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = 256 if vocab_size > 256 else None
        self.eos_token = None  # id 256 has no text

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_text(self, text: str) -> list[int]:
        """The same as `encode`: no text can become the end-of-sequence id."""
        return self.encode(text)

    def decode(self, ids: list[int], skip_special_tokens: bool | None = None) -> str:
        """The text of `ids` (`skip_special_tokens` changes nothing: no special token here has
        text)."""
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


def load_tokenizer(model_dir: str | Path | None, vocab_size: int,
                   tokenizer: str | Path | None = None) -> Tokenizer | ByteTokenizer:
    """What the engine generates with: `tokenizer` (a local tokenizer.json or a folder holding
    one) if given, else the checkpoint's tokenizer.json if there is one, else a `ByteTokenizer`
    of `vocab_size`. The checkpoint's config.json's eos_token_id stops generation; special
    tokens are left out of the text. ValueError if `tokenizer` names no local tokenizer.json
    or has more ids than `vocab_size`."""
    if tokenizer is not None:
        path = Path(tokenizer)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer must be a local {TOKENIZER_FILE} or a folder holding one "
                             f"(hwattn downloads nothing), got {str(tokenizer)!r}")
    elif model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        file = Path(model_dir) / TOKENIZER_FILE
    else:
        return ByteTokenizer(vocab_size)
    eos = read_json_object(Path(model_dir) / "config.json").get("eos_token_id") \
        if model_dir is not None else None
    loaded = Tokenizer.load(file, require_eot=False, skip_special_tokens=True,
                            eos_token_id=eos if isinstance(eos, int) else None)
    if tokenizer is not None and loaded.vocab_size > vocab_size:
        raise ValueError(f"tokenizer {str(tokenizer)!r} has {loaded.vocab_size} ids, more "
                         f"than the model's vocabulary of {vocab_size}")
    return loaded


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text without re-decoding it all each step.

    Decodes a short window (`prefix` .. end) and emits what goes beyond the window's already
    emitted part; holds back text ending in an incomplete UTF-8 sequence.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens  # None: the tokenizer's own setting
        self.prefix = 0
        self.read = 0

    def step(self, ids: list[int], start: int = 0, end: int | None = None) -> str:
        """New text for the output `ids[start:end]` (the whole output so far; `start` and
        `end` let a caller pass a sequence's token list without copying its output out of it
        every step, which costs in proportion to the output's length)."""
        skip = self.skip_special_tokens
        end = len(ids) if end is None else end
        prefix = start + self.prefix
        before = self.tokenizer.decode(ids[prefix:start + self.read], skip_special_tokens=skip)
        after = self.tokenizer.decode(ids[prefix:end], skip_special_tokens=skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, end - start
            return after[len(before):]
        return ""


class StreamDetokenizer:
    """`IncrementalDetokenizer` for a `Tokenizer`, through `tokenizers`' own incremental
    decoder (`tokenizers.decoders.DecodeStream`, tokenizers >= 0.21.1): one call into the
    library per token instead of two window decodes, with the same text token by token (it
    keeps the same window and holds back the same incomplete UTF-8; tests compare the two).

    DecodeStream raises where its shown text stops being a prefix of the window's text (a
    byte-fallback tokenizer's byte token shown, then made U+FFFD by an invalid byte after
    it); the window detokenizer then takes over from the same window, as if it had run all
    along."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool | None = None):
        skip = tokenizer.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        self.tokenizer, self.skip = tokenizer, skip
        self.tok = tokenizer.tok
        self.stream = _tokenizers().decoders.DecodeStream(skip_special_tokens=skip)
        self.fed = 0  # output tokens given to the stream
        # The stream's window as `IncrementalDetokenizer`'s (prefix, read): where it starts and
        # how many output tokens' text it has shown.
        self.prefix = self.read = 0
        self.window: IncrementalDetokenizer | None = None  # once the stream has refused a token

    def step(self, ids: list[int], start: int = 0, end: int | None = None) -> str:
        """New text for the output `ids[start:end]`, as `IncrementalDetokenizer.step`."""
        if self.window is not None:
            return self.window.step(ids, start, end)
        end = len(ids) if end is None else end
        fed = start + self.fed
        if end == fed + 1:  # a decode step's one token
            try:
                piece = self.stream.step(self.tok, ids[fed])
            except Exception:  # noqa: BLE001 - see the class
                return self._take_over(ids, start, end)
            self.fed += 1
            if piece:
                self.prefix, self.read = self.read, self.fed
                return piece
            return ""
        stream, tok, pieces = self.stream, self.tok, []
        for i in range(fed, end):
            try:
                piece = stream.step(tok, ids[i])
            except Exception:  # noqa: BLE001 - see the class
                return "".join(pieces) + self._take_over(ids, start, end)
            self.fed += 1
            if piece:
                pieces.append(piece)
                self.prefix, self.read = self.read, self.fed
        return "".join(pieces)

    def _take_over(self, ids: list[int], start: int, end: int) -> str:
        self.window = IncrementalDetokenizer(self.tokenizer, self.skip)
        self.window.prefix, self.window.read = self.prefix, self.read
        self.stream = None
        return self.window.step(ids, start, end)


def _has_decode_stream() -> bool:
    """Whether the installed `tokenizers` has a working `DecodeStream`: 0.21.0's panics on
    ordinary text (huggingface/tokenizers#1705, fixed in 0.21.1), raising pyo3's
    PanicException, which is no `Exception`."""
    tk = _tokenizers()
    return hasattr(tk.decoders, "DecodeStream") and \
        _version_at_least(getattr(tk, "__version__", ""), (0, 21, 1))


@functools.lru_cache(maxsize=8)
def _version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    """Whether a version string's leading numbers reach `minimum` (read once per string: the
    engine asks for every request)."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return found is not None and tuple(map(int, found.groups())) >= minimum


def incremental_detokenizer(tokenizer, skip_special_tokens: bool | None = None):
    """The incremental detokenizer the engine gives each request: a `StreamDetokenizer` for a
    `Tokenizer` when the installed `tokenizers` has a working `DecodeStream` (>= 0.21.1), else
    an `IncrementalDetokenizer` (the byte fallback, older `tokenizers`, other tokenizers)."""
    if isinstance(tokenizer, Tokenizer) and _has_decode_stream():
        return StreamDetokenizer(tokenizer, skip_special_tokens)
    return IncrementalDetokenizer(tokenizer, skip_special_tokens)


# A role marker of `chat_prompt` written inside a message's content.
_MARKER = re.compile("<\\|(" + "|".join(CHAT_ROLES) + ")\\|>")
ZERO_WIDTH_SPACE = "\u200b"


def defuse_markers(content: str) -> str:
    """`content` with every role marker (`<|user|>`, ...) it contains broken by a zero-width
    space after its `<`: a message cannot start a turn of its own in `chat_prompt`."""
    return _MARKER.sub(lambda m: "<" + ZERO_WIDTH_SPACE + m.group(0)[1:], content)


def message_text(i: int, message) -> tuple[str, str]:
    """(role, content as one string) of `messages[i]`: {"role": one of `CHAT_ROLES`,
    "content": a string or a list of OpenAI text parts {"type": "text", "text": str}, joined
    with "\\n" as vLLM joins them} and nothing more. Anything else raises `ValueError` naming
    it (a free-form role could write its own markers into the template; another field would
    be dropped without a word)."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    extra = sorted(set(message) - {"role", "content"}, key=str)  # would vanish unsaid
    if extra:
        raise ValueError(f"messages[{i}].{extra[0]} is not supported: a message has only role "
                         f"and content")
    content = message.get("content")
    if isinstance(content, list):
        for j, p in enumerate(content):
            if not (isinstance(p, dict) and p.get("type") == "text"
                    and isinstance(p.get("text"), str) and set(p) == {"type", "text"}):
                raise ValueError(f"messages[{i}].content[{j}] must be a text part: an object "
                                 f"with type \"text\" and a string text, nothing else (only "
                                 f"text is supported)")
        content = "\n".join(p["text"] for p in content)  # as vLLM's chat_utils joins them
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got "
                         f"{type(content).__name__}")
    return role, content


def chat_parts(messages: list[dict], add_generation_prompt: bool = True) -> list[tuple[str, bool]]:
    """The built-in chat template as (text, is_content) pieces: `<|role|>\\n`, the content
    (its role markers defused by `defuse_markers`), `\\n` per message, then `<|assistant|>\\n`
    when `add_generation_prompt`. Tokenize content pieces with `encode_text`, so that no
    message can forge a turn or a special token.

    Each message is checked by `message_text` (ValueError naming what is wrong)."""
    parts = []
    for i, m in enumerate(messages):
        role, content = message_text(i, m)
        parts += [(f"<|{role}|>\n", False), (defuse_markers(content), True), ("\n", False)]
    if add_generation_prompt:
        parts.append(("<|assistant|>\n", False))
    return parts


def chat_prompt(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The built-in chat template as text: `<|role|>\\ncontent\\n` per message, then
    `<|assistant|>\\n` (see `chat_parts`, which also says how to tokenize it safely)."""
    return "".join(text for text, _ in chat_parts(messages, add_generation_prompt))
