"""Chat templates: how a conversation becomes one prompt.

A checkpoint may carry its own template as Jinja in `tokenizer_config.json` ("chat_template",
a string or a list of {"name", "template"} of which "default" is used), the way Hugging Face
tokenizers do; a caller may override it with a file or a template string. Templates are
rendered in Jinja's sandbox with `messages`, `add_generation_prompt`, `bos_token`,
`eos_token` and `raise_exception`, and the caller's `chat_template_kwargs` beside them (see
`chat_options`). Without any, the built-in format (`hwattn.data.tokenizer.chat_prompt`) is
used: `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`.

As in vLLM (and transformers' `apply_chat_template`), `add_generation_prompt` ends the prompt
with the template's opening of an assistant turn, and `continue_final_message` instead ends it
right after the final message's content, with nothing of the template after it (no end of
turn): the model continues that message, typically a partial assistant answer ("prefill").
The two cannot both be true.

What a message says must never act as the template's own markup. `ChatTemplate.encode` turns a
conversation into token ids piece by piece: the template's text is tokenized as usual (its
special tokens, such as `<|im_start|>`, become their ids) and every message's content with
special tokens read as plain text, so "<|endoftext|>" in a message is a few ordinary tokens,
never the end-of-text id. The built-in template's markers are plain text, so in content they
are broken up as well (`defuse_markers`): a message cannot forge a turn. What
`chat_template_kwargs` holds is printed as the template's own text, so a string in it that holds
a special token's text is refused.
"""

from __future__ import annotations

import math
import numbers
import re
import secrets
from pathlib import Path

from hwattn.data.tokenizer import chat_parts, message_text, read_json_object
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


# The variables a template is rendered with (and Jinja's own globals): `chat_template_kwargs`
# may not set them. `tools` is refused apart: hwattn does not implement tool calling.
TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message",
                      "bos_token", "eos_token", "raise_exception", "range", "dict", "lipsum",
                      "cycler", "joiner", "namespace")
MAX_KWARGS_DEPTH = 32  # nesting of lists and objects in chat_template_kwargs


class ChatArgumentError(ValueError):
    """A refused chat argument, named in `param` (so that the server's 400 can name it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_template_kwargs(kwargs) -> dict:
    """`kwargs` as a dict of the extra template variables it holds ({} for None);
    `ChatArgumentError` naming `chat_template_kwargs` (and the bad entry) if it is not a dict
    of JSON-like values (None, bools, finite numbers, strings, lists and string-keyed
    objects of them, nested at most `MAX_KWARGS_DEPTH` deep), or if a key would set one of
    `TEMPLATE_VARIABLES` or `tools`."""
    name = "chat_template_kwargs"
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise ChatArgumentError(name, f"{name} must be a dict of template variables, got "
                                      f"{type(kwargs).__name__}")
    for key in kwargs:
        if not isinstance(key, str):
            raise ChatArgumentError(name, f"{name} keys must be strings, got {key!r}")
        if key == "tools":
            raise ChatArgumentError(name, f"{name}['tools']: tool calling is not supported by "
                                          f"hwattn")
        if key in TEMPLATE_VARIABLES:
            raise ChatArgumentError(name, f"{name}[{key!r}] would override the template's own "
                                          f"variable {key}; give it with its own argument")
    stack = [(f"{name}[{k!r}]", v, 1) for k, v in kwargs.items()]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_KWARGS_DEPTH:
            raise ChatArgumentError(name, f"{where} is nested more than {MAX_KWARGS_DEPTH} deep")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ChatArgumentError(name, f"{where} holds a lone surrogate "
                                              f"{value[err.start]!r}, which UTF-8 cannot "
                                              f"encode") from None
            continue
        if value is None or isinstance(value, (bool, numbers.Integral)):
            continue
        if isinstance(value, numbers.Real):
            if not math.isfinite(value):
                raise ChatArgumentError(name, f"{where} must be a finite number, got {value!r}")
        elif isinstance(value, (list, tuple)):
            stack += [(f"{where}[{i}]", v, depth + 1) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            for k, v in value.items():
                if not isinstance(k, str):
                    raise ChatArgumentError(name, f"{where} keys must be strings, got {k!r}")
                stack += [(f"{where} key {k!r}", k, depth + 1), (f"{where}[{k!r}]", v, depth + 1)]
        else:
            raise ChatArgumentError(name, f"{where} must be a JSON value (None, a bool, a "
                                          f"number, a string, a list or a dict of them), got "
                                          f"{type(value).__name__}")
    return dict(kwargs)


def _strings(value):
    """Every string in a JSON-like value (dict keys too), iteratively."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, tuple)):
            stack += value
        elif isinstance(value, dict):
            stack += list(value) + list(value.values())


