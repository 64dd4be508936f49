"""Request bodies of the OpenAI-compatible routes, as pydantic models with bounds, and the
OpenAI-style error they turn into.

Every field the server honours is declared (OpenAI's sampling fields, logit_bias among them,
plus vLLM's extras:
top_k, min_p, repetition_penalty, min_tokens, stop_token_ids, ignore_eos,
include_stop_str_in_output, prompt_logprobs, allowed_token_ids, bad_words,
truncate_prompt_tokens); any other field is refused by name (400)
instead of being silently ignored, and OpenAI fields this server does not implement
(tools, tool_choice, suffix, best_of above n) are accepted only at their no-op
value. `null` for any optional field means the field was not given (OpenAI marks them
nullable). Integers must be JSON integers, floats must be finite, and what costs the engine
time on every token (stop strings, stop ids) or per request (prompts in one body, prompts x n
sequences, chat messages) is capped by `ServerLimits`.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo,
                      field_validator, model_validator)
from pydantic_core import PydanticCustomError

from hwattn.data.tokenizer import CHAT_ROLES
from hwattn.engine.chat import ChatArgumentError, chat_options, check_template_kwargs
from hwattn.engine.sampling_params import INT64_LIMIT, SamplingParams


class APIError(Exception):
    """An error sent to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def response(self) -> JSONResponse:
        # A message may quote the client's input, lone surrogates included: keep it encodable.
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        param = None if self.param is None else \
            self.param.encode("utf-8", "backslashreplace").decode("utf-8")
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse({"error": {"message": message, "type": self.kind, "param": param,
                                       "code": self.code}},
                            status_code=self.status, headers=headers)


