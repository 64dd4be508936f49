"""The quality report's figures: the loss curves (`plot_study`) and the claims table drawn
(`plot_gaps`), with matplotlib (the `plot` extra)."""

from __future__ import annotations

from pathlib import Path

from hwattn.eval.claims import MATCH_MARGIN
from hwattn.eval.report.runs import by_variant, domains_of
from hwattn.plotting import pyplot, save_figure


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
