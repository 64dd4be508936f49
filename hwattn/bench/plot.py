"""The engine's decode step against its floor, drawn from the `engine_roofline.json` that
`benchmarks/engine_roofline.py` writes: one panel per context, one stacked bar per variant.

Each bar is the engine's median decode step (overlapped scheduling, compiled decode blocks,
CUDA graphs) split, bottom to top, into the captured forward's kernels by part (attention,
GEMMs, cache writes, other kernels; from the profiler's trace), the gaps between them when
forwards are queued back to back (queued forward minus the kernels' sum) and the engine's
time beyond that queued forward, so the parts add up to the engine's step. A black line
across the bar is the step's floor (the weights and KV cache at the copy rate, or the FLOPs at
the matmul rate, whichever is longer, at the peaks measured in the same run); above the bar,
the step and its ratio to the floor.

Only compiled decode rows carry the engine's step. Rows written before a field was recorded
(older documents lack `forward_queued_s`; CPU runs have no kernel split and no floor) are not
drawn: `plot_engine_step` raises `ValueError` naming the row and the field.
"""

from __future__ import annotations

from pathlib import Path

# (key, legend label, colour) of a bar's parts, bottom to top.
PARTS = (
    ("attention", "attention kernels", "#4878b0"),
    ("gemm", "GEMMs", "#ee8a2e"),
    ("cache_write", "cache writes", "#3a9d4f"),
    ("other", "other kernels", "#8c6bb1"),
    ("gaps", "gaps between kernels (queued forward − kernels)", "#cfcfcf"),
    ("beyond", "engine step beyond the queued forward", "#d6473e"),
)
KERNEL_PARTS = ("attention", "gemm", "cache_write", "other")

# Why a row needs each field, for the error raised when one is missing.
NEEDS = {
    "variant": "the variant's name",
    "batch": "the batch size",
    "context": "the context length",
    "engine_step_s": "the engine's median step, timed for compiled decode rows",
    "forward_queued_s": "the captured forward timed with calls queued back to back; documents "
                        "written before it was recorded cannot be drawn",
    "kernels": "the profiler's split of the forward's kernels, measured on a GPU only",
    "floor": "the step's floor",
    "floor_s": "the floor at the peaks measured in the run, on a GPU only",
}


def _context_label(context: int) -> str:
    """1024 -> "1K", 8192 -> "8K", 1000 -> "1000"."""
    return f"{context // 1024}K" if context % 1024 == 0 else str(context)


def _row_name(row: dict) -> str:
    return (f"decode row {row.get('variant', '?')} B={row.get('batch', '?')} "
            f"L={row.get('context', '?')}")


def _need(mapping, key: str, row: dict, where: str):
    if not isinstance(mapping, dict) or mapping.get(key) is None:
        raise ValueError(f"{where}{_row_name(row)} has no {key!r} ({NEEDS.get(key, key)})")
    return mapping[key]


def step_parts(row: dict, where: str = "") -> dict:
    """The parts of one compiled decode row's engine step, in seconds, in `PARTS` order, and
    its floor: {"parts": {key: s}, "step_s", "forward_queued_s", "floor_s", "bound"}.
    `bound` is "bytes" or "FLOPs" (whichever sets the floor), None where the row does not
    say. Raises ValueError naming the first missing field (`where` prefixes the message)."""
    for key in ("variant", "batch", "context", "engine_step_s", "forward_queued_s", "kernels",
                "floor"):
        _need(row, key, row, where)
    kernels, floor = row["kernels"], row["floor"]
    parts = {k: float(_need(kernels, f"{k}_s", row, where + "kernels: ")) for k in KERNEL_PARTS}
    queued, step = float(row["forward_queued_s"]), float(row["engine_step_s"])
    parts["gaps"] = queued - sum(parts.values())
    parts["beyond"] = step - queued
    floor_s = float(_need(floor, "floor_s", row, where + "floor: "))
    bound = None
    if floor.get("bytes_s") is not None and floor.get("flops_s") is not None:
        bound = "bytes" if floor["bytes_s"] >= floor["flops_s"] else "FLOPs"
    return dict(parts=parts, step_s=step, forward_queued_s=queued, floor_s=floor_s, bound=bound)


def decode_rows(doc: dict, where: str = "") -> list[dict]:
    """The compiled decode rows of an `engine_roofline.json` document (the rows that carry
    the engine's step). Raises ValueError when there are none or two share a (variant,
    batch, context)."""
    rows = [r for r in doc.get("rows") or [] if r.get("part") == "decode" and r.get("compiled")]
    if not rows:
        raise ValueError(f"{where}no compiled decode rows (the engine's step is timed for "
                         "compiled decode blocks only: --parts decode --decode-modes compiled)")
    seen = set()
    for r in rows:
        key = (r.get("variant"), r.get("batch"), r.get("context"))
        if key in seen:
            raise ValueError(f"{where}two compiled {_row_name(r)}")
        seen.add(key)
    return rows


