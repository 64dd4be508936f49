"""Runs the model over the paged cache through an attention backend (`hwattn.ops`): prefill
and mixed steps as one variable-length forward (every row's chunk, cached prefix or not; a step
of whole prompts attends densely, any other through the paged prefill op, but for a mixed
step's decode rows, which attend through the paged decode op), and decode steps through the paged decode op, replayed on a GPU
from the CUDA graphs of decode batch-size buckets (`DecodeGraphs`, hwattn/engine/cuda_graphs.py).

Mechanism only. The runner chooses its backend once; a step arrives as a `StepInput` of plain
lists (so that tensor-parallel workers can receive the same step), the runner builds one
`AttentionMetadata` per forward (carrying the backend and, for a decode step, the one plan the
backend made for it, reused by every layer), runs `Transformer.forward` and returns logits;
sampling is the engine's. Inside a decode step nothing reads device values back to the host:
slots and positions are derived on the device from the block table and `cache_seqlens`, and
host inputs reach the device by non-blocking copies, so the host can prepare and launch the next
step while this one runs (`launch_step`). A decode row may take its token from the tokens the
previous launched step sampled, still on the device (`StepInput.feed`).
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from hwattn import ops
from hwattn.engine.block_manager import NULL_PAGE, pages_for
from hwattn.engine.cuda_graphs import DecodeGraphs, decode_buckets, error_line, freeze_heap
from hwattn.engine.launch import PendingTokens
from hwattn.engine.prefill_graphs import PrefillGraphs, prefill_graph_sizes
from hwattn.engine.staging import PinnedRing
from hwattn.engine.sampler import (SamplingInput, by_rows, describe_error, matching_verify,
                                  rejection_sample, sample, top_logprobs)
from hwattn.layers import AttentionMetadata, mla
from hwattn.models import compile as regional
from hwattn.models.compile import compile_blocks, compile_pieces, distinct_sizes
from hwattn.ops.argmax import argmax_last
from hwattn.ops.plan import upload

log = logging.getLogger(__name__)

# Tokens of each of the prefill warm-up's two steps (`ModelRunner._warm_prefill`).
WARM_TOKENS = 3


def _tensor_parallel() -> bool:
    """Whether this process is one rank of several (a tensor-parallel worker)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

# `decode_buckets` is re-exported: benchmarks and tests import it from here.
__all__ = ["ModelRunner", "Sampled", "StepInput", "StepResults", "accepted_prefix",
           "compose_absorptions_for_serving", "decode_buckets", "greedy_accept", "greedy_verify"]


@dataclass
class StepInput:
    """One forward step over several sequences.

    kind: "prefill" (each row its own chunk length: whole prompts attended densely, chunks
        over a cached prefix through the paged prefill op), "decode" (every row the same
        number T of tokens, attended through the paged decode op) or "mixed" (the first
        `num_decode` rows decode one token each, attended through the paged decode op, the
        rest are prefill chunks; one forward, `AttentionMetadata.split_decode_rows`).
    tokens: per sequence, the new tokens this step feeds.
    num_cached: per sequence, tokens already in the cache before this step.
    block_tables: per sequence, its page ids (covering num_cached + len(tokens) tokens).
    skip_write: per sequence, how many leading tokens are not written to the cache (their
        slots are padding); None means all are written.
    need_logits: prefill only: per sequence, whether its last token's logits are sampled.
    prompt_logprobs: prefill only, empty or per sequence: how many top log-probabilities to
        report for its chunk's positions (-1: none). prompt_targets: the tokens those
        positions predict (the next prompt tokens; at most one per position).
    """

    kind: str
    tokens: list[list[int]] | Tensor
    num_cached: list[int]
    block_tables: list[list[int]]
    skip_write: list[int] | None = None
    need_logits: list[bool] = field(default_factory=list)
    prompt_logprobs: list[int] = field(default_factory=list)
    prompt_targets: list[list[int]] = field(default_factory=list)
    num_decode: int = 0
    feed: list[int] | None = None

    @property
    def feeds(self) -> bool:
        """Whether any row's last token comes from the previous step's sampled tokens:
        `feed[i] >= 0` replaces row i's last token by that row of them."""
        return self.feed is not None and any(f >= 0 for f in self.feed)


class Sampled(NamedTuple):
    """A sampled token with the log-probabilities its request asked for: `logprobs` is
    (the token's log-probability, its rank, top token ids, their log-probabilities)."""

    token: int
    logprobs: tuple[float, int, list[int], list[float]]


