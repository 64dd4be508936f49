"""Chat templates (`hwattn.engine.chat.ChatTemplate`, behind `LLM.chat` and the server) under
hostile input: message fields the template never sees, and a checkpoint whose
tokenizer_config.json holds a template hwattn cannot use or is not readable."""

from __future__ import annotations

import json

import pytest

from hwattn.engine.chat import ChatTemplate

NAMED = "{% for m in messages %}{{ m.name }}: {{ m.content }}\n{% endfor %}"


@pytest.mark.parametrize("template", [None, NAMED])
@pytest.mark.parametrize("message, field", [
    ({"role": "user", "content": "hi", "name": "bob"}, "messages[1].name"),
    ({"role": "assistant", "content": "", "tool_calls": [{"id": "call_0"}]},
     "messages[1].tool_calls"),
    ({"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]},
     "messages[1].content[0]"),
])
def test_message_fields_the_template_never_sees_are_refused(template, message, field):
    """Only role and content reach a template: a `name` (which a template might print) or
    `tool_calls` would otherwise vanish from the prompt without a word."""
    chat = ChatTemplate(override=template)
    messages = [{"role": "system", "content": "be brief"}, message]
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        chat.render(messages)
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        chat.parts(messages)


def test_plain_messages_still_render():
    chat = ChatTemplate()
    text = chat.render([{"role": "user", "content": [{"type": "text", "text": "a"},
                                                     {"type": "text", "text": "b"}]}])
    assert text == "<|user|>\na\nb\n<|assistant|>\n"


@pytest.mark.parametrize("template", [None, "{{ messages[0].content }}"])
def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(template):
    """vLLM (entrypoints/chat_utils.py, `_parse_chat_message_content_parts`) joins a
    message's text parts with "\\n": ["a", "b"] is the prompt "a\\nb", not "ab"."""
    chat = ChatTemplate(override=template)
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    text = chat.render([{"role": "user", "content": parts}])
    assert text == chat.render([{"role": "user", "content": "a\nb"}])
    assert "a\nb" in text


def _checkpoint(tmp_path, config):
    (tmp_path / "tokenizer_config.json").write_text(
        config if isinstance(config, str) else json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("config, match", [
    ({"chat_template": [{"name": "tool_use", "template": "{{ messages }}"}]},
     r"no template named \"default\".*tool_use"),
    ({"chat_template": 5}, "chat_template must be a string or a list"),
    ({"chat_template": [{"name": "default", "template": 5}]}, "must be a string"),
])
def test_a_checkpoint_template_that_cannot_be_used_is_refused(tmp_path, config, match):
    """The checkpoint names a template, but not one hwattn can use: the built-in format in
    its place would prompt the model in a format it was not trained on, without a word."""
    with pytest.raises(ValueError, match=f"tokenizer_config.json.*{match}"):
        ChatTemplate(_checkpoint(tmp_path, config))
    # An override does not read the checkpoint's template.
    assert ChatTemplate(tmp_path, "{{ messages[0].content }}").source == "override"


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '"text"'])
def test_an_unreadable_tokenizer_config_is_named(tmp_path, text):
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        ChatTemplate(_checkpoint(tmp_path, text))


def test_checkpoint_templates_that_are_usable_or_absent(tmp_path):
    assert ChatTemplate(_checkpoint(tmp_path, {"eos_token": "<|endoftext|>"})).source == "built-in"
    named = {"chat_template": [{"name": "default", "template": NAMED},
                               {"name": "tool_use", "template": "x"}]}
    chat = ChatTemplate(_checkpoint(tmp_path, named))
    assert chat.source == "tokenizer_config.json"
    assert chat.render([{"role": "user", "content": "hi"}]) == ": hi\n"


@pytest.mark.parametrize("message, field", [
    ({"role": "user", "content": "hi", "name": "bob"}, r"messages\[0\].name"),
    ({"role": "user", "content": [{"type": "text", "text": "hi", "extra": 1}]},
     r"messages\[0\].content\[0\]"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
     r"messages\[0\].content\[0\]"),
])
def test_chat_prompt_refuses_what_it_would_drop(message, field):
    """The built-in format's own function (`hwattn.engine.tokenizer.chat_prompt`) as well."""
    from hwattn.engine.tokenizer import chat_prompt

    with pytest.raises(ValueError, match=field):
        chat_prompt([message])
