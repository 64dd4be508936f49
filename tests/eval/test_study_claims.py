"""The claims of the quality report: paired gaps, t-intervals, the correction for looks,
verdicts, seeds to decide and batches registered before their first seed
(`hwattn.eval.claims`, and their rows and plain words on the page,
`hwattn.eval.report.verdicts`)."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from hwattn.eval.claims import MAX_SEEDS, claim_results, seeds_to_decide, t95, t_interval
from hwattn.eval.report import main as report_main, render
from tests.eval.study_helpers import fake_run, paired_runs


def test_t_interval_against_hand_computation():
    vals = [0.01, 0.02, 0.06]
    m, lo, hi = t_interval(vals)
    half = 4.303 * statistics.stdev(vals) / math.sqrt(3)
    assert m == pytest.approx(0.03) and lo == pytest.approx(0.03 - half) and hi == pytest.approx(0.03 + half)
    assert t_interval([0.1]) is None and t95(1) == 12.706 and t95(22) == t95(20)


def test_t_quantile_beyond_the_table_is_not_the_normal_one():
    """Beyond 30 degrees of freedom t95 was 1.96, the normal quantile: 4% narrower intervals at
    31. The quantiles below are scipy.stats.t.ppf(0.975, df)."""
    for df, want in ((31, 2.039513), (40, 2.021075), (60, 2.000298), (99, 1.984217),
                     (120, 1.979930), (1000, 1.962339)):
        assert t95(df) == pytest.approx(want, abs=2e-4)
    assert t95(30) > t95(31) > t95(40) > t95(1000) > 1.96


def test_t_quantile_is_students():
    """The exact quantile by bisection agrees with the table of 97.5% quantiles, and with
    values of other levels (scipy.stats.t.ppf, written down)."""
    from hwattn.eval.claims import T95, t_quantile, t_within

    for df, q in T95.items():
        assert t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)
    assert t_quantile(1 - 0.025 / 4, 5) == pytest.approx(3.8100047, abs=1e-6)
    assert t_quantile(1 - 0.025 / 20, 5) == pytest.approx(5.6041655, abs=1e-6)
    assert t_quantile(0.995, 7) == pytest.approx(3.4994833, abs=1e-6)
    assert t_quantile(0.9999, 2) == pytest.approx(70.700071, rel=1e-6)
    assert t_within(0.0, 3) == 0.0 and t_within(1e9, 4) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.4, 3)


def test_seeds_to_decide_against_hand_computation():
    # Gaps +3.23%, +1.27%, +1.38%: mean 1.96%, sd 1.101%, 0.96% from the margin. Seven seeds
    # give a half-width of 2.447 * 1.101 / sqrt(7) = 1.018% (not clear), eight 0.921% (clear).
    assert seeds_to_decide([0.0323, 0.0127, 0.0138]) == 8
    # Read as a claim's second look, the t quantile is that of 1 − 0.025/6: thirteen seeds give
    # 3.153 * 1.101 / sqrt(13) = 0.963% (not clear), fourteen 3.107 * 1.101 / sqrt(14) = 0.914%.
    assert seeds_to_decide([0.0323, 0.0127, 0.0138], looks=2) == 14
    assert seeds_to_decide([0.01, 0.01]) is None  # on the margin, no spread
    assert seeds_to_decide([0.02]) is None
    assert seeds_to_decide([0.0100, 0.0101, 0.0099, 0.0100001]) == MAX_SEEDS + 1


def test_verdicts_follow_the_numbers():
    runs = []
    for seed, (gqa, gta, mla, gla) in enumerate([(20.0, 19.9, 20.0, 21.0), (20.2, 20.1, 20.1, 21.1),
                                                 (20.1, 20.0, 19.9, 20.9)]):
        runs += [fake_run("gqa-4", seed, gqa, gqa), fake_run("gta-4", seed, gta, gta),
                 fake_run("mla", seed, mla, mla), fake_run("gla-2", seed, gla, gla)]
    res = {(r["new"], r["metric"]): r for r in claim_results(
        {v: [r for r in runs if r["variant"] == v] for v in ("gqa-4", "gta-4", "mla", "gla-2")},
        ["code", "prose"])}
    assert res[("gta-4", "average")]["verdict"] == "holds"  # ~0.5% better, tight
    assert res[("gla-2", "average")]["verdict"] == "fails"  # ~5% worse, tight
    assert [s for s, _ in res[("gta-4", "prose")]["gaps"]] == [0, 1, 2]
    text = render(runs, {})
    gta = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4 vs gqa-4"))
    gla = next(ln for ln in text.splitlines() if ln.startswith("- **gla-2 vs mla"))
    assert "the claim holds at this scale" in gta and "better with 95% confidence" in gta
    assert "this report is the first look at the claim, and corrected for it" in gta
    assert "does not hold" in gla and "worse by" in gla
    noisy = [fake_run("gqa-4", 0, 20, 20), fake_run("gta-4", 0, 20.4, 20.4), fake_run("gqa-4", 1, 20, 20),
             fake_run("gta-4", 1, 19.9, 19.9)]
    text = render(noisy, {})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4"))
    assert "is not decided" in line
    # gaps +2%, -0.5%: mean 0.75% < 1%, sd 1.77%: read as its second look (t quantile of
    # 1 − 0.025/6), the interval clears the margin at 352 seeds
    assert "> 100 paired seeds would show that it holds" in line
    row = next(ln for ln in text.splitlines() if ln.startswith("| gta-4 vs gqa-4 | average"))
    assert row.endswith("| inconclusive | > 100 |")
    assert "untested" in next(ln for ln in text.splitlines() if ln.startswith("- **gla-2"))


def test_each_look_at_a_claim_widens_its_interval():
    """Six gaps whose plain 95% interval just clears the margin (the study's GTA-4 gaps): the
    first look's corrected interval (t quantile of 1 − 0.025/2, a 97.5% interval) already
    straddles it; read as the fourth look at the claim (after 2, 3 and 4 seeds; 1 − 0.025/20,
    a 99.75% interval) it is wider still, and deciding takes more seeds."""
    from hwattn.eval.claims import record_looks, t_quantile_for

    gaps = [0.0323, 0.0127, 0.0138, 0.0088, 0.0262, 0.0274]
    runs = []
    for seed, g in enumerate(gaps):
        runs += [fake_run("gqa-4", seed, 20.0, 20.0), fake_run("gta-4", seed, 20 * (1 + g), 20 * (1 + g))]
    by = {v: [r for r in runs if r["variant"] == v] for v in ("gqa-4", "gta-4")}
    once = claim_results(by, ["code", "prose"])[0]
    assert once["looks"] == 1 and once["interval"][1] > 0.01  # read plainly: "fails"
    m, lo, hi = once["interval"]
    assert (hi - m) * t_quantile_for(1, 5) / t95(5) == pytest.approx(once["corrected"][2] - m)
    assert once["corrected"][1] < 0.01 and once["verdict"] == "inconclusive"
    looks = {"gta-4 vs gqa-4": [2, 3, 4, 6]}
    fourth = claim_results(by, ["code", "prose"], looks)[0]
    assert fourth["interval"] == once["interval"] and fourth["looks"] == 4
    assert fourth["corrected"][1] < once["corrected"][1] < 0.01 < once["interval"][1]
    # scipy.stats.t.ppf(1 - 0.025 / 20, 5) = 5.6041655: [+2.02% ∓ 2.20%]
    assert fourth["corrected"][1] == pytest.approx(-0.0017785, abs=1e-6)
    assert fourth["corrected"][2] == pytest.approx(0.0421785, abs=1e-6)
    assert fourth["verdict"] == "inconclusive" and fourth["seeds_needed"] > 6
    text = render(runs, {"looks": looks})
    line = next(ln for ln in text.splitlines() if ln.startswith("- **gta-4"))
    assert "is not decided" in line and "look 4 at the claim (at 2, 3, 4, 6 paired seeds)" in line
    # A report over new seeds is a look; one rewritten over the same seeds is not.
    assert record_looks(by, {"gta-4 vs gqa-4": [2, 3, 4]}) == looks
    assert record_looks(by, looks) == looks
    assert record_looks({"gqa-4": by["gqa-4"][:1], "gta-4": by["gta-4"][:1]}, {}) == {}


def _ever_wrong(quantile, seeds=(2, 3, 4, 6), draws=400_000, seed=20261206):
    """Monte Carlo: how often a claim whose true gap lies exactly on the margin is ever
    declared "fails", and ever declared "holds" (both wrong), when it is read at a look after
    each of `seeds` paired seeds with the t quantile `quantile(look, df)` and the reading
    stops at the first look that decides it; the gaps normal (the t-statistic does not depend
    on their spread)."""
    import numpy as np

    from hwattn.eval.claims import MATCH_MARGIN

    rng = np.random.default_rng(seed)
    gaps = MATCH_MARGIN + 0.01 * rng.standard_normal((draws, max(seeds)))
    fails, holds = np.zeros(draws, bool), np.zeros(draws, bool)
    for look, n in enumerate(seeds, 1):
        x = gaps[:, :n]
        m, half = x.mean(axis=1), quantile(look, n - 1) * x.std(axis=1, ddof=1) / math.sqrt(n)
        undecided = ~(fails | holds)
        fails |= undecided & (m - half > MATCH_MARGIN)
        holds |= undecided & (m + half <= MATCH_MARGIN)
    return float(fails.mean()), float(holds.mean())


def test_reading_a_claim_at_every_look_is_wrong_at_most_2_5_percent_a_side():
    """The correction for looks holds its promise when the reading stops at the first look
    that clears the margin: with the true gap on the margin and looks at 2, 3, 4 and 6 seeds
    (the study's GTA-4 looks), "fails" (and "holds") is ever declared at most 2.5% of the
    time, up to the Monte Carlo error (400,000 draws: a standard error of 0.025%). Bonferroni's
    1 − 0.025/k, used before, declared "fails" 4.1% of the time here; the levels
    0.025/(k(k+1)) sum to 0.025 · 4/5 over these looks (1.75% here)."""
    from hwattn.eval.claims import t_quantile_for

    assert sum(0.025 / (k * (k + 1)) for k in range(1, 1001)) < 0.025
    fails, holds = _ever_wrong(t_quantile_for)
    assert fails <= 0.025 + 0.001 and holds <= 0.025 + 0.001
    assert fails <= 0.02 + 0.001 and holds <= 0.02 + 0.001  # the union bound over four looks


def test_a_registered_batch_is_read_once_when_it_is_whole(tmp_path):
    """Seeds added as one batch registered before its first seed (`--next-look`) are not a
    look until the batch is whole: part-way, the claim's rows stay those of its last look
    and the looks file is unchanged; whole, the batch is one look over every seed."""
    from hwattn.eval.claims import record_looks
    from hwattn.eval.report import by_variant

    six = [0.0323, 0.0127, 0.0138, 0.0088, 0.0262, 0.0274]
    looks, registered = {"gta-4 vs gqa-4": [2, 3, 4, 6]}, {"gta-4 vs gqa-4": 10}
    at_six = claim_results(by_variant(paired_runs(six)), ["code", "prose"], looks)[0]
    part = paired_runs(six + [-0.05, -0.05])  # two new seeds that would move the interval a lot
    by = by_variant(part)
    assert record_looks(by, looks, registered) == looks
    row = claim_results(by, ["code", "prose"], looks, registered)[0]
    assert row["batch"] == (8, 10) and len(row["gaps"]) == 6
    assert row["corrected"] == at_six["corrected"] and row["looks"] == 4
    assert claim_results(by, ["code", "prose"], looks)[0]["corrected"] != at_six["corrected"]
    text = render(part, {"looks": looks, "next_looks": registered})
    assert "| gta-4 vs gqa-4 | average | 6 |" in text
    assert "inconclusive (batch to 10 seeds: 8 in)" in text
    assert "A batch registered before its first seed is part-way (8 of 10 paired seeds in)" in text
    whole = by_variant(paired_runs(six + [0.02] * 4))
    assert record_looks(whole, looks, registered) == {"gta-4 vs gqa-4": [2, 3, 4, 6, 10]}
    row = claim_results(whole, ["code", "prose"], {"gta-4 vs gqa-4": [2, 3, 4, 6, 10]},
                        registered)[0]
    assert row["batch"] is None and len(row["gaps"]) == 10 and row["looks"] == 5


def test_a_batch_is_registered_only_before_its_first_seed(tmp_path, capsys):
    from hwattn.eval.claims import register_next_looks
    from hwattn.eval.report import by_variant

    by = by_variant(paired_runs([0.01, 0.02, 0.03]))
    key = "gta-4 vs gqa-4"
    assert register_next_looks(by, {key: [3]}, {}, {key: 6}) == {key: 6}
    with pytest.raises(ValueError, match="1 of its 3 paired seeds have not been read"):
        register_next_looks(by, {key: [2]}, {}, {key: 6})
    with pytest.raises(ValueError, match="already has 3 paired seeds"):
        register_next_looks(by, {key: [3]}, {}, {key: 3})
    with pytest.raises(ValueError, match="unknown claim 'gta-4 vs mha'"):
        register_next_looks(by, {key: [3]}, {}, {"gta-4 vs mha": 6})
    # Through the command: the report's look first, then the registration, kept beside the runs.
    study, out = tmp_path / "study", tmp_path / "docs" / "quality.md"
    study.mkdir()
    (study / "study_runs.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in paired_runs([0.01, 0.02, 0.03])))
    assert report_main(["--study", str(study), "--out", str(out), "--next-look", "gta-4 vs gqa-4=6"]) == 0
    assert json.loads((study / "study_looks.json").read_text()) == {key: [3]}
    assert json.loads((study / "study_next_looks.json").read_text()) == {key: 6}
    assert (out.parent / "quality_raw" / "study_next_looks.json").is_file()
    capsys.readouterr()
    assert report_main(["--study", str(study), "--out", str(out), "--next-look", "gta-4 vs gqa-4"]) == 2
    assert "give CLAIM=SEEDS" in capsys.readouterr().err


def test_a_batch_is_not_registered_after_a_seed_no_look_has_read():
    """One paired seed is not read at any look (an interval needs two), but its gap is on the
    page: registering a batch then fixes the stopping point after seeing data of the batch."""
    from hwattn.eval.claims import register_next_looks
    from hwattn.eval.report import by_variant

    key = "gta-4 vs gqa-4"
    assert register_next_looks(by_variant(paired_runs([])), {}, {}, {key: 6}) == {key: 6}
    with pytest.raises(ValueError, match="1 of its 1 paired seeds have not been read"):
        register_next_looks(by_variant(paired_runs([0.05])), {}, {}, {key: 6})


@pytest.mark.parametrize("side", ["base", "new"])
@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_a_diverged_run_has_no_gap_it_is_named(side, value):
    """A diverged run's perplexity is inf (loss past 709 nats) or NaN. A diverged baseline
    made a gap of exactly −100% (20 / inf − 1), which pulled the mean gap to −24% in favour
    of the claim; a diverged new variant gave inf or NaN gaps and an AttributeError from
    `statistics.stdev`. Each is refused, naming the run."""
    runs = paired_runs([0.001, 0.002, 0.003, 0.0])
    bad = runs[2] if side == "base" else runs[3]  # seed 1's gqa-4 or gta-4
    for rec in bad["eval"]["ppl"].values():
        rec["ppl"] = value
    by = {v: [r for r in runs if r["variant"] == v] for v in ("gqa-4", "gta-4")}
    with pytest.raises(ValueError, match=f"run {bad['variant']}-s1: its average perplexity "
                                         f"is {value}.*seed 1 of gta-4 vs gqa-4 has no gap"):
        claim_results(by, ["code", "prose"])
