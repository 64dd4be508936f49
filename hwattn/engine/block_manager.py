"""The page pool: which KV-cache pages each sequence owns, shared prefixes, and free pages.

Mechanism only (the scheduler decides who runs). The cache is a fixed pool of `num_pages`
pages of `page_size` tokens, sized once from a memory budget with the model's own
`kv_bytes_per_token`. Page 0 is reserved as the null page: padding rows of a batch point at
it, so no real sequence ever reads what they write.

Prefix caching: a full page is identified by the hash chain of its tokens and of every page
before it: SHA-256 of the previous page's digest and the page's token ids (as vLLM's default
since 0.10.2), not Python's `hash()`, whose 64-bit values can be made to collide on purpose (a
prompt built to collide with another's prefix would be served that prefix's cache). Once
written, a full page is registered under that hash; a later prompt that starts with the same
tokens takes the page (reference count + 1) instead of recomputing it. A page
whose count drops to zero keeps its contents and hash and joins the free list in
least-recently-used order, so it can still be revived until it is handed out again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from hwattn.engine.config import EngineConfig
from hwattn.engine.sequence import Sequence

NULL_PAGE = 0


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


def num_pages_for_budget(memory_budget: int, kv_bytes_per_token: int, page_size: int) -> int:
    """Pages (the null page included) that fit `memory_budget` bytes of KV cache."""
    if memory_budget <= 0:
        raise ValueError(f"memory_budget must be positive, got {memory_budget}")
    if kv_bytes_per_token <= 0:
        raise ValueError(f"kv_bytes_per_token must be positive, got {kv_bytes_per_token}")
    return memory_budget // (kv_bytes_per_token * page_size)


MiB = 1 << 20


def _free_bytes(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a CUDA device, counting as free the blocks PyTorch has cached
    but not handed out (they are free to this process too)."""
    free, total = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device), total


def plan_pages(config: EngineConfig, kv_bytes_per_token: int, device: torch.device,
               max_model_len: int) -> int:
    """Pages in the pool (null page included), from `num_pages` or the memory budget."""
    if config.num_pages is not None:
        num_pages = config.num_pages
    elif config.gpu_memory_utilization is not None:
        if device.type != "cuda":
            raise ValueError("gpu_memory_utilization needs a CUDA device; on the CPU give "
                             "memory_budget in bytes (or num_pages)")
        free, total = _free_bytes(device)
        budget = int(total * config.gpu_memory_utilization) - (total - free)
        if budget <= 0:
            raise ValueError(f"gpu_memory_utilization {config.gpu_memory_utilization} allows "
                             f"{total * config.gpu_memory_utilization / 2**30:.2f} GiB, but "
                             f"{(total - free) / 2**30:.2f} GiB of the device are already in use: "
                             f"raise it")
        num_pages = num_pages_for_budget(budget, kv_bytes_per_token, config.page_size)
    else:
        budget = config.memory_budget
        if budget is None:
            budget = 0.85 if device.type == "cuda" else 256 * MiB
        if isinstance(budget, float):
            if not 0 < budget <= 1:
                raise ValueError(f"memory_budget as a fraction must be in (0, 1], got {budget}")
            if device.type != "cuda":
                raise ValueError("memory_budget as a fraction needs a CUDA device; give bytes")
            budget = int(_free_bytes(device)[0] * budget)
        num_pages = num_pages_for_budget(int(budget), kv_bytes_per_token, config.page_size)
    need = pages_for(max_model_len + config.num_speculative_tokens + 1, config.page_size) + 1
    if num_pages < need:
        raise ValueError(f"memory_budget / num_pages gives {num_pages} pages of {config.page_size} "
                         f"tokens, fewer than the {need} one sequence of max_model_len "
                         f"{max_model_len} needs: raise memory_budget or lower max_model_len")
    return num_pages


