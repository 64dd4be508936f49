"""Turn the quality study's files into `docs/results/quality.md` and its plots.

    python -m hwattn.eval.report --study DIR [--out docs/results/quality.md]

DIR holds what `benchmarks/quality_study.py` wrote (study_runs.jsonl, study_summary.json).
Every number of the page is computed here from those files: per-domain perplexity and bits
per byte as mean ± standard deviation over seeds, the seed-to-seed variation, each claim's
paired gaps with their interval and verdict (`hwattn.eval.claims`, which says how a verdict
is read), the recall probe, throughput and MFU; its figures draw the loss curves and the
claims' gaps. Each report over new seeds is a look at a claim, recorded beside the runs
(`study_looks.json`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from hwattn.eval.claims import (CLAIMS, LOOKS_FILE, MATCH_MARGIN, MAX_SEEDS, NEXT_LOOKS_FILE,
                                claim_key, claim_results, ppl_of, record_looks,
                                register_next_looks)
from hwattn.models.checkpoint import read_json_object
from hwattn.plotting import pyplot, save_figure

# FineWeb-Edu validation perplexity reported by the paper (docs/design.md §3).
PAPER_PPL = {
    "xl (1.47B)": {"gta-4": 10.129, "gqa-4": 10.202, "gla-2": 10.218, "mla": 10.256, "mha": 10.311},
    "large (876M)": {"gta-4": 11.232, "gqa-4": 11.340, "gla-2": 11.293, "mla": 11.363},
}
# The paper's model sizes and training tokens (docs/design.md §3).
PAPER_SCALE, PAPER_TOKENS = "183M–1.47B-parameter models", "25–50B tokens"
ORDER = ("mha", "mqa", "gqa-4", "gta-4", "mla", "gla-2")
# Seed-to-seed variation small enough for a 1% gap to stand out of it.
SEED_STD_NEEDED = 0.005
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
    setup than the first record's (`SETUP_KEYS`: another corpus build, schedule or shape) and
    one that stopped before its last step (fewer tokens than steps × batch × sequence)."""
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
        out[key] = (i, r)
    return [r for _, r in out.values()]


def by_variant(runs: list[dict]) -> dict[str, list[dict]]:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["variant"], []).append(r)
    for rs in by.values():
        rs.sort(key=lambda r: r["seed"])
    return dict(sorted(by.items(), key=lambda kv: ORDER.index(kv[0]) if kv[0] in ORDER else 99))


def domains_of(runs: list[dict]) -> list[str]:
    return [d for d in runs[0]["eval"]["ppl"] if d != "average"]


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _pm(values, fmt="{:.3f}") -> str:
    m, s = mean_std(values)
    if m is None:
        return "–"
    return fmt.format(m) + ("" if s is None else " ± " + fmt.format(s))


