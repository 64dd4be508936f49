"""Roofline picture of the variants: arithmetic intensity against attainable TFLOP/s."""

from __future__ import annotations

from hwattn.analysis.cost import GPUSpec


def plot_roofline(rows: list[dict], gpu: GPUSpec, path: str) -> None:
    """Memory and compute roofs of `gpu`, one point per variant at L_q = 1 (circle) and 2
    (square), from `analyze` rows (the first TP degree of each variant)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    seen, points = set(), []
    for r in rows:
        if r["variant"] not in seen:
            seen.add(r["variant"])
            points.append(r)
    ais = [r[f"arithmetic_intensity_lq{q}"] for r in points for q in (1, 2)]
    x = np.logspace(np.log10(min(ais + [1.0]) / 2), np.log10(max(ais + [gpu.ridge]) * 4), 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, np.minimum(gpu.tflops, x * gpu.tb_per_s), color="black", lw=1.5,
            label=f"{gpu.name} roof ({gpu.tb_per_s:g} TB/s, {gpu.tflops:g} TFLOP/s)")
    ax.axvline(gpu.ridge, color="grey", ls=":", lw=1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(points):
        for q, marker in ((1, "o"), (2, "s")):
            ai = r[f"arithmetic_intensity_lq{q}"]
            ax.scatter(ai, min(gpu.tflops, ai * gpu.tb_per_s), marker=marker, s=50,
                       color=colors[i % len(colors)], label=f"{r['variant']} L_q={q}", zorder=3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte of KV cache read)")
    ax.set_ylabel("attainable TFLOP/s")
    r0 = points[0]
    ax.set_title(f"Decode attention roofline, {r0['preset']} preset, context {r0['context']}")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
