"""The statistics behind the quality study's verdicts (`hwattn.eval.report` renders them).

Each of the paper's claims (`CLAIMS`: new variant, baseline) is read from the paired gaps
of its seeds (same seed, hence the same tokens in the same order): new / base − 1 in
validation perplexity, with a 95% t-interval over seeds, and the same corrected for the
looks taken at the claim so far (`record_looks`; a batch registered before its first seed,
`register_next_looks`, is one look): at the k-th look each end is allowed an error of
0.025 / (k (k + 1)) (`t_quantile_for`), and these sum to less than 0.025 however many looks
are taken, so the chance of ever wrongly declaring either verdict stays within 2.5% a side.
The verdict (`verdict`), read from the corrected interval:

- holds: the upper end of the interval is at most +1% (`MATCH_MARGIN`): the new variant is
  no more than 1% worse, with 95% confidence;
- fails: the lower end is above +1%: it is worse by more than 1%;
- inconclusive: the interval straddles +1% (`seeds_to_decide`: how many paired seeds would
  decide it if the gaps kept their mean and spread, a planning figure);
- untested: fewer than two seeds of the pair.
"""

from __future__ import annotations

import math
import statistics

# The paper's claims: (new variant, the baseline it matches).
CLAIMS = (("gta-4", "gqa-4"), ("gla-2", "mla"))
# How much worse in perplexity still counts as matching.
MATCH_MARGIN = 0.01
# Two-sided 95% quantiles of Student's t by degrees of freedom (`t95` beyond 30).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120,
       17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}


