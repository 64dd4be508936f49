"""`AttentionBackend`: the object a model runner chooses once and every layer calls.

A backend owns one implementation of the paged decode ops (docs/design.md §4) and the plan
of a step. Its public methods check their arguments (raising `ValueError` naming the argument,
before any kernel launches) and then call the `run_*` hooks a subclass implements:

    plan(cache_seqlens, num_heads_kv=, query_len=, page_size=, device=, out=)  -> plan or None
    decode(q, k_cache, v_cache, block_table, cache_seqlens, ...)      -> run_decode
    decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table, ...) -> run_decode_tied
    plan_prefill(cu_seqlens_q, cache_seqlens)                          -> PrefillPlan
    prefill(q, k_cache, v_cache, block_table, cu_seqlens_q, ...)      -> run_prefill
    prefill_tied(q_nope, q_rope, kv_cache, rope_cache, ...)           -> run_prefill_tied
    store_kv(cache, new, slot_mapping, ...)                            -> run_store_kv
    store_kvs(caches, news, slot_mapping, ...)                         -> run_store_kvs
    store_states(caches, news, slot_mapping, norm=, rope=, ...)        -> run_store_states

The checks themselves are in hwattn/ops/backends/checks.py.

Index tensors (block table, lengths, offsets, slots) are int tensors whose last dimension is
contiguous: the kernels read a table row, or the lengths, as one dense run.

Caches are paged as `(num_pages, page_size, *per-token shape)`, contiguous; `cache_dtype` and
`check_cache` say which cache a backend reads. A plan is computed once per step from host
lengths and reused by every layer; `plan(..., out=previous)` refreshes it in place so that a
captured CUDA graph replays with new lengths.

Prefill is the variable-length form of the same two shapes: the queries of B sequences packed
as rows (N, H_q, D), sequence b's being rows cu_seqlens_q[b]:cu_seqlens_q[b + 1], the last of
its cache_seqlens[b] cached tokens (causal, aligned bottom-right per sequence). Its plan is the
step's host lengths (`plan_prefill`), made once per step; without one, the call reads them.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from hwattn.ops import reference
from hwattn.ops.backends.checks import (_check_index, _check_kv, _check_prefill_plan, _check_scale,
                                        _check_softmax_scale, _check_states, _check_store,
                                        _check_table, _check_tied, _check_values,
                                        _run_prefill_tied_takes_values)
from hwattn.ops.plan import DecodePlan, PrefillPlan, plan_prefill
from hwattn.ops.reference import check_block_table

class AttentionBackend:
    """One implementation of the paged decode and prefill ops; see the module docstring.

    Class attributes a subclass sets: `name` (its registry name) and, for automatic choice,
    `priority` and `auto_select(device)` (see `hwattn.ops.backends.register_backend`).
    """

    name: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    # Substrings of the GPU kernel names its ops launch, by part of a step ("attention",
    # "cache_write"): how a profile of a step (hwattn/bench/engine.py) tells them apart.
    kernel_names: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Whether one launch of its prefill op serves a whole variable-length step (a kernel over
    # the packed sequences), rather than a loop over them as the PyTorch reference does.
    varlen_prefill: ClassVar[bool] = False
    # Whether its run_* hooks refuse page ids outside the cache themselves (the references of
    # hwattn/ops/reference.py do, on any device). For any other backend the checked entry
    # points refuse them when the block table is in host memory, where reading it costs no
    # synchronisation; a GPU table is not read, and its kernels trust it.
    checks_page_ids: ClassVar[bool] = False

    @classmethod
    def auto_select(cls, device: torch.device) -> bool:
        """Whether "auto" may choose this backend for tensors on `device` (cheap, no imports)."""
        return False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

    # The step plan.
    def plan(self, cache_seqlens: Tensor, *, num_heads_kv: int, query_len: int = 1,
             page_size: int, device=None, out: Any = None, reserve_pieces: bool = False) -> Any:
        """The schedule of one decode step, shared by every layer (None if none is needed).

        Args:
            cache_seqlens: (B,) int32 on the host, tokens cached per sequence once the step's
                `query_len` new ones are written; read here, once, so decode never has to.
            num_heads_kv: cached heads per layer on this rank.
            page_size: the cache's page size.
            device: where the decode kernels run (default: the lengths' device).
            out: a plan of the same batch size to refresh in place (CUDA graph replay).
            reserve_pieces: make room for split pieces even where these lengths need none
                (`hwattn.ops.plan_decode`): for a plan captured in a CUDA graph, whose later
                refreshes may need them.
        """
        return None

    def plan_parts(self, plan: Any) -> list[DecodePlan]:
        """The `DecodePlan`s a plan of this backend holds (their `packed` buffers are all
        the device memory it has; a refresh rewrites each), for a caller that moves them into
        memory of its own (`DecodePlan.rebind`) and uploads their `host` mirrors itself."""
        return [plan] if isinstance(plan, DecodePlan) and plan.packed is not None else []

    def check_plan(self, plan: Any, batch: int, capacity: int) -> bool:
        """Validate a plan handed to a decode call. Returns True if the plan vouches for the
        lengths (read on the host when it was made), so the call need not read them.

        The default accepts None and the split-KV `DecodePlan` of `hwattn.ops.plan_decode`.
        """
        if plan is None:
            return False
        if not isinstance(plan, DecodePlan) or plan.batch != batch:
            raise ValueError(f"plan must be a DecodePlan from plan_decode for B={batch}")
        if plan.max_seqlen > capacity:
            raise ValueError(f"block_table holds {capacity} slots, too short for the plan's "
                             f"longest sequence {plan.max_seqlen}")
        return True

    # The cache it reads.
    def cache_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the paged cache for a model computing in `dtype` (default: the same)."""
        return dtype

    def check_cache(self, page_size: int, dtype: torch.dtype) -> None:
        """Raise ValueError if this backend cannot read a cache of this page size and dtype."""
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")

    # Kernels a subclass implements; arguments arrive checked, scales resolved.
    def run_decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                   cache_seqlens: Tensor, *, softmax_scale: float, plan: Any,
                   k_scale: float | None, v_scale: float | None) -> tuple[Tensor, Tensor]:
        """Separate K/V paged attention -> (out (B, L_q, H_q, D), lse (B, H_q, L_q) fp32)."""
        raise NotImplementedError

    def run_decode_tied(self, q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor,
                        rope_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, *,
                        softmax_scale: float, plan: Any,
                        kv_scale: float | None) -> tuple[Tensor, Tensor]:
        """Tied-state paged attention -> (out (B, L_q, H_q, D_v), lse (B, H_q, L_q) fp32)."""
        raise NotImplementedError

    def run_prefill(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                    cu_seqlens_q: Tensor, cache_seqlens: Tensor, *, softmax_scale: float,
                    plan: PrefillPlan, k_scale: float | None,
                    v_scale: float | None) -> tuple[Tensor, Tensor]:
        """Variable-length separate K/V paged attention -> (out (N, H_q, D_v), lse (H_q, N) fp32)."""
        raise NotImplementedError(f"backend {self.name!r} has no prefill kernel")

    def run_prefill_tied(self, q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor,
                         rope_cache: Tensor, block_table: Tensor, cu_seqlens_q: Tensor,
                         cache_seqlens: Tensor, *, softmax_scale: float, plan: PrefillPlan,
                         kv_scale: float | None,
                         v_cache: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Variable-length tied-state paged attention -> (out (N, H_q, D_v), lse (H_q, N) fp32);
        with `v_cache`, its values in place of the state's."""
        raise NotImplementedError(f"backend {self.name!r} has no tied prefill kernel")

    def run_store_kv(self, cache: Tensor, new: Tensor, slot_mapping: Tensor, *,
                     scale: float | None) -> None:
        """Write `new` (N, *feat) into `cache` at `slot_mapping`; negative slots are skipped."""
        raise NotImplementedError

    def run_store_kvs(self, caches: tuple[Tensor, ...], news: tuple[Tensor, ...],
                      slot_mapping: Tensor, *, scale: float | None) -> None:
        """`run_store_kv` of each cache at the same slots; a backend may write several in one
        launch."""
        for cache, new in zip(caches, news):
            self.run_store_kv(cache, new, slot_mapping, scale=scale)

    def run_store_states(self, caches: tuple[Tensor, Tensor], news: tuple[Tensor, Tensor],
                         slot_mapping: Tensor, *, norm: tuple[Tensor, float] | None,
                         rope: tuple[Tensor, Tensor] | None, scale: float | None) -> None:
        """`run_store_kvs` of `finish_states_reference(news, norm, rope)`; a backend may
        finish and store them in one launch."""
        finished = reference.finish_states_reference(news, norm, rope)
        self.run_store_kvs(caches, finished, slot_mapping, scale=scale)

    # Checked entry points.
    def _check_paged(self, name_cache: str, cache: Tensor, block_table: Tensor,
                     cache_seqlens: Tensor, batch: int, query_len: int, device: torch.device,
                     plan: Any) -> None:
        capacity = _check_table(name_cache, cache, block_table, cache_seqlens, batch, device)
        vouches = self.check_plan(plan, batch, capacity)
        if plan is not None and cache_seqlens.device.type == "cpu":
            self._check_plan_lengths(plan, cache_seqlens)
        if vouches:
            # The plan read the lengths on the host already: no device read (CUDA graphs).
            self._check_host_pages(cache, block_table, cache_seqlens)
            return
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return  # reading the lengths would sync; pass a plan to have them checked
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < query_len:
            raise ValueError(f"cache_seqlens must be >= the query length {query_len} (the new "
                             f"tokens are counted), got min {lo}")
        if hi > capacity:
            raise ValueError(f"block_table has {block_table.shape[1]} pages of {cache.shape[1]} "
                             f"tokens = {capacity} slots, too short for cache_seqlens max {hi}")
        self._check_host_pages(cache, block_table, cache_seqlens)

    def _check_plan_lengths(self, plan: Any, cache_seqlens: Tensor) -> None:
        """For lengths in host memory (free to read): ValueError unless `plan` was made for
        exactly `cache_seqlens`. The kernels read the tokens of the plan's lengths: a plan for
        fewer tokens skips the sequence's last ones (a silently wrong output). One for more
        read table entries past its pages and slots past its length (a NaN there poisoned
        the output); the Triton and Hopper kernels now end each item at cache_seqlens.

        A `DecodePlan` in host memory remembers what it was found to match (`CheckedLengths`):
        the step's later layers, passing the very same lengths tensor to the plan, both
        unchanged, are not checked again (deriving the lengths cost about 15 µs a layer)."""
        checked = plan.checked if isinstance(plan, DecodePlan) and plan.items.is_cpu else None
        state = (cache_seqlens, plan.items, plan.splits) if checked is not None else ()
        if checked is not None and checked.holds(state):
            return
        planned = self.plan_lengths(plan)
        if planned is None:
            return
        planned = planned.cpu()
        differ = (planned != cache_seqlens).nonzero()
        if len(differ):
            b = int(differ[0])
            raise ValueError(f"plan was made for other lengths: sequence {b} was planned with "
                             f"{int(planned[b])} tokens, but cache_seqlens gives it "
                             f"{int(cache_seqlens[b])} (plan each step from its own lengths)")
        if checked is not None:
            checked.remember(state)

    def plan_lengths(self, plan: Any) -> Tensor | None:
        """The (B,) lengths a plan this backend vouches with (`check_plan`) was made for: the
        tokens of each sequence its kernels read (on the plan's device), or None if the plan
        does not record them. Read only where the call's lengths are in host memory."""
        return plan.planned_lengths() if isinstance(plan, DecodePlan) else None

    def _check_host_pages(self, cache: Tensor, block_table: Tensor, lengths) -> None:
        """`check_block_table` of a table in host memory, for a backend whose hooks do not
        check page ids (`checks_page_ids`); nothing for a GPU table (it would sync)."""
        if not self.checks_page_ids and block_table.device.type == "cpu":
            check_block_table(block_table, lengths, *cache.shape[:2])

    @torch.compiler.disable
    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
               cache_seqlens: Tensor, *, softmax_scale: float | None = None,
               return_lse: bool = False, plan: Any = None, k_scale: float | None = None,
               v_scale: float | None = None):
        """Paged attention with separate K and V caches (MHA / MQA / GQA).

        Args:
            q: (B, L_q, H_q, D) fp16/bf16 (fp32/fp64 where the backend takes them).
            k_cache, v_cache: (P, page_size, H_kv, D); H_q % H_kv == 0, head i reads KV head
                i // (H_q // H_kv). fp8 (e4m3) with `k_scale` / `v_scale` is accepted.
            block_table: (B, max_pages) int32. cache_seqlens: (B,) int32, counting the L_q new
                tokens. The first ceil(cache_seqlens[b] / page_size) entries of row b are
                read and must be page ids in [0, P); the rest are never read. An id outside
                is refused (ValueError) by the reference on any device and by every backend
                for a table in host memory; a GPU table is not checked (reading it would
                synchronise with the device) and a kernel reads where it points: build it
                from pages you own (the engine's `BlockManager` hands out only [1, P)).
            softmax_scale: any finite number, default 1/sqrt(D).
            plan: this backend's plan for the step (`plan(...)`), reused by every layer, made
                from these very lengths: its kernels read the tokens of the plan's pieces, each
                cut at cache_seqlens. A plan of other lengths is refused where cache_seqlens is
                in host memory (checked once per step: the plan remembers the tensor it
                matched, see `CheckedLengths`); a GPU call trusts it (comparing would read the
                lengths back).
        Returns:
            out (B, L_q, H_q, D) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
        """
        _check_kv(q, k_cache, v_cache, k_scale, v_scale, ("B", "L_q", "H_q"),
                  value_width=q.shape[-1])
        k_scale, v_scale = _check_scale("k_scale", k_scale), _check_scale("v_scale", v_scale)
        batch, query_len, _, head_dim = q.shape
        self._check_paged("k_cache", k_cache, block_table, cache_seqlens, batch, query_len,
                          q.device, plan)
        softmax_scale = _check_softmax_scale(softmax_scale)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        out, lse = self.run_decode(q, k_cache, v_cache, block_table, cache_seqlens,
                                   softmax_scale=scale, plan=plan, k_scale=k_scale,
                                   v_scale=v_scale)
        return (out, lse) if return_lse else out

    @torch.compiler.disable
    def decode_tied(self, q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                    block_table: Tensor, cache_seqlens: Tensor, *,
                    softmax_scale: float | None = None, return_lse: bool = False,
                    plan: Any = None, kv_scale: float | None = None):
        """Paged attention over one tied state per head plus one shared RoPE key (GTA, MLA,
        GLA): scores = (q_nope · S[..., :D_nope] + q_rope · R) · scale, out = P · S.

        Args:
            q_nope: (B, L_q, H_q, D_nope); q_rope: (B, L_q, H_q, D_R).
            kv_cache: (P, page_size, H_kv, D_v) with D_nope <= D_v; rope_cache: (P, page_size, D_R).
            block_table, cache_seqlens, plan: as for `decode`.
            softmax_scale: any finite number, default 1/sqrt(D_nope + D_R).
            kv_scale: dequantisation scale of an fp8 cache (both caches share it).
        Returns:
            out (B, L_q, H_q, D_v) in q's dtype, and lse (B, H_q, L_q) fp32 if `return_lse`.
        """
        _check_tied(q_nope, q_rope, kv_cache, rope_cache, kv_scale, ("B", "L_q", "H_q"))
        kv_scale = _check_scale("kv_scale", kv_scale)
        batch, query_len, n_heads, d_nope = q_nope.shape
        d_rope = q_rope.shape[3]
        self._check_paged("kv_cache", kv_cache, block_table, cache_seqlens, batch, query_len,
                          q_nope.device, plan)
        if q_rope.device != q_nope.device or rope_cache.device != q_nope.device:
            raise ValueError("q_rope and rope_cache must be on q_nope's device")
        softmax_scale = _check_softmax_scale(softmax_scale)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d_nope + d_rope)
        out, lse = self.run_decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                        cache_seqlens, softmax_scale=scale, plan=plan,
                                        kv_scale=kv_scale)
        return (out, lse) if return_lse else out

    # Prefill: variable-length queries per sequence.
    def plan_prefill(self, cu_seqlens_q, cache_seqlens) -> PrefillPlan:
        """The host lengths of a prefill step, read and checked once, for every layer's call.

        Args:
            cu_seqlens_q: (B + 1,) int32 query offsets (host tensor or list), from 0,
                non-decreasing. cache_seqlens: (B,) int32 tokens cached per sequence, this
                step's included (host tensor or list).
        """
        return plan_prefill(cu_seqlens_q, cache_seqlens)

    def _check_varlen(self, name_cache: str, cache: Tensor, block_table: Tensor,
                      cu_seqlens_q: Tensor, cache_seqlens: Tensor, n_tokens: int,
                      device: torch.device, plan: Any) -> PrefillPlan:
        """Check the varlen arguments; return the step's plan (made here when not given)."""
        if cu_seqlens_q.dim() != 1 or cu_seqlens_q.shape[0] < 2:
            raise ValueError(f"cu_seqlens_q must be (B + 1,) with B >= 1, got {tuple(cu_seqlens_q.shape)}")
        if cu_seqlens_q.dtype != torch.int32:
            raise ValueError(f"cu_seqlens_q must be int32, got {cu_seqlens_q.dtype}")
        batch = cu_seqlens_q.shape[0] - 1
        _check_index("cu_seqlens_q", cu_seqlens_q)
        if cu_seqlens_q.device != device:
            raise ValueError(f"cu_seqlens_q is on {cu_seqlens_q.device} but q is on {device}")
        capacity = _check_table(name_cache, cache, block_table, cache_seqlens, batch, device)
        given = plan is not None
        if not given:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise ValueError("plan: a prefill call inside a CUDA graph capture needs the "
                                 "step's plan (backend.plan_prefill), its lengths cannot be read")
            plan = self.plan_prefill(cu_seqlens_q.cpu(), cache_seqlens.cpu())
            if plan.total_q != n_tokens:
                raise ValueError(f"cu_seqlens_q must end at the {n_tokens} query rows, but its "
                                 f"sequences hold {plan.total_q}")
        elif not isinstance(plan, PrefillPlan):
            raise ValueError(f"plan must be a PrefillPlan from plan_prefill, got {type(plan).__name__}")
        plan.check(batch, n_tokens, capacity)
        if given and device.type == "cpu":
            # Lengths in host memory cost nothing to read: the plan must be theirs. (The
            # kernel reads them from the tensors and sizes its grid by the plan: a plan of
            # other lengths left query rows unwritten or read pages no check had seen.) Once
            # per step: the later layers pass the same tensors, unchanged (`CheckedLengths`).
            lengths = (cu_seqlens_q, cache_seqlens)
            if not plan.checked.holds(lengths):
                _check_prefill_plan(plan, plan_prefill(cu_seqlens_q, cache_seqlens))
                plan.checked.remember(lengths)
        # A sequence without queries this step reads none of its pages.
        self._check_host_pages(cache, block_table, [n if q else 0 for n, q in
                                                    zip(plan.seqlens, plan.query_lens)])
        return plan

    @torch.compiler.disable
    def prefill(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                cu_seqlens_q: Tensor, cache_seqlens: Tensor, *,
                softmax_scale: float | None = None, return_lse: bool = False, plan: Any = None,
                k_scale: float | None = None, v_scale: float | None = None):
        """Variable-length causal paged attention with separate K and V caches (MHA / MQA /
        GQA prefill; keys may be wider than values).

        Args:
            q: (N, H_q, D_qk), the queries of B sequences packed as rows: sequence b's are rows
                cu_seqlens_q[b]:cu_seqlens_q[b + 1], its last tokens (already in the cache).
            k_cache: (P, page_size, H_kv, D_qk); v_cache: (P, page_size, H_kv, D_v), the value
                width may differ from the key's. H_q % H_kv == 0, head i reads KV head
                i // (H_q // H_kv). fp8 (e4m3) with `k_scale` / `v_scale` is accepted.
            block_table: (B, max_pages) int32, its page ids checked as for `decode` (a
                sequence without queries reads none). cu_seqlens_q: (B + 1,) int32, from 0,
                non-decreasing, ending at N (a sequence may have no queries).
            cache_seqlens: (B,) int32, tokens cached per sequence counting its queries; query j
                of a sequence of n queries sees cache positions < cache_seqlens[b] - n + j + 1.
            softmax_scale: any finite number, default 1/sqrt(D_qk).
            plan: the step's `plan_prefill(...)`, shared by every layer; without it the lengths
                are read back from the device (a synchronisation). It must be the plan of
                these very tensors: refused otherwise where they are in host memory, trusted
                on the GPU (the kernel sizes its grid by it and reads the lengths itself).
        Returns:
            out (N, H_q, D_v) in q's dtype, and lse (H_q, N) fp32 if `return_lse`.
        """
        _check_kv(q, k_cache, v_cache, k_scale, v_scale, ("N", "H_q"), value_width=None)
        k_scale, v_scale = _check_scale("k_scale", k_scale), _check_scale("v_scale", v_scale)
        n_tokens, _, d_qk = q.shape
        plan = self._check_varlen("k_cache", k_cache, block_table, cu_seqlens_q, cache_seqlens,
                                  n_tokens, q.device, plan)
        softmax_scale = _check_softmax_scale(softmax_scale)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d_qk)
        out, lse = self.run_prefill(q, k_cache, v_cache, block_table, cu_seqlens_q,
                                    cache_seqlens, softmax_scale=scale, plan=plan,
                                    k_scale=k_scale, v_scale=v_scale)
        return (out, lse) if return_lse else out

    @torch.compiler.disable
    def prefill_tied(self, q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                     block_table: Tensor, cu_seqlens_q: Tensor, cache_seqlens: Tensor, *,
                     softmax_scale: float | None = None, return_lse: bool = False,
                     plan: Any = None, kv_scale: float | None = None,
                     v_cache: Tensor | None = None):
        """Variable-length causal paged attention over one tied state per head plus one shared
        RoPE key (GTA; MLA / GLA absorbed): scores = (q_nope · S[..., :D_nope] + q_rope · R)
        · scale, out = P · S; or, with `v_cache`, out = P · V (MLA / GLA expanded: per-head
        keys W_UK c beside the shared RoPE key, values W_UV c).

        Args:
            q_nope: (N, H_q, D_nope); q_rope: (N, H_q, D_R), packed as for `prefill`.
            kv_cache: (P, page_size, H_kv, D_v) with D_nope <= D_v (with `v_cache`: any width
                >= D_nope); rope_cache: (P, page_size, D_R).
            block_table, cu_seqlens_q, cache_seqlens, plan: as for `prefill`.
            softmax_scale: any finite number, default 1/sqrt(D_nope + D_R).
            kv_scale: dequantisation scale of an fp8 cache (every cache shares it).
            v_cache: (P, page_size, H_kv, D_v), values on the pages and heads of kv_cache,
                of its dtype; None: the state is the value.
        Returns:
            out (N, H_q, D_v) in q's dtype, and lse (H_q, N) fp32 if `return_lse`.
        """
        _check_tied(q_nope, q_rope, kv_cache, rope_cache, kv_scale, ("N", "H_q"))
        if v_cache is not None:
            _check_values(v_cache, kv_cache)
        kv_scale = _check_scale("kv_scale", kv_scale)
        n_tokens, n_heads, d_nope = q_nope.shape
        d_rope = q_rope.shape[2]
        if q_rope.device != q_nope.device or rope_cache.device != q_nope.device:
            raise ValueError("q_rope and rope_cache must be on q_nope's device")
        plan = self._check_varlen("kv_cache", kv_cache, block_table, cu_seqlens_q, cache_seqlens,
                                  n_tokens, q_nope.device, plan)
        softmax_scale = _check_softmax_scale(softmax_scale)
        scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d_nope + d_rope)
        if v_cache is None:
            out, lse = self.run_prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                             cu_seqlens_q, cache_seqlens, softmax_scale=scale,
                                             plan=plan, kv_scale=kv_scale)
        elif self._takes_split_values():
            out, lse = self.run_prefill_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                             cu_seqlens_q, cache_seqlens, softmax_scale=scale,
                                             plan=plan, kv_scale=kv_scale, v_cache=v_cache)
        else:  # a backend from before v_cache: its separate-K/V prefill over [K_nope, R] per head
            keys = torch.cat((kv_cache[..., :d_nope], rope_cache[:, :, None, :].expand(
                -1, -1, kv_cache.shape[2], -1)), -1)  # (P, page_size, H_kv, D_nope + D_R)
            out, lse = self.run_prefill(torch.cat((q_nope, q_rope), -1), keys, v_cache,
                                        block_table, cu_seqlens_q, cache_seqlens,
                                        softmax_scale=scale, plan=plan, k_scale=kv_scale,
                                        v_scale=kv_scale)
        return (out, lse) if return_lse else out

    def _takes_split_values(self) -> bool:
        """Whether `run_prefill_tied` takes `v_cache` (a backend registered from outside may
        predate it; it is then given keys and values through `run_prefill`)."""
        return _run_prefill_tied_takes_values(type(self).run_prefill_tied)

    @torch.compiler.disable
    def store_kv(self, cache: Tensor, new: Tensor, slot_mapping: Tensor, *,
                 scale: float | None = None) -> None:
        """Write new tokens into a paged cache in place.

        Args:
            cache: (P, page_size, *feat). new: (N, *feat). slot_mapping: (N,) int, flat slot
                page * page_size + offset per token; negative entries are skipped (padding).
                A slot past the cache is an error where it can be seen without a device read
                (the reference); a kernel that cannot raise skips it, never writing past the cache.
            scale: quantisation scale for an fp8 cache (stored = value / scale), positive.
        """
        _check_store(cache, new, slot_mapping)
        scale = _check_scale("scale", scale)
        self.run_store_kv(cache, new, slot_mapping, scale=scale)

    @torch.compiler.disable
    def store_kvs(self, caches: tuple[Tensor, ...], news: tuple[Tensor, ...],
                  slot_mapping: Tensor, *, scale: float | None = None) -> None:
        """`store_kv` of a layer's caches (K and V, or latent and RoPE key) at the same
        slots: caches[i] (P, page_size, *feat_i), news[i] (N, *feat_i). The Triton backend
        writes two caches of one dtype in one launch."""
        if len(caches) != len(news):
            raise ValueError(f"store_kvs takes a tensor of new tokens per cache, got "
                             f"{len(caches)} caches and {len(news)} tensors")
        for cache, new in zip(caches, news):
            _check_store(cache, new, slot_mapping)
        scale = _check_scale("scale", scale)
        self.run_store_kvs(tuple(caches), tuple(news), slot_mapping, scale=scale)

    @torch.compiler.disable
    def store_states(self, caches: tuple[Tensor, Tensor], news: tuple[Tensor, Tensor],
                     slot_mapping: Tensor, *, norm: tuple[Tensor, float] | None = None,
                     rope: tuple[Tensor, Tensor] | None = None,
                     scale: float | None = None) -> None:
        """`store_kvs` of a layer's two states as its input projection left them, finished on
        the way (`reference.finish_states_reference`): the first RMSNorm'd per head, the
        second rotated. A decode step's cache write of the latent layers (MLA, GLA: the
        normalised latents and the RoPE key) and GTA (its tied state as it is, the RoPE key):
        the Triton backend does it in one launch, where the layer would otherwise launch the
        norm, the rotation and the store.

        Args:
            caches: (P, page_size, heads, d) and (P, page_size, d_R).
            news: (N, heads, d) and (N, d_R), the projection's output rows (views are taken).
            norm: (weight (heads, d), eps) or None (the first state stored as it is).
            rope: (cos, sin), each (N, d_R / 2) floating point (the model's tables are
                float32), or None (the second as it is).
            scale: as `store_kv`'s.
        """
        _check_states(caches, news, slot_mapping, norm, rope)
        scale = _check_scale("scale", scale)
        self.run_store_states(tuple(caches), tuple(news), slot_mapping, norm=norm, rope=rope,
                              scale=scale)
