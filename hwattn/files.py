"""Result files written whole: each is written beside its final name and renamed over it, so
a run that fails or is killed while writing leaves the earlier file as it was (or none), never
a cut one. Results hold no NaN or inf: strict JSON readers (jq, JavaScript, Go) refuse them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def replace_file(path: str | Path, write) -> Path:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`. The
    temporary name keeps the suffix, from which matplotlib's `savefig` takes the format."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`text` to `path`, whole (`replace_file`)."""
    return replace_file(path, lambda tmp: tmp.write_text(text))


def finite_json(value):
    """`value` with every NaN or infinite float (at any depth of dicts, lists and tuples)
    replaced by None: what `json.dumps` would otherwise write as NaN / Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def write_json(path: str | Path, doc, **dumps_kwargs) -> Path:
    """`doc` as strict JSON (`finite_json`) to `path`, whole, ending in a newline."""
    return write_text(path, json.dumps(finite_json(doc), allow_nan=False, **dumps_kwargs) + "\n")
