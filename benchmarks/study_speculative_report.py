"""The report of benchmarks/study_speculative.py: issue 20's targets judged from its
document, and the document's tables as markdown."""

from __future__ import annotations

SPEEDUP_TARGET, VERIFY_TARGET = 1.5, 1.3


def targets(doc: dict) -> dict | None:
    """The issue's targets on the code domain, per batch size: the k of the best speed-up at
    that batch, and whether its speed-up reaches 1.5x and its verify step (timed at that
    batch) stays within 1.3x of a plain step. None without a code domain."""
    code = doc["domains"].get("code")
    if not code:
        return None
    out = {}
    for batch, part in code["batches"].items():
        rows = [r for key, r in part["rows"].items() if key != "fallback" and r["k"]
                and "speedup" in r]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["speedup"])
        step = ((doc.get("step_time") or {}).get(batch) or {}).get("rows", {}).get(
            str(best["k"]), {})
        ratio = step.get("step_over_plain")
        out[batch] = dict(domain="code", batch=int(batch), k=best["k"], speedup=best["speedup"],
                          speedup_target=SPEEDUP_TARGET,
                          speedup_met=best["speedup"] >= SPEEDUP_TARGET,
                          verify_over_plain=ratio,
                          forward_over_plain=step.get("forward_over_plain"),
                          verify_target=VERIFY_TARGET,
                          verify_met=None if ratio is None else ratio <= VERIFY_TARGET,
                          outputs_equal=best["outputs_equal"])
    return out or None


def markdown(doc: dict) -> str:
    """The tables of the document."""
    s, m = doc["setup"], doc["model"]
    trained = m.get("training") or {}
    lines = [f"{m['label']} ({m['params'] / 1e6:.1f}M parameters) from {m['checkpoint']}"
             + (f", trained {trained['steps_done']} of {trained['steps']} steps"
                if trained else "")
             + f"; {s['device']} {s['dtype']}, {s['prompts']} prompts x {s['prompt_len']} held-out "
               f"tokens + {s['output_len']} greedy, decoded at most B at a time (B = "
               f"{', '.join(map(str, s['batch_sizes']))}), page {s['page_size']}, CUDA graphs "
               f"{'on' if doc['cuda_graphs'] else 'off'}, compiled decode "
               f"{'on' if s['compile_decode'] else 'off'}", "",
             "| domain | batch | k | decode tok/s | run spread | speed-up | acceptance "
             "| n-gram found | verify steps | ITL p50 ms | ITL / plain | outputs = plain "
             "| tokens before divergence |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt="{:.2f}"):
        return "-" if x is None else fmt.format(x)

    for domain, part in doc["domains"].items():
        for batch, group in part["batches"].items():
            for key, row in group["rows"].items():
                k = (f"{row['k']}, plain at >= {row['disable_batch_size']} running"
                     if key == "fallback" else str(row["k"]))
                if "skipped" in row:
                    lines.append(f"| {domain} | {batch} | {k} | skipped ({row['skipped']}) |"
                                 + " |" * 9)
                    continue
                lines.append(
                    f"| {domain} | {batch} | {k} | {row['decode_tokens_per_s']:,.0f} | "
                    f"{f(row.get('decode_tokens_per_s_spread'), '{:.0%}')} | "
                    f"{f(row.get('speedup'), '{:.2f}x')} | "
                    f"{f(row.get('acceptance'), '{:.1%}')} | "
                    f"{f(row.get('ngram_match_share'), '{:.0%}')} | "
                    f"{f(row.get('verify_step_share'), '{:.0%}')} | "
                    f"{row['itl_median_s'] * 1e3:.2f} | {f(row.get('itl_over_plain'))} | "
                    f"{f(row.get('outputs_equal'), '{:.0%}')} | "
                    f"{f(row.get('tokens_before_divergence'), '{:.1%}')} |")
    times = doc.get("step_time") or {}
    if times:
        st = next(iter(times.values()))
        lines += ["", f"Decode step of B sequences at context {st['context_len']}: a verify "
                      "step (k + 1 query tokens) against a plain one (1) at the same B.", "",
                  "| batch | k | query tokens | step ms (host-seen) | forward ms (device) "
                  "| step / plain | forward / plain |", "|---|---|---|---|---|---|---|"]
        for batch, st in times.items():
            for row in st["rows"].values():
                lines.append(f"| {batch} | {row['k']} | {row['query_len']} | "
                             f"{row['step_wall_s'] * 1e3:.3f} | "
                             f"{row['forward_device_s'] * 1e3:.3f} | "
                             f"{row['step_over_plain']:.2f} | {row['forward_over_plain']:.2f} |")
    verdict = {True: "met", False: "not met", None: "not measured"}
    for batch, t in (doc.get("targets") or {}).items():
        lines += ["", f"Targets on C code at batch {batch}, at the best k = {t['k']}: speed-up "
                      f"{t['speedup']:.2f}x (>= {t['speedup_target']}x: "
                      f"{verdict[t['speedup_met']]}); verify step {f(t['verify_over_plain'])}x a "
                      f"plain step (<= {t['verify_target']}x: {verdict[t['verify_met']]}); "
                      f"outputs equal to plain decoding for {t['outputs_equal']:.0%} of prompts."]
    return "\n".join(lines)
