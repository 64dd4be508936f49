"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (both with server-sent
event streaming), /v1/models, /health and /metrics (Prometheus text).

Errors come back as OpenAI does them, `{"error": {"message", "type", "param", "code"}}`: 400 for
a malformed body, a bad or unknown field (see `protocol`), 401 for a missing or wrong API key
(when the server has one), 404 for an unknown model, 413 for a body over the size cap, 500
if the engine fails the request, and 503 once a worker process is gone (/health then answers
503 with the reason). One request's failure never reaches another's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from hwattn.data.tokenizer import chat_prompt
from hwattn.engine.sampling_params import SamplingParams
from hwattn.server.async_engine import AsyncEngine, EngineDeadError, EngineError
from hwattn.server.protocol import APIError, ChatRequest, CompletionRequest, ServerLimits, parse

log = logging.getLogger(__name__)


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _sse(doc) -> str:
    return f"data: {json.dumps(doc) if not isinstance(doc, str) else doc}\n\n"


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI application serving `engine` under the name `model_name`.

    api_key: when given, every /v1 route needs `Authorization: Bearer <api_key>` (compared in
        constant time); /health and /metrics stay open.
    limits: caps on body size, stop lists and prompts per request (`ServerLimits()` default).
    """
    limits = limits or ServerLimits()
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty (leave it None for no authentication)")
    key = api_key.encode() if api_key is not None else None

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="hwattn", lifespan=lifespan)
    llm = engine.engine
    max_len = llm.max_model_len
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return err.response()

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        log.exception("unexpected error in %s", request.url.path, exc_info=err)
        return APIError(f"internal error: {type(err).__name__}", status=500,
                        kind="server_error").response()

    async def authorize(request: Request) -> None:
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError("invalid or missing API key: send the header `Authorization: Bearer "
                           "<key>`", status=401, code="invalid_api_key")

    auth = [Depends(authorize)]

    async def read_body(request: Request) -> dict:
        """The JSON object of the body, at most `limits.max_body_bytes`, naming the served model."""
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
        try:
            body = json.loads(b"".join(chunks), parse_constant=_no_constants)
        except RecursionError:
            raise APIError("request body is not valid JSON: it is nested too deeply",
                           code="invalid_json") from None
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN / Infinity
            raise APIError(f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError("model is required and must be a string", param="model")
        if model != model_name:
            raise APIError(f"the model {model!r} does not exist; this server serves "
                           f"{model_name!r}", status=404, param="model", code="model_not_found")
        return body

    def prompt_ids(prompt, param: str) -> list[int]:
        try:
            return llm.validate_prompt(prompt)
        except ValueError as err:
            raise APIError(str(err), param=param,
                           code="context_length_exceeded" if "context" in str(err) else None) from None

    def fits(ids: list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        if len(ids) + params.max_tokens > max_len:
            raise APIError(f"this model's maximum context length is {max_len} tokens; the prompt "
                           f"has {len(ids)} and max_tokens asks for {params.max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        return ids, params

    async def run_all(request: Request, jobs: list[tuple[list[int], SamplingParams]], prefix: str):
        """Merge the output streams of several requests: yields (index, RequestOutput)."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, ids, params):
            try:
                async for out in engine.generate(ids, params, f"{prefix}-{i}"):
                    await queue.put((i, out))
            except Exception as err:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, err))

        tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
        left = len(jobs)
        try:
            while left:
                i, out = await queue.get()
                if isinstance(out, Exception):
                    raise out
                if out.finished:
                    left -= 1
                yield i, out
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def until_done(request: Request, stream):
        """Collect a non-streamed result, aborting if the client goes away meanwhile."""
        final: dict[int, object] = {}

        async def collect():
            async for i, out in stream:
                if out.finished:
                    final[i] = out

        task = asyncio.create_task(collect())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return None
        try:
            task.result()
        except Exception as err:  # noqa: BLE001 - this request's failure, told to its client
            raise request_error(err) from None
        return [final[i] for i in sorted(final)]

    def request_error(err: Exception) -> APIError:
        """What a client hears when its request fails after it was accepted."""
        if isinstance(err, APIError):
            return err
        if isinstance(err, ValueError):  # the engine refused the request
            return APIError(str(err))
        if isinstance(err, EngineDeadError):  # nothing more will run: say so, do not retry here
            return APIError(str(err), status=503, kind="server_error")
        if isinstance(err, EngineError):
            return APIError(str(err), status=500, kind="server_error")
        log.error("request failed", exc_info=err)
        return APIError(f"internal error: {type(err).__name__}", status=500, kind="server_error")

    def usage(outs) -> dict:
        p = sum(len(o.prompt_token_ids) for o in outs)
        c = sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def stream_events(stream, make_chunk, include_usage: bool, first=None):
        sent: dict[int, int] = {}
        outs = {}
        try:
            if first is not None:
                yield _sse(first)
            async for i, out in stream:
                text = out.text[sent.get(i, 0):]
                sent[i] = len(out.text)
                outs[i] = out
                if text or out.finished:
                    yield _sse(make_chunk(i, text, out.finish_reason))
            if include_usage:
                yield _sse(make_chunk(None, None, None, usage=usage(outs.values())))
            yield _sse("[DONE]")
        except Exception as err:  # noqa: BLE001 - this request's failure, told to its client
            e = request_error(err)
            yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                  "code": e.code}})

    @app.get("/health")
    async def health():
        if engine.dead is not None:  # a worker is gone: load balancers should stop sending
            return JSONResponse({"status": "error", "message": engine.dead}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "hwattn",
                                            "max_model_len": max_len}]}

    @app.get("/metrics")
    async def metrics():
        s = engine.snapshot
        rows = [
            ("hwattn_requests_running", "gauge", "Requests being decoded or prefilled.", s["running"]),
            ("hwattn_requests_waiting", "gauge", "Requests queued for admission.", s["waiting"]),
            ("hwattn_kv_pages_used", "gauge", "KV-cache pages held by requests.", s["pages_used"]),
            ("hwattn_kv_pages_total", "gauge", "KV-cache pages in the pool.", s["pages_total"]),
            ("hwattn_kv_page_size_tokens", "gauge", "Tokens per KV-cache page.", s["page_size"]),
            ("hwattn_generation_tokens_per_second", "gauge",
             "Generated tokens per second over the last 10 s.", round(engine.tokens_per_second(), 3)),
            ("hwattn_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens"]),
            ("hwattn_generation_tokens_total", "counter", "Tokens generated.", s["generation_tokens"]),
            ("hwattn_requests_finished_total", "counter", "Requests finished.", s["finished"]),
            ("hwattn_requests_aborted_total", "counter", "Requests aborted.", s["aborted"]),
            ("hwattn_requests_failed_total", "counter", "Requests that failed alone in the engine.",
             s["failed"]),
            ("hwattn_preemptions_total", "counter", "Requests preempted for recompute.", s["preemptions"]),
            ("hwattn_prefix_cache_hit_pages_total", "counter", "Prompt pages found in the prefix cache.",
             s["prefix_hit_pages"]),
            ("hwattn_spec_draft_tokens_total", "counter", "Speculative draft tokens verified.", s["draft_tokens"]),
            ("hwattn_spec_accepted_tokens_total", "counter", "Speculative draft tokens accepted.",
             s["accepted_tokens"]),
        ]
        lines = []
        for name, kind, doc, value in rows:
            lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_body(request), limits)
        include_usage = req.check_stream_options()
        params = req.sampling(16 if req.max_tokens is None else req.max_tokens)
        jobs = [fits(prompt_ids(p, "prompt"), params) for p in req.prompt]
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = run_all(request, jobs, rid)

        def chunk(i, text, reason, usage=None):
            doc = {"id": rid, "object": "text_completion", "created": int(time.time()),
                   "model": model_name, "choices": []}
            if i is not None:
                doc["choices"] = [{"index": i, "text": text, "finish_reason": reason,
                                   "logprobs": None}]
            if usage is not None:
                doc["usage"] = usage
            return doc

        if req.stream:
            return StreamingResponse(stream_events(stream, chunk, include_usage),
                                     media_type="text/event-stream")
        outs = await until_done(request, stream)
        if outs is None:
            return JSONResponse({}, status_code=499)
        doc = chunk(None, None, None, usage=usage(outs))
        doc["choices"] = [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                           "logprobs": None} for i, o in enumerate(outs)]
        return doc

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request):
        req = parse(ChatRequest, await read_body(request), limits)
        include_usage = req.check_stream_options()
        try:
            prompt = chat_prompt([m.model_dump() for m in req.messages])
        except ValueError as err:
            raise APIError(str(err), param="messages") from None
        ids = prompt_ids(prompt, "messages")
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None \
            else req.max_tokens
        params = req.sampling(max_len - len(ids) if max_tokens is None else max_tokens)
        jobs = [fits(ids, params)]
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        stream = run_all(request, jobs, rid)

        def chunk(i, text, reason, usage=None):
            doc = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                   "model": model_name, "choices": []}
            if i is not None:
                delta = {"content": text} if text else {}
                doc["choices"] = [{"index": i, "delta": delta, "finish_reason": reason,
                                   "logprobs": None}]
            if usage is not None:
                doc["usage"] = usage
            return doc

        if req.stream:
            first = chunk(0, None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return StreamingResponse(stream_events(stream, chunk, include_usage, first=first),
                                     media_type="text/event-stream")
        outs = await until_done(request, stream)
        if outs is None:
            return JSONResponse({}, status_code=499)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": outs[0].text},
                             "finish_reason": outs[0].finish_reason, "logprobs": None}],
                "usage": usage(outs)}

    return app
