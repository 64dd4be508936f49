"""The `analyze --plot` figure: KV cache bytes per device against the tensor-parallel degree
(the paper's point: GTA and GLA shard their cache where MLA and MQA cannot) beside the decode
roofline at L_q = 1 and 2, for every variant and every TP degree of the `analyze` rows.

Coincident points stay visible: each variant has its own colour and marker shape and is
nudged sideways by a fixed small amount; on the roofline the TP degree sets the marker size,
so a variant whose intensity does not change with TP shows concentric rings.
"""

from __future__ import annotations

import math

from hwattn.analysis.cost import GPUSpec

MARKERS = "osD^vPX*hp<>"
# Sideways nudge between neighbouring variants: log2 units of TP on the left panel, a factor
# on the roofline's intensity axis.
KV_DODGE = 0.09
ROOF_DODGE = 1.12


def plot_analysis(rows: list[dict], gpu: GPUSpec, path: str) -> dict:
    """Draw `analyze` rows to `path` (PNG). Returns where each marker landed, in pixels:
    {"kv": {(variant, tp): (x, y)}, "roofline": {(variant, tp, L_q): (x, y)}}."""
    from hwattn.plotting import pyplot, save_figure

    plt = pyplot()
    import numpy as np
    from matplotlib.lines import Line2D

    variants = list(dict.fromkeys(r["variant"] for r in rows))
    tps = sorted({r["tp"] for r in rows})
    style = {v: (f"C{i % 10}", MARKERS[i % len(MARKERS)], i - (len(variants) - 1) / 2)
             for i, v in enumerate(variants)}
    size = {tp: 40 + 60 * k for k, tp in enumerate(tps)}  # marker area grows with TP
    fig, (kv_ax, *roof_axes) = plt.subplots(1, 3, figsize=(18, 6))
    kv_pts, roof_pts = {}, {}

    for v in variants:
        colour, marker, slot = style[v]
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["tp"])
        xs = [math.log2(r["tp"]) + slot * KV_DODGE for r in mine]
        ys = [r["kv_bytes_per_token_per_layer"] for r in mine]
        kv_ax.plot(xs, ys, color=colour, lw=1.2, alpha=0.6, zorder=2)
        kv_ax.scatter(xs, ys, color=colour, marker=marker, s=55, edgecolor="black",
                      linewidth=0.5, label=v, zorder=3)
        for r, x, y in zip(mine, xs, ys):
            kv_pts[(v, r["tp"])] = (x, y)
    kv_ax.set_xticks([math.log2(tp) for tp in tps], [str(tp) for tp in tps])
    kv_ax.set_xlim(-0.5, math.log2(tps[-1]) + 0.5)
    kv_ax.set_yscale("log", base=2)
    ys = [r["kv_bytes_per_token_per_layer"] for r in rows]
    lo, hi = 2 ** math.floor(math.log2(min(ys))), 2 ** math.ceil(math.log2(max(ys)))
    ticks = [2 ** k for k in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]
    kv_ax.set_yticks(ticks, [f"{t:,}" for t in ticks])
    kv_ax.set_ylim(lo / 1.3, hi * 1.3)
    kv_ax.set_xlabel("tensor-parallel degree (GPUs)")
    kv_ax.set_ylabel(f"KV cache bytes per token per layer, per GPU ({rows[0]['dtype']})")
    kv_ax.set_title("KV cache per device vs TP degree", fontsize=10)
    kv_ax.grid(True, which="major", alpha=0.3)
    kv_ax.legend(fontsize=8, title="variant", title_fontsize=8)

    ais = [r[f"arithmetic_intensity_lq{q}"] for r in rows for q in (1, 2)]
    x = np.logspace(np.log10(min(ais) / 1.6), np.log10(max(ais + [gpu.ridge]) * 2), 200)
    r0 = rows[0]
    for q, roof_ax in zip((1, 2), roof_axes):
        roof_ax.plot(x, np.minimum(gpu.tflops, x * gpu.tb_per_s), color="black", lw=1.5, zorder=1)
        roof_ax.axvline(gpu.ridge, color="grey", ls=":", lw=1)
        for r in rows:
            colour, marker, slot = style[r["variant"]]
            ai = r[f"arithmetic_intensity_lq{q}"]
            shown = ai * ROOF_DODGE ** slot
            y = min(gpu.tflops, ai * gpu.tb_per_s)
            roof_ax.scatter(shown, y, marker=marker, s=size[r["tp"]], facecolor="none",
                            edgecolor=colour, linewidth=1.6, zorder=3)
            roof_pts[(r["variant"], r["tp"], q)] = (q, shown, y)
        roof_ax.set_xscale("log")
        roof_ax.set_yscale("log")
        roof_ax.set_xlabel("arithmetic intensity (FLOP / byte of KV cache read)")
        roof_ax.set_ylabel("attainable TFLOP/s")
        roof_ax.set_title(f"Decode roofline, L_q = {q} ({r0['preset']}, context {r0['context']})",
                          fontsize=10)
        roof_ax.grid(True, which="both", alpha=0.3)
    handles = [Line2D([], [], color="black", lw=1.5,
                      label=f"{gpu.name}: {gpu.tb_per_s:g} TB/s, {gpu.tflops:g} TFLOP/s")]
    handles += [Line2D([], [], ls="", marker=style[v][1], markerfacecolor="none",
                       markeredgecolor=style[v][0], markeredgewidth=1.6, label=v) for v in variants]
    handles += [Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="grey",
                       markersize=math.sqrt(size[tp]), label=f"TP {tp}") for tp in tps]
    roof_axes[0].legend(handles=handles, fontsize=7, ncol=2, loc="upper left")
    fig.text(0.5, 0.005, "Per rank. Markers of different variants are nudged sideways so "
             "coincident values stay visible; on the rooflines the marker size is the TP degree "
             "(concentric rings: the same intensity at several TP degrees).",
             ha="center", fontsize=7, color="dimgrey")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.canvas.draw()
    placed = {"kv": {k: tuple(kv_ax.transData.transform(p)) for k, p in kv_pts.items()},
              "roofline": {k: tuple(roof_axes[q - 1].transData.transform((x, y)))
                           for k, (q, x, y) in roof_pts.items()}}
    save_figure(fig, path, dpi=120)
    return placed