class StepResults(list):
    """What `ModelRunner.sample_step` returns: one entry per sampled row (a token id, a
    `Sampled`, or the row's error as a str), and in `prompt_logprobs` for each step row that
    asked for them, its chunk's per-position (logprob, rank, top ids, top logprobs) tuples,
    or the row's error as a str."""

    def __init__(self, rows=(), prompt_logprobs: dict | None = None):
        super().__init__(rows)
        self.prompt_logprobs = prompt_logprobs or {}


# The BLAS library the engine's decode steps ask PyTorch to prefer on a GPU (HWATTN_BLAS:
# "cublaslt", "cublas", or "default" to leave PyTorch's choice alone). cuBLASLt is the default:
# at decode's 64 rows it runs the down projection without cuBLAS's split-K reduction kernel,
# and on an H100 the compiled `xl` decode step was 1.9-2.6% faster at L = 1K and 0.6-1.0% at
# 8K with it (docs/results/engine.md, run 18). Prefill keeps PyTorch's choice: compiled
# 2048-token prefill chunks were 4.7% slower under cuBLASLt on an H100 (run 19).
BLAS_CHOICES = ("cublaslt", "cublas", "default")
BLAS_LIBRARY = os.environ.get("HWATTN_BLAS", "cublaslt")


def decode_blas(device: torch.device, blas: str | None = None) -> str:
    """The BLAS library decode steps on `device` prefer: `blas` (None: HWATTN_BLAS) on a CUDA
    device, "default" (PyTorch's own choice) elsewhere and on ROCm. ValueError naming
    HWATTN_BLAS for a library outside BLAS_CHOICES."""
    blas = BLAS_LIBRARY if blas is None else blas
    if blas not in BLAS_CHOICES:
        raise ValueError(f"blas (HWATTN_BLAS) must be one of {BLAS_CHOICES}, got {blas!r}")
    if device.type != "cuda" or torch.version.hip is not None:
        return "default"
    return blas


@contextmanager
def blas_preference(blas: str):
    """PyTorch prefers `blas` for the GEMMs issued inside (a captured graph keeps the kernels
    chosen at capture), and its earlier preference after; "default" changes nothing. The
    preference is process-wide (`torch.backends.cuda.preferred_blas_library`)."""
    if blas == "default":
        yield
        return
    before = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library(blas)
    try:
        yield
    finally:
        torch.backends.cuda.preferred_blas_library(before)


def compose_absorptions_for_serving(model, on: bool | None = None) -> int:
    """`model.compose_absorptions(on)` (W_UK and W_UV multiplied into the latent layers'
    decode projections; they then hold more weight bytes), `on` None meaning the
    HWATTN_COMPOSE_ABSORB switch; returns how many layers hold them. The engine calls it
    before it sizes the KV cache from the free memory, `ModelRunner` again: a model composed
    already is left as it is."""
    on = mla.COMPOSE_ABSORPTIONS if on is None else on
    if on and model.composed_layers:
        return model.composed_layers
    return model.compose_absorptions(on)


