"""Who runs next: continuous batching with chunked prefill and preemption by recompute, fair
between owners. Policy only; pages come from the `BlockManager`.

Every sequence has an owner (by default its request; the server passes the HTTP request, so
the prompts and `n` completions of one call share one owner). Waiting sequences are admitted
owner by owner: next is the first waiting sequence of the owner holding the fewest running
sequences (ties: the one waiting longest), so a one-prompt request is not queued behind the
thousands of sequences of a big one. When that sequence finds no free slot or no pages, a
running sequence of an owner holding at least two more is preempted for it (the most recently
admitted of the owner holding the most), so every owner soon holds its share of the batch.
With prefix caching on, prompts that start alike compute their common full pages once: a
fresh request whose leading pages a prefilling sequence is about to write (the n completions
of one request, a shared system prompt, the same prompt sent many times) waits for the steps
that write them and takes them from the prefix cache (`_pending_pages`); its owner's other
requests are admitted meanwhile.

With `mixed` set (`enable_mixed_batches`, plain decoding only), every step first takes every
decoding sequence (one token each) and spends what is left of `max_num_batched_tokens` on
prompt chunks: partly-prefilled sequences first, then waiting ones in the fair order above.
Decodes keep flowing while long prompts arrive, one bounded chunk per step. They never take
more than the budget: a sequence starts decoding only after a step in which its last prompt
chunk took a token of the budget beside that step's decodes, so at most
`max_num_batched_tokens` sequences decode at once. While that many do, prompts wait for one of
them to finish, as for a free slot (nothing is admitted meanwhile, so their number only falls).

Without it, each step is either a prefill step (prompt chunks of up to
`max_num_batched_tokens` tokens in all, admitted in the same order) or a decode step (every
running sequence advances by one token, or by up to k + 1 when speculating). A waiting
sequence is admitted when the pool has pages for its tokens and for its first decode step;
before a verify step, also for the k + 1 tokens each running sequence writes in it (pages it
takes for the step and gives back after), or that step would preempt the newcomer straight
after its prefill and the next admit it again. Prefill steps come first, but each admits a
sequence or advances a prompt, so decodes wait only while prompts have a slot and pages.

When decoding needs pages the pool does not have, the most recently admitted sequence of the
owner holding the most running sequences is preempted: it gives back all its pages and goes to
the front of its owner's waiting queue, to be recomputed later. A sequence whose last sampled
token the engine has not read back yet (`Sequence.num_pending`) and that will end by length
once it has is not scheduled again.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field

from hwattn.engine.block_manager import BlockManager, pages_for
from hwattn.engine.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """One step's work. prefill: `chunks[i]` new tokens of `seqs[i]`; decode: `query_len`
    tokens (1, or k + 1 with speculation) for every sequence; mixed: the first `num_decode`
    sequences decode one token, the others take `chunks[i]` prompt tokens."""

    kind: str  # "prefill" | "decode" | "mixed"
    seqs: list[Sequence]
    chunks: list[int] = field(default_factory=list)
    query_len: int = 1
    num_decode: int = 0


class HeldBack:
    """One scheduling pass's hold-backs (`Scheduler._next_waiting`): the prompt pages being
    written (`pending`, built when first asked), the waiting requests held back for them, and
    per owner where its first request not held back was last found (`first`): a held request
    is never admitted in the pass, so each owner's queue is scanned past them once per pass.
    After `MAX_HELD` in all (many clients sending one system prompt at once) the pass admits
    no more: each `WaitQueue.next` looks at every owner, and the rest wait a step."""

    MAX_HELD = 64

    def __init__(self):
        self.pending: set[bytes] | None = None
        self.requests: set[str] = set()
        self.first: dict[str, int] = {}

    def hold(self, seq: Sequence) -> None:
        self.requests.add(seq.request_id)

    def forget(self, owner: str) -> None:
        """The owner's queue grew at its front (a preemption): scan it from the start."""
        self.first.pop(owner, None)

    def __bool__(self) -> bool:
        return bool(self.requests)

    @property
    def full(self) -> bool:
        return len(self.requests) >= self.MAX_HELD