def chat_options(add_generation_prompt=True, continue_final_message=False,
                 chat_template_kwargs=None) -> dict:
    """The checked chat arguments, as vLLM takes them: `add_generation_prompt` and
    `continue_final_message` bools that are not both True, and `chat_template_kwargs` through
    `check_template_kwargs`. `ChatArgumentError` naming the argument otherwise."""
    for name, value in (("add_generation_prompt", add_generation_prompt),
                        ("continue_final_message", continue_final_message)):
        if not isinstance(value, bool):
            raise ChatArgumentError(name, f"{name} must be True or False, got {value!r}")
    if add_generation_prompt and continue_final_message:
        raise ChatArgumentError("continue_final_message",
                                "continue_final_message and add_generation_prompt cannot both "
                                "be true: continue_final_message continues the final message, "
                                "add_generation_prompt opens a new assistant turn (set "
                                "add_generation_prompt to false)")
    return dict(add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                chat_template_kwargs=check_template_kwargs(chat_template_kwargs))


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

    def render(self, messages: list[dict], add_generation_prompt: bool = True, *,
               continue_final_message: bool = False, chat_template_kwargs=None) -> str:
        """The prompt for `messages` (each {"role": one of `CHAT_ROLES`, "content": a string or
        a list of text parts}) as text; ValueError naming the bad message, argument
        (`chat_options`) or the template's error. Tokenize a conversation with `encode`, not
        by encoding this text: only `encode` keeps message content from producing special
        tokens."""
        parts, _ = self.parts(messages, add_generation_prompt,
                              continue_final_message=continue_final_message,
                              chat_template_kwargs=chat_template_kwargs)
        return "".join(text for text, _ in parts)

    def parts(self, messages: list[dict], add_generation_prompt: bool = True, *,
              continue_final_message: bool = False,
              chat_template_kwargs=None) -> tuple[list[tuple[str, bool]], bool]:
        """(pieces, reshaped): the prompt as (text, is_content) pieces whose texts join into
        `render`'s prompt: the template's own text, and each message's content where the
        template put it. `reshaped` is True when the template changes message content (trims
        or tests it), so that the contents cannot be found in its output: the pieces are then
        the whole prompt as one piece of template text.

        With `continue_final_message` the pieces end with the final message's content (where
        the template put it last): whatever the template writes after it is cut off. A
        template that does not print that content is refused (ChatArgumentError naming
        continue_final_message). `chat_template_kwargs` are the template's extra variables
        (the built-in format has none to print them)."""
        options = chat_options(add_generation_prompt, continue_final_message,
                               chat_template_kwargs)
        extra = options["chat_template_kwargs"]
        flat = self._flat(messages)
        final = len(flat) - 1
        if self._compiled is None:
            parts = chat_parts(flat, add_generation_prompt)
            if continue_final_message:  # <|role|>\n, content, \n per message: drop the last \n
                parts = parts[:-1]
            return parts, False
        # Render once with a placeholder in place of each content (the placeholders hold
        # nothing of the client's), then put the contents where the placeholders landed.
        nonce = secrets.token_hex(8)
        marks = [f"\ue000{nonce}:{i}\ue001" for i in range(len(flat))]
        shaped = self._render([dict(m, content=mark) for m, mark in zip(flat, marks)],
                              add_generation_prompt, extra)
        pieces = re.split(f"\ue000{nonce}:([0-9]+)\ue001", shaped)
        indices = [int(text) if i % 2 else None for i, text in enumerate(pieces)]
        parts = [(flat[at]["content"], True) if at is not None else (text, False)
                 for text, at in zip(pieces, indices)]
        # Rendered again with the real contents: a template that reshapes content (trims or
        # tests it) treats them otherwise than the placeholders, which only this comparison can
        # tell. Then the plain prompt is all template text (`encode_with_text` refuses a message
        # holding a special token's text, which could not be kept apart).
        plain = self._render(flat, add_generation_prompt, extra)
        reshaped = "".join(text for text, _ in parts) != plain
        if not continue_final_message:
            return ([(plain, False)], True) if reshaped else (parts, False)
        if not reshaped:
            if final not in indices:
                raise self._no_final_content()
            end = len(indices) - indices[::-1].index(final)  # after its last appearance
            return parts[:end], False
        # As transformers cuts a reshaping template's output: after the final content's last
        # appearance, or else after that of its stripped text.
        content = flat[final]["content"]
        for text in (content, content.strip()):
            at = plain.rfind(text) if text else -1
            if at >= 0:
                return [(plain[:at + len(text)], False)], True
        raise self._no_final_content()

    def _no_final_content(self) -> ChatArgumentError:
        return ChatArgumentError("continue_final_message",
                                 f"continue_final_message: the chat template ({self.source}) "
                                 f"does not put the final message's content in the prompt, so "
                                 f"the prompt cannot end inside that message")

    def encode(self, messages: list[dict], tokenizer, add_generation_prompt: bool = True,
               max_model_len: int | None = None, generate: bool = True, *,
               continue_final_message: bool = False, chat_template_kwargs=None) -> list[int]:
        """The prompt's token ids: the template's text with `tokenizer.encode`, each message's
        content with `tokenizer.encode_text` (special tokens' text stays text). ValueError
        naming `messages` if, with `max_model_len` given, the prompt has too many characters to
        fit it (`requests.check_prompt_chars`, with `generate`; checked before anything is
        tokenized), or if the template reshapes message content and a message holds a special
        token's text (it could then not be kept apart); `ChatArgumentError` naming the
        argument for a bad `add_generation_prompt`, `continue_final_message` or
        `chat_template_kwargs` (see `parts`), or a string in `chat_template_kwargs` holding a
        special token's text (the template would print it as its own)."""
        return self.encode_with_text(messages, tokenizer, add_generation_prompt, max_model_len,
                                     generate, continue_final_message=continue_final_message,
                                     chat_template_kwargs=chat_template_kwargs)[0]

    def encode_with_text(self, messages: list[dict], tokenizer,
                         add_generation_prompt: bool = True, max_model_len: int | None = None,
                         generate: bool = True, *, continue_final_message: bool = False,
                         chat_template_kwargs=None) -> tuple[list[int], str]:
        """(`encode`'s token ids, the prompt as `render` gives it), from one rendering."""
        parts, reshaped = self.parts(messages, add_generation_prompt,
                                     continue_final_message=continue_final_message,
                                     chat_template_kwargs=chat_template_kwargs)
        specials = getattr(tokenizer, "special_token_texts", ())
        for key, value in (chat_template_kwargs or {}).items():
            found = next((t for s in _strings(value) for t in specials if t in s), None)
            if found is not None:
                raise ChatArgumentError("chat_template_kwargs",
                                        f"chat_template_kwargs[{key!r}] holds the special token "
                                        f"{found!r}, which the chat template would print as its "
                                        f"own")
        if max_model_len is not None:
            check_prompt_chars(sum(len(text) for text, _ in parts), tokenizer, max_model_len,
                               generate, what="messages: the conversation's prompt")
        if reshaped:  # the prompt is all template text: no message may hold a special token
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

    def _render(self, flat: list[dict], add_generation_prompt: bool, extra: dict) -> str:
        try:
            return self._compiled.render(**extra, messages=flat,
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as err:  # noqa: BLE001 - the template's own failure, said to the caller
            raise ValueError(f"the chat template ({self.source}) refused the messages: "
                             f"{err}") from None


class TemplateRaised(Exception):
    """A template's own `raise_exception(...)`."""


def _raise(message):
    raise TemplateRaised(message)
