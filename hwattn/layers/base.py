"""What every attention family shares: the forward flow over a paged KV cache and the cost
accounting (KV bytes, decode bytes, FLOPs). The metadata that drives a step
(`AttentionMetadata`) and the prefill-op calls (`PrefillForm`) are in hwattn/layers/metadata.py.

A family implements these hooks:

    project(x, cos, sin) -> (q_parts, states)   query pieces and the per-token cached states
                                                 (`finish=False` as well where the family sets
                                                 `finishes_states_in_store`; `state_norm`)
    attend(q_parts, states) -> (B, T, H, d_h)   dense causal attention over states (training,
                                                 whole prompts); keys may outnumber queries
    decode(q_parts, cache, meta) -> (B, T, H, d_h)  attention through `meta.backend`
    prefill(q_parts, cache, meta) -> (N, H, d_h)    varlen attention through `meta.backend`
    prefill_forms() -> (PrefillForm, ...)       the paged prefill-op calls it can make
    cache_layout(tp) -> {name: per-token shape}  what is cached per token on one rank
    decode_widths() -> (d_qk, d_v)              widths the decode kernel multiplies by
    attend_widths() -> (d_qk, d_v)              widths the dense path multiplies by (FLOPs)
    decode_query_shapes(B, L_q, tp) -> shapes   the queries its decode kernel takes
    kernel_call(backend, queries, cache, ...)   the one paged decode-op call `decode` makes
    kernel_operands(queries, caches) -> q, k, v  that call written as dense attention
    shard_heads(q_heads, c_heads) -> fields     keep one tensor-parallel rank's heads

and `forward` ties them together: without metadata it is the training path; with metadata it
writes this step's states into the cache through `slot_mapping`, then attends: a prefill
step (every sequence's tokens packed as rows, `cu_seqlens_q` saying whose they are) densely
through `attend` when it holds only whole prompts, else through the paged prefill op; a
decode step through the paged decode op; a mixed step's decode rows through the decode op and
its prompt rows as a prefill step (`AttentionMetadata.parts`). The decode-op hooks and `prefill_forms` let
benchmarks and tensor parallelism treat every family alike; the layer never sees which backend
runs its kernels. A family without a paged prefill keeps the default `prefill`: dense
attention (`attend`) over each sequence's cache gathered into a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwattn.config import SDPA_CHOICES, ModelConfig
from hwattn.layers.metadata import AttentionMetadata, MixedParts, PrefillForm
from hwattn.ops import AttentionBackend
from hwattn.ops.linear import linear
from hwattn.ops.reference import gather_cache
from hwattn.switches import env_choice


# Which SDPA kernels dense attention may use (`sdpa_choice`, TrainConfig.sdpa):
# - "auto": PyTorch's own choice, FlashAttention-2 on a GPU. It needs one width for queries,
#   keys and values, so widths that differ (MLA and GLA: d_h + d_R-wide keys, d_h-wide values)
#   are zero-padded to one: P·V then runs at the keys' width, e.g. 96 columns for 64 at the
#   `study` scale, 3.6% of MLA's and GLA's training FLOPs there spent on zeros
#   (docs/quality_study.md).
# - "cudnn": cuDNN's fused attention first, with the widths as they are (PyTorch's cuDNN
#   backend takes differing widths), then FlashAttention, memory-efficient and math kernels.
# (SDPA_CHOICES lives in hwattn.config, which the command line reads without importing torch.)
_sdpa_native_widths = False  # read while tracing, so a compiled block keeps the choice it saw


@contextmanager
def sdpa_choice(name: str) -> Iterator[None]:
    """Inside the block dense attention (`causal_attention`) picks its SDPA kernels as `name`
    says (see SDPA_CHOICES). A compiled model should be compiled inside the block."""
    global _sdpa_native_widths
    if name not in SDPA_CHOICES:
        raise ValueError(f"sdpa must be one of {SDPA_CHOICES}, got {name!r}")
    if name == "auto":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    before = _sdpa_native_widths
    _sdpa_native_widths = True
    try:
        with sdpa_kernel(order, set_priority=True):
            yield
    finally:
        _sdpa_native_widths = before


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal SDPA with the mask aligned bottom-right (queries are the last T of L keys).

    q (B, T, H, E); k (B, L, H_kv, E); v (B, L, H_kv, E_v) -> (B, T, H, E_v).
    Widths that differ are zero-padded, which leaves scores and outputs unchanged, except
    inside `sdpa_choice("cudnn")`, whose first kernel takes them as they are.
    """
    n_q, n_k = q.shape[1], k.shape[1]
    e, e_v = q.shape[-1], v.shape[-1]
    if e_v < e and not _sdpa_native_widths:
        v = F.pad(v, (0, e - e_v))
    elif e_v > e and not _sdpa_native_widths:
        q, k = F.pad(q, (0, e_v - e)), F.pad(k, (0, e_v - e))
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, E)
    gqa = kt.shape[1] != qt.shape[1]
    if n_q == n_k:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        rows = torch.arange(n_q, device=q.device)[:, None]
        cols = torch.arange(n_k, device=q.device)[None, :]
        mask = cols <= rows + (n_k - n_q)  # (T, L)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)[..., :e_v]  # (B, T, H, E_v)


