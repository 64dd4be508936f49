"""Chat templates: how a conversation becomes one prompt.

A checkpoint may carry its own template as Jinja in `tokenizer_config.json` ("chat_template",
a string or a list of {"name", "template"} of which "default" is used), the way Hugging Face
tokenizers do; a caller may override it with a file or a template string. Templates are
rendered in Jinja's sandbox with `messages`, `add_generation_prompt`, `bos_token`,
`eos_token` and `raise_exception`. Without any, the built-in `chat_prompt` format is used:
`<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`.
"""

from __future__ import annotations

import json
from pathlib import Path

from hwattn.data.tokenizer import CHAT_ROLES, chat_prompt


def _message_text(i: int, message) -> tuple[str, str]:
    """(role, content as one string) of `messages[i]`, or ValueError naming what is wrong."""
    role = message.get("role") if isinstance(message, dict) else None
    if role not in CHAT_ROLES:
        raise ValueError(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
    content = message.get("content")
    if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(f"messages[{i}].content must be a string or a list of text parts, got "
                         f"{type(content).__name__}")
    return role, content


def _read_checkpoint_template(model_dir: str | Path | None) -> str | None:
    if model_dir is None:
        return None
    path = Path(model_dir) / "tokenizer_config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _special(model_dir, key: str) -> str:
    """A special token's text from tokenizer_config.json ("" when absent)."""
    if model_dir is None or not (Path(model_dir) / "tokenizer_config.json").is_file():
        return ""
    value = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get(key)
    if isinstance(value, dict):  # {"content": "<s>", ...} as transformers writes it
        value = value.get("content")
    return value if isinstance(value, str) else ""


class ChatTemplate:
    """Renders conversations into prompts.

    model_dir: a checkpoint directory whose tokenizer_config.json may hold a chat_template
        (None for presets). override: a path to a template file, or a Jinja template string
        (anything containing "{{" or "{%"), taking precedence over the checkpoint's.
    `source` says which one is used: "override", "tokenizer_config.json" or "built-in".
    Raises ValueError if the override is neither an existing file nor a template, or if a
    template does not compile (naming it).
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
        a list of text parts}); ValueError naming the bad message or the template's error."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {role, content} messages")
        flat = [dict(zip(("role", "content"), _message_text(i, m))) for i, m in enumerate(messages)]
        if self._compiled is None:
            prompt = chat_prompt(flat)
            return prompt if add_generation_prompt else prompt[:-len("<|assistant|>\n")]
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