class WaitQueue:
    """The waiting sequences, one first-in first-out queue per owner (owners in the order
    they first queued). A preempted sequence goes back to the front of its owner's queue."""

    def __init__(self):
        self._queues: dict[str, deque[Sequence]] = {}
        self._size = 0

    def append(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.owner, deque()).append(seq)
        self._size += 1

    def appendleft(self, seq: Sequence) -> None:
        self._queues.setdefault(seq.owner, deque()).appendleft(seq)
        self._size += 1

    def remove(self, seq: Sequence) -> None:
        """ValueError if `seq` is not waiting."""
        queue = self._queues.get(seq.owner)
        if queue is None:
            raise ValueError(f"sequence of {seq.request_id} is not waiting")
        queue.remove(seq)
        self._size -= 1
        if not queue:
            del self._queues[seq.owner]

    def next(self, held: Counter, skip: HeldBack | None = None) -> Sequence | None:
        """The first waiting sequence of the owner holding the fewest running sequences
        (`held`: owner -> running sequences); ties go to the one waiting longest. Sequences
        `skip` holds back are passed over: an owner's first sequence of another request
        stands in for them (None if no sequence is left)."""
        best, best_key = None, None
        skipped = skip.requests if skip else None  # (one truth test, not one per owner)
        for owner, queue in self._queues.items():
            head = queue[0]
            if skipped is not None and head.request_id in skipped:
                i, n = skip.first.get(owner, 0), len(queue)
                while i < n and queue[i].request_id in skipped:
                    i += 1
                skip.first[owner] = i
                if i == n:
                    continue
                head = queue[i]
            key = (held[owner], head.arrival_time)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def __contains__(self, seq) -> bool:
        queue = self._queues.get(getattr(seq, "owner", None))
        return queue is not None and seq in queue

    def __iter__(self):
        for queue in list(self._queues.values()):
            yield from list(queue)

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, max_model_len: int = 2048,
                 mixed: bool = False):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {max_num_batched_tokens}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.mixed = mixed
        self.waiting = WaitQueue()
        self.running: list[Sequence] = []
        # Running sequences per owner; built by `schedule` when a fairness check first needs
        # it (`_owners`: a steady decode step needs none) and kept up to date as it preempts
        # and admits, so the checks do not recount `running` each time.
        self._held: Counter | None = None
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, lookahead: int = 0) -> ScheduledBatch | None:
        """The next step, or None when nothing can run. `lookahead` is the number of draft
        tokens a decode step will verify (pages are reserved for them)."""
        self._held = None
        self._make_way(lookahead)
        if self.mixed and not lookahead:
            return self._schedule_mixed()
        return self._schedule_prefill(lookahead) or self._schedule_decode(lookahead)

    def _owners(self) -> Counter:
        """Running sequences per owner (see `_held`)."""
        if self._held is None:
            self._held = Counter(s.owner for s in self.running)
        return self._held

    def will_end(self, seq: Sequence) -> bool:
        """Whether the sequence ends by length once its pending tokens are read back."""
        if not seq.num_pending:
            return False
        n = len(seq.token_ids)
        return n - seq.num_prompt_tokens >= seq.params.max_tokens or n >= self.max_model_len

    def _decoding(self) -> list[Sequence]:
        return [s for s in self.running if not s.is_prefilling and not self.will_end(s)]

    def _schedule_mixed(self) -> ScheduledBatch | None:
        decodes = self._decoding()
        self._make_room(decodes, 1)
        for seq in decodes:
            self.bm.grow(seq, seq.num_cached + 1)
        budget = self.max_num_batched_tokens - len(decodes)
        seqs, chunks = self._prefill_chunks(max(0, budget)) if budget > 0 else ([], [])
        if not decodes and not seqs:
            return None
        kind = "mixed" if decodes and seqs else ("decode" if decodes else "prefill")
        return ScheduledBatch(kind, decodes + seqs, [1] * len(decodes) + chunks,
                              num_decode=len(decodes))

    def _victim(self, at_least: int = 1) -> Sequence | None:
        """The most recently admitted running sequence (never one about to end) of the owner
        holding the most running sequences, when that owner holds at least `at_least`."""
        held = self._owners()
        best = None
        for seq in reversed(self.running):  # the latest admitted first
            if self.will_end(seq) or held[seq.owner] < at_least:
                continue
            if best is None or held[seq.owner] > held[best.owner]:
                best = seq
        return best

    def _fits(self, seq: Sequence, lookahead: int) -> bool:
        """Whether a waiting sequence can be admitted: the pool has pages for its tokens and
        the 1 + `lookahead` its first decode step writes. Before a verify step (`lookahead`
        drafts: vLLM's lookahead slots) they must also leave the pages each running sequence
        needs for its own k + 1 tokens, which it takes for the step and gives back after:
        room for less, and the step would preempt the newcomer straight after its prefill,
        then admit it again once they are given back, over and over."""
        query_len = 1 + lookahead
        keep = 0
        if lookahead:
            for s in self.running:
                if not self.will_end(s):  # (one still prefilling: past its prompt)
                    end = (len(s) if s.is_prefilling else s.num_cached) + query_len
                    keep += max(0, pages_for(end, self.bm.page_size) - len(s.block_table))
        return self.bm.can_allocate(seq, reserve=query_len, keep_free=keep)

    def _make_way(self, lookahead: int) -> None:
        """Fairness: while the next waiting sequence finds no free slot or no pages, preempt
        for it a sequence of an owner holding at least two more running sequences than its own
        owner (so no two owners trade a sequence back and forth)."""
        if not self.waiting:
            return
        held, held_back = self._owners(), HeldBack()
        while self.waiting:
            seq = self._next_waiting(held, held_back)  # (no room made for a held one)
            if seq is None:
                break
            if seq.num_pending:  # preempted with a token still on its way: next step
                break
            if len(self.running) < self.max_num_seqs and self._fits(seq, lookahead):
                break
            victim = self._victim(at_least=held[seq.owner] + 2)
            if victim is None:
                break
            self._preempt(victim)
            held_back.forget(victim.owner)

    def _make_room(self, decodes: list[Sequence], query_len: int) -> None:
        """Preempt running sequences (`_victim`: never one about to end) until every one left
        in `decodes` can hold `query_len` more tokens."""
        while decodes and not self.bm.can_grow(decodes, query_len):
            victim = self._victim()
            if victim is None:
                break
            if victim in decodes:
                decodes.remove(victim)
            self._preempt(victim)

    def _schedule_prefill(self, lookahead: int) -> ScheduledBatch | None:
        seqs, chunks = self._prefill_chunks(self.max_num_batched_tokens, lookahead)
        if not seqs:
            return None
        return ScheduledBatch("prefill", seqs, chunks)

    def _prefill_chunks(self, budget: int,
                        lookahead: int = 0) -> tuple[list[Sequence], list[int]]:
        """Prompt chunks of `budget` tokens in all: partly-prefilled sequences first, then
        waiting ones admitted in the fair order of `WaitQueue.next` (pages allocated for their
        whole prompt)."""
        seqs, chunks = [], []
        for seq in self.running:  # sequences part-way through their prompt
            if budget and seq.is_prefilling:
                n = min(seq.num_uncomputed, budget)
                seqs.append(seq)
                chunks.append(n)
                budget -= n
        held_back = HeldBack()
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self._next_waiting(self._owners(), held_back)
            if seq is None:
                break
            if seq.num_pending:  # preempted with a token still on its way: next step
                break
            if not self._fits(seq, lookahead):
                if not self.running and not seqs:
                    # Alone and still too big: the pool cannot ever hold it.
                    raise RuntimeError(f"request {seq.request_id} needs more KV pages than the "
                                       f"pool has ({self.bm.num_usable_pages})")
                break
            self.waiting.remove(seq)
            self.bm.allocate(seq)
            seq.status = Status.RUNNING
            if seq.first_scheduled_time is None:  # (a preempted one keeps its first)
                seq.first_scheduled_time = time.perf_counter()
            self._owners()[seq.owner] += 1  # (built before `running` changes)
            self.running.append(seq)
            n = min(seq.num_uncomputed, budget)
            seqs.append(seq)
            chunks.append(n)
            budget -= n
            held_back.pending.update(self.bm.unwritten_prompt_pages(seq))
        return seqs, chunks

    def _next_waiting(self, held: Counter, held_back: HeldBack) -> Sequence | None:
        """The next waiting sequence in the fair order (`WaitQueue.next`) that is not to wait
        for prompt pages another sequence's prefill is about to write; those that are are
        held back for the pass, their owners' other requests going on. None when no sequence
        is left or the pass has held back `HeldBack.MAX_HELD`."""
        while True:
            seq = self.waiting.next(held, held_back)
            if seq is None:
                return None
            if held_back.pending is None:
                held_back.pending = self._pending_pages()
            if not self.bm.awaits_pages(seq, held_back.pending):
                return seq
            held_back.hold(seq)
            if held_back.full:
                return None

    def _pending_pages(self) -> set[bytes]:
        """Hashes of the full prompt pages that prefilling sequences are about to write. A
        waiting prompt that starts with them waits (`BlockManager.awaits_pages`): the prefix
        cache shares a page once the step writing it is launched (the engine registers a
        chunk's pages then), so a prompt admitted after it computes only what it does not
        share, where one admitted beside it would compute the common part again and hold a
        copy of each of its pages for as long as it runs."""
        pending: set[bytes] = set()
        for seq in self.running:
            if seq.is_prefilling:
                pending.update(self.bm.unwritten_prompt_pages(seq))
        return pending

    def _schedule_decode(self, lookahead: int) -> ScheduledBatch | None:
        query_len = 1 + lookahead
        decodes = self._decoding() if any(s.num_pending for s in self.running) \
            else list(self.running)
        if not decodes:
            return None
        # Most steps: every page list already has room, or the pool has the few pages asked.
        if not self.bm.grow_all(decodes, query_len):
            self._make_room(decodes, query_len)
            if not decodes:
                return None
            for seq in decodes:  # (raises if preempting found no room)
                self.bm.grow(seq, seq.num_cached + query_len)
        return ScheduledBatch("decode", decodes, query_len=query_len, num_decode=len(decodes))

    def _preempt(self, seq: Sequence) -> None:
        """Take a running sequence back to the front of its owner's waiting queue."""
        held = self._owners()  # (built before `running` changes)
        self.running.remove(seq)
        held[seq.owner] -= 1
        self.bm.free_sequence(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def preempt_all(self) -> None:
        """Preempt every running sequence (the engine's way back after a step it launched
        was lost: each is recomputed from its tokens)."""
        self._held = None
        for seq in list(reversed(self.running)):
            self._preempt(seq)

    def finish(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
            self.bm.free_sequence(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self.bm.free_sequence(seq)
        seq.status = Status.FINISHED