# Whole prompts of unequal lengths are attended one by one, densely (SDPA: FlashAttention on a
# GPU, one call per prompt and layer), or all in one call of the paged prefill op. The loop is
# kept while the prompts average this many tokens or more: calls that long are compute-bound,
# where FlashAttention led our kernel on 8K prompts (75% against 49% of the matmul peak on an
# H200). Measured on an H200 (docs/results/engine.md, `xl`, one step of whole prompts): the op
# was faster at a mean of 512 tokens (by 6-10% for GQA-4/GTA-4, 31% for GLA-2/MLA) and level
# with it at 2048 (the op ahead by 1-2%), so the crossover is set there.
DENSE_LOOP_MIN_MEAN_LEN = 2048

# Which families' decode steps finish their cached states in the cache write
# (`Attention.finishes_states_in_store`; HWATTN_FUSED_STATE_STORE): "auto" (the default), those
# whose step it made faster (`Attention.store_fusion_pays`: MLA and GLA); "1", every family
# that can (GTA too); "0", none. Measured on an H100 (docs/results/engine.md, run 19, `xl`
# B = 64, compiled, captured): the queued forward of GLA-2 2.4% / 0.9% faster at 1K / 8K and of
# MLA 1.8% / 0.6% (two kernels fewer a layer), of GTA-4 1.8% / 0.6% slower (its kernel list
# showed no kernel fewer).
FUSED_STATE_STORE_CHOICES = ("auto", "1", "0")
FUSED_STATE_STORE = env_choice("HWATTN_FUSED_STATE_STORE", FUSED_STATE_STORE_CHOICES, "auto")