@dataclass(frozen=True)
class ServerLimits:
    """Caps on what one request may ask of the server.

    max_body_bytes: largest request body (413 beyond it, checked before it is parsed).
    max_stop: stop strings, stop token ids, and bad words, per request.
    max_stop_chars: characters in one stop string or bad word.
    max_prompts: prompts in one /v1/completions request.
    max_sequences: prompts x `n` in one request: the sequences it queues in the engine (the
        scheduler shares the batch fairly between requests, but each sequence still costs
        pages and steps).
    max_messages: messages in one /v1/chat/completions or /tokenize request.
    max_n: completions per prompt (`n`).
    max_logprobs: top log-probabilities per token (`logprobs`, `top_logprobs`,
        `prompt_logprobs`).
    max_logit_bias: tokens one request may bias (`logit_bias` entries).
    """

    max_body_bytes: int = 16 << 20
    max_stop: int = 64
    max_stop_chars: int = 1024
    max_prompts: int = 256
    max_sequences: int = 256
    max_messages: int = 1024
    max_n: int = 16
    max_logprobs: int = 20
    max_logit_bias: int = 1024

    def __post_init__(self):
        for name in ("max_body_bytes", "max_stop", "max_stop_chars", "max_prompts",
                     "max_sequences", "max_messages", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_logprobs", "max_logit_bias"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# OpenAI fields this server does not implement, and the values that ask for nothing.
NO_OP = {
    "tools": lambda v: v == [],
    "tool_choice": lambda v: v == "none",
    "suffix": lambda v: v == "",
}


def _error(kind: str, message: str, **ctx) -> PydanticCustomError:
    return PydanticCustomError(kind, message, ctx or None)


def _limits(info: ValidationInfo) -> ServerLimits:
    return (info.context or {}).get("limits") or ServerLimits()


class _Body(BaseModel):
    """A JSON object with only the declared fields, where `null` leaves an optional field
    unset (its default), as OpenAI's nullable fields are."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(_Body):
    include_usage: bool = False


def _cap_messages(value, info: ValidationInfo):
    cap = _limits(info).max_messages
    if isinstance(value, list) and len(value) > cap:
        raise _error("invalid_value", "messages has {n} messages; at most {cap} are allowed",
                     n=len(value), cap=cap)
    return value


def _capped(values: list, limits: "ServerLimits", what: str, unit: str,
            one: str | None = None) -> list:
    """`values` (the `unit` of field `what`), refused beyond `limits.max_stop` of them, and,
    strings named `one` in the error, any longer than `limits.max_stop_chars`."""
    if len(values) > limits.max_stop:
        raise _error("invalid_value", "{what} has {n} {unit}; at most {cap} are allowed",
                     what=what, unit=unit, n=len(values), cap=limits.max_stop)
    longest = max((len(v) for v in values), default=0) if one is not None else 0
    if longest > limits.max_stop_chars:
        raise _error("invalid_value", "{one} has {n} characters; at most {cap} are allowed",
                     one=one, n=longest, cap=limits.max_stop_chars)
    return values


def _token_ids(values: list[int], what: str) -> list[int]:
    """`values`, refused unless every one can be a token id."""
    if not all(0 <= t < INT64_LIMIT for t in values):
        raise _error("invalid_value", "{what} must be token ids >= 0", what=what)
    return values


class _Request(_Body):
    """Fields shared by completions and chat: the model and the sampling settings."""

    model: str | None = None  # None: the served model (`app.read_body` refuses any other)
    max_tokens: int | None = Field(None, ge=1, lt=INT64_LIMIT)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1, lt=INT64_LIMIT)
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    min_tokens: int = Field(0, ge=0, lt=INT64_LIMIT)
    seed: int | None = Field(None, ge=-INT64_LIMIT, lt=INT64_LIMIT)  # any int64, as vLLM's
    stop: Any = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    prompt_logprobs: int | None = Field(None, ge=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    user: str | None = None  # the caller's end-user label: accepted, used for nothing
    logit_bias: Any = None  # {"token id": bias in [-100, 100]}, as OpenAI's
    # vLLM's extras: the only ids that may be sampled; words never to generate; keep only
    # the prompt's last k tokens (-1: as many as leave room for a token).
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, lt=INT64_LIMIT)

    @field_validator(*NO_OP, mode="before", check_fields=False)
    @classmethod
    def _no_op_only(cls, value, info: ValidationInfo):
        if value is None or NO_OP[info.field_name](value):
            return None
        raise _error("unsupported_parameter", "{name} is not supported by this server",
                     name=info.field_name)

    @field_validator("n")
    @classmethod
    def _few(cls, value, info: ValidationInfo):
        cap = _limits(info).max_n
        if value > cap:
            raise _error("invalid_value", "n must be at most {cap}, got {n}", cap=cap, n=value)
        return value

    @field_validator("prompt_logprobs", "logprobs", "top_logprobs", check_fields=False)
    @classmethod
    def _few_logprobs(cls, value, info: ValidationInfo):
        cap = _limits(info).max_logprobs
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            raise _error("invalid_value", "{name} must be at most {cap}, got {n}",
                         name=info.field_name, cap=cap, n=value)
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value, info: ValidationInfo):
        if value is None:
            return None
        limits = _limits(info)
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise _error("invalid_value", "stop must be a non-empty string or a list of them")
        return _capped(stops, limits, "stop", "strings", one="a stop string")

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_ids(cls, value, info: ValidationInfo):
        if value is not None:
            _token_ids(_capped(value, _limits(info), "stop_token_ids", "ids"), "stop_token_ids")
        return value

    @field_validator("allowed_token_ids")
    @classmethod
    def _allowed(cls, value):
        return value if value is None else _token_ids(value, "allowed_token_ids")

    @field_validator("bad_words")
    @classmethod
    def _bad_words(cls, value, info: ValidationInfo):
        if value is not None:
            _capped(value, _limits(info), "bad_words", "words", one="a bad word")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _logit_bias(cls, value, info: ValidationInfo):
        """{token id: bias} from OpenAI's JSON object of token-id strings to numbers."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise _error("invalid_value", "logit_bias must be an object mapping token ids to "
                         "biases")
        cap = _limits(info).max_logit_bias
        if len(value) > cap:
            raise _error("invalid_value", "logit_bias has {n} entries; at most {cap} are "
                         "allowed", n=len(value), cap=cap)
        out = {}
        for key, bias in value.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()) \
                    or int(key) >= INT64_LIMIT:
                raise _error("invalid_value", "logit_bias keys must be token ids (digits), got "
                             "{key}", key=reprlib.repr(key))
            if not _number(bias) or not -100 <= bias <= 100:
                raise _error("invalid_value", "logit_bias values must be numbers in [-100, "
                             "100], got {bias} for token {key}", bias=reprlib.repr(bias), key=key)
            out[int(key)] = float(bias)
        return out or None

    def sampling(self, max_tokens: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """The engine's settings, with `max_tokens`, `logprobs` and `prompt_logprobs` as the
        route resolved them (from the request's own fields and the route's defaults)."""
        if prompt_logprobs is None:
            prompt_logprobs = self.prompt_logprobs
        try:
            return SamplingParams(
                n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=self.top_k or 0, min_p=self.min_p, presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
                stop_token_ids=self.stop_token_ids or [], ignore_eos=self.ignore_eos,
                include_stop_str_in_output=self.include_stop_str_in_output, logprobs=logprobs,
                prompt_logprobs=prompt_logprobs, logit_bias=self.logit_bias,
                allowed_token_ids=self.allowed_token_ids, bad_words=self.bad_words,
                truncate_prompt_tokens=self.truncate_prompt_tokens,
                # What is new each step, streamed or not: the server joins the outputs
                # (`app.run_all`) and never asks the engine for all so far every step.
                output_kind="delta")
        except ValueError as err:
            raise APIError(str(err), param=str(err).split(" ", 1)[0]) from None

    def check(self) -> None:
        """Checks across fields, raising `APIError` naming the field."""
        if self.stream and self.prompt_logprobs is not None:
            raise APIError("prompt_logprobs is not available with stream: ask without streaming",
                           param="prompt_logprobs")

    def check_stream_options(self) -> bool:
        """Whether to send a usage chunk last; stream_options without streaming is an error."""
        if self.stream_options is not None and not self.stream:
            raise APIError("stream_options is only allowed when stream is true",
                           param="stream_options")
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Request):
    """POST /v1/completions. `prompt` becomes a list of prompts (strings or token-id lists).
    logprobs: top log-probabilities per token (0: the token's own). echo: the prompt comes
    back before the completion (with its log-probabilities when `logprobs` is set); with echo,
    max_tokens may be 0 (the prompt alone)."""

    prompt: Any
    max_tokens: int | None = Field(None, ge=0, lt=INT64_LIMIT)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: Any = None

    def check(self) -> None:
        super().check()
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(f"best_of={self.best_of} is not supported by this server (best_of "
                           f"must equal n, {self.n})", param="best_of",
                           code="unsupported_parameter")
        if self.max_tokens == 0 and not self.echo:
            raise APIError("max_tokens must be >= 1 (0 only with echo)", param="max_tokens")

    @model_validator(mode="after")
    def _few_sequences(self, info: ValidationInfo):
        cap = _limits(info).max_sequences
        if len(self.prompt) * self.n > cap:
            raise APIError(f"this request asks for {len(self.prompt)} prompt(s) x n={self.n} = "
                           f"{len(self.prompt) * self.n} sequences; at most {cap} are allowed "
                           f"in one request: send fewer prompts or a smaller n",
                           param="n" if self.n > 1 else "prompt")
        return self

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, value, info: ValidationInfo):
        def ids(x):
            return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                               for t in x)

        if isinstance(value, str) or (ids(value) and value):
            return [value]
        # Counted before the prompts are looked at: millions of tiny prompts cost nothing.
        cap = _limits(info).max_prompts
        if isinstance(value, list) and len(value) > cap and isinstance(value[0], (str, list)):
            raise _error("invalid_value", "prompt has {n} prompts; at most {cap} are allowed",
                         n=len(value), cap=cap)
        if isinstance(value, list) and value and (all(isinstance(p, str) for p in value)
                                                  or all(ids(p) for p in value)):
            return value
        raise _error("invalid_value", "prompt must be a string, a list of strings, a list of "
                     "token ids or a list of such lists")


