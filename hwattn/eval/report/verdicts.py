"""The claims on the page: the rows of its claims table and their verdicts in plain words.

`claim_rows` hands the paired runs, the looks taken and the batches registered to
`hwattn.eval.claims`, which holds the statistics (paired gaps, t-intervals, the correction
for looks, verdicts, seeds to decide); `plain_statement` reads each claim's rows out as a
sentence for the page ("In plain words").
"""

from __future__ import annotations

from hwattn.eval.claims import CLAIMS, MATCH_MARGIN, MAX_SEEDS, claim_key, claim_results
from hwattn.eval.report.runs import by_variant, domains_of


def claim_rows(runs: list[dict], summary: dict) -> list[dict]:
    """The rows of the page's claims table (`claim_results` over the summary's looks and
    registered batches); the gaps figure (`plot_gaps`) draws the same rows."""
    return claim_results(by_variant(runs), domains_of(runs), summary.get("looks") or {},
                         summary.get("next_looks") or {})


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