class Attention(nn.Module):
    """Base class of the attention families; see the module docstring for the hooks."""

    # The linear layers a family applies to the block input, in the order `in_proj` returns
    # their outputs; `fuse_projections` makes them one matrix product for inference.
    input_projections: tuple[str, ...] = ()

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.rope_dim = config.rope_dim
        self._fused_in: FusedLinear | None = None

    def in_proj(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (B, T, D) through each layer of `input_projections`: (B, T, out_i) each; one
        matrix product over the concatenated weights once `fuse_projections` ran."""
        if self._fused_in is None:
            return tuple(getattr(self, name)(x) for name in self.input_projections)
        return self._fused_in(x)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Concatenate the weights of `input_projections` into one matrix that `in_proj`
        multiplies once (fewer, larger GEMMs: a decode step reads the same bytes in fewer
        launches). Each layer's weight becomes a view of its rows, so nothing is stored twice
        and the state dict is unchanged. For inference, once the model is on its device and
        sharded: replacing a weight afterwards (`set_weight`) needs `fuse_projections` again."""
        self._fused_in = fuse_linears([getattr(self, n) for n in self.input_projections])

    # Hooks each family implements.
    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """x (B, T, D), cos / sin (B or 1, T, d_R / 2) -> (query parts, states): each query
        part (B, T, H, width), RoPE applied; each state (B, T, *per-token shape of the
        matching `cache_layout` entry), in that order."""
        raise NotImplementedError

    def attend(self, q: tuple[Tensor, ...], states: tuple[Tensor, ...]) -> Tensor:
        """Dense causal attention of query parts (B, T, H, ...) over states (B, L, ...),
        L >= T, the queries being the last T positions -> (B, T, H, d_h)."""
        raise NotImplementedError

    def decode(self, q: tuple[Tensor, ...], cache: tuple[Tensor, ...], meta: AttentionMetadata) -> Tensor:
        """Query parts (B, T, H, ...) over the paged cache through `meta.backend`'s decode op,
        this step's states already written -> (B, T, H, d_h)."""
        raise NotImplementedError

    def cache_layout(self, tp: int = 1) -> dict[str, tuple[int, ...]]:
        """Per-token shape of each cache tensor on one rank of a `tp`-way split, in the order
        `project` returns the states."""
        raise NotImplementedError

    def decode_widths(self) -> tuple[int, int]:
        """(d_qk, d_v) per query head of the decode op: what its FLOPs multiply by."""
        raise NotImplementedError

    def attend_widths(self) -> tuple[int, int]:
        """(d_qk, d_v) of the dense path, per query head; default d_h for both."""
        return self.head_dim, self.head_dim

    def decode_query_shapes(self, batch: int, query_len: int,
                            tp: int = 1) -> tuple[tuple[int, ...], ...]:
        """Shapes of the queries `kernel_call` takes, on one rank of a `tp`-way split."""
        raise NotImplementedError(f"{type(self).__name__} does not say what its decode kernel "
                                  "takes (decode_query_shapes): benchmarks cannot call it")

    def kernel_call(self, backend: AttentionBackend, queries: tuple[Tensor, ...],
                    cache: tuple[Tensor, ...], block_table: Tensor, cache_seqlens: Tensor, *,
                    plan: Any = None, cache_scale: float | None = None, return_lse: bool = False):
        """The paged decode-op call `decode` makes, on kernel-ready queries (shapes from
        `decode_query_shapes`) and this layer's cache tensors; `cache_scale` dequantises an
        fp8 cache. Returns what the backend's op returns."""
        raise NotImplementedError(f"{type(self).__name__} does not implement kernel_call")

    def kernel_operands(self, queries: tuple[Tensor, ...],
                        caches: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """`kernel_call` as dense attention: from the queries and each cache gathered per
        sequence, (B, L, *per-token shape), the (q (B, L_q, H, E), k (B, L, H_kv, E),
        v (B, L, H_kv, E_v)) whose bottom-right causal attention gives the same output."""
        raise NotImplementedError(f"{type(self).__name__} does not implement kernel_operands: "
                                  "no dense baseline for its decode kernel")

    def shard_heads(self, q_heads: range, c_heads: range) -> dict:
        """Keep query heads `q_heads` and cached heads `c_heads` of every projection into
        heads (column-parallel), and return the config fields that change on this rank. The
        output projection `wo` is split by the caller."""
        raise NotImplementedError(f"{type(self).__name__} does not implement shard_heads: it "
                                  "cannot be split over tensor-parallel ranks")

    def prefill_forms(self) -> tuple[PrefillForm, ...]:
        """The paged prefill-op calls `prefill` can make, on this layer's (local) heads."""
        raise NotImplementedError(f"{type(self).__name__} has no paged prefill (prefill_forms)")

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None = None,
                cache: tuple[Tensor, ...] | None = None) -> Tensor:
        """x (B, T, D); cos, sin (B, T, d_R / 2) -> (B, T, D).

        Without `meta` this is the causal training path. With `meta` and this layer's `cache`
        (the tensors from `allocate_cache`), the step's states are written to the cache first;
        a prefill step's B·T tokens are the packed rows of `meta.cu_seqlens_q`'s sequences.
        cos and sin may also be (1, T, d_R / 2), one row of positions for the whole batch.

        Raises ValueError for x not (B, T, D), cos or sin not shaped as the tokens are (they
        would broadcast: every token rotated to another token's position), metadata without
        its cache, or a prefill step's metadata without its plan.
        """
        self.check_step(x, cos, sin, meta, cache)
        if not self.finishes_in_store(meta):
            q, states = self.project(x, cos, sin)
            return self.wo(self.attend_step(q, states, meta, cache).reshape(*x.shape[:2], -1))
        q, raw = self.project(x, cos, sin, finish=False)
        self._store_unfinished(cache, raw, cos, sin, meta)
        return self.wo(self.decode(q, cache, meta).reshape(*x.shape[:2], -1))

    # Families whose `project` does no more to its two cached states after the input
    # projection than an RMSNorm per head of the first (`state_norm`) and the RoPE of the
    # second set this, and take `project(x, cos, sin, finish=False)`: the states then come
    # back as the projection left them, and a decode step finishes them in its cache write
    # (`AttentionBackend.store_states`: one launch on the Triton backend, where the norm, the
    # rotation and the store would be three) as FUSED_STATE_STORE says.
    finishes_states_in_store = False
    # Whether FUSED_STATE_STORE's "auto" finishes this family's states in the cache write
    # (measured faster on a GPU; see FUSED_STATE_STORE).
    store_fusion_pays = False

    def state_norm(self) -> tuple[Tensor, float] | None:
        """(weight (heads, d), eps) of the RMSNorm on the first cached state, or None."""
        return None

    def finishes_in_store(self, meta: AttentionMetadata | None) -> bool:
        """Whether this step's states are finished in the cache write: a decode step (neither
        prefill nor mixed, whose attention reads the finished states themselves) of a family
        that can, as HWATTN_FUSED_STATE_STORE asks (`FUSED_STATE_STORE`)."""
        if not self.finishes_states_in_store or FUSED_STATE_STORE == "0":
            return False
        if FUSED_STATE_STORE == "auto" and not self.store_fusion_pays:
            return False
        return meta is not None and not meta.is_prefill and meta.parts is None

    @torch.compiler.disable
    def _store_unfinished(self, cache: tuple[Tensor, ...], raw: tuple[Tensor, Tensor],
                          cos: Tensor, sin: Tensor, meta: AttentionMetadata) -> None:
        """`_store` of the states `project(..., finish=False)` returned (each (B, T, ...)),
        finished on the way: `state_norm` on the first, RoPE by cos, sin on the second."""
        first, second = raw
        rows = (first.shape[0] * first.shape[1], cos.shape[-1])
        cos, sin = (t.expand(*first.shape[:2], rows[1]).reshape(rows) for t in (cos, sin))
        meta.backend.store_states(cache, (first.flatten(0, 1), second.flatten(0, 1)),
                                  meta.slot_mapping, norm=self.state_norm(), rope=(cos, sin))

    def check_step(self, x: Tensor, cos: Tensor, sin: Tensor, meta: AttentionMetadata | None,
                   cache: tuple[Tensor, ...] | None) -> None:
        """`forward`'s checks of its arguments (host metadata only; see `forward`)."""
        self._check_inputs(x, cos, sin)
        if meta is not None and cache is None:
            raise ValueError("cache must be given together with meta")
        if meta is not None and meta.is_prefill and meta.plan is None:
            raise ValueError("a prefill step's metadata needs its plan (AttentionMetadata."
                             "for_prefill / for_step make it; else meta.backend.plan_prefill)")

    def attend_step(self, q: tuple[Tensor, ...], states: tuple[Tensor, ...],
                    meta: AttentionMetadata | None = None,
                    cache: tuple[Tensor, ...] | None = None) -> Tensor:
        """`forward` between `project` and the output projection: the queries and states of
        `project` (each (B, T, ...)) -> the attention output before `wo`, (B, T, H, d_h) (or
        (N, H, d_h), N = B·T, for a prefill step). With `meta`, the states are written to
        `cache` first and the queries attend through it."""
        if meta is None:
            return self.attend(q, states)
        self._store(cache, states, meta)
        if meta.parts is not None:
            return self._attend_mixed(q, states, cache, meta.parts)
        if meta.is_prefill:
            return self._attend_prefill(q, states, cache, meta)
        return self.decode(q, cache, meta)

    @torch.compiler.disable
    def _attend_mixed(self, q: tuple[Tensor, ...], states: tuple[Tensor, ...],
                      cache: tuple[Tensor, ...], parts: MixedParts) -> Tensor:
        """A mixed step's attention, its queries and states (1, N, ...) packed rows, decode rows
        first, the states already in the cache -> (N, H, d_h): the decode rows through the
        paged decode op (each a sequence of one query token), the prompt rows as a prefill
        step (`_attend_prefill`)."""
        nd = parts.num_decode
        decoded = self.decode(tuple(t[0, :nd, None] for t in q), cache, parts.decode)  # (nd, 1, H, d_h)
        prompts = self._attend_prefill(tuple(t[:, nd:] for t in q),
                                       tuple(s[:, nd:] for s in states), cache, parts.prompts)
        return torch.cat((decoded.flatten(0, 1), prompts))

    @torch.compiler.disable
    def _attend_prefill(self, q: tuple[Tensor, ...], states: tuple[Tensor, ...],
                        cache: tuple[Tensor, ...], meta: AttentionMetadata) -> Tensor:
        """A prefill step's attention, its queries and states (B, T, ...) packed rows, the
        states already in the cache -> (N, H, d_h): whole prompts densely (`_attend_fresh`)
        or through the paged op (`prefill`). The choice and both paths read the step's host
        lengths, on which a compiled graph would guard (one recompile per chunk layout): the
        engine runs it eagerly between its compiled pieces (`compile_pieces`), and a whole
        block compiled with `compile_blocks` breaks its graph here. Contiguous, whichever path
        ran: the compiled code after it guards on its input's strides, which differ between
        the paths."""
        if meta.plan.fresh and self._attends_densely(meta):
            out = self._attend_fresh(q, states, meta.plan.query_lens)
        else:
            out = self.prefill(tuple(t.flatten(0, 1) for t in q), cache, meta)
        return out.contiguous()

    def _check_inputs(self, x: Tensor, cos: Tensor, sin: Tensor) -> None:
        """`forward`'s shape checks (host metadata only)."""
        if x.dim() != 3:
            raise ValueError(f"x must be (B, T, D), got shape {tuple(x.shape)}")
        batch, seq = x.shape[:2]
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1:] != (seq, self.rope_dim // 2):
                raise ValueError(f"{name} must be (B={batch} or 1, T={seq}, d_R / 2="
                                 f"{self.rope_dim // 2}) for x {tuple(x.shape)}, got "
                                 f"{tuple(t.shape)}")

    def _attends_densely(self, meta: AttentionMetadata) -> bool:
        """Whether a step of whole prompts goes through `_attend_fresh` rather than the paged
        prefill op: always for prompts of one length (one dense call) and where the op would
        loop anyway (a backend without a variable-length kernel, a layer without its own
        `prefill`); for unequal lengths, while they average `DENSE_LOOP_MIN_MEAN_LEN` tokens
        or more."""
        lens = [n for n in meta.plan.query_lens if n]
        if len(set(lens)) <= 1 or not meta.backend.varlen_prefill:
            return True
        if type(self).prefill is Attention.prefill:
            return True
        return sum(lens) >= DENSE_LOOP_MIN_MEAN_LEN * len(lens)

    def _attend_fresh(self, q: tuple[Tensor, ...], states: tuple[Tensor, ...],
                      query_lens: Sequence[int]) -> Tensor:
        """A prefill step whose sequences have nothing cached before it: each attends only to
        its own states, densely (`attend`: SDPA, FlashAttention on a GPU, which outran the
        paged prefill kernel on whole prompts on an H200). q and states are packed (1, N, ...);
        returns (N, H, d_v). Sequences of one length run as one batch, else one by one."""
        lens = [n for n in query_lens if n]
        if len(set(lens)) == 1:
            batch, t = len(lens), lens[0]
            out = self.attend(tuple(x.reshape(batch, t, *x.shape[2:]) for x in q),
                              tuple(x.reshape(batch, t, *x.shape[2:]) for x in states))
            return out.flatten(0, 1)
        outs, start = [], 0
        for n in lens:
            part = slice(start, start + n)
            outs.append(self.attend(tuple(x[:, part] for x in q),
                                    tuple(x[:, part] for x in states))[0])
            start += n
        return torch.cat(outs)

    @torch.compiler.disable
    def _store(self, cache: tuple[Tensor, ...], states: tuple[Tensor, ...],
               meta: AttentionMetadata) -> None:
        """Write this step's states (each (B, T, ...)) into the cache at `meta.slot_mapping`;
        one graph break for all of them under `torch.compile`, and one launch where the
        backend can."""
        meta.backend.store_kvs(cache, tuple(s.flatten(0, 1) for s in states), meta.slot_mapping)

    def prefill(self, q: tuple[Tensor, ...], cache: tuple[Tensor, ...],
                meta: AttentionMetadata) -> Tensor:
        """Attention of a prefill step's packed queries (each part (N, H, ...)) over the paged
        cache (this step's states already written) -> (N, H, d_h).

        This default serves families without a paged prefill: each sequence's cache gathered
        into a dense tensor, attended by `attend` (slow: a loop over sequences)."""
        cu, seqlens = meta.plan.cu_seqlens_q, meta.plan.seqlens
        outs = []
        for b, (lo, hi) in enumerate(zip(cu, cu[1:])):
            if hi == lo:
                continue
            past = tuple(gather_cache(c, meta.block_table[b], seqlens[b])[None].to(q[0].dtype)
                         for c in cache)  # each (1, L, ...)
            outs.append(self.attend(tuple(t[lo:hi][None] for t in q), past)[0])
        return torch.cat(outs)

    # Cost accounting (docs/design.md §2). All counts are for one layer on one tensor-parallel rank.
    def local_heads(self, tp: int = 1) -> tuple[int, int]:
        """(query heads, cached heads) on one rank of a `tp`-way split.

        Cached heads are split while there are at least as many as ranks, else each rank keeps
        the one its query heads read (duplicated across ranks).
        """
        cached = self.config.cache_heads
        if tp <= 0 or self.n_heads % tp:
            raise ValueError(f"tp ({tp}) must divide n_heads ({self.n_heads})")
        if cached >= tp:
            if cached % tp:
                raise ValueError(f"tp ({tp}) must divide the {cached} cached heads")
            return self.n_heads // tp, cached // tp
        if tp % cached:
            raise ValueError(f"tp ({tp}) must be a multiple of the {cached} cached heads")
        return self.n_heads // tp, 1

    def kv_elements_per_token(self, tp: int = 1) -> int:
        return sum(math.prod(shape) for shape in self.cache_layout(tp).values())

    def kv_bytes_per_token(self, tp: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of KV cache one token occupies in this layer on one rank."""
        return self.kv_elements_per_token(tp) * dtype.itemsize

    def decode_flops(self, context_len: int, query_len: int = 1, tp: int = 1) -> int:
        """FLOPs of one decode call for one sequence: QK^T and PV over the whole context."""
        d_qk, d_v = self.decode_widths()
        return 2 * query_len * self.local_heads(tp)[0] * context_len * (d_qk + d_v)

    def decode_bytes(self, context_len: int, query_len: int = 1, tp: int = 1,
                     dtype: torch.dtype = torch.bfloat16) -> int:
        """Fewest bytes one decode call moves for one sequence: the cache once, q and out."""
        d_qk, d_v = self.decode_widths()
        io = query_len * self.local_heads(tp)[0] * (d_qk + d_v) * dtype.itemsize
        return context_len * self.kv_bytes_per_token(tp, dtype) + io

    def arithmetic_intensity(self, context_len: int, query_len: int = 1, tp: int = 1,
                             dtype: torch.dtype = torch.bfloat16) -> float:
        return self.decode_flops(context_len, query_len, tp) / self.decode_bytes(
            context_len, query_len, tp, dtype)

    def allocate_cache(self, num_pages: int, page_size: int, dtype: torch.dtype = torch.bfloat16,
                       device=None) -> tuple[Tensor, ...]:
        """Uninitialised paged cache tensors, one per `cache_layout` entry:
        (num_pages, page_size, *per-token shape)."""
        return tuple(torch.empty(num_pages, page_size, *shape, dtype=dtype, device=device)
                     for shape in self.cache_layout(1).values())


class TiedStateAttention(Attention):
    """Families that cache one tied state per cached head plus one RoPE key shared by every
    head (GTA; MLA and GLA absorbed): the state's first D_nope dims are the un-rotated key and
    all of it the value, so decode runs `decode_tied` (docs/design.md §4). `scale` is set by
    the subclass."""

    def kernel_call(self, backend, queries, cache, block_table, cache_seqlens, *, plan=None,
                    cache_scale=None, return_lse=False):
        q_nope, q_rope = queries
        kv_cache, rope_cache = cache
        return backend.decode_tied(q_nope, q_rope, kv_cache, rope_cache, block_table,
                                   cache_seqlens, softmax_scale=self.scale, plan=plan,
                                   kv_scale=cache_scale, return_lse=return_lse)

    def tied_form(self, d_nope: int, name: str = "paged", **costs) -> PrefillForm:
        """The `prefill_tied` call over this layer's cache, with keys of `d_nope` state dims."""
        n_heads, n_cached = self.n_heads, self.cache_layout(1)["kv"][0]
        return PrefillForm(name, True, n_heads, n_cached, d_nope, self.cache_layout(1)["kv"][1],
                           self.rope_dim, self.scale, **costs)

    def kernel_operands(self, queries, caches):
        q_nope, q_rope = queries  # (B, L_q, H, D_nope), (B, L_q, H, D_R)
        state, rope = caches  # (B, L, H_kv, D_v), (B, L, D_R)
        heads = state.shape[2]
        keys = torch.cat((state[..., :q_nope.shape[-1]],
                          rope[:, :, None, :].expand(-1, -1, heads, -1)), -1)  # (B, L, H_kv, D_nope + D_R)
        return torch.cat((q_nope, q_rope), -1), keys, state


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same state dict) whose product goes through
    `hwattn.ops.linear` (`F.linear`, or the skinny kernel for decode's few rows on a GPU when
    HWATTN_SKINNY_GEMM=1)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class FusedLinear(NamedTuple):
    """Linear layers of one input as one matrix product: `weight` (sum of outs, in), `bias`
    (or None) and each layer's output size. Calling it on x (..., in) returns their outputs."""

    weight: Tensor
    bias: Tensor | None
    sizes: list[int]

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        return linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def fuse_linears(linears: list[nn.Linear]) -> FusedLinear | None:
    """One `FusedLinear` for linear layers of one input (one bias, zeros where a layer has
    none, if any has one), with every layer's weight and bias replaced by views of its rows,
    so nothing is stored twice. None for fewer than two layers."""
    if len(linears) < 2:
        return None
    weight = torch.cat([m.weight for m in linears])
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                          for m in linears])
    sizes = [m.out_features for m in linears]
    start = 0
    for m, n in zip(linears, sizes):
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return FusedLinear(weight, bias, sizes)


def select_heads(weight: Tensor, heads: range, width: int) -> Tensor:
    """Rows of `weight` (H * width, ...) belonging to `heads`: (len(heads) * width, ...).

    Takes a weight (H * width, D) or a bias (H * width,)."""
    return weight.reshape(-1, width, *weight.shape[1:])[heads.start:heads.stop].flatten(0, 1)


def set_weight(linear: nn.Linear, weight: Tensor, bias: Tensor | None = None) -> None:
    """Replace `linear`'s weight and, if given, its bias (a frozen shard: tensor-parallel
    models serve, not train)."""
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
