"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions (both with server-sent
event streaming), /v1/models, /health and /metrics (Prometheus text).

Errors come back as OpenAI does them, `{"error": {"message", "type", "param", "code"}}`, with
400 for a malformed body or bad values, 404 for an unknown model, and 500 if the engine fails.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.tokenizer import chat_prompt
from hwattn.server.async_engine import AsyncEngine, EngineError

UNSUPPORTED = {"logprobs": None, "echo": False, "best_of": 1, "suffix": None,
               "logit_bias": None, "tools": None, "tool_choice": None, "top_logprobs": None,
               "presence_penalty": 0, "frequency_penalty": 0}


class APIError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.kind = message, status, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


def _sampling(body: dict, max_len: int, chat: bool) -> SamplingParams:
    for name, default in UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, default) and not (name == "logprobs" and value is False):
            raise APIError(f"{name} is not supported by this server", param=name,
                           code="unsupported_parameter")
    n = body.get("n", 1)
    if n != 1:
        raise APIError(f"n must be 1, got {n!r}", param="n")
    max_tokens = body.get("max_completion_tokens") if chat else None
    if max_tokens is None:
        max_tokens = body.get("max_tokens", 16 if not chat else max_len)
    kwargs = dict(max_tokens=max_tokens, temperature=body.get("temperature", 1.0),
                  top_p=body.get("top_p", 1.0), top_k=body.get("top_k", 0),
                  seed=body.get("seed"), stop=body.get("stop"),
                  ignore_eos=body.get("ignore_eos", False))
    for name in ("max_tokens", "top_k", "seed"):
        if kwargs[name] is not None and (not isinstance(kwargs[name], int)
                                         or isinstance(kwargs[name], bool)):
            raise APIError(f"{name} must be an integer, got {kwargs[name]!r}", param=name)
    for name in ("temperature", "top_p"):
        value = kwargs[name]
        if value is None:
            kwargs[name] = 1.0
        elif not isinstance(value, (int, float)) or isinstance(value, bool):
            raise APIError(f"{name} must be a number, got {value!r}", param=name)
    if kwargs["top_k"] is None:
        kwargs["top_k"] = 0
    stop = kwargs["stop"]
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError("stop must be a string or a list of strings", param="stop")
    try:
        return SamplingParams(**kwargs)
    except ValueError as err:
        param = str(err).split(" ", 1)[0]
        raise APIError(str(err), param=param) from None


def _prompts(body: dict) -> list:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt) or all(
                isinstance(p, list) and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise APIError("prompt must be a string, a list of strings, a list of token ids or a "
                   "list of such lists", param="prompt")


def _sse(doc) -> str:
    return f"data: {json.dumps(doc) if not isinstance(doc, str) else doc}\n\n"


def build_app(engine: AsyncEngine, model_name: str) -> FastAPI:
    """The FastAPI application serving `engine` under the name `model_name`."""

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

    async def read_body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(f"request body is not valid JSON: {err}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError("request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise APIError("model is required", param="model")
        if model != model_name:
            raise APIError(f"the model `{model}` does not exist; this server serves "
                           f"`{model_name}`", status=404, param="model", code="model_not_found")
        return body

    def encode(prompt, params: SamplingParams) -> list[int]:
        try:
            ids = llm.validate_prompt(prompt)
        except ValueError as err:
            raise APIError(str(err), param="prompt",
                           code="context_length_exceeded" if "context" in str(err) else None) from None
        if len(ids) + params.max_tokens > max_len:
            raise APIError(f"this model's maximum context length is {max_len} tokens; the prompt "
                           f"has {len(ids)} and max_tokens asks for {params.max_tokens}",
                           param="max_tokens", code="context_length_exceeded")
        return ids

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
        except EngineError as err:
            raise APIError(str(err), status=500, kind="server_error") from None
        return [final[i] for i in sorted(final)]

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
        except EngineError as err:
            yield _sse({"error": {"message": str(err), "type": "server_error", "param": None,
                                  "code": None}})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
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

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        params = _sampling(body, max_len, chat=False)
        jobs = [(encode(p, params), params) for p in _prompts(body)]
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

        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(stream_events(stream, chunk, include),
                                     media_type="text/event-stream")
        outs = await until_done(request, stream)
        if outs is None:
            return JSONResponse({}, status_code=499)
        doc = chunk(None, None, None, usage=usage(outs))
        doc["choices"] = [{"index": i, "text": o.text, "finish_reason": o.finish_reason,
                           "logprobs": None} for i, o in enumerate(outs)]
        return doc

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            raise APIError("messages must be a non-empty list of {role, content} objects",
                           param="messages")
        params = _sampling(body, max_len, chat=True)
        prompt = chat_prompt(messages)
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            room = max_len - len(llm.validate_prompt(prompt)) if prompt else 0
            params.max_tokens = max(1, room)
        jobs = [(encode(prompt, params), params)]
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

        if body.get("stream"):
            include = bool((body.get("stream_options") or {}).get("include_usage"))
            first = chunk(0, None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            return StreamingResponse(stream_events(stream, chunk, include, first=first),
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