def _pct(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def _seeds(n: int | None) -> str:
    return "–" if n is None else (f"> {MAX_SEEDS}" if n > MAX_SEEDS else str(n))


def plain_statement(res: list[dict], domains: list[str],
                    looks: dict[str, list[int]] | None = None) -> list[str]:
    lines = []
    for new, base in CLAIMS:
        rows = [r for r in res if r["new"] == new and r["base"] == base]
        head = rows[0]
        n = len(head["gaps"])
        if head["verdict"] == "untested":
            lines.append(f"- **{new} vs {base}: untested.** {n} paired seed(s) finished; the "
                         "interval needs at least two." + _batch_note(head))
            continue
        m, lo, hi = head["corrected"]
        word = {"holds": "holds", "fails": "does not hold", "inconclusive": "is not decided"}[
            head["verdict"]]
        text = (f"- **{new} vs {base}: the claim {word} at this scale.** Over {n} paired seeds "
                f"{new}'s perplexity (mean over domains) is {100 * m:+.2f}% against {base}'s, "
                f"95% interval [{100 * head['interval'][1]:+.2f}%, "
                f"{100 * head['interval'][2]:+.2f}%]")
        if head["looks"] > 1:
            seen = ", ".join(map(str, (looks or {})[claim_key(new, base)]))
            text += (f"; this report is look {head['looks']} at the claim (at {seen} paired "
                     f"seeds), and corrected for the looks the interval is "
                     f"[{100 * lo:+.2f}%, {100 * hi:+.2f}%]")
        else:  # the first look is corrected too: its share of the 2.5% a side is half
            text += (f"; this report is the first look at the claim, and corrected for it the "
                     f"interval is [{100 * lo:+.2f}%, {100 * hi:+.2f}%]")
        if head["verdict"] == "holds":
            text += (f": at most {100 * MATCH_MARGIN:.0f}% worse"
                     + (", and better with 95% confidence." if hi < 0 else "."))
        elif head["verdict"] == "fails":
            text += (f": worse by {100 * m:.2f}% (at least {100 * lo:.2f}%), beyond the "
                     f"{100 * MATCH_MARGIN:.0f}% margin.")
        else:
            text += f", which straddles the {100 * MATCH_MARGIN:.0f}% margin; more seeds would decide"
            if head["seeds_needed"] is not None:
                side = "holds" if m < MATCH_MARGIN else "does not hold"
                text += (f" (if the gaps kept their mean and spread, {_seeds(head['seeds_needed'])} "
                         f"paired seeds would show that it {side})")
            text += "."
        per = [f"{r['metric']} {100 * r['interval'][0]:+.2f}% ({r['verdict']})"
               for r in rows[1:] if r["interval"] is not None]
        if per:
            text += " Per domain: " + ", ".join(per) + "."
        lines.append(text + _batch_note(head))
    return lines


def _batch_note(head: dict) -> str:
    if not head["batch"]:
        return ""
    n, target = head["batch"]
    return (f" A batch registered before its first seed is part-way ({n} of {target} paired "
            f"seeds in): its new seeds are read once, at {target}; until then these are the "
            "numbers of the last look.")


def plot_study(runs: list[dict], path: str | Path) -> Path:
    """Training loss and validation loss per domain vs tokens: one colour per variant, the
    mean over seeds drawn solid, each seed faint."""
    plt = pyplot()
    import numpy as np

    domains = domains_of(runs)
    fig, axes = plt.subplots(1, 1 + len(domains), figsize=(5 * (1 + len(domains)), 4.2), dpi=110)
    by = by_variant(runs)
    for i, (label, rs) in enumerate(by.items()):
        colour = f"C{i}"
        keys = [("loss", axes[0])] + [(f"val_loss/{d}", ax) for d, ax in zip(domains, axes[1:])]
        for key, ax in keys:
            series = []
            for r in rs:
                pts = [(c["tokens"], c[key]) for c in r["curve"] if key in c]
                if pts:
                    ax.plot(*zip(*pts), color=colour, alpha=0.25, lw=0.8)
                    series.append(pts)
            n = min((len(s) for s in series), default=0)
            if n:
                x = [p[0] for p in series[0][:n]]
                y = np.mean([[p[1] for p in s[:n]] for s in series], axis=0)
                ax.plot(x, y, color=colour, lw=1.6, label=f"{label} ({len(series)} seeds)")
    axes[0].set_title("training loss", fontsize=10)
    for d, ax in zip(domains, axes[1:]):
        ax.set_title(f"validation loss, {d}", fontsize=10)
        vals = [c[f"val_loss/{d}"] for r in runs for c in r["curve"] if f"val_loss/{d}" in c]
        if vals:
            ax.set_ylim(min(vals) - 0.05, min(vals) + 1.2)
    for ax in axes:
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    tr = [c["loss"] for r in runs for c in r["curve"] if "loss" in c]
    if tr:
        axes[0].set_ylim(min(tr) - 0.05, min(tr) + 1.5)
    if axes[-1].get_legend_handles_labels()[0]:  # (runs without curves draw nothing)
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def claim_rows(runs: list[dict], summary: dict) -> list[dict]:
    """The rows of the page's claims table (`claim_results` over the summary's looks and
    registered batches); the gaps figure (`plot_gaps`) draws the same rows."""
    return claim_results(by_variant(runs), domains_of(runs), summary.get("looks") or {},
                         summary.get("next_looks") or {})


def plot_gaps(rows: list[dict], path: str | Path) -> Path:
    """The claims table drawn (`rows`: `claim_rows`), one panel per claim and one line per
    metric: each seed's paired gap as a dot (one colour per seed), the mean gap, the 95%
    t-interval (thick bar) and the interval corrected for the looks (thin bar, capped), the
    +1% margin dashed and 0 thin. A claim part-way through a registered batch is drawn as its
    rows are, at the last look."""
    plt = pyplot()
    from matplotlib.lines import Line2D

    claims = list(dict.fromkeys((r["new"], r["base"]) for r in rows))
    seeds = sorted({s for r in rows for s, _ in r["gaps"]})
    colour = {s: f"C{i % 10}" for i, s in enumerate(seeds)}
    marker = {s: "osD^v"[i // 10 % 5] for i, s in enumerate(seeds)}
    # the dots lie below their line, each seed a little lower than the one before, so that
    # seeds with nearly the same gap stay apart
    drop = {s: 0.18 + 0.2 * i / max(1, len(seeds) - 1) for i, s in enumerate(seeds)}
    per = [[r for r in rows if (r["new"], r["base"]) == c] for c in claims]
    fig, axes = plt.subplots(len(claims), 1, squeeze=False, dpi=110, figsize=(
        10, 0.6 + sum(0.85 * len(p) + 1.1 for p in per)),
        gridspec_kw={"height_ratios": [max(1, len(p)) for p in per]})
    margin = 100 * MATCH_MARGIN
    for ax, (new, base), claim in zip(axes[:, 0], claims, per):
        xs = [0.0, margin]
        labels = []
        for y, r in enumerate(claim):
            gaps = [(s, 100 * g) for s, g in r["gaps"]]
            for s, g in gaps:
                ax.scatter(g, y + drop[s], s=30, color=colour[s], marker=marker[s],
                           edgecolor="white", linewidth=0.5, zorder=4)
            xs += [g for _, g in gaps]
            if r["interval"] is not None:
                m, lo, hi = (100 * v for v in r["interval"])
                _, clo, chi = (100 * v for v in r["corrected"])
                ax.plot([lo, hi], [y, y], color="tab:blue", lw=5, alpha=0.45,
                        solid_capstyle="butt", zorder=2)
                ax.errorbar(m, y, xerr=[[m - clo], [chi - m]], fmt="none", ecolor="black",
                            elinewidth=1.1, capsize=5, capthick=1.1, zorder=3)
                ax.plot(m, y, marker="|", color="black", ms=14, mew=2.2, zorder=5)
                ax.annotate(f"{m:+.2f}%", (m, y), xytext=(0, 9), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8, zorder=6,
                            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                  "alpha": 0.85})
                xs += [clo, chi]
            state = ("no paired seeds" if not gaps else
                     f"{r['verdict']}, {len(gaps)} seed{'s' * (len(gaps) != 1)}")
            labels.append(f"{r['metric']}\n{state}")
        ax.axvline(margin, color="tab:red", ls="--", lw=1.2, zorder=1)
        ax.axvline(0, color="black", lw=0.6, zorder=1)
        head = claim[0]
        title = f"{new} vs {base}"
        if head["interval"] is not None:
            title += f": look {head['looks']} at the claim"
        if head["batch"]:
            n, target = head["batch"]
            title += (f"; batch to {target} seeds part-way ({n} in), drawn at the last look "
                      f"({len(head['gaps'])} seeds)")
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_yticks(range(len(claim)), labels, fontsize=9)
        ax.set_ylim(len(claim) - 0.4, -0.65)
        pad = 0.08 * (max(xs) - min(xs))
        ax.set_xlim(min(xs) - pad, max(xs) + pad)
        ax.set_xlabel("perplexity gap, new variant vs baseline (%)", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], ls="none", marker=marker[s], color=colour[s], label=f"seed {s}")
               for s in seeds]
    handles += [Line2D([], [], ls="none", marker="|", ms=12, mew=2.2, color="black",
                       label="mean gap"),
                Line2D([], [], color="tab:blue", lw=5, alpha=0.45, label="95% t-interval"),
                Line2D([], [], color="black", lw=1.1, marker="|", ms=8,
                       label="95% interval corrected for the looks"),
                Line2D([], [], color="tab:red", ls="--", lw=1.2,
                       label=f"+{margin:.0f}% margin"),
                Line2D([], [], color="black", lw=0.6, label="0 (no gap)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8,
               frameon=False)
    legend_rows = -(-len(handles) // min(6, len(handles)))
    fig.tight_layout(rect=(0, (0.1 + 0.2 * legend_rows) / fig.get_figheight(), 1, 1))
    return save_figure(fig, path)


def final_descent(run: dict) -> float | None:
    """How far the run's validation loss (mean over domains) fell over the last quarter of its
    tokens, in nats; None without two validation points in that span."""
    points = [(c["tokens"], c["val_loss"]) for c in run.get("curve", []) if "val_loss" in c]
    if len(points) < 2:
        return None
    end_tokens, end_loss = points[-1]
    start = min(points, key=lambda p: abs(p[0] - 0.75 * end_tokens))
    return None if start == points[-1] else start[1] - end_loss


def seed_loss_spread(by: dict[str, list[dict]]) -> dict[str, float]:
    """Per variant with two seeds or more, the seed-to-seed standard deviation of its
    validation loss (mean over domains, `eval.ppl.average.loss`) as a share of its mean."""
    out = {}
    for label, rs in by.items():
        losses = [r["eval"]["ppl"].get("average", {}).get("loss") for r in rs]
        if None not in losses:
            m, s = mean_std(losses)
            if s is not None:
                out[label] = s / m
    return out


def mean_loss(runs: list[dict]) -> float:
    """The runs' mean validation loss (mean over domains), in nats per token."""
    return statistics.fmean(r["eval"]["ppl"]["average"]["loss"] for r in runs
                            if "loss" in r["eval"]["ppl"].get("average", {}))


def curve_note(runs: list[dict], domains: list[str]) -> str | None:
    """How the curves' last validation points differ from the table's losses, in one run: the
    curve scores a prefix of each domain's held-out tokens at each point, the final evaluation
    every one of them. None when no run has both."""
    for run in runs:
        last = next((c for c in reversed(run.get("curve", []))
                     if all(f"val_loss/{d}" in c for d in domains)), None)
        ppl = run.get("eval", {}).get("ppl", {})
        if last is None or not all(d in ppl and "loss" in ppl[d] for d in domains):
            continue
        pairs = ", ".join(f"{d} {last[f'val_loss/{d}']:.2f} against {ppl[d]['loss']:.2f}"
                          for d in domains)
        return ("- The curves' validation points score a prefix of each domain's held-out "
                "tokens (the study's `--eval-tokens`), the tables all of them, so a "
                "curve's last point is not the table's loss: "
                f"{run['variant']} seed {run['seed']} ends its curve at {pairs} nats. Compare "
                "variants on the curves with each other, not with the tables.")
    return None


def scale_notes(runs: list[dict], domains: list[str]) -> list[str]:
    """What the study's size allows, from its own numbers."""
    r0 = runs[0]
    params = r0.get("non_embedding_params") or r0["params"]
    kind = "non-embedding parameters" if r0.get("non_embedding_params") else "parameters"
    tokens = r0.get("tokens", 0)
    notes = [f"- Models of {params / 1e6:.1f}M {kind} trained on {tokens / 1e6:.0f}M tokens, "
             f"{tokens / params:.1f} tokens per parameter; the paper trains "
             f"{PAPER_SCALE} on {PAPER_TOKENS}. A gap that opens only with more parameters or "
             "tokens is out of reach."]
    descents = [d for d in map(final_descent, runs) if d is not None]
    if descents and min(descents) > 0.01:
        notes.append(f"- Every run's validation loss was still falling when it stopped: by "
                     f"{min(descents):.2f}–{max(descents):.2f} nats over its last quarter of "
                     "tokens, so the ordering can still change with longer training.")
    notes += [f"- The held-out domains are {', '.join(domains)}, not the paper's FineWeb-Edu: "
              "absolute perplexities are not comparable with the paper's, the gaps are.",
              "- A verdict is only as good as its interval: with 2–3 seeds the t-interval is "
              "wide (the 95% quantile of t with 1 and 2 degrees of freedom is 12.7 and 4.3)."]
    note = curve_note(runs, domains)
    return notes + ([note] if note else [])


def _scored(run: dict, val: dict | None) -> str:
    """How much of the held-out text the tables score: whole windows of the run's seq_len,
    every token after a domain's first predicted once up to the last whole window
    (`hwattn.data.loader.eval_windows`), so a domain's last (n - 1) mod seq_len tokens are
    left out."""
    ppl = run.get("eval", {}).get("ppl", {})
    scored = {d: ppl[d]["tokens"] for d in (val or {}) if isinstance(ppl.get(d), dict)
              and "tokens" in ppl[d]}
    window = f"windows of {run['seq_len']:,} tokens" if run.get("seq_len") else "whole windows"
    if not scored:
        return f"scored in {window} (a domain's last partial window left out)"
    counts = ", ".join(f"{d} {n:,} of {val[d]:,}" for d, n in scored.items())
    return f"scored in {window}, up to each domain's last whole window ({counts} tokens)"


def render(runs: list[dict], summary: dict, plot_name: str = "quality_loss.png",
           gaps_name: str = "quality_gaps.png", claims: list[dict] | None = None) -> str:
    """The markdown report; `plot_name` and `gaps_name` are its figures' file names, `claims`
    the claims table's rows when already computed (`claim_rows`)."""
    by = by_variant(runs)
    domains = domains_of(runs)
    r0 = runs[0]
    sched = summary.get("schedule", {})
    ds = summary.get("dataset", {})
    seeds = sorted({r["seed"] for r in runs})
    plan, pending = summary.get("plan", []), summary.get("pending", [])
    old_env = summary.get("environment", {})  # studies written before per-run records
    def gpu_of(r: dict) -> str:
        return r.get("gpu") or old_env.get("gpu") or "CPU"

    gpus = sorted({gpu_of(r) for r in runs})
    # Training speed depends on the GPU, quality does not: the speed columns come from the
    # runs on the GPU most runs used, so that a spread over seeds is not a spread over cards.
    speed_gpu = max(gpus, key=lambda g: (sum(gpu_of(r) == g for r in runs), g))
    cmds = summary.get("commands", [])
    env = cmds[-1]["environment"] if cmds and cmds[-1].get("environment") else old_env
    out = [f"# Quality study: GTA vs GQA, GLA vs MLA at the `{r0.get('preset')}` scale", "",
           "Generated by `python -m hwattn.eval.report` from the raw files of "
           "`benchmarks/quality_study.py`, kept beside this page in `quality_raw/`. Every number "
           "below is computed from those files; only the paper's perplexities are typed in.", ""]
    if pending:
        # (the plan is the last command's; runs outside it came from earlier plans' seeds)
        extra = len(runs) - (len(plan) - len(pending))
        earlier = f", and {extra} more from earlier plans" if extra > 0 else ""
        out += [f"**The study is incomplete: {len(plan) - len(pending)} of {len(plan)} planned "
                f"runs are finished** (pending: {', '.join(pending)}){earlier}. Conclusions "
                "below use what is finished.", ""]
    tokens = r0.get("tokens", 0)
    avail = sched.get("train_tokens_available")
    val = ds.get("splits", {}).get("val")
    train_split = ds.get("splits", {}).get("train")
    lr, warmup = r0.get("lr", sched.get("lr")), r0.get("warmup_steps", sched.get("warmup_steps"))
    non_emb = [r["non_embedding_params"] for r in runs if r.get("non_embedding_params")]
    when = (f"{len(cmds)} study command(s), the last on {env.get('date', 'an unrecorded date')}"
            if cmds else f"run on {env.get('date', 'an unrecorded date')}")
    tok = ds.get("tokenizer", {})
    per_param = [r["tokens_per_non_embedding_param"] for r in runs
                 if r.get("tokens_per_non_embedding_param")]
    out += ["## Setup", "",
            f"- Hardware / software: {', '.join(gpus)}; PyTorch {env.get('torch', '?')}; {when}.",
            f"- Models: preset `{r0.get('preset')}`, "
            + (f"{non_emb[0] / 1e6:.2f}M non-embedding parameters ({r0['params'] / 1e6:.2f}M "
               "with the tied embedding)" if non_emb else
               f"{r0['params'] / 1e6:.2f}M parameters with the tied embedding")
            + "; every variant parameter-matched to MHA by widening its SwiGLU hidden size.",
            "- Data: "
            + (f"`{ds['path']}`" if ds.get("path") else "a dataset built by `hwattn data build`")
            + (f" (build {str(r0['build_key'])[:12]})" if r0.get("build_key") else "")
            + (f", tokenizer {tok.get('name')} ({tok.get('vocab_size')} ids)" if tok else "")
            + (f"; training tokens by domain {train_split}" if train_split else "")
            + (f"; validation tokens {val}" if val else "")
            + "; validation = held-out documents of each domain, " + _scored(r0, val) + ".",
            "- Schedule, identical for every run: "
            + (f"{r0['steps']} steps × {sched['tokens_per_step']:,} tokens = "
               if r0.get("steps") and sched.get("tokens_per_step") else "")
            + f"{tokens:,} tokens"
            + (f" ({tokens / avail:.2f} epochs)" if avail else "")
            + (f", at least {min(per_param):.1f} tokens per non-embedding parameter"
               if per_param else "")
            + (f"; peak lr {lr}" if lr is not None else "")
            + (f", warm-up {warmup} steps" if warmup is not None else "")
            + ", cosine to 1%, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, bf16 autocast.",
            f"- Seeds {seeds}: a seed sets the initialisation and the data order, so for one seed "
            "every variant sees the same tokens in the same order; the claim pairs are compared "
            "seed by seed.", ""]

    head = ["variant", "seeds", "hidden", "KV B/token/layer", "val ppl (mean of domains)",
            "seed std", "loss seed std"] + [f"ppl {d}" for d in domains] + \
        [f"bits/byte {d}" for d in domains] + \
        ["cloze", "MC (norm)", "recall", "tok/s", "MFU"]
    loss_rel = seed_loss_spread(by)
    out += ["## Results", "", "Mean ± standard deviation over seeds; seed std: of the mean "
            "validation perplexity, as a share of it; loss seed std: of the validation loss "
            "(nats per token, mean over domains), as a share of it.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in by.items():
        avg = [r["eval"]["ppl"]["average"]["ppl"] for r in rs]
        m, s = mean_std(avg)
        row = [label, str(len(rs)), str(rs[0].get("hidden_dim", "–")),
               f"{rs[0]['kv_bytes_per_token_per_layer']:,}", _pm(avg),
               _pct(s / m if s is not None else None, 2), _pct(loss_rel.get(label), 2)]
        row += [_pm([ppl_of(r, d) for r in rs]) for d in domains]
        row += [_pm([r["eval"]["ppl"][d].get("bpb") for r in rs], "{:.4f}") for d in domains]
        row += [_pct(mean_std([r["eval"].get("cloze", {}).get("acc") for r in rs])[0]),
                _pct(mean_std([r["eval"].get("mc", {}).get("acc_norm") for r in rs])[0]),
                _pct(mean_std([r["eval"].get("recall", {}).get("mean") for r in rs])[0]),
                _pm([r.get("steady_tokens_per_s") for r in rs if gpu_of(r) == speed_gpu],
                    "{:,.0f}"),
                _pct(mean_std([r.get("steady_mfu") for r in rs if gpu_of(r) == speed_gpu])[0])]
        out.append("| " + " | ".join(row) + " |")
    if len(gpus) > 1:
        others = ", ".join(f"{r['variant']} seed {r['seed']} on {gpu_of(r)}"
                           for r in runs if gpu_of(r) != speed_gpu)
        out += ["", f"tok/s and MFU: the runs on {speed_gpu} only (training speed depends on "
                f"the card; perplexity does not). Trained elsewhere: {others}."]
    stds = {label: mean_std([r["eval"]["ppl"]["average"]["ppl"] for r in rs])
            for label, rs in by.items()}
    rel = {k: s / m for k, (m, s) in stds.items() if s is not None}
    if rel:
        worst = max(rel, key=rel.get)
        out += ["", f"Seed-to-seed standard deviation of the mean validation perplexity: at most "
                f"{_pct(rel[worst], 2)} ({worst}). Resolving a 1% gap needs at most "
                f"{_pct(SEED_STD_NEEDED, 1)}: "
                + ("every variant is within it." if rel[worst] <= SEED_STD_NEEDED else
                   f"{', '.join(k for k, v in rel.items() if v > SEED_STD_NEEDED)} "
                   "vary more.")]
    if loss_rel:
        worst = max(loss_rel, key=loss_rel.get)
        over = [k for k, v in loss_rel.items() if v > SEED_STD_NEEDED]
        out += ["", f"Of the validation loss itself the seed-to-seed standard deviation is at "
                f"most {_pct(loss_rel[worst], 2)} ({worst}) of the loss: "
                + (f"{', '.join(over)} above {_pct(SEED_STD_NEEDED, 1)}, every other variant "
                   "within it." if over else f"every variant within {_pct(SEED_STD_NEEDED, 1)}.")
                + f" A perplexity's relative spread is about its loss's spread in nats (the "
                f"loss, {mean_loss(runs):.2f} nats here, times the loss's relative spread), "
                "and the mean of the domains' perplexities weighs the high-perplexity domain "
                "most (where the domains' deviations offset each other, as with two seeds they "
                "may, the perplexity spread is the smaller one)."]
    peak = r0.get("peak_tflops")
    out += ["", "Perplexity is per held-out domain; the mean over domains weighs each domain "
            "equally. Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens "
            "stand for. Cloze: greedy last-word accuracy; MC: 4-way continuation choice by "
            "per-character log-likelihood (chance 25%); recall: multi-query associative recall "
            "(below). MFU: steady-state training tokens/s × `Transformer.flops_per_token` (6 per "
            "matmul weight plus attention over the full context) against "
            + (f"{peak:.0f} TFLOP/s (bf16 dense)." if peak else "no peak (CPU run)."), "",
            f"![loss curves]({plot_name})", ""]

    looks = summary.get("looks") or {}
    res = claims if claims is not None else claim_rows(runs, summary)
    out += ["## The paper's claims", "",
            "Paired by seed: gap = perplexity of the new variant / perplexity of its baseline − 1; "
            f"95% t-interval over seeds; a claim holds when the interval's upper end is at most "
            f"+{100 * MATCH_MARGIN:.0f}% (the new variant no more than 1% worse). Seeds are added "
            "to the study in batches and each batch's report is a look at the claim: reading a "
            "95% interval after every batch and stopping once it clears the margin would be "
            "wrong more often than 5% of the time, so the verdict is read from the interval "
            "corrected for the looks so far: at the k-th look, the t quantile of "
            "1 − 0.025/(k(k+1)) (each end may be wrong 1.25% of the time at the first look, "
            "0.42% at the second, 0.21% at the third, 0.125% at the fourth, ...; these sum to "
            "less than 2.5% however many looks are taken, so the chance of ever wrongly "
            "declaring either verdict stays within 2.5% a side). `study_looks.json` beside the "
            "runs records the paired-seed counts at which each claim's report was written. "
            "Seeds to decide: for an inconclusive row, "
            "the paired seeds whose interval, corrected for one look more, would clear the "
            "margin if the gaps kept their mean and standard deviation. A batch of seeds "
            "registered before its first seed (`--next-look`, kept in `study_next_looks.json`) "
            "is read once, when it is whole: until then its claim's rows stay those of the last "
            "look, and the verdict column says how far the batch has come.", "",
            "| claim | metric | seeds | per-seed gaps | mean gap | 95% interval | looks | "
            "corrected interval | verdict | seeds to decide |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        iv, cv = r["interval"], r["corrected"]
        gaps = ", ".join(f"s{s}: {100 * g:+.2f}%" for s, g in r["gaps"]) or "–"
        out.append(f"| {r['new']} vs {r['base']} | {r['metric']} | {len(r['gaps'])} | {gaps} | "
                   + (f"{100 * iv[0]:+.2f}% | [{100 * iv[1]:+.2f}%, {100 * iv[2]:+.2f}%] | "
                      f"{r['looks']} | [{100 * cv[1]:+.2f}%, {100 * cv[2]:+.2f}%]"
                      if iv else "– | – | – | –")
                   + f" | {r['verdict']}"
                   + (f" (batch to {r['batch'][1]} seeds: {r['batch'][0]} in)" if r["batch"] else "")
                   + f" | {_seeds(r['seeds_needed'])} |")
    out += ["", f"![the claims' paired gaps]({gaps_name})", "",
            "Per claim and metric: each seed's gap (dots), the mean gap, the 95% t-interval "
            "(thick bar) and the interval corrected for the looks (thin bar), against the "
            f"+{100 * MATCH_MARGIN:.0f}% margin (dashed) and 0."]
    paper = [f"{k}: " + ", ".join(f"{v} {p}" for v, p in d.items()) for k, d in PAPER_PPL.items()]
    gaps = []
    for new, base in CLAIMS:
        gaps += [f"{new} vs {base} {100 * (d[new] / d[base] - 1):+.2f}% at {k}"
                 for k, d in PAPER_PPL.items() if new in d and base in d]
    out += ["", "In plain words:", "", *plain_statement(res, domains, looks), "",
            "The paper (FineWeb-Edu validation, 25–50B tokens) measured " + "; ".join(gaps)
            + ". Its perplexities: " + "; ".join(paper) + ".", ""]

    pairs = sorted({k for r in runs for k in r["eval"].get("recall", {})
                    if k.startswith("pairs_")}, key=lambda k: int(k.split("_")[1]))
    if pairs:
        chance = r0["eval"]["recall"].get("chance")
        out += ["## Recall probe", "",
                "Multi-query associative recall: a list of key–value word pairs, then queries of "
                "the keys; accuracy of the model's next-token argmax at each query (chance "
                f"{_pct(chance, 2)}). Mean ± standard deviation over seeds.", "",
                "| variant | " + " | ".join(f"{k.split('_')[1]} pairs" for k in pairs) + " |",
                "|" + "---|" * (1 + len(pairs))]
        for label, rs in by.items():
            out.append(f"| {label} | " + " | ".join(
                _pm([r["eval"].get("recall", {}).get(k) for r in rs], "{:.3f}") for k in pairs) + " |")
        out.append("")
    out += ["## What this scale can and cannot show", "", *scale_notes(runs, domains), ""]
    return "\n".join(out)


def _replace_with(path: Path, write) -> None:
    """`write(tmp)` to a temporary file beside `path`, then rename it over `path`: a write
    that fails leaves `path` as it was. The temporary name keeps the suffix, from which
    matplotlib's `savefig` takes the format."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    _replace_with(plot, lambda tmp: plot_study(runs, tmp))
    _replace_with(gaps, lambda tmp: plot_gaps(rows, tmp))
    looks_file = Path(study) / LOOKS_FILE
    if looks and (not looks_file.is_file() or read_json_object(looks_file) != looks):
        _replace_with(looks_file, lambda tmp: tmp.write_text(json.dumps(looks, indent=1) + "\n"))
    next_file = Path(study) / NEXT_LOOKS_FILE
    if registered and (not next_file.is_file() or read_json_object(next_file) != registered):
        _replace_with(next_file,
                      lambda tmp: tmp.write_text(json.dumps(registered, indent=1) + "\n"))
    raw = out.parent / f"{out.stem}_raw"
    raw.mkdir(exist_ok=True)
    for name in ("study_runs.jsonl", "study_summary.json", "study_log.txt", LOOKS_FILE,
                 NEXT_LOOKS_FILE):
        src = Path(study) / name
        if src.is_file() and src.resolve() != (raw / name).resolve():
            _replace_with(raw / name, lambda tmp: shutil.copyfile(src, tmp))
    _replace_with(out, lambda tmp: tmp.write_text(text))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Write docs/results/quality.md from a quality study's files.")
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


if __name__ == "__main__":
    sys.exit(main())
