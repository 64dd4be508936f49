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

import functools
import inspect
import math
import numbers
from typing import Any, ClassVar

import torch
from torch import Tensor

from hwattn.ops import reference
from hwattn.ops.plan import DecodePlan, PrefillPlan, plan_prefill
from hwattn.ops.reference import check_block_table

FP8_DTYPES = (torch.float8_e4m3fn,)


def _check_index(name: str, t: Tensor) -> None:
    """The kernels read an index tensor (block table row, lengths, offsets, slots) as a dense
    run of its last dimension (of a table only the row stride is passed): ValueError unless
    that dimension has unit stride. Host metadata only, no device read; called with tensors of
    at least one dimension."""
    if not t.is_contiguous() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides "
                         f"{t.stride()} for shape {tuple(t.shape)}")


def _check_scale(name: str, scale) -> float | None:
    """ValueError unless a dequantisation scale is None or a positive finite number (the
    kernels fold it into the softmax scale and the output; zero, NaN or inf cannot be);
    returned as a Python float (a NumPy float32 is no scalar a Triton launch takes)."""
    if scale is None:
        return None
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"{name} must be a positive finite number, got {scale!r}")
    return float(scale)


def _check_softmax_scale(scale) -> float | None:
    """ValueError unless `softmax_scale` is None or a finite real number (zero and negative
    scales are well defined and allowed); returned as a Python float (a NumPy float32 is no
    scalar a Triton launch takes). A NaN or inf scale made every output NaN; a tensor reached
    the Triton kernels as a pointer (an opaque compile error there) and would need a device
    read on the GPU."""
    if scale is None:
        return None
    if not (isinstance(scale, numbers.Real) and math.isfinite(scale)):
        raise ValueError(f"softmax_scale must be a finite number (or None for 1/sqrt(D)), "
                         f"got {scale!r}")
    return float(scale)


def _check_nonempty(name: str, t: Tensor, dims: tuple[str, ...], may_be_empty: str = "") -> None:
    """ValueError naming the dimension unless each leading dimension of `t` named in `dims`,
    but `may_be_empty`, holds at least one element."""
    empty = [d for d, size in zip(dims, t.shape) if size == 0 and d != may_be_empty]
    if empty:
        raise ValueError(f"{name} must not be empty: its {', '.join(empty)} dimension is 0 "
                         f"(shape {tuple(t.shape)})")


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"{name} must be fp16, bf16, fp32 or fp64, got {t.dtype}")


def _check_cache_dtype(name: str, cache: Tensor, q: Tensor, scale) -> None:
    fp8 = cache.dtype in FP8_DTYPES
    if fp8 and scale is None:
        raise ValueError(f"{name} is fp8: pass its dequantisation scale")
    if not fp8 and cache.dtype != q.dtype:
        raise ValueError(f"{name} dtype {cache.dtype} must match the query dtype {q.dtype} "
                         "(or be float8_e4m3fn with a scale)")


