"""OpenAI-compatible routes, as vLLM's server has them: /v1/completions (with `echo` and
`logprobs`, which lm-eval's `local-completions` needs for log-likelihoods),
/v1/chat/completions (both with server-sent event streaming and `n` choices per prompt),
/v1/models, /tokenize, /detokenize, /tokenizer_info, /version, /health and /metrics
(Prometheus text, with latency histograms).

Errors come back as OpenAI does them, `{"error": {"message", "type", "param", "code"}}`: 400 for
a malformed body, a bad or unknown field (see `protocol`), 401 for a missing or wrong API key
(when the server has one), 404 for an unknown model (`model` may be left out: the served one),
413 for a body over the size cap, 500 if the engine fails the request, 503 at once when no
engine thread runs to take it (the app's lifespan never started one, or the server is shutting
down; /health then answers 503 too), and 503 when a worker
process it needed is gone or stuck (/health then answers 503 with the reason; with data-parallel
replicas, only the failed replica's requests get 503, and /health answers 200 "degraded" while
it restarts and the others serve; the worker's traceback goes to the log, never to a client). A
request the engine would refuse is refused before any answer starts, so a streamed request gets
the same 400 as an unstreamed one. One request's failure never reaches another's. The engine
sends "delta" outputs (`SamplingParams.output_kind`: what is new each step, never all so far),
whose text holds back the end that a stop string may still cut off, so that a stream says what
the same request says unstreamed.

Tokenizing and rendering prompts, detokenizing, and checking a large body run in worker
threads, never on the event loop, and tokenizing is bounded before it starts (a text longer
than the context could hold is refused untokenized): a huge prompt costs its own request a
400 or 413, not the other requests their answers.
"""

from __future__ import annotations

import gc
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from hwattn.config import VERSION
from hwattn.engine.chat import ChatTemplate
from hwattn.engine.cuda_graphs import freeze_heap
from hwattn.engine.requests import ContextLengthError, encode_prompt
from hwattn.engine.sampling_params import SamplingParams
from hwattn.server.async_engine import AsyncEngine
from hwattn.server.formats import chat_logprobs, completion_logprobs, prompt_logprobs, top
from hwattn.server.metrics import render
from hwattn.server.protocol import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest,
                                    ServerLimits, TokenizeRequest, parse)
from hwattn.server.streams import answered, run_all, stream_events, until_done, usage

log = logging.getLogger(__name__)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unexpected_response(path: str, err: Exception) -> JSONResponse:
    """A route's unexpected error: logged with its traceback, a 500 without it to the client."""
    log.exception("unexpected error in %s", path, exc_info=err)
    return APIError(f"internal error: {type(err).__name__}", status=500,
                    kind="server_error").response()