class BlockManager:
    """Allocates, shares (prefix caching), grows, trims and frees sequences' pages."""

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (one is the null page), got {num_pages}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_pages
        self.page_hash: list[bytes | None] = [None] * num_pages
        self.page_tokens: list[tuple[int, ...] | None] = [None] * num_pages
        self.hash_to_page: dict[bytes, int] = {}
        # Free pages in eviction order: the first is handed out next.
        self.free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(1, num_pages))
        self.prefix_hits = 0
        self.prefix_queries = 0

    @property
    def num_usable_pages(self) -> int:
        return self.num_pages - 1

    @property
    def num_free_pages(self) -> int:
        return len(self.free)

    @property
    def num_used_pages(self) -> int:
        return self.num_usable_pages - len(self.free)

    @staticmethod
    def chain_hash(previous: bytes | None, tokens: tuple[int, ...]) -> bytes:
        """The 32-byte digest of a full page: SHA-256 of the previous page's digest (None for
        the first page) and the page's token ids as int64."""
        digest = hashlib.sha256(b"\x00" if previous is None else b"\x01" + previous)
        digest.update(array("q", tokens).tobytes())
        return digest.digest()

    def _take_free_page(self) -> int:
        page, _ = self.free.popitem(last=False)
        old = self.page_hash[page]
        if old is not None:  # evict the cached contents
            if self.hash_to_page.get(old) == page:
                del self.hash_to_page[old]
            self.page_hash[page] = None
            self.page_tokens[page] = None
        self.ref_count[page] = 1
        return page

    def _release(self, page: int) -> None:
        self.ref_count[page] -= 1
        if self.ref_count[page] < 0:
            raise RuntimeError(f"page {page} released more often than taken")
        if self.ref_count[page] == 0:
            self.free[page] = None
            if self.page_hash[page] is None:  # nothing worth keeping: hand it out first
                self.free.move_to_end(page, last=False)

    @contextmanager
    def borrow_pages(self, n: int) -> Iterator[list[int]]:
        """Lend `n` free pages outside any sequence (benchmarks timing a step on pages of
        their own) and take them back when the block ends, whatever happens inside.
        Raises ValueError if fewer than `n` pages are free."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > self.num_free_pages:
            raise ValueError(f"{n} pages asked for; the pool has {self.num_free_pages} free")
        pages = [self._take_free_page() for _ in range(n)]
        try:
            yield list(pages)
        finally:
            for page in pages:
                self._release(page)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Pages registered for the sequence's leading full pages. At least one token is left
        to compute, so the model still produces the logits of the last one. A request that
        asks for prompt log-probabilities computes its whole prompt."""
        if not self.enable_prefix_caching or seq.params.prompt_logprobs is not None:
            return []
        ps = self.page_size
        hits, previous, in_prompt = [], None, seq.num_prompt_tokens // ps
        for i in range((len(seq) - 1) // ps):
            tokens = tuple(seq.token_ids[i * ps:(i + 1) * ps])
            # (the prompt's hashes are kept: a waiting sequence is asked about every step)
            previous = self._prompt_hash(seq, i) if i < in_prompt else \
                self.chain_hash(previous, tokens)
            page = self.hash_to_page.get(previous)
            if page is None or self.page_tokens[page] != tokens:
                break
            hits.append(page)
        return hits

    def prompt_hashes(self, seq: Sequence, pages: int | None = None) -> list[bytes]:
        """The hash chain of the full pages of the sequence's prompt, at least its first
        `pages` (default: all), kept on the sequence (`Sequence.prompt_hashes`) and extended
        only as far as asked: a prompt no cache holds costs one hash per check, as before,
        and its chain is built as its chunks are registered."""
        hashes, ps = seq.prompt_hashes, self.page_size
        want = seq.num_prompt_tokens // ps
        if pages is not None:
            want = min(want, pages)
        for i in range(len(hashes), want):
            hashes.append(self.chain_hash(hashes[-1] if hashes else None,
                                          tuple(seq.token_ids[i * ps:(i + 1) * ps])))
        return hashes

    def _prompt_hash(self, seq: Sequence, i: int) -> bytes:
        """The hash of the prompt's full page i."""
        return self.prompt_hashes(seq, i + 1)[i]

    def unwritten_prompt_pages(self, seq: Sequence) -> list[bytes]:
        """Hashes of the full prompt pages a sequence holding pages has not registered yet:
        those its coming prefill chunks write (none without prefix caching)."""
        if not self.enable_prefix_caching:
            return []
        return self.prompt_hashes(seq)[len(seq.page_hashes):]

    def awaits_pages(self, seq: Sequence, pending: set[bytes]) -> bool:
        """Whether a waiting sequence would take, from the prefix cache, a page among
        `pending` (pages another sequence's prefill is about to write) if it waited for them:
        its leading full prompt pages are registered up to one of them. Only a fresh
        sequence whose prompt is read from the cache (`_cached_prefix`) waits."""
        if (not pending or not self.enable_prefix_caching or seq.num_preemptions
                or seq.params.prompt_logprobs is not None):
            return False
        for i in range((seq.num_prompt_tokens - 1) // self.page_size):  # as `_cached_prefix`
            h = self._prompt_hash(seq, i)
            if h not in self.hash_to_page:
                return h in pending
        return False

    def can_allocate(self, seq: Sequence, reserve: int = 0, keep_free: int = 0) -> bool:
        """Whether the sequence's tokens (plus `reserve` more) fit, counting prefix hits, with
        `keep_free` pages still free after them."""
        hits = self._cached_prefix(seq)
        revived = sum(1 for p in hits if self.ref_count[p] == 0)
        needed = pages_for(len(seq) + reserve, self.page_size) - len(hits) + revived
        return needed + keep_free <= self.num_free_pages

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence pages for all its tokens, reusing cached prefix pages."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.request_id} already holds pages")
        hits = self._cached_prefix(seq)
        self.prefix_queries += pages_for(len(seq), self.page_size)
        self.prefix_hits += len(hits)
        for page in hits:
            if self.ref_count[page] == 0:
                del self.free[page]
            self.ref_count[page] += 1
        seq.block_table = list(hits)
        seq.page_hashes = [self.page_hash[p] for p in hits]
        seq.num_cached = len(hits) * self.page_size
        if not seq.num_preemptions:  # a recompute's hits are its own pages, not cached prompt
            seq.num_prefix_hit = seq.num_cached
        needed = pages_for(len(seq), self.page_size) - len(hits)
        if needed > self.num_free_pages:
            self.free_sequence(seq)
            raise RuntimeError("allocate called without can_allocate")
        seq.block_table.extend(self._take_free_page() for _ in range(needed))

    def can_grow(self, seqs: list[Sequence], extra: int) -> bool:
        """Whether every sequence can hold `extra` more tokens beyond its cached ones."""
        return self.pages_to_grow(seqs, extra) <= self.num_free_pages

    def pages_to_grow(self, seqs: list[Sequence], extra: int) -> int:
        return sum(max(0, pages_for(s.num_cached + extra, self.page_size) - len(s.block_table))
                   for s in seqs)

    def grow_all(self, seqs: list[Sequence], extra: int) -> bool:
        """Make every sequence's page list cover `extra` tokens beyond its cached ones, if the
        pool has the pages for all of them; else change nothing. Returns whether it did
        (`can_grow` then `grow` each, with the pages counted once)."""
        ps = self.page_size
        short = []
        for seq in seqs:
            needed = pages_for(seq.num_cached + extra, ps) - len(seq.block_table)
            if needed > 0:
                short.append((seq, needed))
        if not short:
            return True
        if sum(n for _, n in short) > self.num_free_pages:
            return False
        for seq, needed in short:
            seq.block_table.extend(self._take_free_page() for _ in range(needed))
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Make the page list cover `num_tokens` tokens."""
        needed = pages_for(num_tokens, self.page_size) - len(seq.block_table)
        if needed <= 0:  # most decode steps: the last page has room
            return
        if needed > self.num_free_pages:
            raise RuntimeError(f"no free pages for sequence {seq.request_id}")
        seq.block_table.extend(self._take_free_page() for _ in range(needed))

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Drop pages past those covering `num_tokens` tokens (rejected speculative slots)."""
        keep = pages_for(num_tokens, self.page_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def register_full_pages(self, seq: Sequence, written: int | None = None) -> None:
        """Record the hash of every full page among the sequence's first `written` tokens
        (default: its cached ones; a draft model's cache may lag behind the target's)."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        written = seq.num_cached if written is None else min(written, seq.num_cached)
        in_prompt = seq.num_prompt_tokens // ps
        for i in range(len(seq.page_hashes), written // ps):
            tokens = tuple(seq.token_ids[i * ps:(i + 1) * ps])
            h = self._prompt_hash(seq, i) if i < in_prompt else self.chain_hash(
                seq.page_hashes[-1] if seq.page_hashes else None, tokens)
            seq.page_hashes.append(h)
            page = seq.block_table[i]
            if h not in self.hash_to_page and self.page_hash[page] is None:
                self.hash_to_page[h] = page
                self.page_hash[page] = h
                self.page_tokens[page] = tokens

    def free_sequence(self, seq: Sequence) -> None:
        """Return all the sequence's pages (finished, aborted or preempted)."""
        for page in reversed(seq.block_table):
            self._release(page)
        seq.block_table = []
        seq.page_hashes = []
        seq.num_cached = 0
        seq.draft_cached = 0

    def reset_prefix_cache(self) -> None:
        """Forget every registered page (as vLLM's `reset_prefix_cache`): a page whose
        contents cannot be trusted (its writing step was lost) must never be shared. Pages in
        use keep their contents but are no longer found by later prompts."""
        for page in range(1, self.num_pages):
            self.page_hash[page] = None
            self.page_tokens[page] = None
        self.hash_to_page.clear()
        # Unhashed free pages are handed out first, in any order; keep the current one.

    def check(self, live: list[Sequence]) -> None:
        """Raise if the reference counts disagree with the live sequences' page lists."""
        counts = [0] * self.num_pages
        for seq in live:
            for page in seq.block_table:
                counts[page] += 1
        for page in range(1, self.num_pages):
            if counts[page] != self.ref_count[page]:
                raise AssertionError(f"page {page}: {self.ref_count[page]} references recorded, "
                                     f"{counts[page]} held")
            if (page in self.free) != (counts[page] == 0):
                raise AssertionError(f"page {page}: free list disagrees with {counts[page]} holders")
        if NULL_PAGE in self.free or self.ref_count[NULL_PAGE]:
            raise AssertionError("the null page was handed out")