def plot_engine_step(doc: dict, path: str | Path, source: str | None = None) -> dict:
    """Draw the compiled decode rows of the `engine_roofline.json` document `doc` to `path`
    (PNG): per context a panel, per (variant, batch) a bar of the engine step's parts with its
    floor and the ratio step / floor. `source` names the document in the figure's caption
    and in errors.

    Returns what was drawn, read back from the figure, keyed by (variant, batch, context):
    {"segments": {part: ms} (the bar patches' heights), "bottom_ms" (where the stack
    starts), "floor_ms" (the floor line's height), "label" (the text above the bar),
    "label_px" (its bounding box in pixels, x0, y0, x1, y1)}, plus "texts_px": the bounding
    boxes of the figure's other texts (titles, legend, caption)."""
    where = f"{source}: " if source else ""
    for key in ("device_name", "peaks"):
        if not doc.get(key):
            raise ValueError(f"{where}the document has no {key!r} (the GPU and the copy / "
                             "matmul rates measured in the run)")
    rows = decode_rows(doc, where)
    drawn = {(r["variant"], r["batch"], r["context"]): step_parts(r, where) for r in rows}

    from hwattn.plotting import pyplot, save_figure

    plt = pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    contexts = sorted({c for _, _, c in drawn})
    batches = sorted({b for _, b, _ in drawn})
    variants = list(dict.fromkeys(v for v, _, _ in drawn))
    fig, axes = plt.subplots(1, len(contexts), figsize=(5.6 * len(contexts) + 1.2, 6.4),
                             dpi=120, squeeze=False)
    axes = axes[0]
    ms, width = 1e3, 0.62
    artists = {}
    negative = False
    for ax, context in zip(axes, contexts):
        keys = [(v, b, context) for b in batches for v in variants if (v, b, context) in drawn]
        tops = []
        for x, key in enumerate(keys):
            d = drawn[key]
            bottom, patches, top = 0.0, {}, d["floor_s"] * ms
            for part, _, colour in PARTS:
                h = d["parts"][part] * ms
                negative |= h < 0
                (patch,) = ax.bar(x, h, width, bottom=bottom, color=colour,
                                  edgecolor="white" if h >= 0 else "black", linewidth=0.6,
                                  hatch="///" if h < 0 else None, zorder=2 if h >= 0 else 3)
                patches[part] = patch
                bottom += h
                top = max(top, bottom - min(h, 0))  # a negative part's upper end
            floor_line = ax.hlines(d["floor_s"] * ms, x - width / 2 - 0.07, x + width / 2 + 0.07,
                                   colors="black", linewidth=2.4, zorder=4)
            label = ax.annotate(f"{d['step_s'] * ms:.2f} ms\n"
                                f"{d['step_s'] / d['floor_s']:.2f}× floor",
                                (x, top), xytext=(0, 4), textcoords="offset points",
                                ha="center", va="bottom", fontsize=9, zorder=5)
            artists[key] = (patches, floor_line, label)
            tops.append(top)
        names = [v.upper() + (f"\nB = {b}" if len(batches) > 1 else "") for v, b, _ in keys]
        ax.set_xticks(range(len(keys)), names, fontsize=10)
        ax.set_xlim(-0.6, len(keys) - 0.4)
        ax.set_ylim(0, max(tops) * 1.2)
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"context {_context_label(context)} ({context} tokens)", fontsize=11)
        ax.grid(True, axis="y", alpha=0.3, zorder=0)
        ax.set_axisbelow(True)

    copy, matmul = doc["peaks"][:2]
    preset = "tiny" if (doc.get("args") or {}).get("tiny") else "xl"
    batch = f"B = {batches[0]}" if len(batches) == 1 else "B per bar"
    title = fig.suptitle(f"Engine decode step against its floor: {doc['device_name']}, "
                         f"{preset}, {batch}, compiled decode blocks, CUDA graphs\n"
                         f"peaks measured in the run: copy {copy:.0f} GB/s, bf16 matmul "
                         f"{matmul:.0f} TFLOP/s", fontsize=12)
    handles = [Patch(facecolor=c, edgecolor="none", label=label) for _, label, c in PARTS]
    handles.append(Line2D([], [], color="black", linewidth=2.4, label="the step's floor"))
    # Two rows read left to right: matplotlib fills a legend's columns first.
    ncol = -(-len(handles) // 2)
    order = [i + ncol * r for i in range(ncol) for r in range(2) if i + ncol * r < len(handles)]
    legend = fig.legend(handles=[handles[i] for i in order], loc="lower center", ncol=ncol,
                        fontsize=9, bbox_to_anchor=(0.5, 0.065), frameon=False)
    bounds = {d["bound"] for d in drawn.values()}
    bound = ""
    if len(bounds) == 1 and None not in bounds:
        bound = f" (the {bounds.pop()}, in every bar here)"
    caption = ("Bars: the engine's median decode step (overlapped scheduling); its parts add up "
               "to it. Above each bar: the step and step / floor.\nFloor: every weight once plus "
               "the whole KV cache at the copy rate, or the FLOPs at the matmul rate, whichever "
               f"is longer{bound}.")
    if negative:
        caption += " Hatched: a negative part, drawn downward."
    if source:
        caption += f"\nDrawn from {source}."
    note = fig.text(0.5, 0.008, caption, ha="center", va="bottom", fontsize=8, color="dimgrey")
    fig.tight_layout(rect=(0, 0.17, 1, 1))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = {}
    for key, (patches, floor_line, label) in artists.items():
        segs = {part: float(p.get_height()) for part, p in patches.items()}
        out[key] = dict(segments=segs, bottom_ms=float(patches[PARTS[0][0]].get_y()),
                        floor_ms=float(floor_line.get_segments()[0][0][1]),
                        label=label.get_text(),
                        label_px=tuple(map(float, label.get_window_extent(renderer).extents)))
    others = [title, legend, note] + [ax.title for ax in axes]
    out["texts_px"] = [tuple(map(float, t.get_window_extent(renderer).extents)) for t in others]
    save_figure(fig, path)
    return out
