"""Step plans: split-KV decode schedules and the host lengths of a prefill step.

Decode: which program attends which tokens of which sequence.

A decode step's work is B sequences × the programs along the head axis (KV heads × head
blocks). When that is too few programs to keep every SM streaming (small batch, long context),
long sequences are cut into pieces; each piece becomes a work item with its own partial output
and LSE, and the combine kernel merges a sequence's pieces. Piece sizes follow the lengths, so a
batch of one 128K and three 1K sequences spends its programs on the long one. A batch large
enough to fill the GPU one piece per sequence is cut only where one sequence is far longer
than its share (one 128K among 127 of 1K), which alone would keep one SM busy long after the
rest are done.

The plan is computed once per step on the host (it reads `cache_seqlens`) and reused by every
layer. Its tensors live on the lengths' device; the kernels read them there and never sync.
Its grid, `capacity` items, depends only on the batch size and head count, so a CUDA graph
captured with one plan replays correctly after `plan_decode(..., out=plan)` refreshes it.

Prefill (`plan_prefill`): a variable-length step's query and context lengths, read on the host
once and checked, so that every layer's prefill call launches without reading them back.

Where a step's lengths are in host memory, an op holds its plan to them; each plan remembers
the tensors it was last found to match (`CheckedLengths`), so that the check runs in the
step's first layer, not in all of them.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import operator
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch
from torch import Tensor

# Pieces start on multiples of this many tokens, a multiple of every kernel's token block.
PIECE_ALIGN = 64
# Default shortest piece of a split sequence, so the partial written per piece stays small
# next to the cache bytes the piece reads (the kernels' launcher passes a shape-aware value).
MIN_PIECE = 256
# Programs in flight per SM that the planner aims for (two hide most of the load latency).
PROGRAMS_PER_SM = 2
# Batches of at most this many sequences are planned with Python integers: numpy's cost per
# call, not the batch, sets the time of a small plan, and a plan is refreshed every step.
SMALL_BATCH = 8


class CheckedLengths:
    """The host tensors a plan was last found to agree with (the call's lengths, and the
    plan's own tensors where it has any), with their bytes at that time: an op that holds a
    plan to the call's lengths skips the check when `holds` them, so the later layers of a
    step do not repeat the first layer's.

    `holds` is true only for the very same tensor objects (another tensor of equal values is
    checked afresh) still holding the same bytes. Identity alone would not do: the engine
    refreshes its buffers in place, and a tensor made under `torch.inference_mode` keeps no
    version counter that would show a write. The bytes are read through a view of the raw
    memory kept from `remember`, and only while the tensor still starts at the same address
    with the same shape, strides and dtype, i.e. covers exactly the view's bytes (its storage
    may have been swapped and the old one freed: the view is never read then). Not through
    `Tensor.numpy()`, which would make the caller's tensor unresizable for good. Under a
    microsecond a tensor, where deriving a decode plan's lengths costs about 15. Contiguous
    host tensors only: a call with any other is checked every time.
    """

    __slots__ = ("_seen",)

    def __init__(self) -> None:
        # Per tensor: (tensor, a view of its bytes, the bytes, address, shape, strides, dtype);
        # None: nothing that `holds` may vouch for.
        self._seen: tuple[tuple, ...] | None = None

    def holds(self, tensors: tuple[Tensor, ...]) -> bool:
        """Whether `tensors` are the ones last remembered, in order, holding the same bytes."""
        seen = self._seen  # read once: a `remember` from another thread swaps it whole
        if seen is None or len(seen) != len(tensors):
            return False
        for t, (old, view, values, address, shape, strides, dtype) in zip(tensors, seen):
            # The view is read last, once the tensor is known to span exactly its bytes.
            if not (t is old and t.data_ptr() == address and t.shape == shape
                    and t.stride() == strides and t.dtype == dtype and t.is_cpu
                    and view.tobytes() == values):
                return False
        return True

    def remember(self, tensors: tuple[Tensor, ...]) -> None:
        """Record `tensors` (host tensors just found to agree with the plan) and their bytes."""
        seen = []
        for t in tensors:
            if not (t.is_cpu and t.is_contiguous()):
                self._seen = None
                return
            address, size = t.data_ptr(), t.numel() * t.element_size()
            view = np.frombuffer((ctypes.c_char * size).from_address(address), dtype=np.uint8)
            seen.append((t, view, view.tobytes(), address, t.shape, t.stride(), t.dtype))
        self._seen = tuple(seen)

    def __reduce__(self):
        # A copy (pickled, deep-copied with its plan) was checked against nothing: its views
        # would hold copied bytes, not the memory at the addresses they remember.
        return CheckedLengths, ()


@dataclass
class DecodePlan:
    """Work items of one decode step.

    batch: B the plan was made for. max_seqlen: longest sequence, checked against the block
    table without a device read. items: (capacity, 3) int32, one row per program along the
    token axis: (sequence, first token, end token); sequence -1 marks an idle slot.
    splits: (B, 2) int32, (first item, number of items) of each sequence; a sequence's items
    are consecutive. Item i writes its partial into slot i of the partial buffers.
    max_pieces: most items of one sequence (sizes the combine kernel's tile; a refreshed plan
    that exceeds the tile a CUDA graph captured is still merged correctly, in more steps).
    min_seqlen: shortest sequence, so that a call with more query tokens than it holds is
    refused without a device read (None: not known, not checked).
    """

    batch: int
    max_seqlen: int
    items: Tensor
    splits: Tensor
    max_pieces: int = 1
    # items and splits as views of this one int32 buffer, flattened and in that order, when
    # they share one (then a refresh is one host-to-device copy); None when they do not.
    packed: Tensor | None = None
    # A host tensor shaped like `packed` that a refresh writes instead of copying to the
    # device, for a caller whose own upload carries it (the engine's staged inputs).
    host: Tensor | None = None
    min_seqlen: int | None = None
    # The host lengths this plan was last found to be made for (`CheckedLengths`).
    checked: CheckedLengths = field(default_factory=CheckedLengths, init=False, repr=False,
                                    compare=False)

    @classmethod
    def of_packed(cls, batch: int, max_seqlen: int, packed: Tensor, max_pieces: int,
                  min_seqlen: int | None = None) -> DecodePlan:
        """A plan whose items and splits are views of `packed`: (capacity * 3 + B * 2,) int32."""
        return cls(batch, max_seqlen, *_unpacked(packed, batch), max_pieces, packed,
                   min_seqlen=min_seqlen)

    def rebind(self, packed: Tensor) -> None:
        """Move this plan into `packed` (a (capacity * 3 + B * 2,) int32 tensor, e.g. a view
        of a larger buffer): its contents are copied there and items and splits become views
        of it, so a CUDA graph captured afterwards reads the plan from `packed`."""
        if self.packed is None:
            raise ValueError("rebind: the plan's items and splits do not share one buffer")
        if packed.shape != self.packed.shape or packed.dtype != torch.int32:
            raise ValueError(f"packed must be {tuple(self.packed.shape)} int32, got "
                             f"{tuple(packed.shape)} {packed.dtype}")
        packed.copy_(self.packed)
        self.items, self.splits = _unpacked(packed, self.batch)
        self.packed = packed

    def to(self, device) -> DecodePlan:
        """This plan with its tensors on `device` (itself if they are there already). From the
        host to a GPU the copy goes through pinned memory without waiting: a blocking copy
        would first drain every step already queued (an eager decode call, such as a mixed
        step's decode rows, would then hold the engine's overlapped scheduling back)."""
        device = torch.device(device)
        if self.items.device == device:
            return self
        if self.packed is not None:
            return DecodePlan.of_packed(self.batch, self.max_seqlen, upload(self.packed, device),
                                        self.max_pieces, self.min_seqlen)
        return DecodePlan(self.batch, self.max_seqlen, upload(self.items, device),
                          upload(self.splits, device), self.max_pieces,
                          min_seqlen=self.min_seqlen)

    @property
    def capacity(self) -> int:
        return self.items.shape[0]

    @property
    def may_split(self) -> bool:
        """Whether any sequence can have several pieces, i.e. the combine kernel must run."""
        return self.capacity > self.batch

    def check(self, batch: int, device: torch.device, query_len: int | None = None) -> None:
        """Raise ValueError unless this plan was made for `batch` sequences on `device` whose
        lengths all count `query_len` new tokens (host values only: no device read)."""
        if self.batch != batch or self.items.device != device:
            raise ValueError(f"plan was made for B={self.batch} on {self.items.device}, "
                             f"not B={batch} on {device}")
        if query_len is not None and self.min_seqlen is not None and self.min_seqlen < query_len:
            raise ValueError(f"plan: the plan's shortest sequence holds {self.min_seqlen} tokens, "
                             f"fewer than the query length {query_len} (the new tokens are "
                             f"counted); plan the step with query_len={query_len}")

    def planned_lengths(self) -> Tensor:
        """(B,) int32 on the plan's device: the tokens of each sequence its items cover, i.e.
        the lengths it was made for (a sequence's last item ends at its length)."""
        last = self.splits[:, 0] + self.splits[:, 1] - 1
        return self.items[last.long(), 2]

    def buffers(self, query_len: int, n_heads: int, d_v: int, dtype: torch.dtype,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The step's outputs and the partials its pieces write: out (B, L_q, H, d_v) in
        `dtype`, lse (B, H, L_q) fp32, and the fp32 partials (capacity, L_q, H, d_v) and
        (capacity, L_q, H), which are `out` and `lse` themselves when no sequence splits
        (the kernel then never touches them)."""
        out = torch.empty(self.batch, query_len, n_heads, d_v, dtype=dtype, device=device)
        lse = torch.empty(self.batch, n_heads, query_len, dtype=torch.float32, device=device)
        if not self.may_split:
            return out, lse, out, lse
        part_out = torch.empty(self.capacity, query_len, n_heads, d_v, dtype=torch.float32,
                               device=device)
        part_lse = torch.empty(self.capacity, query_len, n_heads, dtype=torch.float32,
                               device=device)
        return out, lse, part_out, part_lse


def upload(t: Tensor, device) -> Tensor:
    """`t` on `device`; from host memory to a GPU through pinned memory without waiting for
    the device (a blocking copy would first drain every step already queued)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _unpacked(packed: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """(items (capacity, 3), splits (B, 2)) as views of a packed plan buffer."""
    capacity = (packed.numel() - 2 * batch) // 3
    return packed[:3 * capacity].view(capacity, 3), packed[3 * capacity:].view(batch, 2)


def _one_piece(lengths: np.ndarray, capacity: int, packed: np.ndarray) -> None:
    """`_schedule` when every sequence is one piece (the common case: enough sequences to
    fill the GPU, or short ones): the same packed plan, written into `packed`, in fewer array
    operations (each one costs the host a microsecond or two, and a plan is refreshed every
    step)."""
    batch = len(lengths)
    if batch > capacity:
        raise ValueError(f"out: a plan for B={batch} with {capacity} items cannot hold "
                         f"this step's {batch} pieces")
    items = packed[:3 * capacity].reshape(capacity, 3)
    splits = packed[3 * capacity:].reshape(batch, 2)
    rows = np.arange(batch)
    if np.logical_and.reduce(lengths[1:] <= lengths[:-1]):  # already longest first
        items[:batch, 0] = rows
        items[:batch, 2] = lengths
        splits[:, 0] = rows
    else:
        order = np.argsort(-lengths, kind="stable")
        items[:batch, 0] = order
        items[:batch, 2] = lengths[order]
        splits[order, 0] = rows
    items[:batch, 1] = 0
    items[batch:] = (-1, 0, 0)
    splits[:, 1] = 1


def _schedule(lengths: np.ndarray, n_pieces: np.ndarray, capacity: int,
              packed: np.ndarray) -> int:
    """The packed plan of sequences of `lengths` (B,), each cut into at most `n_pieces` (B,)
    aligned pieces of near-equal size, written into `packed` ((capacity * 3 + B * 2,) int32):
    the items (sequence, start, end), idle slots (-1, 0, 0) after them, then the splits (first
    item, number of items); returns the most pieces of one sequence.

    Sequences are laid out longest pieces first (ties in batch order), each one's pieces
    together: programs start in item order, so the longest work starts first and the short
    pieces fill the gaps at the end (longest-processing-time order), wherever the long
    sequences sit in the batch."""
    size = -(-lengths // n_pieces)
    size = -(-size // PIECE_ALIGN) * PIECE_ALIGN
    counts = -(-lengths // size)  # pieces actually cut: [0, n) in steps of `size`
    piece = np.minimum(size, lengths)  # each sequence's longest (first) piece
    if (piece[1:] <= piece[:-1]).all():  # already longest first (e.g. equal lengths)
        order, first = np.arange(len(lengths)), np.cumsum(counts) - counts
    else:
        order = np.argsort(-piece, kind="stable")
        first = np.empty_like(counts)
        first[order] = np.cumsum(counts[order]) - counts[order]
    total = int(counts.sum())
    if total > capacity:  # only a refreshed plan can be too small: a fresh one is sized here
        raise ValueError(f"out: a plan for B={len(lengths)} with {capacity} items cannot hold "
                         f"this step's {total} pieces")
    batch = len(lengths)
    items = packed[:3 * capacity].reshape(capacity, 3)
    seq = np.repeat(order, counts[order])  # (items in layout order)
    start = (np.arange(total) - first[seq]) * size[seq]
    items[:total, 0] = seq
    items[:total, 1] = start
    items[:total, 2] = np.minimum(start + size[seq], lengths[seq])
    items[total:] = (-1, 0, 0)
    splits = packed[3 * capacity:].reshape(batch, 2)
    splits[:, 0], splits[:, 1] = first, counts
    return int(counts.max())


def _schedule_small(lengths: list[int], n_pieces: list[int], capacity: int,
                    packed: np.ndarray) -> int:
    """`_schedule` for a few sequences, with Python integers: the same packed plan."""
    sizes, counts = [], []
    for n, parts in zip(lengths, n_pieces):
        size = -(-n // parts)
        size = -(-size // PIECE_ALIGN) * PIECE_ALIGN
        sizes.append(size)
        counts.append(-(-n // size))
    total = sum(counts)
    batch = len(lengths)
    if total > capacity:
        raise ValueError(f"out: a plan for B={batch} with {capacity} items cannot hold "
                         f"this step's {total} pieces")
    # Longest first piece first, ties in batch order (as `_schedule`'s stable sort).
    order = sorted(range(batch), key=lambda b: -min(sizes[b], lengths[b]))
    items, splits = [], [0] * (2 * batch)
    for b in order:
        n, size = lengths[b], sizes[b]
        splits[2 * b], splits[2 * b + 1] = len(items) // 3, counts[b]
        for start in range(0, n, size):
            items += (b, start, min(start + size, n))
    packed[:3 * total] = items
    packed[3 * total:3 * capacity].reshape(-1, 3)[:] = (-1, 0, 0)
    packed[3 * capacity:] = splits
    return max(counts)


def device_sms(device: torch.device) -> int:
    """Multiprocessors of `device`: the GPU's count, or an H100's (132) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H100's count, so CPU plans (tests, interpreter) look like GPU ones


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first of `values` (a plan's sizes and knobs) that is not
    positive."""
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def plan_decode(cache_seqlens: Tensor, *, num_heads_kv: int, query_len: int = 1,
                page_size: int = 64, num_sms: int | None = None, head_blocks: int = 1,
                min_piece: int = MIN_PIECE, split_tokens: int | None = None,
                programs_per_sm: int = PROGRAMS_PER_SM, reserve_pieces: bool = False,
                out: DecodePlan | None = None) -> DecodePlan:
    """Split-KV schedule for one decode step (reads `cache_seqlens` on the host once).

    Args:
        cache_seqlens: (B,) int32, tokens cached per sequence, the `query_len` new ones included.
        num_heads_kv: KV (or latent) heads per layer; with `head_blocks` (query-head blocks per
            KV head, default 1) it sets how many programs work on each item.
        query_len: L_q of the step; every length must be at least this.
        page_size: the cache's page size; must be positive (pieces are aligned to 64 tokens).
        num_sms: multiprocessors to fill; default: the device's (132 on CPU).
        min_piece: shortest piece worth its partial output (tokens, default 256); wide partials
            (MLA: 128 heads × 512 fp32 per piece) call for longer pieces.
        split_tokens: force pieces of this many tokens (a multiple of 64), e.g. to test the
            combine path; default: decided from the lengths.
        programs_per_sm: programs in flight per SM to aim for when splitting (default 2); a
            kernel that fits one program per SM asks for 1, so its pieces fill one wave.
        reserve_pieces: size the plan for split pieces even where these lengths need none (a
            full batch of even lengths): a plan captured in a CUDA graph and refreshed for
            later steps, whose lengths may hold a sequence far longer than the rest, which a
            plan of capacity B would have to leave whole. It costs the refreshed steps that
            split nothing one combine launch per call, whose programs return at once.
            (With `split_tokens` the forced pieces size the plan, and this is not needed.)
        out: a previous plan of the same batch to refresh in place (CUDA graph replay); the new
            schedule must fit its capacity. If `out.host` is set the schedule is written there
            and not copied to the device (the caller uploads it).
    Returns:
        a `DecodePlan`.
    """
    if cache_seqlens.dtype != torch.int32 or cache_seqlens.dim() != 1:
        raise ValueError(f"cache_seqlens must be (B,) int32, got {tuple(cache_seqlens.shape)} "
                         f"{cache_seqlens.dtype}")
    # (One comparison on the every-step path; `check_positive` names the bad value.)
    if min(num_heads_kv, query_len, page_size, head_blocks, min_piece, programs_per_sm) <= 0:
        check_positive(num_heads_kv=num_heads_kv, query_len=query_len, page_size=page_size,
                       head_blocks=head_blocks, min_piece=min_piece,
                       programs_per_sm=programs_per_sm)
    if out is not None and not isinstance(out, DecodePlan):
        raise ValueError(f"out must be a DecodePlan from plan_decode, got {type(out).__name__}")
    if split_tokens is not None and (split_tokens <= 0 or split_tokens % PIECE_ALIGN):
        raise ValueError(f"split_tokens must be a positive multiple of {PIECE_ALIGN}, "
                         f"got {split_tokens}")
    host = cache_seqlens if cache_seqlens.is_cpu else cache_seqlens.cpu()
    batch = len(host)
    if batch == 0:
        raise ValueError("cache_seqlens must hold at least one sequence")
    small = batch <= SMALL_BATCH
    # Python ints for a small batch, else an int64 array: both go through the same rule.
    if small:
        lengths = host.tolist()
        shortest, max_seqlen = min(lengths), max(lengths)
    else:
        lengths = host.numpy().astype(np.int64)
        shortest, max_seqlen = int(np.minimum.reduce(lengths)), int(np.maximum.reduce(lengths))
    if shortest < query_len:
        raise ValueError(f"cache_seqlens must be >= the query length {query_len} (the new tokens "
                         f"are counted), got min {shortest}")
    sms = num_sms if num_sms is not None else device_sms(cache_seqlens.device)
    per_item = num_heads_kv * head_blocks

    # n_pieces None: every sequence is one piece (`_one_piece`), decided from the longest.
    if split_tokens is not None:
        n_pieces = None if max_seqlen <= split_tokens else \
            [-(-n // split_tokens) for n in lengths] if small else -(-lengths // split_tokens)
        capacity = batch if n_pieces is None else \
            sum(n_pieces) if small else int(n_pieces.sum())
    else:
        wanted = math.ceil(programs_per_sm * sms / per_item)  # items that fill the GPU
        # A full batch (one piece per sequence fills every SM) is cut only where a sequence
        # is far longer than an even share of the step's work: a 128K-token sequence among
        # short ones would otherwise be one program's work while the rest of the GPU idles.
        # Its chunk is at least the mean length, so a batch of equal lengths stays whole, and
        # the cheap bound from the shortest decides that without summing the lengths.
        full = batch >= wanted
        if full and 2 * max_seqlen * wanted < 3 * (max_seqlen + (batch - 1) * shortest):
            chunk = None
        else:
            chunk = max(min_piece, -(-(sum(lengths) if small else int(np.add.reduce(lengths)))
                                     // wanted))
        # Rounding (half to even, as Python's round) keeps the count within wanted + B/2;
        # capacity B + wanted always holds it. round(n / chunk) <= 1 exactly when
        # 2n < 3 chunk (n / chunk < 1.5; the quotient's rounding error is far below the gap
        # of 1 / (2 chunk) to 1.5), so that one comparison of the longest decides. A full
        # batch refreshed into a plan sized without room for pieces (made on equal lengths
        # without `reserve_pieces`) keeps one piece per sequence, as it was made.
        if chunk is None or 2 * max_seqlen < 3 * chunk or (
                full and out is not None and out.capacity < batch + wanted):
            n_pieces = None
        else:
            n_pieces = [max(1, round(n / chunk)) for n in lengths] if small \
                else np.maximum(1, np.rint(lengths / chunk).astype(np.int64))
        capacity = batch if full and n_pieces is None and not reserve_pieces else batch + wanted
    if out is not None:
        if out.batch != batch:
            raise ValueError(f"out: a plan for B={out.batch} cannot hold B={batch}")
        capacity = out.capacity
    # A refresh whose caller uploads the host mirror is written straight into it.
    direct = out is not None and out.host is not None
    packed = out.host.numpy() if direct else np.empty(3 * capacity + 2 * batch, dtype=np.int32)
    if n_pieces is None and not small:
        _one_piece(lengths, capacity, packed)
        max_pieces = 1
    else:
        max_pieces = (_schedule_small if small else _schedule)(
            lengths, [1] * batch if n_pieces is None else n_pieces, capacity, packed)
    if direct:  # the caller's own upload carries it (see DecodePlan.host)
        out.max_seqlen, out.max_pieces, out.min_seqlen = max_seqlen, max_pieces, shortest
        return out
    packed = torch.from_numpy(packed)
    if out is None:
        return DecodePlan.of_packed(batch, max_seqlen, packed, max_pieces,
                                    shortest).to(cache_seqlens.device)
    if out.items.is_cuda:  # a copy from pageable memory may wait for the stream to drain
        packed = packed.pin_memory()
    if out.packed is not None:
        out.packed.copy_(packed, non_blocking=True)
    else:
        out.items.copy_(packed[:3 * capacity].view(capacity, 3), non_blocking=True)
        out.splits.copy_(packed[3 * capacity:].view(batch, 2), non_blocking=True)
    out.max_seqlen, out.max_pieces, out.min_seqlen = max_seqlen, max_pieces, shortest
    return out


@dataclass(frozen=True)
class PrefillPlan:
    """The host lengths of one variable-length prefill step, read once and shared by every
    layer (so that no layer reads `cu_seqlens_q` or `cache_seqlens` back from the device).

    query_lens: per sequence, its query tokens this step (0 allowed).
    seqlens: per sequence, tokens cached once this step's are written (>= its query tokens).
    """

    query_lens: tuple[int, ...]
    seqlens: tuple[int, ...]
    # The host cu_seqlens_q and cache_seqlens this plan was last found to be made for.
    checked: CheckedLengths = field(default_factory=CheckedLengths, init=False, repr=False,
                                    compare=False)

    # Read by every layer of a step: computed once per plan (the plan is immutable).
    @cached_property
    def batch(self) -> int:
        return len(self.seqlens)

    @cached_property
    def total_q(self) -> int:
        return sum(self.query_lens)

    @cached_property
    def max_seqlen_q(self) -> int:
        return max(self.query_lens)

    @cached_property
    def max_seqlen_k(self) -> int:
        return max(self.seqlens)

    @cached_property
    def total_k(self) -> int:
        """Cached tokens of all sequences, this step's included."""
        return sum(self.seqlens)

    @cached_property
    def pairs(self) -> int:
        """(query, key) pairs the causal step attends: query j of a sequence of n queries over
        L cached tokens sees L - n + j + 1 keys."""
        return sum(n * (length - n) + n * (n + 1) // 2
                   for n, length in zip(self.query_lens, self.seqlens))

    @cached_property
    def fresh(self) -> bool:
        """Whether every sequence's cache holds only this step's tokens (whole prompts)."""
        return all(s == q for s, q in zip(self.seqlens, self.query_lens))

    @cached_property
    def cu_seqlens_q(self) -> list[int]:
        """(B + 1) offsets of each sequence's first query token, as the ops take them."""
        return [0, *itertools.accumulate(self.query_lens)]

    def check(self, batch: int, total_q: int, capacity: int) -> None:
        """Raise ValueError unless this plan describes `batch` sequences holding `total_q`
        query tokens whose longest context fits a block table of `capacity` slots."""
        if self.batch != batch or self.total_q != total_q:
            raise ValueError(f"plan was made for B={self.batch} with {self.total_q} query tokens, "
                             f"not B={batch} with {total_q}")
        if self.max_seqlen_k > capacity:
            raise ValueError(f"block_table holds {capacity} slots, too short for the plan's "
                             f"longest sequence {self.max_seqlen_k}")


def _host_ints(name: str, values) -> list[int]:
    """A 1-D integer tensor or sequence of integers as a list of ints; ValueError naming it
    otherwise (a float would be truncated, a nested list fail inside int())."""
    if isinstance(values, Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex():
            raise ValueError(f"{name} must be a 1-D integer tensor or list, got "
                             f"{tuple(values.shape)} {values.dtype}")
        return values.tolist()
    try:
        return [operator.index(n) for n in values]
    except TypeError:
        raise ValueError(f"{name} must be a 1-D integer tensor or list, got {values!r}") from None


def plan_prefill(cu_seqlens_q, cache_seqlens) -> PrefillPlan:
    """Read and check the lengths of a variable-length prefill step (on the host, once).

    Args:
        cu_seqlens_q: (B + 1,) int offsets of each sequence's queries, starting at 0 and
            non-decreasing (a tensor, read back once, or a list).
        cache_seqlens: (B,) int tokens cached per sequence, this step's included.
    Returns:
        a `PrefillPlan`.
    """
    cu = _host_ints("cu_seqlens_q", cu_seqlens_q)
    lens = _host_ints("cache_seqlens", cache_seqlens)
    if not lens:
        raise ValueError("cache_seqlens must hold at least one sequence")
    if len(cu) != len(lens) + 1:
        raise ValueError(f"cu_seqlens_q must hold B + 1 = {len(lens) + 1} offsets, got {len(cu)}")
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens_q must start at 0, got {cu[0]}")
    query_lens = [hi - lo for lo, hi in zip(cu, cu[1:])]
    if min(query_lens) < 0:
        raise ValueError(f"cu_seqlens_q must be non-decreasing, got {cu}")
    short = [b for b, (n, q) in enumerate(zip(lens, query_lens)) if n < q]
    if short:
        b = short[0]
        raise ValueError(f"cache_seqlens must count each sequence's query tokens: sequence {b} "
                         f"has {query_lens[b]} queries but cache_seqlens {lens[b]}")
    return PrefillPlan(tuple(query_lens), tuple(lens))