def _check_table(name_cache: str, cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                 batch: int, device: torch.device) -> int:
    """The block table and lengths checks of every paged op; returns the table's capacity in
    tokens (pages per row x page size)."""
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be (B={batch}, max_pages), got {tuple(block_table.shape)}")
    if block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32, got {block_table.dtype}")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be (B={batch},), got {tuple(cache_seqlens.shape)}")
    if cache_seqlens.dtype != torch.int32:
        raise ValueError(f"cache_seqlens must be int32, got {cache_seqlens.dtype}")
    _check_index("block_table", block_table)
    _check_index("cache_seqlens", cache_seqlens)
    for name, t in (("block_table", block_table), ("cache_seqlens", cache_seqlens), (name_cache, cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but q is on {device}")
    if cache.shape[1] <= 0:
        raise ValueError(f"{name_cache} page size must be positive, got {cache.shape[1]}")
    return block_table.shape[1] * cache.shape[1]


def _check_kv(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_scale, v_scale,
              lead: tuple[str, ...], value_width: int | None) -> None:
    """The operand checks `decode` and `prefill` share; `lead` names the query dimensions
    before the head width. value_width: the value width the op needs (decode: the key's),
    None where any width goes (prefill, whose keys may be wider than its values)."""
    if q.dim() != len(lead) + 1:
        raise ValueError(f"q must be ({', '.join(lead)}, D), got shape {tuple(q.shape)}")
    _check_float("q", q)
    if 0 in q.shape:  # a prefill step may have no queries (N = 0)
        _check_nonempty("q", q, (*lead, "D"), may_be_empty="N")
    n_heads, head_dim = q.shape[-2:]
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(f"{name} must be (P, page_size, H_kv, D), got {tuple(cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q's {head_dim}")
    if value_width is not None and v_cache.shape[3] != value_width:
        raise ValueError(f"v_cache head dim {v_cache.shape[3]} must equal q's {value_width}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} must match k_cache "
                         f"{tuple(k_cache.shape)} in pages, page size and heads")
    _check_cache_dtype("k_cache", k_cache, q, k_scale)
    _check_cache_dtype("v_cache", v_cache, q, v_scale)
    _check_scale("k_scale", k_scale)
    _check_scale("v_scale", v_scale)
    n_kv = k_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"k_cache has {n_kv} heads, which must divide q's {n_heads} heads")
    if v_cache.device != q.device:
        raise ValueError(f"v_cache is on {v_cache.device} but q is on {q.device}")


def _check_tied(q_nope: Tensor, q_rope: Tensor, kv_cache: Tensor, rope_cache: Tensor,
                kv_scale, lead: tuple[str, ...]) -> None:
    """The operand checks `decode_tied` and `prefill_tied` share; `lead` names the query
    dimensions before the head width (("B", "L_q", "H_q") for decode, ("N", "H_q") for prefill)."""
    dims, names, lead = len(lead) + 1, lead, ", ".join(lead)
    if q_nope.dim() != dims:
        raise ValueError(f"q_nope must be ({lead}, D_nope), got {tuple(q_nope.shape)}")
    _check_float("q_nope", q_nope)
    if 0 in q_nope.shape:
        _check_nonempty("q_nope", q_nope, names, may_be_empty="N")
    d_nope, n_heads = q_nope.shape[-1], q_nope.shape[-2]
    if q_rope.dim() != dims or q_rope.shape[:-1] != q_nope.shape[:-1]:
        raise ValueError(f"q_rope must be ({lead}, D_R) matching q_nope {tuple(q_nope.shape[:-1])}, "
                         f"got {tuple(q_rope.shape)}")
    if q_rope.dtype != q_nope.dtype:
        raise ValueError(f"q_rope dtype {q_rope.dtype} must match q_nope's {q_nope.dtype}")
    d_rope = q_rope.shape[-1]
    if d_nope + d_rope == 0:  # no key at all (and the default scale 1/sqrt(0))
        raise ValueError(f"q_nope and q_rope must not both be empty: D_nope + D_R is 0 "
                         f"(shapes {tuple(q_nope.shape)}, {tuple(q_rope.shape)})")
    if kv_cache.dim() != 4:
        raise ValueError(f"kv_cache must be (P, page_size, H_kv, D_v), got {tuple(kv_cache.shape)}")
    if kv_cache.shape[3] < d_nope:
        raise ValueError(f"kv_cache width {kv_cache.shape[3]} must be >= q_nope's D_nope {d_nope}")
    if rope_cache.dim() != 3 or rope_cache.shape[:2] != kv_cache.shape[:2] or rope_cache.shape[2] != d_rope:
        raise ValueError(f"rope_cache must be (P, page_size, D_R) = {(*kv_cache.shape[:2], d_rope)}, "
                         f"got {tuple(rope_cache.shape)}")
    _check_cache_dtype("kv_cache", kv_cache, q_nope, kv_scale)
    _check_cache_dtype("rope_cache", rope_cache, q_nope, kv_scale)
    _check_scale("kv_scale", kv_scale)
    n_kv = kv_cache.shape[2]
    if n_kv <= 0 or n_heads % n_kv:
        raise ValueError(f"kv_cache has {n_kv} heads, which must divide q_nope's {n_heads} heads")


def takes_keyword(fn, name: str, unreadable: bool = True) -> bool:
    """Whether a callable takes the keyword `name` (or any keyword): a backend registered from
    outside may predate a keyword its hooks now take. `unreadable`: the answer for a callable
    whose signature cannot be read."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return unreadable
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=None)
def _run_prefill_tied_takes_values(fn) -> bool:
    """`takes_keyword(fn, "v_cache")`, once per function (every latent layer of a step asks)."""
    return takes_keyword(fn, "v_cache")


def _check_values(v_cache: Tensor, kv_cache: Tensor) -> None:
    """ValueError naming `v_cache` unless it is a value cache on kv_cache's pages and heads:
    (P, page_size, H_kv, D_v), its dtype and device."""
    if not isinstance(v_cache, Tensor):
        raise ValueError(f"v_cache must be a tensor or None, got {type(v_cache).__name__}")
    if v_cache.dim() != 4 or v_cache.shape[:3] != kv_cache.shape[:3] or v_cache.shape[3] == 0:
        raise ValueError(f"v_cache must be (P, page_size, H_kv, D_v) = "
                         f"({', '.join(map(str, kv_cache.shape[:3]))}, D_v > 0) as kv_cache, "
                         f"got {tuple(v_cache.shape)}")
    if v_cache.dtype != kv_cache.dtype:
        raise ValueError(f"v_cache dtype {v_cache.dtype} must match kv_cache's {kv_cache.dtype}")
    if v_cache.device != kv_cache.device:
        raise ValueError(f"v_cache is on {v_cache.device} but kv_cache is on {kv_cache.device}")


def _check_store(cache: Tensor, new: Tensor, slot_mapping: Tensor) -> None:
    """ValueError naming the argument unless `new` (N, *feat) fits `cache` (P, page, *feat)
    and `slot_mapping` is (N,) int32/int64 on the cache's device."""
    if cache.dim() < 2:
        raise ValueError(f"cache must be paged as (P, page_size, *feat), got {tuple(cache.shape)}")
    if new.shape[1:] != cache.shape[2:]:
        raise ValueError(f"new tokens {tuple(new.shape)} do not fit cache {tuple(cache.shape)}: "
                         f"expected (N, {', '.join(map(str, cache.shape[2:]))})")
    if slot_mapping.shape != (new.shape[0],):
        raise ValueError(f"slot_mapping must be (N={new.shape[0]},), got {tuple(slot_mapping.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}")
    _check_index("slot_mapping", slot_mapping)
    for name, t in (("new", new), ("slot_mapping", slot_mapping)):
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but cache is on {cache.device}")


def _check_prefill_plan(plan: PrefillPlan, actual: PrefillPlan) -> None:
    """ValueError naming the first sequence whose planned query or cache length differs from
    the call's (`actual`, the plan of its cu_seqlens_q and cache_seqlens)."""
    if plan == actual:
        return
    if plan.batch != actual.batch:
        raise ValueError(f"plan was made for B={plan.batch}, not B={actual.batch}")
    b = next(b for b in range(plan.batch) if (plan.query_lens[b], plan.seqlens[b])
             != (actual.query_lens[b], actual.seqlens[b]))
    raise ValueError(f"plan was made for other lengths: sequence {b} was planned with "
                     f"{plan.query_lens[b]} queries over {plan.seqlens[b]} tokens, but "
                     f"cu_seqlens_q and cache_seqlens give it {actual.query_lens[b]} over "
                     f"{actual.seqlens[b]} (plan each step from its own lengths)")


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
        if len(caches) != 2 or len(news) != 2:
            raise ValueError(f"store_states takes two caches and two tensors of new tokens, got "
                             f"{len(caches)} and {len(news)}")
        for cache, new in zip(caches, news):
            _check_store(cache, new, slot_mapping)
        if news[0].dim() != 3 or news[1].dim() != 2:
            raise ValueError(f"store_states takes news (N, heads, d) and (N, d_R), got "
                             f"{tuple(news[0].shape)} and {tuple(news[1].shape)}")
        if norm is not None:
            weight, eps = norm
            if weight.shape != news[0].shape[1:]:
                raise ValueError(f"norm weight must be (heads, d) = {tuple(news[0].shape[1:])}, "
                                 f"got {tuple(weight.shape)}")
            if weight.device != news[0].device:
                raise ValueError(f"norm weight is on {weight.device} but news are on "
                                 f"{news[0].device}")
            if not eps >= 0:
                raise ValueError(f"norm eps must be >= 0, got {eps}")
        if rope is not None:
            half = (news[1].shape[0], news[1].shape[1] // 2)
            for name, t in zip(("cos", "sin"), rope):
                if news[1].shape[1] % 2 or t.shape != half:
                    raise ValueError(f"rope {name} must be (N, d_R / 2) = {half} for an even "
                                     f"d_R, got {tuple(t.shape)}")
                if not t.is_floating_point() or t.device != news[1].device:
                    raise ValueError(f"rope {name} must be floating point on {news[1].device}, "
                                     f"got {t.dtype} on {t.device}")
        scale = _check_scale("scale", scale)
        self.run_store_states(tuple(caches), tuple(news), slot_mapping, norm=norm, rope=rope,
                              scale=scale)
