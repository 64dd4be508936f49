"""One data-parallel replica: an `LLMEngine` in its own process, driven by messages.

Started by `DataParallelEngine` as `python -m hwattn.engine.engine_core`. The replica builds
its engine (itself tensor-parallel when asked: its ranks are then its own worker processes,
on the GPUs its CUDA_VISIBLE_DEVICES names), then loops: take every message waiting, run one
engine step if anything is unfinished, send what the step produced.

Messages in: ("add", request_id, payload), ("abort", request_id),
("call", fn, args) -> ("result", ...), ("stop",).
An add's payload is (prompt_ids, params, owner), pickled on its own by the sender: a request
this process cannot unpickle (params of a class defined in the caller's `__main__`) is then
rejected alone instead of ending the replica and every request it holds. So is a request
the engine fails to queue, whatever it raises (the engine takes nothing of it).
A call's result is pickled here on its own too: ("result", True, pickled fn(engine, *args)),
or, when `fn` raised or its result does not pickle, ("result", False, (what happened, its
traceback, the exception pickled or None)): a failed call is its caller's error alone, and
the replica serves on.
Messages out: ("ready", info), ("outputs", deltas, (step kind, seconds), stats) (kind
"prefill", "decode", or "readback": only the last overlapped step read back),
("stats", stats), ("rejected", request_id, message), ("result", ok, payload).
A delta is (request_id, new token ids, text start, text from there, finish_reason,
stop_reason, error, num_cached_prompt_tokens, first_scheduled_time): output text only grows,
except when a stop string cuts it, and then `text start` says where the replacement begins
(never, for a request whose params ask for "delta" outputs: the engine's own deltas are
forwarded as they are, their text held back until no stop string can cut it);
error is set when the request failed alone (finish_reason "error"); first_scheduled_time is
the replica's `time.perf_counter()` when its scheduler first admitted the request (None
before; a monotonic clock every process of the host shares on Linux).
"""

from __future__ import annotations

import pickle
import time
import traceback

from hwattn.parallel.errors import summarize
from hwattn.parallel.worker import ParentLink, fault_point


def _failure(happened: str, err: Exception) -> tuple:
    """A failed call's "result" payload: (what happened, its traceback, `err` pickled or
    None). Call from the `except` block that caught `err`."""
    try:
        exception = pickle.dumps(err, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - what happened and the traceback still go
        exception = None
    return happened, traceback.format_exc(), exception


class EngineCore:
    """Turns messages into calls on `engine` and engine steps into output messages."""

    def __init__(self, engine):
        self.engine = engine
        self.sent: dict[str, tuple[int, int]] = {}  # request id -> (tokens, characters) sent
        self.delta: set[str] = set()  # requests whose outputs hold only what is new

    def info(self) -> dict:
        e = self.engine
        runner = e.runner
        return dict(kv_bytes_per_token=e.kv_bytes_per_token, max_model_len=e.max_model_len,
                    device=str(e.device), dtype=str(e.dtype).replace("torch.", ""),
                    stats=e.stats(), config=e.config,
                    cuda_graphs=bool(getattr(runner, "graphs", None)
                                     or getattr(runner, "cuda_graphs", False)),
                    graph_error=getattr(runner, "graph_error", None),
                    prefill_compile_error=getattr(runner, "prefill_compile_error", None),
                    prefill_graph_error=getattr(runner, "prefill_graph_error", None))

    def handle(self, message) -> list:
        kind = message[0]
        if kind == "add":
            _, request_id, payload = message
            try:
                ids, params, owner = pickle.loads(payload)
            except Exception as err:  # noqa: BLE001 - that request alone is refused
                return [("rejected", request_id, f"the replica process cannot unpickle the "
                                                 f"request (are its classes importable there, "
                                                 f"not defined in __main__?): {summarize(err)}")]
            try:
                self.engine.add_request(ids, params, request_id=request_id, owner=owner)
            except ValueError as err:
                return [("rejected", request_id, str(err))]
            except Exception as err:  # noqa: BLE001 - it fails alone, as in the server's loop
                return [("rejected", request_id, summarize(err))]
            if params.output_kind == "delta":
                self.delta.add(request_id)
            return []
        if kind == "abort":
            self.sent.pop(message[1], None)
            self.delta.discard(message[1])
            self.engine.abort_request(message[1])
            return []
        if kind == "call":
            return [self.call(message[1], message[2])]
        raise RuntimeError(f"unknown message {kind!r}")

    def call(self, fn, args) -> tuple:
        """The "result" message of `fn(engine, *args)`: its result pickled, or how it failed."""
        try:
            value = fn(self.engine, *args)
        except Exception as err:  # noqa: BLE001 - the caller's error: the replica serves on
            return ("result", False, _failure(f"raised {summarize(err)}", err))
        try:
            return ("result", True, pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
        except Exception as err:  # noqa: BLE001 - pickle raises several kinds
            return ("result", False, _failure(f"returned a value that cannot be pickled: "
                                              f"{summarize(err)}", err))

    def step(self) -> list:
        engine = self.engine
        prefills, steps = engine.counters["prefill_steps"], engine.counters["steps"]
        t0 = time.perf_counter()
        outputs = engine.step()
        seconds = time.perf_counter() - t0
        # "readback": the step only read back the last overlapped step and launched none.
        kind = ("prefill" if engine.counters["prefill_steps"] > prefills else
                "decode" if engine.counters["steps"] > steps else "readback")
        deltas = []
        for out in outputs:
            rid = out.request_id
            n_tokens, n_chars = self.sent.get(rid, (0, 0))
            if rid in self.delta:  # already what is new, text that no stop string can cut
                start, tokens, text = n_chars, out.token_ids, out.text
            else:
                start = n_chars if len(out.text) >= n_chars else 0
                tokens, text = out.token_ids[n_tokens:], out.text[start:]
            deltas.append((rid, tokens, start, text, out.finish_reason,
                           out.outputs[0].stop_reason, out.error, out.num_cached_prompt_tokens,
                           out.first_scheduled_time))
            if out.finished:
                self.sent.pop(rid, None)
                self.delta.discard(rid)
            else:
                self.sent[rid] = (n_tokens + len(tokens), start + len(text))
        return [("outputs", deltas, (kind, seconds), engine.stats())]


def main() -> None:
    link = ParentLink()
    with link.phase("build"):
        import torch

        from hwattn.engine.llm import create_engine

        _, spec = link.recv()
        torch.set_num_threads(spec["threads"])
        fault_point("replica", "build", link.rank)
        core = EngineCore(create_engine(**spec["engine"]))
        link.send(("ready", core.info()))
    engine, steps, stop = core.engine, 0, False
    with link.phase("step"):
        while not stop:
            timeout = 0.0 if engine.has_unfinished() else 0.5
            handled = False
            while link.poll(timeout):
                message = link.recv()
                if message[0] == "stop":
                    stop = True
                    break
                for reply in core.handle(message):
                    link.send(reply)
                handled, timeout = True, 0.0
            if stop:
                break
            if engine.has_unfinished():
                steps += 1
                fault_point("replica", "step", link.rank, steps)
                for reply in core.step():
                    link.send(reply)
                continue
            engine.check_workers()  # a rank of this replica that died or stopped, while idle
            if handled:
                link.send(("stats", engine.stats()))
    with link.phase("shutdown"):
        fault_point("replica", "shutdown", link.rank)
        engine.shutdown()
        link.send(("bye",))
    link.exit(0)


if __name__ == "__main__":
    main()
