"""What a forward step tells the attention layers, and the paged prefill-op calls they can make.

`AttentionMetadata` describes one step over the paged KV cache (the block table, lengths,
slots, the backend and its plan; a mixed step's two halves in `MixedParts`); every layer of the
step reads the one object. `PrefillForm` is one paged prefill-op call a family can make, with
its cost, so that benchmarks and the latent families' choice of form treat every family alike.
The layers themselves are in hwattn/layers/base.py and the family modules.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from hwattn import ops
from hwattn.ops import AttentionBackend, PrefillPlan, plan_prefill


@dataclass
class AttentionMetadata:
    """How one forward step reads and writes the paged KV cache; shared by every layer.

    block_table: (B, max_pages) int32, page ids of each sequence in order.
    cache_seqlens: (B,) int32, tokens cached per sequence once this step's tokens are written.
    slot_mapping: (N,) int64, flat cache slot (page * page_size + offset) of each new token, in
        the order of the step's tokens; negative slots are padding and are not written.
    is_prefill: attend through the variable-length prefill op: the step's N tokens are the
        sequences' new tokens packed in order, sequence b's being tokens
        cu_seqlens_q[b]:cu_seqlens_q[b + 1] (any number, the last of its cached tokens).
        Otherwise every sequence has T tokens, attended through the decode op.
    cu_seqlens_q: prefill only: (B + 1,) int32 offsets of each sequence's tokens.
    token_positions: positions of the step's tokens, shaped as the tokens ((1, N) for packed
        prefill rows); None: the last T of each sequence (`positions`).
    plan: the backend's schedule for this step, computed once and reused by every layer: for
        decode `backend.plan(...)` (None where the backend needs none), for prefill the
        `PrefillPlan` of the step's host lengths (`backend.plan_prefill`).
    backend: the `AttentionBackend` every layer calls. A registered name or "auto" given here
        is resolved once, for block_table's device, when the metadata is made.
    parts: a mixed step's two halves (`split_decode_rows`): the first rows are decode rows, one
        query token each, attended through the paged decode op; the rest are prompt chunks,
        attended as a prefill step of their own. None: every row attends as the step says.
    """

    block_table: Tensor
    cache_seqlens: Tensor
    slot_mapping: Tensor
    is_prefill: bool = False
    plan: Any = None
    backend: AttentionBackend | str = "auto"
    cu_seqlens_q: Tensor | None = None
    token_positions: Tensor | None = None
    parts: MixedParts | None = None
    # Per-step values the first layer that needs them makes (`context_pages`), and the host
    # block table with the upload that made the device one (`for_prefill`).
    _context: dict = field(default_factory=dict, init=False, repr=False)
    _host_table: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.backend = ops.get_backend(self.backend, self.block_table.device)

    def positions(self, query_len: int) -> Tensor:
        """Positions of this step's tokens: `token_positions` if set, else (B, T) int64, the
        last T = `query_len` of each sequence."""
        if self.token_positions is not None:
            return self.token_positions
        offsets = torch.arange(query_len, device=self.cache_seqlens.device)
        return self.cache_seqlens.long()[:, None] - query_len + offsets

    @staticmethod
    def slots(block_table: Tensor, positions: Tensor, page_size: int) -> Tensor:
        """Flat cache slots (B*T,) int64 of token positions (B, T) under a block table."""
        pages = torch.gather(block_table.long(), 1, positions // page_size)
        return (pages * page_size + positions % page_size).flatten()

    @classmethod
    def for_step(cls, block_table: Tensor, cache_seqlens: Tensor, query_len: int, page_size: int,
                 is_prefill: bool = False, **kwargs) -> "AttentionMetadata":
        """Metadata for T = `query_len` new tokens per sequence, slots derived from the table.
        With `is_prefill` the (B, T) tokens run as B packed sequences of T through the prefill
        op (reading the lengths back once, for the step's plan, unless `plan` is given)."""
        meta = cls(block_table, cache_seqlens, slot_mapping=torch.empty(0), is_prefill=is_prefill,
                   **kwargs)
        # Computed once for the step: the slots and every later `positions` call read them.
        meta.token_positions = meta.positions(query_len)
        meta.slot_mapping = cls.slots(block_table, meta.token_positions, page_size)
        if is_prefill:
            batch = block_table.shape[0]
            cu = torch.arange(batch + 1, dtype=torch.int32) * query_len
            meta.cu_seqlens_q = cu.to(block_table.device)
            if meta.plan is None:
                meta.plan = meta.backend.plan_prefill(cu, cache_seqlens.cpu())
        return meta

    @classmethod
    def for_prefill(cls, block_table: Tensor, query_lens: Sequence[int], num_cached: Sequence[int],
                    page_size: int, backend: AttentionBackend | str = "auto",
                    device=None, upload=None) -> "AttentionMetadata":
        """Metadata of a variable-length prefill step, built from host lists.

        Args:
            block_table: (B, max_pages) int32 on the host, each sequence's pages.
            query_lens: per sequence, its new tokens this step (packed in this order).
            num_cached: per sequence, tokens already cached before this step.
            page_size: the cache's page size.
            device: where the model runs (default: the host). upload: `f(host tensor) ->
                device tensor` (default `.to(device)`), e.g. a non-blocking pinned copy.
        Returns:
            metadata whose `token_positions` is (1, N) and `plan` the step's `PrefillPlan`.
        """
        upload = upload or (lambda t: t.to(device) if device is not None else t)
        q_lens = np.asarray(query_lens, dtype=np.int64)
        seqlens = np.asarray(num_cached, dtype=np.int64) + q_lens
        cu = np.concatenate(([0], np.cumsum(q_lens)))
        rows = np.repeat(np.arange(len(q_lens)), q_lens)  # (N,) sequence of each token
        positions = np.arange(cu[-1]) - cu[rows] + (seqlens - q_lens)[rows]  # (N,)
        table = block_table.numpy()
        slots = table[rows, positions // page_size].astype(np.int64) * page_size + positions % page_size
        meta = cls(upload(block_table), upload(torch.from_numpy(seqlens.astype(np.int32))),
                   upload(torch.from_numpy(slots)), is_prefill=True, backend=backend,
                   cu_seqlens_q=upload(torch.from_numpy(cu.astype(np.int32))),
                   token_positions=upload(torch.from_numpy(positions)[None]))
        meta.plan = meta.backend.plan_prefill(cu.tolist(), seqlens.tolist())
        meta._host_table = table, upload
        return meta

    def split_decode_rows(self, num_decode: int, decode_plan: Any = None) -> None:
        """Make this prefill step a mixed one (`parts`): its first `num_decode` rows, one query
        token each, attend through the paged decode op with `decode_plan` (the backend's
        `plan` for their lengths), the rest as a prefill step of their own. The decode op reads
        only the cache, where the prefill op over a row of one query token would run a whole
        query tile for it; the latent families' prefill would also pick one form for every
        row, e.g. up-project each decode row's whole context. The step's cache write, RoPE
        positions and slots stay whole: `parts` only changes how the rows attend.

        Raises ValueError unless this is packed prefill metadata (`for_prefill`), 0 < num_decode
        < B and each of the first rows has one token.
        """
        plan = self.plan
        if not self.is_prefill or plan is None:
            raise ValueError("split_decode_rows needs a prefill step's metadata with its plan")
        if (self.token_positions is None or self.token_positions.shape[0] != 1
                or self.cu_seqlens_q is None):
            raise ValueError("split_decode_rows needs packed rows (1, N), as "
                             "AttentionMetadata.for_prefill makes them")
        nd, batch = num_decode, plan.batch
        if not 0 < nd < batch:
            raise ValueError(f"num_decode must be in [1, {batch - 1}] for a step of {batch} "
                             f"sequences, got {nd}")
        if any(n != 1 for n in plan.query_lens[:nd]):
            raise ValueError(f"decode rows take one query token each, got query lengths "
                             f"{list(plan.query_lens[:nd])} for the first {nd} rows")
        decode = AttentionMetadata(self.block_table[:nd], self.cache_seqlens[:nd],
                                   self.slot_mapping[:nd], plan=decode_plan, backend=self.backend,
                                   token_positions=self.token_positions[0, :nd, None])
        # The prompt rows' table and lengths copied rather than sliced: a view starting at row
        # nd is aligned to 16 bytes or not as nd goes, and Triton compiles its kernels again
        # for each alignment of a pointer argument. (Their offsets are a new tensor anyway.)
        cu = [0, *itertools.accumulate(plan.query_lens[nd:])]
        prompts = AttentionMetadata(self.block_table[nd:].clone(), self.cache_seqlens[nd:].clone(),
                                    self.slot_mapping[nd:], is_prefill=True, backend=self.backend,
                                    cu_seqlens_q=self.cu_seqlens_q[nd:] - nd,
                                    token_positions=self.token_positions[:, nd:],
                                    plan=self.backend.plan_prefill(cu, plan.seqlens[nd:]))
        if self._host_table is not None:
            host, upload = self._host_table
            prompts._host_table = host[nd:], upload
        self.parts = MixedParts(nd, decode, prompts)

    def context_pages(self, page_size: int) -> tuple[Tensor, Tensor]:
        """Prefill: every page holding a sequence's cached tokens, gathered into one list.

        Returns pages (n,) int64, the page ids of sequence 0's tokens, then sequence 1's, ...
        (block_table's device), and table (B, max_pages) int32, sequence b's pages as indices
        into `pages`: the block table of a cache whose page i holds what page pages[i] holds.
        Made once per step (the first layer to ask) from the plan's host lengths.
        """
        if page_size not in self._context:
            counts = np.array([-(-n // page_size) for n in self.plan.seqlens], dtype=np.int64)
            first = np.concatenate(([0], np.cumsum(counts)[:-1]))
            rows = np.repeat(np.arange(len(counts)), counts)
            cols = np.arange(counts.sum()) - first[rows]  # page index within its sequence
            table = np.zeros((len(counts), max(1, counts.max())), dtype=np.int32)
            table[rows, cols] = np.arange(counts.sum())
            if self._host_table is not None:  # the pages read on the host, one upload each
                host, upload = self._host_table
                pages = upload(torch.from_numpy(host[rows, cols].astype(np.int64)))
                self._context[page_size] = pages, upload(torch.from_numpy(table))
            else:
                device = self.block_table.device
                index = torch.from_numpy(np.stack((rows, cols))).to(device)
                pages = self.block_table[index[0], index[1]].long()
                self._context[page_size] = pages, torch.from_numpy(table).to(device)
        return self._context[page_size]


class MixedParts(NamedTuple):
    """A mixed step's halves (`AttentionMetadata.split_decode_rows`): its first `num_decode`
    rows as a decode step of one token each, the rest as a prefill step of their own."""

    num_decode: int
    decode: AttentionMetadata
    prompts: AttentionMetadata


@dataclass(frozen=True)
class PrefillForm:
    """One paged prefill-op call a family can make (`Attention.prefill_forms`), with its cost.

    name: what the family calls it ("paged"; latent families "absorbed" / "expanded").
    tied: the call is `prefill_tied` (queries q_nope, q_rope; caches state, RoPE key) rather
        than `prefill` (query q; caches K, V).
    heads, heads_kv: query heads and cached heads the call sees.
    d_qk: query / key width (tied: D_nope, the state's dims that serve as key). d_v: value
        width. d_rope: the shared RoPE key's width (tied only, else 0).
    softmax_scale: the family's scale.
    context_flops: FLOPs per cached context token to build the call's operands (the latent
        families' expanded form up-projects every context token to per-head keys and values).
    query_flops: FLOPs per query token around the call (the absorbed form folds W_UK into the
        query and W_UV into the output).
    split_values: (tied only) the values are a cache of their own, not the state: the call
        reads three caches, keys (H_kv, d_qk), the RoPE key (d_rope,), values (H_kv, d_v)
        (the latent families' expanded form).
    """

    name: str
    tied: bool
    heads: int
    heads_kv: int
    d_qk: int
    d_v: int
    d_rope: int
    softmax_scale: float
    context_flops: int = 0
    query_flops: int = 0
    split_values: bool = False

    @staticmethod
    def pairs(query_lens: Sequence[int], seqlens: Sequence[int]) -> int:
        """(query, key) pairs a causal varlen step attends (`PrefillPlan.pairs`)."""
        return plan_prefill([0, *itertools.accumulate(query_lens)], seqlens).pairs

    def attention_flops(self, query_lens: Sequence[int], seqlens: Sequence[int]) -> int:
        """FLOPs of the op itself: QK^T and PV over the visible pairs, every query head."""
        return self._attention_flops(self.pairs(query_lens, seqlens))

    def _attention_flops(self, pairs: int) -> int:
        return 2 * self.heads * pairs * (self.d_qk + self.d_rope + self.d_v)

    def flops(self, query_lens: Sequence[int], seqlens: Sequence[int]) -> int:
        """FLOPs of the step's attention in this form: the op, plus building its operands."""
        return self.step_flops(plan_prefill([0, *itertools.accumulate(query_lens)], seqlens))

    def step_flops(self, plan: PrefillPlan) -> int:
        """`flops` of a step's plan, from the counts the plan keeps (no pass over the batch:
        every latent layer of a step asks)."""
        return (self._attention_flops(plan.pairs) + self.context_flops * plan.total_k
                + self.query_flops * plan.total_q)

    def query_shapes(self, n_tokens: int) -> tuple[tuple[int, ...], ...]:
        """Shapes of the queries the call takes for N packed query tokens."""
        if self.tied:
            return (n_tokens, self.heads, self.d_qk), (n_tokens, self.heads, self.d_rope)
        return ((n_tokens, self.heads, self.d_qk),)

    def cache_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-token shapes of the paged caches the call reads."""
        if self.split_values:
            return (self.heads_kv, self.d_qk), (self.d_rope,), (self.heads_kv, self.d_v)
        if self.tied:
            return (self.heads_kv, self.d_v), (self.d_rope,)
        return (self.heads_kv, self.d_qk), (self.heads_kv, self.d_v)

    def run(self, backend: AttentionBackend, queries: tuple[Tensor, ...],
            caches: tuple[Tensor, ...], block_table: Tensor, cu_seqlens_q: Tensor,
            cache_seqlens: Tensor, *, plan: Any = None, cache_scale: float | None = None,
            return_lse: bool = False):
        """The call: queries and caches shaped as `query_shapes` / `cache_shapes`; returns
        what the backend's op returns (out (N, H_q, d_v) [, lse (H_q, N)])."""
        if len(caches) != len(self.cache_shapes()):
            raise ValueError(f"the {self.name} form reads {len(self.cache_shapes())} caches "
                             f"(per token {self.cache_shapes()}), got {len(caches)}")
        if self.tied:
            q_nope, q_rope = queries
            kv_cache, rope_cache, *values = caches
            split = dict(v_cache=values[0]) if self.split_values else {}
            return backend.prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                        cu_seqlens_q, cache_seqlens,
                                        softmax_scale=self.softmax_scale, plan=plan,
                                        kv_scale=cache_scale, return_lse=return_lse, **split)
        k_cache, v_cache = caches
        return backend.prefill(queries[0], k_cache, v_cache, block_table, cu_seqlens_q,
                               cache_seqlens, softmax_scale=self.softmax_scale, plan=plan,
                               k_scale=cache_scale, v_scale=cache_scale, return_lse=return_lse)
