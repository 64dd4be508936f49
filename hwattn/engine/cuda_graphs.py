"""CUDA graphs of the runner's decode steps on a GPU: one per decode batch-size bucket
(`decode_buckets`) and query length (plain decode and speculative verification).

`DecodeGraphs` is the half of `ModelRunner` that captures and replays them. At start-up
`_capture` records every bucket's decode forward over static device inputs (token ids, lengths,
block table) and the bucket's split-KV plan, made for the longest context with room for split
pieces, all laid out per query length in one `StagedInputs` buffer (`hwattn/engine/staging.py`);
a failure leaves decoding eager (`graph_error`), and a capture ends by freezing the heap
(`freeze_heap`). A decode step that fits a captured bucket and writes all its tokens is then
replayed (`_replay`): its inputs and its refreshed plan reach the device in one copy from a
pinned host slot, and the graph reruns the forward, leaving the logits and their argmax in its
static outputs.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from hwattn.engine.block_manager import NULL_PAGE, pages_for
from hwattn.engine.staging import HostBlockTable, StagedInputs
from hwattn.layers import AttentionMetadata
from hwattn.ops.argmax import argmax_last
from hwattn.ops.backends.checks import takes_keyword

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Collect garbage once, then move every object alive (the model, the compiled decode
    blocks, the captured graphs' Python side) to the collector's permanent generation, as
    vLLM does after start-up. Left in the collected generations, the long-lived heap that
    compilation leaves makes each full collection a stall of the step it falls in: 178 ms once
    in 600 decode steps of a compiled tiny model on our CPU, 14 ms after freezing."""
    gc.collect()
    gc.freeze()


def error_line(err: BaseException, limit: int = 300) -> str:
    """A failed capture or compile as one line of at most `limit` characters: the error's type
    and first line, and where it wraps another (dynamo's `BackendCompilerFailed` says only
    "backend='inductor' raised:" first), the wrapped one's, which holds the cause."""
    def first(e: BaseException) -> str:
        return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
    inner = getattr(err, "inner_exception", None) or err.__cause__
    parts = [first(err)] + ([first(inner)] if inner is not None and inner is not err else [])
    return " <- ".join(parts)[:limit]


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a CUDA graph: 1, 2, 4, 8, then multiples of 16."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


