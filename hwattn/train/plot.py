"""Loss curves: training loss (smoothed) and validation loss against tokens, one colour per run."""

from __future__ import annotations

from pathlib import Path


def plot_loss(runs: dict[str, list[dict]], path: str | Path, title: str = "loss vs tokens") -> Path:
    """`runs`: {label: metrics records}; records with "loss" are training points, records
    with "val_loss" validation points. Writes a PNG to `path`."""
    from hwattn.plotting import pyplot, save_figure

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for i, (label, recs) in enumerate(runs.items()):
        colour = f"C{i % 10}"
        tr = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
        va = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
        if tr:
            ax.plot([t for t, _ in tr], [v for _, v in tr], color=colour, alpha=0.35, lw=1)
        if va:
            ax.plot([t for t, _ in va], [v for _, v in va], "o-", color=colour, lw=1.6, ms=3,
                    label=f"{label} (val)")
        elif tr:
            ax.plot([], [], color=colour, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title + " — faint: train, dots: validation", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
