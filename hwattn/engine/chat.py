"""Chat templates: how a conversation becomes one prompt.

A checkpoint may carry its own template as Jinja in `tokenizer_config.json` ("chat_template",
a string or a list of {"name", "template"} of which "default" is used), the way Hugging Face
tokenizers do; a caller may override it with a file or a template string. Templates are
rendered in Jinja's sandbox with `messages`, `add_generation_prompt`, `bos_token`,
`eos_token` and `raise_exception`. Without any, the built-in `chat_prompt` format is used:
`<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`.

What a message says must never act as the template's own markup. `ChatTemplate.encode` turns a
conversation into token ids piece by piece: the template's text is tokenized as usual (its
special tokens, such as `<|im_start|>`, become their ids) and every message's content with
special tokens read as plain text, so "<|endoftext|>" in a message is a few ordinary tokens,
never the end-of-text id. The built-in template's markers are plain text, so in content they
are broken up as well (`defuse_markers`): a message cannot forge a turn.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path

from hwattn.data.tokenizer import chat_parts, chat_prompt, message_text, read_json_object
from hwattn.engine.requests import check_prompt_chars


def _tokenizer_config(model_dir: str | Path | None) -> dict:
    """The checkpoint's tokenizer_config.json as a dict ({} when there is none); ValueError
    naming the file when it is not a JSON object."""
    return {} if model_dir is None else read_json_object(Path(model_dir) / "tokenizer_config.json")


def _read_checkpoint_template(model_dir: str | Path | None) -> str | None:
    """The checkpoint's template (None when it names none); ValueError naming the file when
    it names one that cannot be used: the built-in format in its place would prompt the model
    in a format it was not trained on."""
    template = _tokenizer_config(model_dir).get("chat_template")
    if template is None:
        return None
    where = f"{Path(model_dir) / 'tokenizer_config.json'}: chat_template"
    if isinstance(template, list):  # named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{where} lists no template named \"default\" (it has "
                             f"{', '.join(map(repr, named)) or 'none'}); pass one with "
                             f"chat_template")
        template, where = named["default"], where + " \"default\""
        if not isinstance(template, str):
            raise ValueError(f"{where} must be a string, got {type(template).__name__}")
    if not isinstance(template, str):
        raise ValueError(f"{where} must be a string or a list of {{name, template}}, got "
                         f"{type(template).__name__}")
    return template if template.strip() else None


def _special(model_dir, key: str) -> str:
    """A special token's text from tokenizer_config.json ("" when absent)."""
    value = _tokenizer_config(model_dir).get(key)
    if isinstance(value, dict):  # {"content": "<s>", ...} as transformers writes it
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Renders conversations into prompts.

    model_dir: a checkpoint directory whose tokenizer_config.json may hold a chat_template
        (None for presets). override: a path to a template file, or a Jinja template string
        (anything containing "{{" or "{%"), taking precedence over the checkpoint's.
    `source` says which one is used: "override", "tokenizer_config.json" or "built-in".
    Raises ValueError if the override is neither an existing file nor a template, if a
    template does not compile (naming it), or if the checkpoint's tokenizer_config.json is not
    a JSON object or names a template that cannot be used (no "default" among named ones, or
    not a string), naming the file.
    """

    def __init__(self, model_dir: str | Path | None = None, override: str | None = None):
        self.bos_token = _special(model_dir, "bos_token")
        self.eos_token = _special(model_dir, "eos_token")
        text, self.source = None, "built-in"
        if override is not None:
            if Path(override).is_file():
                text = Path(override).read_text()
            elif "{{" in override or "{%" in override:
                text = override
            else:
                raise ValueError(f"chat_template must be a template file or a Jinja template "
                                 f"string; {override!r} is neither")
            self.source = "override"
        else:
            text = _read_checkpoint_template(model_dir)
            if text is not None:
                self.source = "tokenizer_config.json"
        self.text = text
        self._compiled = None
        if text is not None:
            try:
                from jinja2.exceptions import TemplateError
                from jinja2.sandbox import ImmutableSandboxedEnvironment
            except ImportError as err:
                raise ValueError(f"chat templates need jinja2: pip install 'hwattn[serve]' "
                                 f"({err})") from None
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            try:
                self._compiled = env.from_string(text)
            except TemplateError as err:
                raise ValueError(f"chat_template ({self.source}) does not compile: {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` (each {"role": one of `CHAT_ROLES`, "content": a string or
        a list of text parts}) as text; ValueError naming the bad message or the template's
        error. Tokenize a conversation with `encode`, not by encoding this text: only `encode`
        keeps message content from producing special tokens."""
        flat = self._flat(messages)
        if self._compiled is None:
            return chat_prompt(flat, add_generation_prompt)
        return self._render(flat, add_generation_prompt)

    def parts(self, messages: list[dict],
              add_generation_prompt: bool = True) -> tuple[list[tuple[str, bool]], bool]:
        """(pieces, reshaped): the prompt as (text, is_content) pieces whose texts join into
        `render`'s prompt: the template's own text, and each message's content where the
        template put it. `reshaped` is True when the template changes message content (trims
        or tests it), so that the contents cannot be found in its output: the pieces are then
        the whole prompt as one piece of template text."""
        flat = self._flat(messages)
        if self._compiled is None:
            return chat_parts(flat, add_generation_prompt), False
        # Render once with a placeholder in place of each content (the placeholders hold
        # nothing of the client's), then put the contents where the placeholders landed.
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(flat))]
        shaped = self._render([dict(m, content=mark) for m, mark in zip(flat, marks)],
                              add_generation_prompt)
        pieces = re.split(f"\ue000{nonce}:([0-9]+)\ue001", shaped)
        parts = [(text, i % 2 == 1) for i, text in enumerate(pieces)]
        parts = [(flat[int(text)]["content"], True) if content else (text, False)
                 for text, content in parts]
        # Rendered again with the real contents: a template that reshapes content (trims or
        # tests it) treats them otherwise than the placeholders, which only this comparison can
        # tell. Then the plain prompt is all template text (`encode_with_text` refuses a message
        # holding a special token's text, which could not be kept apart).
        plain = self._render(flat, add_generation_prompt)
        if "".join(text for text, _ in parts) == plain:
            return parts, False
        return [(plain, False)], True

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True,
               max_model_len: int | None = None, generate: bool = True) -> list[int]:
        """The prompt's token ids: the template's text with `tokenizer.encode`, each message's
        content with `tokenizer.encode_text` (special tokens' text stays text). ValueError
        naming `messages` if, with `max_model_len` given, the prompt has too many characters to
        fit it (`requests.check_prompt_chars`, with `generate`; checked before anything is
        tokenized), or if the template reshapes message content and a message holds a special
        token's text (it could then not be kept apart)."""
        return self.encode_with_text(messages, tokenizer, add_generation_prompt, max_model_len,
                                     generate)[0]

    def encode_with_text(self, messages: list[dict], tokenizer,
                         add_generation_prompt: bool = True, max_model_len: int | None = None,
                         generate: bool = True) -> tuple[list[int], str]:
        """(`encode`'s token ids, the prompt as `render` gives it), from one rendering."""
        parts, reshaped = self.parts(messages, add_generation_prompt)
        if max_model_len is not None:
            check_prompt_chars(sum(len(text) for text, _ in parts), tokenizer, max_model_len,
                               generate, what="messages: the conversation's prompt")
        if reshaped:  # the prompt is all template text: no message may hold a special token
            specials = getattr(tokenizer, "special_token_texts", ())
            for i, m in enumerate(self._flat(messages)):
                found = next((t for t in specials if t in m["content"]), None)
                if found is not None:
                    raise ValueError(f"messages[{i}].content holds the special token {found!r}, "
                                     f"which this chat template ({self.source}) cannot keep "
                                     f"apart from its own (it reshapes message content)")
        ids: list[int] = []
        for text, content in parts:
            if text:
                ids += tokenizer.encode_text(text) if content else tokenizer.encode(text)
        return ids, "".join(text for text, _ in parts)

    @staticmethod
    def _flat(messages) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} messages")
        return [dict(zip(("role", "content"), message_text(i, m))) for i, m in enumerate(messages)]

    def _render(self, flat: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._compiled.render(messages=flat, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as err:  # noqa: BLE001 - the template's own failure, said to the caller
            raise ValueError(f"the chat template ({self.source}) refused the messages: "
                             f"{err}") from None


class TemplateRaised(Exception):
    """A template's own `raise_exception(...)`."""


def _raise(message):
    raise TemplateRaised(message)