class _AnswerUnexpected:
    """ASGI middleware: an HTTP request whose handling raises before its answer has begun
    gets `answer(path, error)` from here, so that the middleware around this one (CORS) sees
    the answer go out; one whose answer has begun is left to fail as it would."""

    def __init__(self, app, answer):
        self.app = app
        self.answer = answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as err:  # noqa: BLE001 - answered as the app's Exception handler does
            if started:
                raise
            await self.answer(scope["path"], err)(scope, receive, send)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None,
              chat_template: ChatTemplate | None = None, protect_metrics: bool = False, *,
              allowed_origins: list[str] | None = None, allowed_methods: list[str] | None = None,
              allowed_headers: list[str] | None = None,
              allow_credentials: bool = False) -> FastAPI:
    """The FastAPI application serving `engine` under the name `model_name`.

    api_key: when given, every /v1 route and the tokenizer routes need `Authorization: Bearer
        <api_key>`, compared as UTF-8 bytes in constant time (any Unicode key works);
        /health and /version stay open.
    protect_metrics: with an api_key, /metrics and the API docs (/docs, /redoc,
        /openapi.json) need the key too; by default they are open (monitoring scrapers
        usually carry no key). ValueError without an api_key.
    limits: caps on body size, stop lists and prompts per request (`ServerLimits()` default).
    chat_template: how /v1/chat/completions renders messages (default: the built-in format).
    allowed_origins: origins a browser may call the server from (CORS; "*": any). None or
        empty: no CORS middleware, so no Access-Control-* header is ever sent and a preflight
        gets the 405 of any method a route does not take. vLLM allows every origin unless told
        otherwise; a server that holds an API key or sits on a private network should not
        be readable from any web page its users open, so here an origin must be named.
    allowed_methods, allowed_headers: with allowed_origins, what a cross-origin request may
        use (None: ["*"]; an empty list allows none); allow_credentials: browsers may send
        cookies and HTTP authentication. ValueError for any of them without allowed_origins.
    """
    limits = limits or ServerLimits()
    template = chat_template or ChatTemplate()
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (leave it None for no authentication)")
    if protect_metrics and api_key is None:
        raise ValueError("protect_metrics needs an api_key to protect /metrics and the docs with")
    # An empty list given is given: it allows nothing (None is the default, "*").
    cors_options = [name for name, given in (("allowed_methods", allowed_methods is not None),
                                             ("allowed_headers", allowed_headers is not None),
                                             ("allow_credentials", allow_credentials)) if given]
    if cors_options and not allowed_origins:
        raise ValueError(f"{', '.join(cors_options)} need allowed_origins: without an origin "
                         f"no CORS headers are sent")
    # surrogateescape: a key read from the environment or the command line as raw bytes that
    # are not UTF-8 comes back as exactly those bytes.
    key = api_key.encode("utf-8", "surrogateescape") if api_key is not None else None
    engine.latency.set_model_name(model_name)  # every /metrics sample's `model_name` label

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        # Everything start-up left alive (the model, the engine, the libraries' objects) into
        # the collector's permanent generation, as the GPU runner does after its capture and
        # vLLM after start-up: otherwise every full collection while a big answer is built (a
        # million log-probabilities) scans that whole heap with the GIL held, stalling every
        # other request and /health for it (hundreds of ms each on our CPU). Given back to
        # the collector at shutdown.
        freeze_heap()
        try:
            yield
        finally:
            gc.unfreeze()
            engine.shutdown()

    docs = {} if not protect_metrics else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="hwattn", lifespan=lifespan, **docs)
    if allowed_origins:
        # Inside the CORS middleware (added first, so it runs second): starlette answers an
        # unexpected error's 500 from outside every middleware, without CORS headers, which
        # a browser then hides from the page (as it would any answer without them).
        app.add_middleware(_AnswerUnexpected, answer=_unexpected_response)
        methods = ["*"] if allowed_methods is None else list(allowed_methods)
        headers = ["*"] if allowed_headers is None else list(allowed_headers)
        # Outside the routes: a preflight (OPTIONS, no Authorization header) is answered
        # here, before the API key is asked for.
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=methods, allow_headers=headers,
                           allow_credentials=allow_credentials)
    llm = engine.engine
    tokenizer = llm.tokenizer
    max_len = llm.max_model_len
    created = int(time.time())

    def decode(token: int) -> str:
        return tokenizer.decode([token])

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        """The router's own errors (no such route, a method the route does not take) in the
        same OpenAI format as every other error."""
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            err.status_code, str(err.detail))
        response = APIError(message, status=err.status_code,
                            code="not_found" if err.status_code == 404 else None).response()
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        return _unexpected_response(request.url.path, err)

    async def authorize(request: Request) -> None:
        if key is None:
            return
        # The header's raw bytes: a client sends a non-ASCII key as UTF-8.
        raw = next((v for k, v in request.scope["headers"] if k == b"authorization"), b"")
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key):
            raise APIError("invalid or missing API key: send the header `Authorization: Bearer "
                           "<key>`", status=401, code="invalid_api_key")

    auth = [Depends(authorize)]
    auth_metrics = auth if protect_metrics else []

    async def read_request(request: Request, schema):
        """The body as a `schema` request (`parse`): validated off the event loop when it is
        large, as its JSON is (a body of millions of list items takes a while to check)."""
        body, size = await read_body(request)
        if size > 1 << 16:
            return await run_in_threadpool(parse, schema, body, limits)
        return parse(schema, body, limits)

    async def read_body(request: Request) -> tuple[dict, int]:
        """The JSON object of the body, at most `limits.max_body_bytes`, naming the served model
        or no model (404 for any other name), and the body's size in bytes."""
        cap = limits.max_body_bytes
        too_large = APIError(f"the request body is larger than {cap} bytes", status=413,
                             code="request_too_large")
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > cap:
            raise too_large
        chunks, total = [], 0
        try:
            async for chunk in request.stream():
                total += len(chunk)
                if total > cap:
                    raise too_large
                chunks.append(chunk)
        except ClientDisconnect:
            raise APIError("the client went away while sending the request", status=499) from None
        data = b"".join(chunks)
        try:
            if len(data) > 1 << 16:  # megabytes of JSON take a while: not on the event loop
                body = await run_in_threadpool(json.loads, data, parse_constant=_no_constants)
            else:
                body = json.loads(data, parse_constant=_no_constants)
        except RecursionError:
            raise APIError("request body is not valid JSON: it is nested too deeply",
                           code="invalid_json") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            raise APIError(f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object")
        model = body.get("model")
        if model is None:  # left out (or null): the served model, as recent vLLM takes it
            return body, len(data)
        if not isinstance(model, str):
            raise APIError(f"model must be a string (the served model's name, "
                           f"{model_name!r}), or left out", param="model")
        if model != model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves "
                           f"{model_name!r}", status=404, param="model", code="model_not_found")
        return body, len(data)

    def refused(err: ValueError, param: str) -> APIError:
        code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
        return APIError(str(err), param=getattr(err, "param", param), code=code)

    def prompt_ids(prompt, param: str, truncate: int | None = None) -> list[int]:
        """The prompt's ids, its last `truncate` only when set (truncate_prompt_tokens)."""
        try:
            return llm.validate_prompt(prompt, truncate)
        except ValueError as err:
            raise refused(err, param) from None

    def chat_ids(messages, add_generation_prompt: bool = True, generate: bool = True, *,
                 truncated: bool = False, continue_final_message: bool = False,
                 chat_template_kwargs=None) -> list[int]:
        """The conversation's token ids (`ChatTemplate.encode`: no message can produce a
        special token or a turn marker), refused before tokenizing if it cannot fit (leaving a
        token to generate, with `generate`), unless it is to be `truncated`. A refused chat
        argument is named as the 400's param (`ChatArgumentError`), anything else as
        `messages`."""
        try:
            ids = template.encode([m.model_dump() for m in messages], tokenizer,
                                  add_generation_prompt,
                                  max_model_len=None if truncated else max_len, generate=generate,
                                  continue_final_message=continue_final_message,
                                  chat_template_kwargs=chat_template_kwargs)
        except UnicodeEncodeError as err:  # a lone surrogate in a message
            raise APIError(f"messages are not valid Unicode: {err.reason}",
                           param="messages") from None
        except ValueError as err:
            raise refused(err, getattr(err, "param", "messages")) from None
        return ids

    def tokenize_text(text: str) -> list[int]:
        """/tokenize's ids of a prompt: at most the model's context (as for generation, a text
        that could not fit is refused before it is tokenized)."""
        try:
            return encode_prompt(text, tokenizer, max_len, generate=False)
        except ValueError as err:
            raise refused(err, "prompt") from None

    def checked(jobs: list[tuple[list[int], SamplingParams]]) -> None:
        """Refuse now, with the engine's own check of the params (the prompts passed
        `prompt_ids`), what the engine would refuse once queued (e.g. settings a data-parallel
        engine does not support, each a `ParamError` naming the setting), and everything once
        the engine is down, shutting down or not started: a stream must not start with 200
        and then fail."""
        reason = engine.unavailable()
        if reason is not None:
            raise APIError(reason, status=503, kind="server_error")
        for _, params in jobs:
            try:
                llm.check_params(params)
            except ValueError as err:
                raise APIError(str(err), param=getattr(err, "param", None)) from None

    def fits(ids: list[int], params: SamplingParams,
             param: str = "max_tokens") -> tuple[list[int], SamplingParams]:
        """(ids, params), or a 400 naming `param` (the field that set max_tokens) if the
        prompt and max_tokens cannot fit the context."""
        if len(ids) + params.max_tokens > max_len:
            raise APIError(f"this model's maximum context length is {max_len} tokens; the prompt "
                           f"has {len(ids)} and {param} asks for {params.max_tokens}",
                           param=param, code="context_length_exceeded")
        return ids, params

    @app.get("/health")
    async def health():
        serving, problem = engine.health()
        # No engine thread takes requests (never started, or shutting down): each gets 503
        # at once, and so does this.
        stopped = engine.unavailable() if serving else None
        if stopped is not None:
            serving, problem = False, stopped
        if not serving:  # a worker is gone: load balancers should stop sending
            return JSONResponse({"status": "error", "message": problem}, status_code=503)
        if problem is not None:  # a data-parallel replica is down (restarting); others serve
            return {"status": "degraded", "message": problem}
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "hwattn",
                                            "max_model_len": max_len}]}

    @app.get("/version")
    async def version():
        return {"version": VERSION}

    @app.get("/metrics", dependencies=auth_metrics)
    async def metrics():
        return PlainTextResponse(render(engine.snapshot, engine.tokens_per_second(),
                                        engine.latency),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    if protect_metrics:  # FastAPI's own docs routes are off: the same, behind the key
        @app.get("/openapi.json", dependencies=auth, include_in_schema=False)
        async def openapi():
            return JSONResponse(app.openapi())

        @app.get("/docs", dependencies=auth, include_in_schema=False)
        async def swagger():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="hwattn - docs")

        @app.get("/redoc", dependencies=auth, include_in_schema=False)
        async def redoc():
            return get_redoc_html(openapi_url="/openapi.json", title="hwattn - docs")

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        return {"tokenizer_class": type(tokenizer).__name__,
                "eos_token": getattr(tokenizer, "eos_token", None),
                "eos_token_id": getattr(tokenizer, "eos_token_id", None), "bos_token": None, "pad_token": None,
                "chat_template": template.text, "model_max_length": max_len,
                "vocab_size": llm.model_config.vocab_size}

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(request: Request):
        req = await read_request(request, TokenizeRequest)
        if req.messages is not None:
            ids, param = await run_in_threadpool(
                lambda: chat_ids(req.messages, req.add_generation_prompt, False,
                                 continue_final_message=req.continue_final_message,
                                 chat_template_kwargs=req.chat_template_kwargs)), "messages"
        else:
            ids, param = await run_in_threadpool(tokenize_text, req.prompt), "prompt"
        if len(ids) > max_len:
            raise APIError(f"{param} has {len(ids)} tokens; the model's context is {max_len}",
                           param=param, code="context_length_exceeded")
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": None}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(request: Request):
        req = await read_request(request, DetokenizeRequest)
        vocab = llm.model_config.vocab_size

        def text() -> str:
            bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise APIError(f"tokens must be ids in [0, {vocab}), got {bad}", param="tokens")
            return tokenizer.decode(req.tokens)

        # Off the event loop, as tokenizing is: a body may hold millions of ids.
        return {"prompt": await run_in_threadpool(text)}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = await read_request(request, CompletionRequest)
        include_usage = req.check_stream_options()
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        generated = max_tokens > 0  # echo with max_tokens 0: the prompt alone
        want = req.logprobs is not None
        # The engine computes the prompt's log-probabilities once, for the echoed prompt's
        # `logprobs` and for `prompt_logprobs`, each then showing its own number of top tokens.
        asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None)
                 if k is not None]
        params = req.sampling(max(1, max_tokens), logprobs=req.logprobs,
                              prompt_logprobs=max(asked) if asked else None)

        def prepare():
            truncate = params.truncate_prompt_tokens
            jobs = [fits(prompt_ids(p, "prompt", truncate), params) for p in req.prompt]
            checked(jobs)
            # An echoed prompt is what the model read: a truncated one, decoded.
            texts = [p if isinstance(p, str) and truncate is None else tokenizer.decode(ids)
                     for p, (ids, _) in zip(req.prompt, jobs)]
            return jobs, texts

        jobs, texts = await run_in_threadpool(prepare)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream = run_all(engine, jobs, rid)
        n = req.n
        # Per prompt, shared by its n choices: the echoed prompt's (token, top tokens) entries
        # and the formatted `prompt_logprobs`.
        echoed: dict[int, list] = {}
        formatted: dict[int, list] = {}
        offsets: dict[int, int] = {}  # choice -> text_offset of its next token (streams)

        def echo_entries(i, out) -> list:
            if i not in echoed:
                prompt = out.prompt_token_ids
                lps = [top(p, t, req.logprobs) for t, p in zip(prompt, out.prompt_logprobs)] \
                    if want else [None] * len(prompt)
                echoed[i] = list(zip(prompt, lps))
            return echoed[i]

        def choice(index, text, completion, out, is_first):
            """One choice: new text (the prompt before it on the first chunk, with echo) and
            the log-probabilities of `completion`'s tokens."""
            entries = []
            if generated:
                tokens = completion.token_ids
                lps = completion.logprobs if want else [None] * len(tokens)
                entries = list(zip(tokens, lps))
            else:
                text = ""
            if req.echo and is_first:
                entries = echo_entries(index // n, out) + entries
                text = texts[index // n] + text
            lps = None
            if want:  # offsets count on from the choice's earlier chunks, as vLLM's
                lps = completion_logprobs(entries, decode, offsets.get(index, 0))
                if lps["tokens"]:
                    offsets[index] = lps["text_offset"][-1] + len(lps["tokens"][-1])
            doc = {"index": index, "text": text, "logprobs": lps,
                   "finish_reason": completion.finish_reason,
                   "stop_reason": completion.stop_reason}
            if out is not None and not req.stream:
                if req.prompt_logprobs is not None and index // n not in formatted:
                    formatted[index // n] = prompt_logprobs(
                        out.prompt_token_ids, out.prompt_logprobs, req.prompt_logprobs)
                doc["prompt_logprobs"] = formatted.get(index // n)
            return doc

        def chunk(index, text, completion, out, is_first, usage=None):
            doc = {"id": rid, "object": "text_completion", "created": created,
                   "model": model_name, "choices": []}
            if index is not None:
                doc["choices"] = [choice(index, text, completion, out, is_first)]
            if usage is not None:
                doc["usage"] = usage
            return doc

        if req.stream:
            return StreamingResponse(stream_events(stream, chunk, include_usage, n,
                                                   generated=generated, announce=req.echo),
                                     media_type="text/event-stream")
        outs = await until_done(request, stream)
        if outs is None:
            return JSONResponse({}, status_code=499)

        def answer() -> dict:
            doc = chunk(None, None, None, None, None, usage=usage(outs, generated))
            doc["choices"] = [choice(i * n + c.index, c.text, c, o, True)
                              for i, o in enumerate(outs) for c in o.outputs]
            return doc

        return await answered(answer)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        req = await read_request(request, ChatRequest)
        include_usage = req.check_stream_options()
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        # The field that set max_tokens, for errors (max_completion_tokens wins, as vLLM's).
        limit_field = "max_completion_tokens" if req.max_completion_tokens is not None \
            else "max_tokens"
        top_n = req.top_logprobs or 0

        def prepare():
            truncate = req.truncate_prompt_tokens
            ids = prompt_ids(chat_ids(req.messages, req.add_generation_prompt,
                                      truncated=truncate is not None,
                                      continue_final_message=req.continue_final_message,
                                      chat_template_kwargs=req.chat_template_kwargs),
                             "messages", truncate)
            limit = max_len - len(ids) if max_tokens is None else max_tokens
            if req.min_tokens > limit:  # named as sent (the engine would say max_tokens)
                where = f"{limit_field} ({limit})" if max_tokens is not None else \
                    f"the {limit} tokens the context leaves after the prompt"
                raise APIError(f"min_tokens must be at most {where}, got {req.min_tokens}",
                               param="min_tokens")
            params = req.sampling(limit, logprobs=top_n if req.logprobs else None)
            jobs = [fits(ids, params, limit_field)]
            checked(jobs)
            return jobs

        jobs = await run_in_threadpool(prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream = run_all(engine, jobs, rid)
        # Whose message the answer is, as vLLM says it: the assistant's new turn, or without
        # one, the final message's author (whose message continue_final_message continues).
        role = "assistant" if req.add_generation_prompt else req.messages[-1].role

        def logprobs(completion):
            if not req.logprobs:
                return None
            return chat_logprobs(zip(completion.token_ids, completion.logprobs), decode, top_n)

        def chunk(index, text, completion, out, is_first, usage=None):
            doc = {"id": rid, "object": "chat.completion.chunk", "created": created,
                   "model": model_name, "choices": []}
            if index is not None:
                delta = {"content": text} if text else {}
                doc["choices"] = [{"index": index, "delta": delta,
                                   "finish_reason": completion.finish_reason,
                                   "stop_reason": completion.stop_reason,
                                   "logprobs": logprobs(completion)}]
            if usage is not None:
                doc["usage"] = usage
            return doc

        if req.stream:
            first = {"id": rid, "object": "chat.completion.chunk", "created": created,
                     "model": model_name,
                     "choices": [{"index": i, "delta": {"role": role, "content": ""},
                                  "finish_reason": None, "logprobs": None}
                                 for i in range(req.n)]}
            return StreamingResponse(stream_events(stream, chunk, include_usage, req.n,
                                                   first=first),
                                     media_type="text/event-stream")
        outs = await until_done(request, stream)
        if outs is None:
            return JSONResponse({}, status_code=499)
        out = outs[0]

        def answer() -> dict:
            return {"id": rid, "object": "chat.completion", "created": created,
                    "model": model_name,
                    "choices": [{"index": c.index,
                                 "message": {"role": role, "content": c.text},
                                 "finish_reason": c.finish_reason, "stop_reason": c.stop_reason,
                                 "logprobs": logprobs(c)} for c in out.outputs],
                    "usage": usage(outs),
                    "prompt_logprobs": None if req.prompt_logprobs is None else prompt_logprobs(
                        out.prompt_token_ids, out.prompt_logprobs, req.prompt_logprobs)}

        return await answered(answer)

    return app
