"""Turn the quality study's files into `docs/results/quality.md` and its plots.

    python -m hwattn.eval.report --study DIR [--out docs/results/quality.md]

DIR holds what `benchmarks/quality_study.py` wrote (study_runs.jsonl, study_summary.json).
Every number of the page is computed here from those files: per-domain perplexity and bits
per byte as mean ± standard deviation over seeds, the seed-to-seed variation, each claim's
paired gaps with their interval and verdict (`hwattn.eval.claims`, which says how a verdict
is read), the recall probe, throughput and MFU; its figures draw the loss curves and the
claims' gaps. Each report over new seeds is a look at a claim, recorded beside the runs
(`study_looks.json`).

The report in phases, each in its own module (each imports only those above it):

- `runs`: reading the study folder (runs, summary, looks, registered batches), refusing
  runs recorded twice differently, of another setup or unfinished, and grouping the runs;
- `verdicts`: the claims table's rows (`claim_rows`) and their plain words; the statistics
  behind them (paired gaps, intervals, looks, verdicts) are `hwattn.eval.claims`;
- `page`: the markdown page (`render`); `figures`: the loss curves and the gaps figure;
- here: `write_report`, which takes this report's look, writes the page, its figures and
  raw copies, and the command (`main`; `__main__` runs it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

from hwattn.eval.claims import LOOKS_FILE, NEXT_LOOKS_FILE, record_looks, register_next_looks
from hwattn.eval.report.figures import plot_gaps, plot_study
from hwattn.eval.report.page import (PAPER_PPL, PAPER_SCALE, PAPER_TOKENS, SEED_STD_NEEDED,
                                     curve_note, final_descent, mean_loss, mean_std, render,
                                     scale_notes, seed_loss_spread)
from hwattn.eval.report.runs import ORDER, SETUP_KEYS, by_variant, domains_of, load_runs
from hwattn.eval.report.verdicts import claim_rows, plain_statement
from hwattn.files import replace_file
from hwattn.models.checkpoint import read_json_object

__all__ = ["ORDER", "PAPER_PPL", "PAPER_SCALE", "PAPER_TOKENS", "SEED_STD_NEEDED", "SETUP_KEYS",
           "by_variant", "claim_rows", "curve_note", "domains_of", "final_descent",
           "load_runs", "main", "mean_loss", "mean_std", "plain_statement", "plot_gaps",
           "plot_study", "render", "scale_notes", "seed_loss_spread", "write_report"]


def write_report(study: str | Path, out: str | Path = "docs/results/quality.md",
                 next_looks: dict[str, int] | None = None) -> Path:
    """Write the page `out`, its plots `<stem>_loss.png` (loss curves) and `<stem>_gaps.png`
    (the claims table drawn) and copies of the study's files in `<stem>_raw/`. The page is
    rendered before anything is written, and each file is replaced by rename, so a study whose
    records cannot be rendered (ValueError naming the file) leaves an earlier page, plots and
    raw copies as they were: they keep describing each other.
    `next_looks` (claim -> paired seeds) registers each claim's next batch after this report's
    look (`register_next_looks`; kept in `study_next_looks.json` beside the runs)."""
    runs, summary = load_runs(study)
    runs_file = Path(study) / "study_runs.jsonl"
    if not runs:
        raise ValueError(f"{runs_file} holds no runs")
    out = Path(out)
    plot = out.with_name(out.stem + "_loss.png")
    gaps = out.with_name(out.stem + "_gaps.png")
    # This report is a look at each claim with new seeds: recorded beside the runs (tracked
    # with them), so that the next report corrects for it too.
    by = by_variant(runs)
    registered = summary.get("next_looks") or {}
    looks = record_looks(by, summary.get("looks") or {}, registered)
    if next_looks:
        registered = register_next_looks(by, looks, registered, next_looks)
    summary = dict(summary, looks=looks, next_looks=registered)
    try:
        rows = claim_rows(runs, summary)
        text = render(runs, summary, plot.name, gaps.name, rows)
    except (KeyError, TypeError, IndexError, AttributeError, ZeroDivisionError,
            statistics.StatisticsError) as err:
        raise ValueError(f"{runs_file}: its records lack what the report needs "
                         f"({type(err).__name__}: {err}); are they records of "
                         "benchmarks/quality_study.py?") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(plot, lambda tmp: plot_study(runs, tmp))
    replace_file(gaps, lambda tmp: plot_gaps(rows, tmp))
    looks_file = Path(study) / LOOKS_FILE
    if looks and (not looks_file.is_file() or read_json_object(looks_file) != looks):
        replace_file(looks_file, lambda tmp: tmp.write_text(json.dumps(looks, indent=1) + "\n"))
    next_file = Path(study) / NEXT_LOOKS_FILE
    if registered and (not next_file.is_file() or read_json_object(next_file) != registered):
        replace_file(next_file,
                      lambda tmp: tmp.write_text(json.dumps(registered, indent=1) + "\n"))
    raw = out.parent / f"{out.stem}_raw"
    raw.mkdir(exist_ok=True)
    for name in ("study_runs.jsonl", "study_summary.json", "study_log.txt", LOOKS_FILE,
                 NEXT_LOOKS_FILE):
        src = Path(study) / name
        if src.is_file() and src.resolve() != (raw / name).resolve():
            replace_file(raw / name, lambda tmp: shutil.copyfile(src, tmp))
    replace_file(out, lambda tmp: tmp.write_text(text))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m hwattn.eval.report", description=(
        "Write docs/results/quality.md from a quality study's files."))
    p.add_argument("--study", required=True, help="folder with study_runs.jsonl and study_summary.json")
    p.add_argument("--out", default="docs/results/quality.md",
                   help="the page to write (default %(default)s); its plot and raw copies go beside it")
    p.add_argument("--next-look", action="append", default=[], metavar="CLAIM=SEEDS",
                   help="register a claim's next batch, e.g. 'gta-4 vs gqa-4=10': its new seeds "
                        "are read once, when it has that many paired seeds (repeatable)")
    args = p.parse_args(argv)
    requests = {}
    for item in args.next_look:
        key, _, count = item.rpartition("=")
        if not key or not count.strip().isdigit():
            print(f"error: --next-look {item!r}: give CLAIM=SEEDS, e.g. 'gta-4 vs gqa-4=10'",
                  file=sys.stderr)
            return 2
        requests[key.strip()] = int(count)
    try:
        path = write_report(args.study, args.out, requests)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
