"""Reading a quality study's folder and pairing its runs: the first phase of the report.

`load_runs` reads the runs of study_runs.jsonl (each run once, all of one setup, all
finished: `_comparable_runs`), the study_summary.json beside them and the claims' looks
(study_looks.json) and registered batches (study_next_looks.json) into the summary;
`by_variant` and `domains_of` are how the other phases group those runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from hwattn.eval.claims import LOOKS_FILE, NEXT_LOOKS_FILE
from hwattn.models.checkpoint import read_json_object

# The order of the variants in the page's tables and figures (others after them).
ORDER = ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")


def load_runs(study: str | Path) -> tuple[list[dict], dict]:
    """The run records of study_runs.jsonl and the study_summary.json document ({} without
    one). ValueError naming the file, and the line, of a record that is not a JSON object;
    the records are those of `_comparable_runs` (each run once, one setup, finished runs)."""
    study = Path(study)
    runs_file, summary_file = study / "study_runs.jsonl", study / "study_summary.json"
    if not runs_file.is_file():
        raise ValueError(f"{study} holds no study_runs.jsonl")
    runs = []
    for i, ln in enumerate(runs_file.read_text().splitlines(), 1):
        if not ln.strip():
            continue
        try:
            record = json.loads(ln)
        except ValueError as err:
            raise ValueError(f"{runs_file}: line {i} is not a JSON record ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{runs_file}: line {i} is not a JSON object")
        runs.append((i, record))
    runs = _comparable_runs(runs_file, runs)
    summary = read_json_object(summary_file) if summary_file.is_file() else {}
    looks_file = study / LOOKS_FILE
    if looks_file.is_file():  # the claims' earlier looks (`record_looks`), read with the summary
        summary = dict(summary, looks=read_json_object(looks_file))
    next_file = study / NEXT_LOOKS_FILE
    if next_file.is_file():  # batches registered before their first seed (`register_next_looks`)
        summary = dict(summary, next_looks=read_json_object(next_file))
    return runs, summary


# What must be equal for runs to be compared (benchmarks/quality_study.py's SETUP_KEYS).
SETUP_KEYS = ("preset", "steps", "seq_len", "batch_size", "lr", "warmup_steps", "build_key")


def _comparable_runs(runs_file: Path, numbered: list[tuple[int, dict]]) -> list[dict]:
    """The records (line number, record) as runs to compare: a run recorded twice alike
    counted once; ValueError naming the run for one recorded twice differently, one of another
    setup than the first record's (`SETUP_KEYS`: another corpus build, schedule or shape), one
    that stopped before its last step (fewer tokens than steps × batch × sequence) and one
    that diverged (`_diverged`)."""
    out: dict[tuple, tuple[int, dict]] = {}
    for i, r in numbered:
        key = (r.get("variant"), r.get("seed"))
        name = f"{key[0]}-s{key[1]}"
        if key in out:
            if out[key][1] != r:
                raise ValueError(f"{runs_file}: run {name} is recorded twice, differently "
                                 f"(lines {out[key][0]} and {i}); keep one")
            continue
        first = next(iter(out.values()), (i, r))[1]
        diff = {k: (r.get(k), first.get(k)) for k in SETUP_KEYS if r.get(k) != first.get(k)}
        if diff:
            other = f"{first.get('variant')}-s{first.get('seed')}"
            raise ValueError(f"{runs_file}: run {name} (line {i}) is of another setup than "
                             f"{other} ({name}'s, {other}'s: {diff}); a study compares runs "
                             "of one setup")
        dims = [r.get(k) for k in ("tokens", "steps", "batch_size", "seq_len")]
        if all(isinstance(d, int) for d in dims) and dims[0] < dims[1] * dims[2] * dims[3]:
            raise ValueError(f"{runs_file}: run {name} (line {i}) trained {dims[0]:,} of its "
                             f"{dims[1] * dims[2] * dims[3]:,} tokens: not a finished run")
        bad = _diverged(r)
        if bad:
            raise ValueError(f"{runs_file}: run {name} (line {i}) diverged: its validation "
                             f"{bad}, so its seed has no perplexity gap to pair (an "
                             "infinite baseline would make a gap of -100%); decide what the "
                             "study does with it (rerun the seed, or take its record out and "
                             "say so) before reporting")
        out[key] = (i, r)
    return [r for _, r in out.values()]


def _diverged(run: dict) -> str | None:
    """What is not finite in the run's final evaluation ("perplexity of code is inf"), or
    None: a loss past about 709 nats is an infinite perplexity, a NaN loss a NaN one
    (`hwattn.eval.perplexity`). Records without an evaluation are left to the phases that
    read it."""
    ppl = run.get("eval", {}).get("ppl") if isinstance(run.get("eval"), dict) else None
    if not isinstance(ppl, dict):
        return None
    for domain, rec in ppl.items():
        if not isinstance(rec, dict):
            continue
        for key, word in (("ppl", "perplexity"), ("loss", "loss")):
            value = rec.get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                return f"{word} of {domain} is {value}"
    return None


def by_variant(runs: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(sorted(by.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def domains_of(runs: list[dict]) -> list[str]:
    return [d for d in runs[0]["eval"]["ppl"] if d != "average"]