class DecodeGraphs:
    """The CUDA graphs of a `ModelRunner`'s decode steps (a mixin of `ModelRunner`, which
    calls `_capture` when it is built, `_graph_for` and `_replay` in its decode step).

    It reads the runner's `device`, `backend`, `model`, `page_size`, `max_model_len`,
    `max_num_seqs` and `decode_blocks`, runs its `plan`, `forward`, `_part` and `_feed_into`,
    and writes its `graphs`, `graph_error`, `graph_argmax` and `fed_tokens`. Its own state, set
    by `_capture` (emptied again by a failed capture): `buckets`, and per query length or
    (bucket, query length) `static`, `stages`, `host_tables`, `plans`, `staged_plans`, and the
    graphs' memory pool `_pool`.
    """

    @property
    def cuda_graphs(self) -> bool:
        """Whether decode steps replay captured CUDA graphs."""
        return bool(self.graphs)

    def graph_for(self, batch: int, query_len: int):
        """The replay of the captured decode graph a step of `batch` rows of `query_len`
        tokens runs through (a callable rerunning the forward on the inputs the last such
        step left in place), or None when that step runs eagerly."""
        if not self.graphs:
            return None
        for size in self.buckets:
            if size >= batch and (size, query_len) in self.graphs:
                return self.graphs[(size, query_len)][0]
        return None

    @contextmanager
    def eager(self) -> Iterator[DecodeGraphs]:
        """Inside the block every decode step runs eagerly, without the captured graphs."""
        graphs, self.graphs = self.graphs, {}
        try:
            yield self
        finally:
            self.graphs = graphs

    # Capture and replay: static inputs per query length, one graph per batch bucket.
    def _graph_for(self, batch: int, t: int, step):
        if not self.graphs or step.skip_write:
            return None
        for size in self.buckets:
            if size >= batch and (size, t) in self.graphs:
                return size
        return None

    def _capture(self, query_lens: tuple[int, ...]) -> None:
        """Record one decode graph per (bucket, query length), largest bucket first so the
        smaller ones reuse its memory pool. Any failure leaves decoding eager.

        Per query length, a step's inputs reach the device in one copy (`StagedInputs`): its
        bucket's split-KV plan (made first, by one eager forward per bucket, then moved into
        the staged buffer), the token ids, the lengths and the block table, in that order."""
        self.buckets = decode_buckets(self.max_num_seqs)
        width = pages_for(self.max_model_len, self.page_size)
        big = self.buckets[-1]
        self.static = {}
        self.stages: dict[int, StagedInputs] = {}
        # Per query length, one host block table per staging slot, each kept in its slot.
        self.host_tables: dict[int, list[HostBlockTable]] = {}
        self.plans = {}
        # Per (bucket, query length): the plan's parts (`AttentionBackend.plan_parts`), each
        # staging slot's host views of them, and the byte where the bucket's upload starts.
        self.staged_plans: dict[tuple[int, int], tuple[list, list[list[Tensor]], int]] = {}
        self._pool = None
        try:
            for t in query_lens:
                # The plans first: a bucket's plan takes its final shape (every launch shape
                # of a Hopper plan) in a forward over placeholder inputs.
                self.static[t] = self._placeholders(big, t, width)
                with torch.inference_mode():
                    for size in reversed(self.buckets):
                        self._static_forward(size, t)
                parts = {size: self.backend.plan_parts(self.plans[(size, t)])
                         for size in self.buckets}
                # Largest bucket's plan first: a bucket's upload runs from its own plan to its
                # rows of the table, so it also carries the (smaller) plans of smaller buckets.
                fields = {f"plan{size}.{i}": ((part.packed.numel(),), torch.int32)
                          for size in reversed(self.buckets) for i, part in enumerate(parts[size])}
                fields.update({"ids": ((big, t), torch.int64), "lens": ((big,), torch.int32),
                               "table": ((big, width), torch.int32)})
                stage = StagedInputs(fields, self.device)
                ids, lens, table = (stage.device[k] for k in ("ids", "lens", "table"))
                table.fill_(NULL_PAGE)
                lens.fill_(self._capture_len(t))
                self.static[t] = (ids, table, lens)
                self.stages[t] = stage
                self.host_tables[t] = [HostBlockTable(big, width, array=slot["table"])
                                       for slot in stage.slots]
                for size in self.buckets:
                    names = [f"plan{size}.{i}" for i in range(len(parts[size]))]
                    for part, name in zip(parts[size], names):
                        part.rebind(stage.device[name])
                    hosts = [[torch.from_numpy(slot[name]) for name in names] for slot in stage.slots]
                    self.staged_plans[(size, t)] = (parts[size], hosts,
                                                    stage.start(names[0] if names else "ids"))
                for size in reversed(self.buckets):
                    self.graphs[(size, t)] = self._record(
                        lambda size=size, t=t: self._captured_step(size, t))
            self._synchronize()
            freeze_heap()
        except Exception as err:  # noqa: BLE001 - any capture failure means eager decoding
            self.graphs.clear()
            # Only replays read these: the device memory they hold goes back to the cache.
            self.static, self.stages, self.host_tables = {}, {}, {}
            self.plans, self.staged_plans, self._pool = {}, {}, None
            self.graph_error = error_line(err)
            log.warning("CUDA graph capture failed, decoding eagerly: %s", self.graph_error)
            self._synchronize()

    def _capture_len(self, t: int) -> int:
        """The length of every placeholder sequence while the graphs are captured: the longest
        context, which their plans are made for (a kernel reads the tokens of its plan's
        lengths, and an op refuses a plan of other lengths where they are on the host); each
        replay refreshes the lengths and the plan together. It stops at the model's own
        context: the engine's `max_model_len` here keeps room for drafts beyond it, and a
        placeholder token past the model's positions would index its RoPE table out of
        bounds (a device-side assert on a GPU)."""
        positions = getattr(getattr(self.model, "config", None), "max_seq_len", None)
        longest = self.max_model_len if positions is None else min(self.max_model_len, positions)
        return max(t, longest)

    def _placeholders(self, rows: int, t: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        """(ids, table, lens) for a decode forward that only settles shapes: every row one
        sequence of `_capture_len(t)` tokens on the null page."""
        ids = torch.zeros(rows, t, dtype=torch.int64, device=self.device)
        table = torch.full((rows, width), NULL_PAGE, dtype=torch.int32, device=self.device)
        lens = torch.full((rows,), self._capture_len(t), dtype=torch.int32, device=self.device)
        return ids, table, lens

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _record(self, forward):
        """Capture `forward` (a decode step over the static inputs) as a CUDA graph.
        Returns (replay, output): calling `replay()` reruns it into `output` (what `forward`
        returned: a tensor, or a tuple of tensors)."""
        with torch.inference_mode():
            forward()  # warm up: compiles kernels, settles the allocator
            self._synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = forward()
        self._pool = graph.pool()
        return graph.replay, out

    def _captured_step(self, size: int, t: int) -> tuple[Tensor, Tensor]:
        """What the (size, t) graph records: the decode forward's logits (size, t, V) and
        their argmax, (size,) int64 for one-token steps and (size, t) for verify steps, so
        that a greedy step launches no kernel of its own between two graphs (`launch_step`,
        `verify_step`). A sampled step pays for an argmax it does not read: one pass over
        the logits, small next to the forward that wrote them."""
        logits = self._static_forward(size, t)
        return logits, argmax_last(logits[:, -1] if t == 1 else logits)

    def _capture_knobs(self) -> dict:
        """`reserve_pieces=True` for the captured plans, where the backend's `plan` takes it
        (a backend registered from outside may predate the keyword: its plans are captured
        as it makes them, rather than the capture failing on the keyword)."""
        # (no signature to read: called without it, as every backend's plan may be)
        takes = takes_keyword(self.backend.plan, "reserve_pieces", unreadable=False)
        return {"reserve_pieces": True} if takes else {}

    def _static_forward(self, size: int, t: int) -> Tensor:
        """The captured decode step: reads only the static tensors and the bucket's plan,
        which `_replay` refreshes in place before each replay."""
        ids, table, lens = self.static[t]
        if (size, t) not in self.plans:
            # Planned for the longest context, and with room for pieces: even lengths fill
            # the GPU in a large bucket without any, but a later step's one long sequence
            # among short ones must be cut to share it. (The combine kernel captured here
            # merges however many pieces a refreshed plan has, reading the counts on the
            # device; a bucket captured with one piece a sequence merges them one at a time.)
            longest = torch.full((size,), self._capture_len(t), dtype=torch.int32)
            self.plans[(size, t)] = self.plan(longest, t, **self._capture_knobs())
        meta = AttentionMetadata.for_step(table[:size], lens[:size], t, self.page_size,
                                          backend=self.backend)
        meta.plan = self.plans[(size, t)]
        return self.forward(ids[:size], meta, blocks=self.decode_blocks)

    def _replay(self, size: int, batch: int, t: int, step) -> Tensor:
        """Refresh the static inputs of the (size, t) graph in place and replay it: the step's
        split-KV plan, tokens (host lists, or a (batch, t) device tensor), lengths and block
        tables reach the device in one copy from a pinned staging slot, then fed tokens are
        written in place."""
        ids, _, _ = self.static[t]
        stage = self.stages[t]
        replay, out = self.graphs[(size, t)]
        out, argmax = out  # (logits, their argmax): see `_captured_step`
        self.graph_argmax = argmax[:batch]
        with self._part("inputs"):
            slot = stage.index
            table = self.host_tables[t][slot]
            host = stage.slot()
            on_device = isinstance(step.tokens, Tensor)
            if not on_device:
                host["ids"][:batch] = step.tokens
            host["ids"][batch:size] = 0
            lens = host["lens"]
            lens[:batch] = step.num_cached
            lens[:batch] += t
            lens[batch:size] = t
            table.update(step.block_tables, size)
            parts, hosts, start = self.staged_plans[(size, t)]
            plan = self.plans.get((size, t))
            if plan is not None:  # refreshed into the slot: the upload below carries it
                for part, view in zip(parts, hosts[slot]):
                    part.host = view
                self.plan(torch.from_numpy(lens[:size]), t, out=plan)
            stage.upload(stage.end("table", size), start=start)
            if on_device:
                ids[:batch].copy_(step.tokens)
            if step.feeds:
                self._feed_into(ids[:batch], step.feed)
            self.fed_tokens = ids[:batch]
        with self._part("forward"):
            replay()
        return out[:batch]
