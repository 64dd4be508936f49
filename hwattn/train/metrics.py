"""The training run's `metrics.jsonl`: one JSON record per line, each with its `step`."""

from __future__ import annotations

import json
from pathlib import Path

from hwattn.files import write_text


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every line of `path`. A last line that is not valid JSON is a write
    cut short by a kill and is left out; a bad line elsewhere is a ValueError."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError as err:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not a JSON record ({err})") from None
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only records up to `step` (a resumed run rewrites what came after). The file is
    replaced by rename, so a kill meanwhile leaves the old one whole."""
    if not path.is_file():
        return
    keep = [ln for ln, rec in _records(path) if rec.get("step", 0) <= step]
    write_text(path, "".join(ln + "\n" for ln in keep))


def drop_metrics(path: Path, match) -> None:
    """Remove the records for which `match(record)` is true, replacing the file by rename (as
    `truncate_metrics` does)."""
    if not path.is_file():
        return
    keep = [ln for ln, rec in _records(path) if not match(rec)]
    write_text(path, "".join(ln + "\n" for ln in keep))


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a metrics file, in order ([] if there is none)."""
    path = Path(path)
    return [rec for _, rec in _records(path)] if path.is_file() else []
