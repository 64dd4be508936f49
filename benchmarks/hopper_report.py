"""Human-readable lines and tables of `hopper_decode.py`'s result rows (one JSON row per task:
check:, warm:, peaks, time:)."""

from __future__ import annotations

import json


def summary(row: dict) -> str:
    """One line for a result row, as it arrives."""
    try:
        return _summary_line(row)
    except (KeyError, TypeError, ValueError):  # an unexpected row is printed raw, never fatal
        return json.dumps(row)[:400]


def _summary_line(row: dict) -> str:
    task = row.get("task", "?")
    if "error" in row:
        return f"{task}: ERROR {row['error'][:300]}"
    if "not_applicable" in row:
        return f"{task}: n/a ({row['not_applicable'][:120]})"
    if task.startswith("warm:"):
        return f"{task} ({row['wall_s']}s): compiled"
    if task == "peaks":
        return f"peaks: copy {row['copy_GBps']:.0f} GB/s, bf16 matmul {row['mm_TFLOPs']:.0f} TFLOP/s ({row['device']})"
    if task.startswith("check:"):
        parts = []
        for pname in ("unsplit", "split"):
            val = row.get(pname, {})
            if "error" in val:
                parts.append(f"{pname} ERROR {val['error'][:200]}")
            elif val:
                parts.append(f"{pname} out {val['out_err']:.1e} lse {val['lse_err']:.1e} "
                             f"ratio {val['ratio']:.2f}{'' if val['ok'] else ' FAIL'}")
        note = f" [falls back: {row['unsupported']}]" if row.get("unsupported") else ""
        return f"{task} ({row['wall_s']}s): " + "; ".join(parts) + note
    extra = f" err {row['rel_err_vs_triton']:.1e}{' WRONG' if row['wrong'] else ''}" if "rel_err_vs_triton" in row else ""
    return f"{task} ({row['wall_s']}s): {row['us']:.1f} us, {row['GBps']:.0f} GB/s, {row['TFLOPs']:.0f} TFLOP/s{extra}"


def format_table(rows: list[dict], peaks) -> str:
    lines = [f"peaks: copy {peaks[0]:.0f} GB/s, bf16 matmul {peaks[1]:.0f} TFLOP/s" if peaks else "peaks: -",
             f"{'shape':22} {'kernel':12} {'µs':>9} {'GB/s':>6} {'TFLOP/s':>7} {'%copy':>5} {'%mm':>5} "
             f"{'roof µs':>8} {'×Triton':>7} {'err':>7}  launch"]
    triton_us = {r["shape"]: r["us"] for r in rows if r.get("kernel") == "triton" and "us" in r}
    for row in rows:
        task = row.get("task", "")
        if not task.startswith("time:") or "not_applicable" in row:
            continue
        if "us" not in row:
            lines.append(f"{task[5:]:30} ERROR {row.get('error', '?')[:200]}")
            continue
        speedup = triton_us[row["shape"]] / row["us"] if row["shape"] in triton_us else float("nan")
        err = f"{row['rel_err_vs_triton']:7.1e}" if "rel_err_vs_triton" in row else f"{'-':>7}"
        note = row.get("launch", "") + (" WRONG" if row.get("wrong") else "")
        if row.get("unsupported"):
            note = f"falls back to Triton: {row['unsupported']}"
        if row["kernel"] == "gqa":  # the question is GTA's time as a fraction of GQA's
            speedup = float("nan")
            tied = {r["kernel"]: r["us"] for r in rows if r.get("shape") == row["shape"]
                    and r.get("kernel") != "gqa" and "us" in r}
            note = f"{row['variant']} (Triton); GTA time / this: " + ", ".join(
                f"{k} {us / row['us']:.2f}" for k, us in tied.items())
        lines.append(
            f"{row['shape']:22} {row['kernel']:12} {row['us']:9.1f} {row['GBps']:6.0f} {row['TFLOPs']:7.1f} "
            f"{row['pct_copy']:5.0f} {row['pct_mm']:5.0f} {row['roofline_us']:8.1f} {speedup:7.2f} {err}  {note}")
    return "\n".join(lines)


def format_pivot(rows: list[dict], kernels: list[str]) -> str:
    """One line per shape: µs of every kernel (n/a, or ERR/WRONG) and the fastest correct
    Hopper variant with its share of the roofline (the slower of the copy and matmul roofs)."""
    times: dict[str, dict[str, str]] = {}
    best: dict[str, tuple[float, str, float]] = {}
    for row in rows:
        task = row.get("task", "")
        if not task.startswith("time:"):
            continue
        _, shape, kernel = task.split(":")
        if "not_applicable" in row:
            cell = "n/a"
        elif "us" not in row:
            cell = "ERR"
        elif row.get("wrong"):
            cell = "WRONG"
        else:
            cell = f"{row['us']:.1f}"
            if kernel not in ("triton", "gqa") and (shape not in best or row["us"] < best[shape][0]):
                best[shape] = (row["us"], kernel, 100 * row["roofline_us"] / row["us"])
        times.setdefault(shape, {})[kernel] = cell
    cols = [k for k in kernels + ["gqa"] if any(k in t for t in times.values())]
    width = max([8] + [len(k) + 1 for k in cols])
    lines = [f"{'shape':22}" + "".join(f"{k:>{width}}" for k in cols) + "  fastest Hopper variant"]
    for shape, cells in times.items():
        tail = (f"  {best[shape][1]} ({best[shape][2]:.0f}% of roof)" if shape in best else "")
        lines.append(f"{shape:22}" + "".join(f"{cells.get(k, '-'):>{width}}" for k in cols) + tail)
    return "\n".join(lines)