# The normal distribution's 97.5% quantile.
Z975 = 1.959963984540054


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom: the table's value, or
    that of the nearest smaller df in the table (a slightly wider interval) up to 30; beyond
    30 the Cornish–Fisher expansion of t in 1/df (Abramowitz & Stegun 26.7.5), within 1e-4 of
    the quantile there. The normal quantile 1.96, used beyond 30 before, is the limit of
    infinitely many degrees of freedom: at 31 the quantile is 2.040, so 1.96 made intervals 4%
    too narrow and `seeds_to_decide` count too few seeds."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df in T95:
        return T95[df]
    if df <= 30:
        return T95[max(k for k in T95 if k < df)]
    z = Z975
    terms = ((z ** 3 + z) / 4,
             (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(g / df ** (k + 1) for k, g in enumerate(terms))


def t_within(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with integer `df` >= 1, exactly (Abramowitz & Stegun
    26.7.3 and 26.7.4: a finite series in theta = atan(t / sqrt(df)))."""
    theta = math.atan(t / math.sqrt(df))
    c2, term, total = math.cos(theta) ** 2, 1.0, 1.0
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + (2*4)/(3*5) cos^4 + ...))
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        tail = math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0
        return 2 / math.pi * (theta + tail)
    for k in range(1, df // 2):  # even: sin (1 + 1/2 cos^2 + (1*3)/(2*4) cos^4 + ...)
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(p: float, df: int) -> float:
    """The p quantile (0.5 < p < 1) of Student's t with integer `df` >= 1, by bisection on
    `t_within` to 1e-9."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi, within = 0.0, 1.0, 2 * p - 1
    while t_within(hi, df) < within:
        hi *= 2
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_within(mid, df) < within else (lo, mid)
    return (lo + hi) / 2


def t_quantile_for(looks: int, df: int) -> float:
    """The t quantile of the interval read at look k = `looks` (1, 2, ...) of an open-ended
    number of looks at a growing set of seeds: 1 − 0.025 / (k (k + 1)), so each end may be
    wrong with probability 1.25% at the first look, 0.42% at the second, 0.21% at the third,
    0.125% at the fourth (a 99.75% interval), ... These sum to 0.025 · K / (K + 1) < 0.025
    over any K looks, so by the union bound the chance of ever wrongly declaring "holds", or
    ever wrongly declaring "fails", stays within 2.5%, whenever one stops. (Bonferroni's
    1 − 0.025 / k, used before 2026-12-06, sums to 0.025 · H_K, the K-th harmonic number:
    with looks at 2, 3, 4 and 6 seeds and the true gap on the margin, "fails" was declared
    wrongly 4.1% of the time, not 2.5%.) `looks` = 0: no correction, the plain 95% interval's
    `t95`."""
    if looks < 1:
        return t95(df)
    return t_quantile(1 - 0.025 / (looks * (looks + 1)), df)


def t_interval(values: list[float], looks: int = 0) -> tuple[float, float, float] | None:
    """(mean, low, high) of the t-interval of the mean of `values`: the plain 95% interval
    (`looks` = 0), or the one read at look number `looks` (`t_quantile_for`); None under two
    values."""
    if len(values) < 2:
        return None
    m = statistics.fmean(values)
    half = t_quantile_for(looks, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def ppl_of(r: dict, domain: str) -> float:
    return r["eval"]["ppl"][domain]["ppl"]


def paired_gaps(by: dict, new: str, base: str, domain: str) -> list[tuple[int, float]]:
    """(seed, ppl_new / ppl_base − 1) for every seed both variants finished. ValueError
    naming the run whose perplexity is not a finite positive number (a diverged run): an
    infinite baseline made a gap of −100%, a claim helped by its baseline diverging."""
    base_by_seed = {r["seed"]: r for r in by.get(base, [])}
    out = []
    for r in by.get(new, []):
        if r["seed"] not in base_by_seed:
            continue
        pair = (r, base_by_seed[r["seed"]])
        for run in pair:
            p = ppl_of(run, domain)
            if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
                raise ValueError(f"run {run['variant']}-s{run['seed']}: its {domain} perplexity "
                                 f"is {p!r}, not a finite positive number (a diverged run?): "
                                 f"seed {r['seed']} of {new} vs {base} has no gap")
        out.append((r["seed"], ppl_of(pair[0], domain) / ppl_of(pair[1], domain) - 1))
    return out


def verdict(interval: tuple[float, float, float] | None) -> str:
    if interval is None:
        return "untested"
    _, lo, hi = interval
    if hi <= MATCH_MARGIN:
        return "holds"
    if lo > MATCH_MARGIN:
        return "fails"
    return "inconclusive"


# The most seeds `seeds_to_decide` looks for; beyond it, "more than" this.
MAX_SEEDS = 100


def seeds_to_decide(values: list[float], looks: int = 0) -> int | None:
    """The fewest paired seeds whose interval, read as look number `looks` (`t_quantile_for`;
    0: the plain 95% interval), would clear the margin (lie wholly on one side of +1%) if the
    gaps kept the mean and standard deviation of `values`; None when that cannot happen (fewer
    than two values, no spread, or a mean on the margin itself) and MAX_SEEDS + 1 when more
    than MAX_SEEDS would be needed."""
    if len(values) < 2:
        return None
    m, sd = statistics.fmean(values), statistics.stdev(values)
    distance = abs(m - MATCH_MARGIN)
    if sd == 0 or distance == 0:
        return None
    for n in range(2, MAX_SEEDS + 1):
        if t_quantile_for(looks, n - 1) * sd / math.sqrt(n) < distance:
            return n
    return MAX_SEEDS + 1


def claim_key(new: str, base: str) -> str:
    return f"{new} vs {base}"


def batch_in_progress(n: int, seen: list[int], next_look: int | None) -> bool:
    """Whether a claim's `n` paired seeds are part-way through a batch registered, before its
    first seed, to be read at `next_look` seeds (`seen`: the counts at its earlier looks)."""
    return next_look is not None and (seen[-1] if seen else 0) < n < next_look


def claim_results(by: dict, domains: list[str], looks: dict[str, list[int]] | None = None,
                  next_looks: dict[str, int] | None = None) -> list[dict]:
    """Per claim pair and metric (the mean over domains, then each domain): the per-seed
    gaps, their 95% interval, the same corrected for the looks taken at the claim so far
    (`looks`: claim -> paired-seed counts at which its report was written, this one last;
    none recorded: one look), the verdict read from the corrected interval and, when
    inconclusive, `seeds_to_decide` at the next look.

    A claim part-way through a registered batch (`next_looks`: claim -> the paired-seed count
    it is read at next; `batch_in_progress`) is reported as at its last look: over the seeds
    that look read (its lowest seeds, as seeds are added in order), with `batch` = (paired
    seeds in now, the count the batch is read at)."""
    out = []
    for new, base in CLAIMS:
        key = claim_key(new, base)
        seen = (looks or {}).get(key, [])
        n_looks = max(1, len(seen))
        n_now = len(paired_gaps(by, new, base, "average"))
        target = (next_looks or {}).get(key)
        batch = (n_now, target) if batch_in_progress(n_now, seen, target) else None
        for metric in ["average", *domains]:
            gaps = paired_gaps(by, new, base, metric)
            if batch:
                gaps = sorted(gaps)[:seen[-1] if seen else 0]
            values = [g for _, g in gaps]
            corrected = t_interval(values, n_looks)
            decided = verdict(corrected)
            out.append({"new": new, "base": base, "metric": metric, "gaps": gaps,
                        "interval": t_interval(values), "corrected": corrected,
                        "looks": n_looks, "verdict": decided, "batch": batch,
                        "seeds_needed": seeds_to_decide(values, n_looks + 1)
                        if decided == "inconclusive" else None})
    return out


LOOKS_FILE = "study_looks.json"


NEXT_LOOKS_FILE = "study_next_looks.json"


def record_looks(by: dict, looks: dict[str, list[int]],
                 next_looks: dict[str, int] | None = None) -> dict[str, list[int]]:
    """`looks` with this report counted: each claim's paired-seed count appended where it has
    at least two seeds and differs from the last look (a report rewritten over the same
    seeds reads nothing new), unless the claim is part-way through a registered batch
    (`batch_in_progress`): its new seeds are not read until the batch is whole."""
    out = {k: list(v) for k, v in looks.items()}
    for new, base in CLAIMS:
        n = len(paired_gaps(by, new, base, "average"))
        key = claim_key(new, base)
        seen = out.setdefault(key, [])
        if batch_in_progress(n, seen, (next_looks or {}).get(key)):
            continue
        if n >= 2 and (not seen or seen[-1] != n):
            seen.append(n)
    return {k: v for k, v in out.items() if v}


def register_next_looks(by: dict, looks: dict[str, list[int]], next_looks: dict[str, int],
                        requests: dict[str, int]) -> dict[str, int]:
    """`next_looks` with each of `requests` (claim -> paired-seed count) registered: the claim
    is next read when it has that many paired seeds, and not before. Registering is only
    sound before the batch's first seed is in, so a claim with seeds its last look has not
    read is refused (ValueError naming it), as is a count not above the seeds it has."""
    known = {claim_key(new, base) for new, base in CLAIMS}
    out = dict(next_looks)
    for key, target in requests.items():
        if key not in known:
            raise ValueError(f"--next-look: unknown claim {key!r} (claims: {', '.join(sorted(known))})")
        new, base = key.split(" vs ")
        n = len(paired_gaps(by, new, base, "average"))
        read = looks[key][-1] if looks.get(key) else 0  # paired seeds at the last look
        if n != read:  # (a single seed too: no look reads it, yet its gap is on the page)
            raise ValueError(f"--next-look {key}={target}: {n - read} of its "
                             f"{n} paired seeds have not been read at a look; register a batch "
                             "before its first seed is in")
        if target <= n:
            raise ValueError(f"--next-look {key}={target}: the claim already has {n} paired "
                             "seeds; give a larger count")
        out[key] = target
    return out
