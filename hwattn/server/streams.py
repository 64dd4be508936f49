"""From the engine's "delta" outputs to a client's answer: the merged output streams of an
HTTP request's prompts, the server-sent events of a streamed answer, the joined outputs of an
unstreamed one, the usage, and the error a client hears when its request fails after it was
accepted. The routes of `hwattn.server.app` build on these."""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from hwattn.engine.sampling_params import SamplingParams
from hwattn.engine.sequence import CompletionOutput, DeltaJoiner
from hwattn.server.async_engine import AsyncEngine, EngineDeadError, EngineError
from hwattn.server.protocol import APIError

log = logging.getLogger(__name__)


def sse(doc) -> str:
    """One server-sent event: `doc` as JSON (a string as it is)."""
    return f"data: {json.dumps(doc) if not isinstance(doc, str) else doc}\n\n"


async def run_all(engine: AsyncEngine, jobs: list[tuple[list[int], SamplingParams]], prefix: str):
    """Merge the "delta" output streams of several requests on `engine`: yields (index, RequestOutput
    holding what is new since that index's previous one). The requests share one owner
    (`prefix`): the scheduler weighs them together against other clients' requests.
    The outputs that come while the consumer is busy are joined into one per request
    (`DeltaJoiner`): a client that stops reading its stream holds what was generated
    meanwhile once, not one output per step."""
    newest: dict[int, object] = {}  # index -> its DeltaJoiner, or its error
    ready = asyncio.Event()

    async def pump(i, ids, params):
        try:
            async for out in engine.generate(ids, params, f"{prefix}-{i}", owner=prefix):
                joiner = newest.get(i)
                if joiner is None:
                    joiner = newest[i] = DeltaJoiner()
                joiner.add(out)
                ready.set()
        except Exception as err:  # noqa: BLE001 - handed to the consumer
            newest[i] = err
            ready.set()

    tasks = [asyncio.create_task(pump(i, ids, p)) for i, (ids, p) in enumerate(jobs)]
    left = len(jobs)
    try:
        while left:
            await ready.wait()
            ready.clear()
            batch = list(newest.items())
            newest.clear()
            for i, joiner in batch:
                if isinstance(joiner, Exception):
                    raise joiner
                out = joiner.take()
                if out.finished:
                    left -= 1
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def until_done(request: Request, stream):
    """Collect a non-streamed result (each request's outputs joined), aborting if the
    client goes away meanwhile."""
    final: dict[int, object] = {}
    joined: dict[int, DeltaJoiner] = {}

    async def collect():
        async for i, out in stream:
            joined.setdefault(i, DeltaJoiner()).add(out)
            if out.finished:
                final[i] = joined.pop(i).take()

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


class PiecewiseJSONResponse(JSONResponse):
    """`JSONResponse`'s bytes (same separators, UTF-8, no NaN), with a document's "choices"
    encoded one choice at a time. `json.dumps` holds the GIL for a whole call: over a 17 MB
    answer that is most of a second on a slow host, during which the event loop (every other
    request's stream, /health) cannot run even though the encoding is in a worker thread.
    Between the pieces the interpreter hands the GIL on."""

    def render(self, content) -> bytes:
        choices = content.get("choices") if isinstance(content, dict) else None
        if not isinstance(choices, list) or len(choices) < 2:
            return super().render(content)
        encode = super().render
        mark = f"\x00{uuid.uuid4().hex}\x00"  # stands where the list goes; no answer holds it
        key = b'"choices":' + json.dumps(mark).encode()
        head, tail = encode({**content, "choices": mark}).split(key, 1)
        return b"".join((head, b'"choices":[', b",".join(map(encode, choices)), b"]", tail))


async def answered(answer) -> JSONResponse:
    """The non-streamed answer `answer()` builds, built and encoded in a worker thread, as
    tokenizing is: with log-probabilities it can hold millions of entries (256 echoed
    prompts of 300 tokens with 20 top tokens each: 35 MB of JSON, seconds of work) that
    must not hold every other request's stream and /health meanwhile (hence encoded choice
    by choice, `PiecewiseJSONResponse`)."""
    return await run_in_threadpool(lambda: PiecewiseJSONResponse(answer()))


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


def usage(outs, generated: bool = True) -> dict:
    """The usage of finished outputs, each with all its tokens."""
    p = sum(len(o.prompt_token_ids) for o in outs)
    c = sum(len(c.token_ids) for o in outs for c in o.outputs) if generated else 0
    return usage_of(p, c)


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def stream_events(stream, make_chunk, include_usage: bool, n: int, first=None,
                        generated: bool = True, announce: bool = False):
    """SSE chunks of the merged "delta" `stream` (`run_all`): `make_chunk(choice, text,
    completion, request output, is_first)` for each choice's new text (`completion`
    holding its tokens since its previous chunk) and its finish; `announce`: send each
    choice's first chunk even before it has text (an echoed prompt). `generated` False
    shows no generated text (echo of the prompt alone). include_usage: a last chunk with
    the usage and no choices, and, as OpenAI's, a null `usage` in every other chunk."""
    # Per choice: its tokens and their log-probabilities that came with no text to send
    # yet (a character still incomplete, text a stop string may still cut); they go with
    # its next chunk.
    unsent: dict[int, tuple[list[int], list]] = {}
    started: set[int] = set()  # choices that have had a chunk
    done: set[int] = set()
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0

    def event(doc: dict) -> str:
        if include_usage:
            doc.setdefault("usage", None)
        return sse(doc)

    try:
        if first is not None:
            yield event(first)
        async for i, out in stream:
            prompt_tokens[i] = len(out.prompt_token_ids)
            for completion in out.outputs:
                choice = i * n + completion.index
                if choice in done:
                    continue
                completion_tokens += len(completion.token_ids)
                tokens, logprobs = unsent.setdefault(choice, ([], []))
                tokens += completion.token_ids
                if completion.logprobs is not None:
                    logprobs += completion.logprobs
                is_first = choice not in started
                text = completion.text if generated else ""
                if not (text or completion.finished or (is_first and announce)):
                    continue
                del unsent[choice]
                started.add(choice)
                if completion.finished:
                    done.add(choice)
                pending = CompletionOutput(
                    completion.index, text, tokens, completion.cumulative_logprob,
                    None if completion.logprobs is None else logprobs,
                    completion.finish_reason, completion.stop_reason)
                yield event(make_chunk(choice, text, pending, out, is_first))
        if include_usage:
            yield event(make_chunk(None, None, None, None, None, usage=usage_of(
                sum(prompt_tokens.values()), completion_tokens if generated else 0)))
        yield sse("[DONE]")
    except Exception as err:  # noqa: BLE001 - this request's failure, told to its client
        e = request_error(err)
        yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                              "code": e.code}})
        # The stream still ends as every stream does (vLLM's serving_completion.py and
        # serving_chat.py send [DONE] after the error too): a client reading to [DONE]
        # is not left waiting for the connection to close.
        yield sse("[DONE]")
