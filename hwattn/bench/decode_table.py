"""The human table of `hwattn bench decode`'s rows (`hwattn.bench.decode.bench_case`)."""

from __future__ import annotations

from hwattn.bench.anchors import AnchorSet
from hwattn.bench.decode_cases import case_label


def _fmt(value, spec):
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _external_names(rows: list[dict]) -> list[str]:
    """External kernels with a column: those any row timed or tried (in first-seen order)."""
    names = []
    for r in rows:
        for key in r:
            if key.startswith("ext_") and key.endswith(("_us", "_error")):
                name = key[4:].rsplit("_", 1)[0]
                if name not in names:
                    names.append(name)
    return names


def _external_widths(name: str) -> tuple[int, int]:
    return max(9, len(name) + 3), max(6, len(name) + 3)  # "<name> µs", "hw/<name>"


def _external_head(name: str) -> str:
    us, ratio = _external_widths(name)
    return f"{name + ' µs':>{us}} {'hw/' + name:>{ratio}} {'err':>7} "


def _external_cells(row: dict, name: str) -> str:
    us, ratio = _external_widths(name)
    if f"ext_{name}_error" in row:
        return f"{'error':>{us}} {'-':>{ratio}} {'-':>7} "
    return (f"{_fmt(row.get(f'ext_{name}_us'), '.1f'):>{us}} "
            f"{_fmt(row.get(f'ext_{name}_ratio'), '.2f'):>{ratio}} "
            f"{_fmt(row.get(f'ext_{name}_rel_err'), '.1e'):>7} ")


def format_table(rows: list[dict], peaks, anchors: AnchorSet | None = None) -> str:
    """The human table of `rows`; L is an uneven batch's spec (`case_label`), the column as
    wide as the widest."""
    names = _external_names(rows)
    width = max([7, *(len(case_label(r)) for r in rows)])
    head = (f"{'variant':8} {'hq/hkv':>7} {'B':>4} {'L':>{width}} {'Lq':>2} {'page':>4} {'µs':>9} "
            f"{'GB/s':>6} {'TFLOP/s':>7} {'AI':>6} {'roof µs':>8} {'%roof':>5} {'SDPA µs':>9} "
            f"{'×SDPA':>6} {'err':>7} {'Hopper µs':>9} {'%roof':>5} {'×Tri':>5} "
            + "".join(_external_head(name) for name in names)
            + f"{'anchor':>16}")
    lines = [f"peaks measured now: copy {peaks[0]:.0f} GB/s (read+write), bf16 matmul "
             f"{peaks[1]:.0f} TFLOP/s", head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['variant']:8} B={r['batch']} L={case_label(r)} Lq={r['query_len']}: {r['error']}")
            continue
        beside = [f"{k[7:-3]} {v:.0f}" for k, v in r.items() if k.startswith("anchor_")]
        lines.append(
            f"{r['variant']:8} {r['heads_local']:>3}/{r['kv_heads_local']:<3} {r['batch']:4} "
            f"{case_label(r):>{width}} {r['query_len']:2} {r['page']:4} {r['us']:9.1f} {r['GBps']:6.0f} "
            f"{r['TFLOPs']:7.1f} {r['AI']:6.1f} {r['roofline_us']:8.1f} {r['pct_roofline']:5.0f} "
            f"{_fmt(r.get('sdpa_us'), '9.1f'):>9} {_fmt(r.get('speedup_sdpa'), '6.2f'):>6} "
            f"{_fmt(r.get('check_rel_err'), '7.1e'):>7} {_fmt(r.get('hopper_us'), '9.1f'):>9} "
            f"{_fmt(r.get('hopper_pct_roofline'), '5.0f'):>5} "
            f"{_fmt(r.get('hopper_speedup_triton'), '5.2f'):>5} "
            + "".join(_external_cells(r, name) for name in names)
            + f"{', '.join(beside) or '-':>16}")
    lines.append("µs, GB/s, %roof: the Triton backend; Hopper µs / %roof / ×Tri: the Hopper "
                 "backend (its default schedule and plan; '-' where it hands the call to Triton)")
    if any("mixed" in r for r in rows):
        lines.append("L as LENGTHxCOUNT+...: an uneven batch (B sequences of those lengths); its "
                     "bytes and FLOPs are summed over the sequences, SDPA runs one call per "
                     "distinct length")
    if names:
        lines.append(f"{' / '.join(names)} µs: timed in this process on the same paged data "
                     "(layouts converted before timing); hw/X: hwattn's fastest µs over X's, "
                     "above 1 X is faster; err: X's output against SDPA; '-' where X has no "
                     "call for the case (the JSON row's ext_X_note says why)")
    if anchors is not None:
        lines.append(f"anchor: µs of FlashMLA / FA3 on {anchors.describe()} ({anchors.name}), "
                     f"another process: compare only on the same GPU model")
    return "\n".join(lines)