class ChatMessage(_Body):
    role: Any
    content: Any

    @field_validator("role", mode="before")
    @classmethod
    def _role(cls, value):
        if not isinstance(value, str) or value not in CHAT_ROLES:
            raise _error("invalid_value", "role must be one of {roles}; got {got}",
                         roles=", ".join(CHAT_ROLES), got=_SHORT.repr(value))
        return value

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, value):
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise _error("invalid_value", "content[{i}] must be a text part: an object "
                                 "with type \"text\" and a string text (only text is supported)",
                                 i=i)
            return value
        raise _error("invalid_value", "content must be a string or a list of text parts, got {t}",
                     t=type(value).__name__ if value is not None else "null")


class ChatRequest(_Request):
    """POST /v1/chat/completions. logprobs: report each token's log-probability, with the
    `top_logprobs` most likely tokens beside it. vLLM's extras for the template:
    add_generation_prompt (end the rendered prompt with the assistant's turn; default true),
    continue_final_message (end it inside the final message instead, which the model then
    continues: a prefilled answer; not with add_generation_prompt true) and
    chat_template_kwargs (extra template variables: an object of JSON values, none of them the
    template's own). `tools` is the no-op `NO_OP` names: tool calling is not implemented."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=INT64_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Any = None
    tools: Any = None
    tool_choice: Any = None

    @field_validator("chat_template_kwargs", mode="before")
    @classmethod
    def _template_kwargs(cls, value):
        try:
            return check_template_kwargs(value) or None
        except ValueError as err:
            raise _error("invalid_value", "{reason}", reason=str(err)) from None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        try:
            chat_options(self.add_generation_prompt, self.continue_final_message)
        except ChatArgumentError as err:
            raise APIError(str(err), param=err.param) from None

    @model_validator(mode="after")
    def _few_sequences(self, info: ValidationInfo):
        cap = _limits(info).max_sequences
        if self.n > cap:
            raise APIError(f"n={self.n} asks for more sequences than the {cap} allowed in one "
                           f"request", param="n")
        return self

    _few_messages = field_validator("messages", mode="before")(_cap_messages)


class TokenizeRequest(_Body):
    """POST /tokenize: a `prompt` or chat `messages` (rendered with the chat template, with
    the chat route's add_generation_prompt, continue_final_message and chat_template_kwargs),
    capped as the generation routes cap them (messages, and the model's context).
    add_special_tokens is accepted for compatibility: this server's tokenizers add none."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: Any = None

    _few_messages = field_validator("messages", mode="before")(_cap_messages)
    _template_kwargs = ChatRequest._template_kwargs

    def check(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError("give exactly one of prompt and messages", param="prompt")
        if self.messages is None:
            for name in ("continue_final_message", "chat_template_kwargs"):
                if getattr(self, name) not in (False, None):
                    raise APIError(f"{name} applies to messages, not to a prompt", param=name)
            return
        try:
            chat_options(self.add_generation_prompt, self.continue_final_message)
        except ChatArgumentError as err:
            raise APIError(str(err), param=err.param) from None


class DetokenizeRequest(_Body):
    """POST /detokenize: token ids back to text."""

    model: str | None = None
    tokens: list[int]

    def check(self) -> None:
        pass


_SHORT = reprlib.Repr()  # quotes a client's value briefly, however long or deep
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict = 3, 60, 60, 6, 6


def _param(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(model: type[BaseModel], body: dict, limits: ServerLimits):
    """`model` validated from `body`, or an APIError (400) naming the first bad field."""
    try:
        request = model.model_validate(body, context={"limits": limits})
        request.check()
        return request
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            raise APIError(f"unrecognized request argument {param!r}: this server does not "
                           f"implement it", param=param, code="unsupported_parameter") from None
        if first["type"] == "unsupported_parameter":
            raise APIError(first["msg"], param=param, code="unsupported_parameter") from None
        message, name = first["msg"], str(first["loc"][-1]) if first["loc"] else ""
        if first["type"] == "missing":
            message = f"{param} is required"
        elif first["type"] != "invalid_value":
            message = f"{param}: {message}, got {_SHORT.repr(first.get('input'))}"
        elif message.startswith(name):
            message = param + message[len(name):]  # name the field by its whole path
        else:
            message = f"{param}: {message}"
        raise APIError(message, param=param) from None
