"""The training run's `metrics.jsonl`: one JSON record per line, each with its `step`."""

from __future__ import annotations

import json
from pathlib import Path


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file, in order ([] if there is none)."""
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.is_file() else []
