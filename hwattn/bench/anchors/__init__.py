"""Measured timings of other people's decode kernels (FlashMLA, FlashAttention-3), kept as data.

Each JSON file in this folder is one measurement session on one GPU model:

    gpu       the device name as torch reports it ("NVIDIA H100 80GB HBM3")
    date      the day it was measured; source: what was timed and how
    peaks     copy GB/s and bf16 matmul TFLOP/s measured the same day
    shape     what every row shares (batch, query heads, page size, TP degree, cache dtype,
              d_h and d_R: the widths the latents and the RoPE key follow from)
    timings   rows of kernel, variant, query_len, context and us (median µs per call)

`hwattn bench decode` prints the matching anchor beside its own rows. They come from another
process and day, so they compare only on the same GPU model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

SHAPE_KEYS = ("batch", "heads", "page", "tp", "cache_dtype", "head_dim", "rope_dim")


@dataclass(frozen=True)
class AnchorSet:
    """One file of anchors. `timings` maps (kernel, variant, query_len, context) to µs."""

    name: str
    gpu: str
    date: str
    source: str
    shape: dict
    timings: dict[tuple[str, str, int, int], float]

    def matches(self, case: dict) -> bool:
        """Whether a bench row's shape is the one these anchors were timed at. `case` holds
        batch, heads (local query heads), page, tp, cache_dtype, head_dim and rope_dim."""
        return all(case.get(k) == self.shape[k] for k in SHAPE_KEYS)

    def lookup(self, kernel: str, variant: str, query_len: int, context: int) -> float | None:
        return self.timings.get((kernel, variant, query_len, context))

    def describe(self) -> str:
        return f"{self.gpu}, {self.date}"


def _parse(name: str, doc: dict) -> AnchorSet:
    for key in ("gpu", "date", "source", "shape", "timings"):
        if key not in doc:
            raise ValueError(f"anchor file {name}: missing field {key!r}")
    missing = [k for k in SHAPE_KEYS if k not in doc["shape"]]
    if missing:
        raise ValueError(f"anchor file {name}: shape lacks {missing}")
    timings = {}
    for i, row in enumerate(doc["timings"]):
        try:
            key = (str(row["kernel"]), str(row["variant"]), int(row["query_len"]), int(row["context"]))
            timings[key] = float(row["us"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"anchor file {name}: timings[{i}] is malformed ({err})") from None
    return AnchorSet(name, doc["gpu"], doc["date"], doc["source"], dict(doc["shape"]), timings)


def load_anchors() -> list[AnchorSet]:
    """Every anchor file shipped in this folder, oldest first."""
    sets = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            sets.append(_parse(entry.name, json.loads(entry.read_text())))
    return sorted(sets, key=lambda s: (s.date, s.name))


def anchors_for(device_name: str, sets: list[AnchorSet] | None = None) -> AnchorSet | None:
    """The newest anchors measured on `device_name`'s GPU model; without one, the oldest set
    (the H100 reference), to be read as numbers from another GPU. None if there are none."""
    sets = load_anchors() if sets is None else sets
    same = [s for s in sets if s.gpu == device_name or device_name.startswith(s.gpu)]
    if same:
        return same[-1]
    return sets[0] if sets else None
