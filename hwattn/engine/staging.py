"""Host-side buffers that let a captured decode step reach the device in one copy and return
its tokens without allocating.

A replayed CUDA graph reads its inputs (split-KV plan, token ids, lengths, block table) from
static device tensors. Uploading each from a fresh pinned tensor costs the host one pinned allocation (whose
allocator polls the events of every pinned block still in flight) and one copy call per
tensor, every step. `StagedInputs` lays the static tensors out in one device buffer, mirrors
that layout in pinned host slots the engine writes with numpy, and sends a step's inputs in one
copy. `PinnedRing` keeps a few pinned buffers for the sampled tokens on their way back.
`HostBlockTable` keeps a slot's block table from step to step, rewriting only changed rows.

`StagedInputs` and `PinnedRing` reuse host memory that a queued copy may still read, so each slot carries the CUDA event
of its last copy and is only rewritten once that copy has run (`slot()` waits for it; with two
slots and the engine's one step in flight, the wait is over before it starts).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from hwattn.engine.block_manager import NULL_PAGE

_ALIGN = 16  # bytes; every field starts on a multiple (int64 views need 8)


class StagedInputs:
    """Named device tensors carved out of one byte buffer, with `slots` host mirrors.

    fields: name -> (shape, dtype), in layout order. `device[name]` is the device tensor;
    `slot()` returns the next host mirror as numpy arrays, `upload(end, start)` sends its
    bytes [start, end) (see `start` and `end`) to the device buffer in one non-blocking copy.
    """

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 device: torch.device, slots: int = 2):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.device_type = torch.device(device).type
        self._offsets: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        # Bytes of one row (dimension 0) of each field: `end` is called every step.
        self._row_bytes: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in fields.items():
            offset = -(-offset // _ALIGN) * _ALIGN
            self._offsets[name] = (offset, tuple(shape), dtype)
            self._row_bytes[name] = math.prod(shape[1:]) * dtype.itemsize
            offset += math.prod(shape) * dtype.itemsize
        self.nbytes = offset
        self._device_buffer = torch.zeros(offset, dtype=torch.uint8, device=device)
        self.device = self._views(self._device_buffer)
        pinned = self.device_type == "cuda"
        self._host_buffers = [torch.zeros(offset, dtype=torch.uint8, pin_memory=pinned)
                              for _ in range(slots)]
        self._host = [{k: v.numpy() for k, v in self._views(b).items()}
                      for b in self._host_buffers]
        self._events: list = [None] * slots
        self._next = 0

    def _views(self, buffer: Tensor) -> dict[str, Tensor]:
        out = {}
        for name, (offset, shape, dtype) in self._offsets.items():
            size = math.prod(shape) * dtype.itemsize
            out[name] = buffer[offset:offset + size].view(dtype).view(shape)
        return out

    @property
    def slots(self) -> list[dict[str, np.ndarray]]:
        """Every host mirror, in the order `slot()` hands them out."""
        return self._host

    @property
    def index(self) -> int:
        """Which of `slots` the next `slot()` returns."""
        return self._next

    def start(self, name: str) -> int:
        """Byte offset of field `name`."""
        return self._offsets[name][0]

    def end(self, name: str, rows: int) -> int:
        """Byte offset just past the first `rows` rows of field `name` (dimension 0)."""
        return self._offsets[name][0] + rows * self._row_bytes[name]

    def slot(self) -> dict[str, np.ndarray]:
        """The next host mirror, once the copy that last read it has run."""
        event = self._events[self._next]
        if event is not None:
            event.synchronize()
        return self._host[self._next]

    def upload(self, end: int | None = None, start: int = 0) -> None:
        """Send bytes [start, end) (default all) of the slot `slot()` returned to the device
        buffer, then move on to the next slot."""
        end = self.nbytes if end is None else end
        if not 0 <= start <= end <= self.nbytes:
            raise ValueError(f"upload: bytes [{start}, {end}) lie outside [0, {self.nbytes})")
        i = self._next
        src = self._host_buffers[i][start:end]
        if self.device_type == "cuda":
            self._device_buffer[start:end].copy_(src, non_blocking=True)
            if self._events[i] is None:
                self._events[i] = torch.cuda.Event()
            self._events[i].record()
        else:
            self._device_buffer[start:end].copy_(src)
        self._next = (i + 1) % len(self._host)


class PinnedRing:
    """A few pinned (capacity,) buffers that sampled tokens are copied back into, taken in
    turn. `take(n, dtype)` returns (the buffer's first n elements, the event to record after
    the copy into them, the slot) or None when the next buffer is still held, too small or of
    another dtype (the caller allocates then); `release(slot)` frees it once read."""

    def __init__(self, capacity: int, dtype: torch.dtype = torch.int64, slots: int = 4):
        self.capacity = capacity
        self.dtype = dtype
        self._buffers = [torch.empty(capacity, dtype=dtype, pin_memory=True) for _ in range(slots)]
        self._events = [torch.cuda.Event() for _ in range(slots)]
        self._held = [False] * slots
        self._next = 0

    def take(self, n: int, dtype: torch.dtype):
        i = self._next
        if n > self.capacity or dtype != self.dtype or self._held[i]:
            return None
        self._held[i] = True
        self._next = (i + 1) % len(self._buffers)
        return self._buffers[i][:n], self._events[i], i

    def release(self, slot: int) -> None:
        self._held[slot] = False


class HostBlockTable:
    """The (rows, width) int32 block table of captured decode steps on the host, kept from
    step to step: a row is rewritten only where its page list changed (a decoding sequence
    gains a page every `page_size` tokens), where building the table afresh converts every
    page of every row each step (0.8 ms for 64 rows of 512 pages on our CPU).

    Rows beyond the step's lists are the null page throughout, like the unused tail of
    every row, so the array always equals the table built from scratch.
    """

    def __init__(self, rows: int, width: int, array: np.ndarray | None = None):
        """array: (rows, width) int32 to keep the table in (a `StagedInputs` host slot), by
        default one of its own."""
        if array is None:
            array = np.empty((rows, width), dtype=np.int32)
        elif array.shape != (rows, width) or array.dtype != np.int32:
            raise ValueError(f"array must be ({rows}, {width}) int32, got {array.shape} {array.dtype}")
        array[:] = NULL_PAGE
        self.array = array
        self._held: list[list[int]] = [[] for _ in range(rows)]  # each row's pages

    def update(self, tables: list[list[int]], rows: int) -> np.ndarray:
        """Rows 0..rows-1 hold `tables` (then empty rows); returns `array[:rows]`."""
        width = self.array.shape[1]
        if not len(tables) <= rows <= self.array.shape[0]:
            raise ValueError(f"rows must lie in [{len(tables)}, {self.array.shape[0]}], got {rows}")
        for i in range(rows):
            pages = tables[i] if i < len(tables) else []
            held = self._held[i]
            if pages == held:
                continue
            if len(pages) > width:
                raise ValueError(f"block_tables: row {i} has {len(pages)} pages, the table "
                                 f"holds {width}")
            row = self.array[i]
            keep = len(held) if len(pages) >= len(held) and pages[:len(held)] == held else 0
            row[keep:len(pages)] = pages[keep:]
            if len(held) > len(pages):
                row[len(pages):len(held)] = NULL_PAGE
            self._held[i] = list(pages)
        return self.array[:rows]