class ModelRunner(DecodeGraphs):
    """Owns the model's KV cache and runs prefill and decode steps.

    num_pages, page_size: the pool the `BlockManager` hands out (page 0 is the null page).
    backend: attention backend name, "auto" (chosen for the model's device) or an
        `AttentionBackend`; it also chooses the cache dtype when `cache_dtype` is None.
    cuda_graphs: capture decode for every bucket in `decode_buckets(max_num_seqs)` and each
        query length in `graph_query_lens` (on CUDA only; falls back to eager if capture fails).
    prefill_graphs: with `cuda_graphs` and `compile_prefill`, also capture the prefill pieces
        between attention steps, for steps of up to 2048 tokens (`PrefillGraphs`; on CUDA,
        not under tensor parallelism; EngineConfig.prefill_graphs).
    max_num_batched_tokens: the most tokens a prefill or mixed step holds (the scheduler's
        budget; None: unknown): no prefill graph is recorded for more.
    mixed_steps: whether the engine may run mixed steps here (EngineConfig.
        enable_mixed_batches, plain decoding): `warm_kernels` warms their shapes only then.
    compile_decode: run decode steps through `torch.compile`d blocks (hwattn/models/compile.py;
        compiled before capture, so each captured graph replays the fused kernels).
    compile_prefill: run prefill (and mixed) steps through `torch.compile`d blocks of their
        own, compiled for any number of tokens (`dynamic=True`) in two pieces a block
        (`compile_pieces`): RMSNorm, RoPE and SwiGLU become a few fused kernels around the
        GEMMs, the attention step between the pieces stays eager (`Attention.attend_step`).
        Compiled at start-up (`_warm_prefill`); on an H100, compiled whole blocks took 24-27%
        off a whole 8K-token `xl` prompt (docs/results/engine.md, run 14; measured before the
        warm-up and the pieces took their present form).

    compose_absorptions: decode steps of latent layers (MLA, GLA) through projections with
        W_UK and W_UV multiplied in (`Transformer.compose_absorptions`); None: the
        HWATTN_COMPOSE_ABSORB environment switch (off unless "1").
    blas: the BLAS library PyTorch is asked to prefer for decode steps on a GPU, while they
        are captured or run eagerly (`decode_blas`, `blas_preference`; None: HWATTN_BLAS,
        cuBLASLt unless set); prefill keeps PyTorch's choice.

    The runner fuses the model's input projections (`Transformer.fuse_projections`): from
    then on the model serves (its fused weights take no gradients).
    """

    def __init__(self, model, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int = 64, cache_dtype: torch.dtype | None = None,
                 backend: str | ops.AttentionBackend = "auto", cuda_graphs: bool = True,
                 graph_query_lens: tuple[int, ...] = (1,), compile_decode: bool = False,
                 compile_prefill: bool = False, prefill_graphs: bool = True,
                 max_num_batched_tokens: int | None = None, mixed_steps: bool = True,
                 compose_absorptions: bool | None = None, blas: str | None = None):
        self.blas = decode_blas(model.tok_embeddings.weight.device, blas)
        self.model = model.fuse_projections()  # fewer, larger GEMMs (weights shared, not copied)
        self.composed_layers = compose_absorptions_for_serving(model, compose_absorptions)
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.mixed_steps = mixed_steps
        ref = model.tok_embeddings.weight
        self.device = ref.device
        self.backend = ops.get_backend(backend, self.device)
        cache_dtype = cache_dtype or self.backend.cache_dtype(ref.dtype)
        self.backend.check_cache(page_size, cache_dtype)
        self.kv_caches = model.allocate_kv_cache(num_pages, page_size, dtype=cache_dtype,
                                                 device=self.device)
        # Cached heads per layer, as the caches were just allocated for (read every step).
        self.cache_heads = model.cache_heads
        # (bucket, T) -> (replay, its output: (logits, argmax), see `_captured_step`)
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.graph_error: str | None = None
        self._prompt_logits: dict[int, Tensor] = {}  # step row -> its chunk's logits (T, V)
        self.last_sampled: Tensor | None = None  # (n,) int64: the last launched step's tokens
        self.graph_argmax: Tensor | None = None  # see `execute`
        # (B, T) int64 on the device: the tokens the last decode step fed (a verify step's
        # drafts are read from here; a captured step's are its static inputs, valid until
        # the next step of its query length).
        self.fed_tokens: Tensor | None = None
        self.decode_blocks = None
        if compile_decode:
            self.decode_blocks = compile_blocks(model, eager_numerics=True,
                                                defer_residual=regional.DEFER_RESIDUAL)
        self.prefill_blocks = None
        if compile_prefill:
            self.prefill_blocks = compile_pieces(model, eager_numerics=True, dynamic=True)
        # The engine's `StepTimer`, when one is attached: decode launches time their parts
        # on it (`hwattn.engine.step_timer.LAUNCH_PARTS`).
        self.step_timer = None
        # Pinned buffers the launched steps' tokens (one per row) come back through.
        self._out_ring = PinnedRing(max_num_seqs) if self.device.type == "cuda" else None
        self.prefill_compile_error: str | None = None
        # Graphs of the prefill pieces (`_capture_prefill`), and why capturing them failed.
        self.prefill_graphs: PrefillGraphs | None = None
        self.prefill_graph_error: str | None = None
        if self.prefill_blocks is not None:
            try:
                self._warm_prefill()  # (before the capture, which ends by freezing the heap)
            except Exception as err:  # noqa: BLE001 - a failed compile leaves prefill eager
                if _tensor_parallel():
                    # One rank going on eagerly while the others still run the warm-up's
                    # collectives would put the ranks out of step: the engine fails instead.
                    raise
                self.prefill_blocks = None
                self.prefill_compile_error = error_line(err)
                log.warning("compiling the prefill blocks failed, prefilling eagerly: %s",
                            self.prefill_compile_error)
        if cuda_graphs and self.device.type == "cuda":
            with blas_preference(self.blas):  # the graphs keep the GEMMs chosen here
                self._capture(graph_query_lens)
            # After decode's graphs, which keep the memory first: a prefill capture that
            # finds too little left fails alone (the pieces then launch directly).
            if prefill_graphs and self.prefill_blocks is not None and not _tensor_parallel():
                self._capture_prefill()
        if self.device.type == "cuda":
            self.warm_kernels()
            # Once everything start-up builds is alive (graphs, compiled pieces, the kernels
            # the warm-up compiled): a collection in a serving step then scans none of it.
            freeze_heap()

    def _capture_prefill(self) -> None:
        """Record the prefill pieces' graphs (`PrefillGraphs`, steps of up to
        `prefill_graph_sizes`' largest; not under tensor parallelism, where a rank whose
        capture failed would run other steps than the rest). A failure leaves the compiled
        pieces launching one by one (`prefill_graph_error`, logged)."""
        most = self.max_model_len * self.max_num_seqs
        if self.max_num_batched_tokens is not None:
            most = min(most, self.max_num_batched_tokens)
        sizes = prefill_graph_sizes(most)
        if not sizes:
            return
        try:
            self.prefill_graphs = PrefillGraphs(self.model, self.prefill_blocks, sizes)
        except Exception as err:  # noqa: BLE001 - any capture failure leaves the pieces eager
            self.prefill_graphs = None
            self.prefill_graph_error = error_line(err)
            log.warning("capturing the prefill pieces failed, launching them one by one: %s",
                        self.prefill_graph_error)
            self._synchronize()

    def _warm_prefill(self) -> None:
        """Compile the prefill blocks now rather than in the first request's step: a whole
        prompt, then a chunk over it (the dense path and the paged op), both in the null page;
        their graphs, compiled with a symbolic token count, then serve every prefill and mixed
        step of two tokens or more (a step of one token runs the eager blocks: dynamo
        specialises sizes 0 and 1). If it fails, prefill runs the eager blocks and
        `prefill_compile_error` says why, as a failed graph capture leaves decoding eager
        (under tensor parallelism the engine fails instead: the ranks would fall out of step).

        The graphs are compiled without duck sizing (`distinct_sizes`): dynamo would otherwise
        take two sizes that happen to be equal in the warm-up (its token count and, say, the
        number of cached heads or the page size) for one symbol and guard on their equality,
        and the first step of another length would compile the blocks again (a two-token
        warm-up did so wherever a rank holds two cached heads). The token count is the same
        on every tensor-parallel rank, since each rank's warm-up runs collectives."""
        n = WARM_TOKENS
        pages = [NULL_PAGE] * pages_for(2 * n, self.page_size)
        with distinct_sizes():
            for cached in (0, n):
                self.execute(StepInput("prefill", [[0] * n], [cached], [pages],
                                       need_logits=[False]))
        self._synchronize()

    def warm_kernels(self) -> None:
        """Run now, in the null page, the prefill and mixed steps whose kernel variants the
        first serving steps of each shape would otherwise compile (Triton's JIT, a second or
        more a variant: run 16 measured such stalls in mixed steps). A variant is one per
        compile-time tile shape and per specialised argument, and those follow a step's
        shape: the prefill kernel's rows per query tile follow its longest chunk (a power of
        two up to its tile), the latent families pick the absorbed or the expanded form by
        FLOPs (short chunks over long contexts, long chunks over short ones), and a mixed
        step's decode rows run the decode op eagerly, whose combine step follows the plan's
        most pieces a sequence (few rows over long contexts: many; the pieces fall as the rows
        grow). So: chunks of 1, 2, 4 ... 128 tokens over one token per chunk token and over
        the longest context; then, where the engine runs mixed steps (`mixed_steps`), mixed
        steps of 1 to 16 decode rows, and of each decode graph bucket's, over the longest
        context beside a 3-token chunk.
        Triton keeps what it compiles on disk, so a later start compiles none of it. The
        longest context is the runner's or the model's, whichever is shorter (positions past
        the model's RoPE table would index out of it). A failure is raised, not logged: these
        are steps serving would run, and a device-side assert leaves the device unusable."""
        long = min(self.max_model_len, self.model.config.max_seq_len) - 1
        budget = self.max_num_batched_tokens or self.max_model_len
        steps = []
        n = 1
        while n <= min(128, budget, long):
            for cached in sorted({n, long - n} - {0}) if long > n else ():
                pages = [NULL_PAGE] * pages_for(cached + n, self.page_size)
                steps.append(StepInput("prefill", [[0] * n], [cached], [pages]))
            n *= 2
        if self.mixed_steps and long >= 8:  # (decode rows over `long`, a chunk at 5..7)
            full = [NULL_PAGE] * pages_for(long + 1, self.page_size)
            chunk = [NULL_PAGE] * pages_for(8, self.page_size)
            rows = set(range(1, 17)) | set(decode_buckets(self.max_num_seqs))
            for nd in sorted(b for b in rows if b < self.max_num_seqs and b + 3 <= budget):
                steps.append(StepInput("mixed", [[0]] * nd + [[0] * 3], [long] * nd + [5],
                                       [full] * nd + [chunk], need_logits=[True] * (nd + 1),
                                       num_decode=nd))
        with torch.inference_mode():
            for step in steps:
                self.execute(step)
        self._synchronize()

    def _part(self, name: str):
        """Time a part of a decode launch on the attached step timer (none: no timing)."""
        return self.step_timer.phase(name) if self.step_timer is not None else nullcontext()

    @property
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.kv_caches for t in layer)

    def forward(self, tokens: Tensor, meta: AttentionMetadata, blocks=None) -> Tensor:
        """A decode step: tokens (B, T) -> logits (B, T, V); `blocks` run in place of the
        model's layers (the compiled decode blocks)."""
        return self.model(tokens, meta=meta, kv_caches=self.kv_caches, blocks=blocks)

    def plan(self, seqlens: Tensor, query_len: int, out=None, **knobs):
        """The backend's plan for a decode step of host lengths `seqlens` (B,) int32 (the
        step's `query_len` new tokens included), for the kernels on this runner's device;
        `out` refreshes an earlier plan of the same batch size in place; `knobs` go to the
        backend's `plan` (`reserve_pieces`)."""
        return self.backend.plan(seqlens, num_heads_kv=self.cache_heads, query_len=query_len,
                                 page_size=self.page_size, device=self.device, out=out, **knobs)

    def _table(self, tables: list[list[int]], width: int | None = None) -> Tensor:
        """(B, width) int32 block table, rows padded with the null page."""
        width = width or max(1, max(len(t) for t in tables))
        out = np.full((len(tables), width), NULL_PAGE, dtype=np.int32)
        for row, pages in zip(out, tables):
            row[:len(pages)] = pages
        return torch.from_numpy(out)

    def block_table(self, tables: list[list[int]], width: int | None = None) -> Tensor:
        """Per-sequence page lists as the (B, width) int32 host tensor the kernels read, rows
        padded with the null page (width: the longest list by default)."""
        return self._table(tables, width)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> Tensor | None:
        """Run one step. prefill -> logits (n, V) of the last token of every row whose
        `need_logits` is set (None if none); decode -> logits (B, T, V); mixed -> logits
        (num_decode + n, V): every decode row's, then those of the prefill rows as for prefill.
        A decode step replayed from a graph also leaves the argmax of its logits in
        `graph_argmax`: (B,) int64 for one-token steps (the last position's), (B, T) for
        verify steps; None after any other step."""
        self.graph_argmax = None
        if step.kind == "prefill":
            return self._prefill(step)
        if step.kind == "decode":
            return self._decode(step)
        if step.kind == "mixed":
            return self._mixed(step)
        raise ValueError(f"step kind must be 'prefill', 'decode' or 'mixed', got {step.kind!r}")

    def _mixed(self, step: StepInput) -> Tensor | None:
        """Decode rows and prompt chunks in one variable-length forward: each decode row is a
        sequence of one query token (its last token may come from the previous step's
        sampled tokens, `feed`); logits of every decode row, then those of the prompt rows
        as for prefill."""
        nd = step.num_decode
        if not 0 < nd < len(step.num_cached):
            raise ValueError(f"a mixed step needs 0 < num_decode < {len(step.num_cached)} rows, "
                             f"got {nd}")
        rest = step.need_logits[nd:] if step.need_logits else [False] * (len(step.num_cached) - nd)
        return self._packed(step, [True] * nd + list(rest), num_decode=nd)

    def _upload(self, t: Tensor) -> Tensor:
        """A host tensor on the runner's device without waiting for the device (`upload`)."""
        return upload(t, self.device)

    def _device_sampling(self, sampling: SamplingInput):
        """`sampling.tensors` on this device, uploaded without a synchronisation (two copies
        for the common settings, one per extra setting)."""
        return sampling.tensors(self.device, upload=self._upload)

    @torch.inference_mode()
    def launch_step(self, step: StepInput, sampling: SamplingInput | None) -> PendingTokens:
        """`sample_step` without waiting: the step and its sampling are queued on the device
        and the tokens start their copy to the host. The tokens also stay on the device as
        `last_sampled`, which the next step's `feed` reads. If sampling the batch at once
        raises, the rows are sampled alone at once (as `sample_step` does)."""
        logits = self.execute(step)
        if sampling is None or logits is None:
            self.last_sampled = None
            return PendingTokens(rows=[])
        if step.kind == "decode":
            logits = logits[:, -1]  # (B, V)
        try:
            with self._part("sampling"):
                if sampling.argmax_only and self.graph_argmax is not None:
                    tokens = self.graph_argmax  # taken inside the graph (`_captured_step`)
                else:
                    tokens = self._sample(logits, sampling)  # (n,) int64
        except Exception:  # noqa: BLE001 - row by row, as sample_step does
            rows = self._sample_rows(logits, sampling)
            self.last_sampled = self._upload(torch.tensor(
                [t if isinstance(t, int) else 0 for t in rows], dtype=torch.int64))
            return PendingTokens(rows=rows)
        self.last_sampled = tokens
        if self.device.type != "cuda":
            # (A graph's argmax buffer is rewritten by the next replay, before this step is
            # read back; on a GPU the copy below is queued ahead of that replay.)
            return PendingTokens(host=tokens.clone() if tokens is self.graph_argmax else tokens)
        with self._part("copy_out"):
            taken = self._out_ring.take(tokens.numel(), tokens.dtype)
            if taken is None:  # every ring buffer still held (or too small): a fresh one
                host, event, release = (torch.empty(tokens.shape, dtype=tokens.dtype,
                                                    pin_memory=True), torch.cuda.Event(), None)
            else:
                host, event, slot = taken
                host, release = host.view(tokens.shape), (lambda: self._out_ring.release(slot))
            host.copy_(tokens, non_blocking=True)
            event.record()
        return PendingTokens(host=host, event=event, release=release)

    @torch.inference_mode()
    def sample_step(self, step: StepInput, sampling: SamplingInput | None) -> StepResults:
        """Run a prefill or plain decode step and sample one token per row that has logits
        (prefill: rows whose `need_logits` is set, in order; decode: every row).
        sampling: the settings of those rows, or None when no row needs a token.

        The batch is sampled at once; if that raises (settings the device cannot hold, ...),
        each row is sampled alone, and a row that still fails gets its error (a str) in place
        of its token. Only a failure of the forward itself raises. Rows whose settings ask for
        log-probabilities get a `Sampled`; prompt log-probabilities come in the results'
        `prompt_logprobs`."""
        logits = self.execute(step)
        prompt = self._prompt_logprobs(step)
        if sampling is None or logits is None:
            return StepResults([], prompt)
        if step.kind == "decode":
            logits = logits[:, -1]  # (B, V)
        return StepResults(self._sample_rows(logits, sampling), prompt)

    def _sample(self, logits: Tensor, sampling: SamplingInput) -> Tensor:
        """(n, V) logits -> (n,) int64 tokens: `sample` with the settings on this device, or
        the argmax at once when every row takes it (no setting needs uploading then)."""
        if sampling.argmax_only:
            return argmax_last(logits)
        return sample(logits, self._device_sampling(sampling))

    def _sample_rows(self, logits: Tensor, sampling: SamplingInput) -> list[int | str]:
        def run(rows):
            every = len(rows) == len(sampling)
            settings = sampling if every else sampling.select(rows)
            rows_logits = logits if every else logits[rows]
            tokens = self._sample(rows_logits, settings)
            if not any(k >= 0 for k in settings.logprobs):
                return tokens.tolist()
            want = [j for j, k in enumerate(settings.logprobs) if k >= 0]
            lp, rank, ids, values = top_logprobs(rows_logits[want], tokens[want],
                                                 max(settings.logprobs[j] for j in want))
            out: list = tokens.tolist()
            for n, j in enumerate(want):
                k = settings.logprobs[j]
                out[j] = Sampled(out[j], (lp[n].item(), rank[n].item(), ids[n, :k].tolist(),
                                          values[n, :k].tolist()))
            return out

        return by_rows(run, len(sampling))

    def _prompt_logprobs(self, step: StepInput) -> dict:
        """Per step row that asked, its chunk's (logprob, rank, top ids, top logprobs) per
        position that predicts a prompt token, or its error (a str)."""
        out = {}
        for i, logits in self._prompt_logits.items():
            targets = step.prompt_targets[i]
            try:
                t = torch.tensor(targets, dtype=torch.int64, device=logits.device)
                lp, rank, ids, values = top_logprobs(logits[:len(targets)], t,
                                                     step.prompt_logprobs[i])
                out[i] = list(zip(lp.tolist(), rank.tolist(), ids.tolist(), values.tolist()))
            except Exception as err:  # noqa: BLE001 - that request alone fails
                out[i] = describe_error(err)
        self._prompt_logits = {}
        return out

    @torch.inference_mode()
    def verify_step(self, step: StepInput, sampling: SamplingInput,
                    draft_probs: Tensor | None = None) -> list[tuple[list[int], int] | str]:
        """Run a decode step that feeds each row's last token and its k drafts
        (`step.tokens` (B, k + 1)) and verify the drafts (`sampler.matching_verify` for a
        deterministic drafter, else `sampler.rejection_sample`).
        draft_probs: (B, k, V) draft distributions, or None for a deterministic drafter.
        Returns per row (the k + 1 candidate tokens, how many drafts were accepted), or the
        row's error (a str) if verifying it failed even alone (as in `sample_step`)."""
        if step.kind != "decode":
            raise ValueError(f"verify_step runs decode steps, got {step.kind!r}")
        logits = self.execute(step)  # (B, k + 1, V)
        drafts = self.fed_tokens[:, 1:]  # on the device already: no second upload
        host_rows = step.tokens if not isinstance(step.tokens, Tensor) else None
        graph_best = self.graph_argmax  # (B, k + 1), taken inside a replayed graph

        def run(rows):
            every = len(rows) == len(sampling)
            pick = (lambda t: t) if every else (lambda t: t[rows])  # noqa: E731
            settings = sampling if every else sampling.select(rows)
            if settings.argmax_only:  # greedy on the raw logits (no logit bias)
                best = pick(graph_best) if graph_best is not None else argmax_last(pick(logits))
                if host_rows is not None:  # drafts on the host: only the argmax comes back
                    best = best.tolist()  # one read-back
                    return [(row, accepted_prefix(host_rows[r], row))
                            for r, row in zip(rows, best)]
                out, accepted = greedy_accept(best, pick(drafts))
            elif draft_probs is None:  # a deterministic drafter: the plain sampler's tokens
                out, accepted = matching_verify(pick(logits), pick(drafts),
                                                self._device_sampling(settings))
            else:
                out, accepted = rejection_sample(pick(logits), pick(drafts), pick(draft_probs),
                                                 self._device_sampling(settings))
            both = torch.cat((out, accepted[:, None]), 1).tolist()  # one read-back
            return [(row[:-1], row[-1]) for row in both]

        with self._part("sampling"):  # (on a GPU: waits for the forward at the read-back)
            return by_rows(run, len(sampling))

    def _prefill(self, step: StepInput) -> Tensor | None:
        """Every row's chunk (any length, with or without a cached prefix) in one
        variable-length forward; logits of the last token of each row whose `need_logits`
        is set (None if none)."""
        return self._packed(step, step.need_logits or [False] * len(step.num_cached))

    def _packed(self, step: StepInput, need: list[bool], num_decode: int = 0) -> Tensor | None:
        """One forward over the rows' tokens packed as (1, N) (whole prompts attended densely,
        chunks over a cached prefix through the paged prefill op; the first `num_decode`
        rows, one token each, through the paged decode op). Returns the logits (n, V) of the
        last token of each row i with need[i], in row order (None if none); rows asking
        prompt log-probabilities keep every position's logits for `_prompt_logprobs`."""
        self._prompt_logits = {}
        query_lens = [len(t) for t in step.tokens]
        meta = AttentionMetadata.for_prefill(self._table(step.block_tables), query_lens,
                                             step.num_cached, self.page_size,
                                             backend=self.backend, upload=self._upload)
        if num_decode:
            seqlens = torch.tensor([n + 1 for n in step.num_cached[:num_decode]], dtype=torch.int32)
            meta.split_decode_rows(num_decode, self.plan(seqlens, 1))
        cu = meta.plan.cu_seqlens_q
        flat = np.fromiter(itertools.chain.from_iterable(step.tokens), dtype=np.int64,
                           count=cu[-1])
        tokens = self._upload(torch.from_numpy(flat)[None])  # (1, N)
        if step.feeds:
            tokens = self._feed(tokens, step.feed, last=[n - 1 for n in cu[1:]])
        graphs = self.prefill_graphs
        if graphs is not None and 1 < cu[-1] <= graphs.sizes[-1]:
            hidden = graphs.forward(tokens, meta, self.kv_caches)[0]  # (N, D)
        else:
            # (A step of one token runs eagerly: dynamo would specialise a graph for size 1.)
            blocks = self.prefill_blocks if cu[-1] > 1 else None
            hidden = self.model(tokens, meta=meta, kv_caches=self.kv_caches, hidden_only=True,
                                blocks=blocks)[0]  # (N, D)
        for i, k in enumerate(step.prompt_logprobs):
            if k >= 0:
                self._prompt_logits[i] = self.model.output(hidden[cu[i]:cu[i + 1]])  # (T_i, V)
        last = [cu[i + 1] - 1 for i, wanted in enumerate(need) if wanted]
        if not last:
            return None
        return self.model.output(hidden[self._upload(torch.tensor(last))])  # (n, V)

    def _decode(self, step: StepInput) -> Tensor:
        with self._part("inputs"):
            if isinstance(step.tokens, Tensor):  # already on the device (draft model steps)
                batch, t = step.tokens.shape
            else:
                if len({len(x) for x in step.tokens}) != 1:
                    raise ValueError("decode rows must all feed the same number of tokens")
                batch, t = len(step.tokens), len(step.tokens[0])
            graph = self._graph_for(batch, t, step)
            if graph is None:  # (a graph's static inputs take the step in `_replay`)
                tokens = step.tokens
                if not isinstance(tokens, Tensor):
                    tokens = torch.tensor(tokens, dtype=torch.int64)
                seqlens = torch.tensor([n + t for n in step.num_cached], dtype=torch.int32)
                if tokens.device != self.device:
                    tokens = self._upload(tokens)
                if step.feeds:
                    tokens = self._feed(tokens, step.feed)
                self.fed_tokens = tokens
                meta = AttentionMetadata.for_step(self._upload(self._table(step.block_tables)),
                                                  self._upload(seqlens), t, self.page_size,
                                                  backend=self.backend)
                if step.skip_write:
                    skip = torch.tensor([[j < s for j in range(t)] for s in step.skip_write])
                    meta.slot_mapping = meta.slot_mapping.masked_fill(
                        self._upload(skip.flatten()), -1)
                meta.plan = self.plan(seqlens, t)
        if graph is not None:  # (its GEMMs were chosen at capture, under `self.blas`)
            return self._replay(graph, batch, t, step)
        with self._part("forward"), blas_preference(self.blas):
            return self.forward(tokens, meta, blocks=self.decode_blocks)

    def _feed(self, tokens: Tensor, feed: list[int], last: list[int] | None = None) -> Tensor:
        """tokens on the device with the last token of each row i whose feed[i] >= 0 replaced
        by `last_sampled[feed[i]]` (the token the previous step sampled for it). Rows are
        those of (B, T) tokens, or with `last` (each row's last position in the flat tokens)
        the packed rows of a (1, N) prefill step."""
        tokens = tokens.clone()
        self._feed_into(tokens, feed, last)
        return tokens

    def _feed_into(self, tokens: Tensor, feed: list[int], last: list[int] | None = None) -> None:
        """`_feed` in place: `tokens` (contiguous, on the device) gets the fed tokens."""
        if self.last_sampled is None:
            raise RuntimeError("a step feeds on the previous step's tokens, but none were sampled")
        n = len(feed)
        if last is None and feed == list(range(n)) and len(self.last_sampled) >= n:
            # Every row takes the token sampled for it in the row it held last step (a
            # steady decode batch): one device copy, no index to upload.
            tokens[:, -1].copy_(self.last_sampled[:n])
            return
        rows = [i for i, f in enumerate(feed) if f >= 0]
        t = tokens.shape[1]
        ends = [last[i] if last is not None else i * t + t - 1 for i in rows]
        index = self._upload(torch.tensor([ends, [feed[i] for i in rows]], dtype=torch.int64))
        tokens.view(-1)[index[0]] = self.last_sampled[index[1]]


def accepted_prefix(fed: list[int], best: list[int]) -> int:
    """How many drafts of a greedy row are accepted: fed is the row's last token then its k
    drafts, best the target's k + 1 argmax tokens; draft i is kept while every draft up to
    it equals the argmax after the token before it (`greedy_verify` on the host)."""
    n = 0
    for draft, target in zip(fed[1:], best):
        if draft != target:
            break
        n += 1
    return n


def greedy_verify(target_logits: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """`rejection_sample` for rows that all sample greedily, whatever drafted: a draft is
    accepted iff it is the target's argmax, and every output token is the target's argmax.

    target_logits (B, k + 1, V), drafts (B, k) int64 -> (tokens (B, k + 1), num_accepted (B,))."""
    return greedy_accept(target_logits.argmax(-1), drafts)


def greedy_accept(best: Tensor, drafts: Tensor) -> tuple[Tensor, Tensor]:
    """`greedy_verify` from the target's argmax tokens `best` (B, k + 1) int64."""
    num_accepted = (drafts == best[:, :-1]).long().cumprod(-1).sum(-1)  # (B,)
    return best, num_accepted
