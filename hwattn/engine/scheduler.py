"""Who runs next: first-come first-served continuous batching with chunked prefill and
preemption by recompute. Policy only; pages come from the `BlockManager`.

Each step is either a prefill step (prompt chunks of up to `max_num_batched_tokens` tokens in
all, finishing partly-prefilled sequences first, then admitting waiting ones in arrival order)
or a decode step (every running sequence advances by one token, or by up to k + 1 when
speculating). When a decode step needs pages the pool does not have, the most recently
admitted sequence is preempted: it gives back all its pages and goes to the front of the
waiting queue, to be recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hwattn.engine.block_manager import BlockManager
from hwattn.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work. prefill: `chunks[i]` new tokens of `seqs[i]`; decode: `query_len`
    tokens (1, or k + 1 with speculation) for every sequence."""

    kind: str  # "prefill" | "decode"
    seqs: list[Sequence]
    chunks: list[int] = field(default_factory=list)
    query_len: int = 1
    preempted: list[Sequence] = field(default_factory=list)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 2048):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledBatch | None:
        """The next step, or None when nothing can run. `lookahead` is the number of draft
        tokens a decode step will verify (pages are reserved for them)."""
        batch = self._schedule_prefill()
        if batch is not None:
            return batch
        return self._schedule_decode(lookahead)

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.max_num_batched_tokens
        seqs, chunks = [], []
        for seq in self.running:  # sequences part-way through their prompt
            if budget and seq.is_prefilling:
                n = min(seq.num_uncomputed, budget)
                seqs.append(seq)
                chunks.append(n)
                budget -= n
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.bm.can_allocate(seq, reserve=1):
                if not self.running and not seqs:
                    # Alone and still too big: the pool cannot ever hold it.
                    raise RuntimeError(f"request {seq.request_id} needs more KV pages than the "
                                       f"pool has ({self.bm.num_usable_pages})")
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            chunks.append(n)
            budget -= n
        if not seqs:
            return None
        return ScheduledBatch("prefill", seqs, chunks)

    def _schedule_decode(self, lookahead: int) -> ScheduledBatch | None:
        preempted = []
        query_len = 1 + lookahead
        while self.running and not self.bm.can_grow(self.running, query_len):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
        if not self.running:
            return ScheduledBatch("decode", [], query_len=query_len, preempted=preempted) \
                if preempted else None
        for seq in self.running:
            self.bm.grow(seq, seq.num_cached + query_len)
        return ScheduledBatch("decode", list(self.running), query_len=query_len,
                              preempted=preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.bm.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free_sequence(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.bm.free_sequence(seq)
        seq.status = Status.FINISHED
