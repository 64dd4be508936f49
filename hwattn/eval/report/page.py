"""The markdown page of the quality report (`render`), and the notes it draws from the runs.

The page's sections in order: setup, results per variant (mean ± std over seeds), the
claims table and its plain words (`hwattn.eval.report.verdicts`), the recall probe and what
this scale can and cannot show (`scale_notes`). The paper's numbers it compares with are
the only ones typed in (`PAPER_PPL`).
"""

from __future__ import annotations

import statistics

from hwattn.eval.claims import CLAIMS, MATCH_MARGIN, ppl_of
from hwattn.eval.report.runs import by_variant, domains_of
from hwattn.eval.report.verdicts import _seeds, claim_rows, plain_statement


# FineWeb-Edu validation perplexity reported by the paper (docs/design.md §3).
PAPER_PPL = {
    "xl (1.47B)": {"gta-4": 10.129, "gqa-4": 10.202, "gla-2": 10.218, "mla": 10.256, "mha": 10.311},
    "large (876M)": {"gta-4": 11.232, "gqa-4": 11.340, "gla-2": 11.293, "mla": 11.363},
}
# The paper's model sizes and training tokens (docs/design.md §3).
PAPER_SCALE, PAPER_TOKENS = "183M–1.47B-parameter models", "25–50B tokens"


# Seed-to-seed variation small enough for a 1% gap to stand out of it.
SEED_STD_NEEDED = 0.005


def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _pm(values, fmt="{:.3f}") -> str:
    m, s = mean_std(values)
    if m is None:
        return "–"
    return fmt.format(m) + ("" if s is None else " ± " + fmt.format(s))


def _pct(x, digits=1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}%"


def final_descent(run: dict) -> float | None:
    """How far the run's validation loss (mean over domains) fell over the last quarter of its
    tokens, in nats; None without two validation points in that span."""
    points = [(c["tokens"], c["val_loss"]) for c in run.get("curve", []) if "val_loss" in c]
    if len(points) < 2:
        return None
    end_tokens, end_loss = points[-1]
    start = min(points, key=lambda p: abs(p[0] - 0.75 * end_tokens))
    return None if start == points[-1] else start[1] - end_loss


def seed_loss_spread(by: dict[str, list[dict]]) -> dict[str, float]:
    """Per variant with two seeds or more, the seed-to-seed standard deviation of its
    validation loss (mean over domains, `eval.ppl.average.loss`) as a share of its mean."""
    out = {}
    for label, rs in by.items():
        losses = [r["eval"]["ppl"].get("average", {}).get("loss") for r in rs]
        if None not in losses:
            m, s = mean_std(losses)
            if s is not None:
                out[label] = s / m
    return out


def mean_loss(runs: list[dict]) -> float:
    """The runs' mean validation loss (mean over domains), in nats per token."""
    return statistics.fmean(r["eval"]["ppl"]["average"]["loss"] for r in runs
                            if "loss" in r["eval"]["ppl"].get("average", {}))


def curve_note(runs: list[dict], domains: list[str]) -> str | None:
    """How the curves' last validation points differ from the table's losses, in one run: the
    curve scores a prefix of each domain's held-out tokens at each point, the final evaluation
    every one of them. None when no run has both."""
    for run in runs:
        last = next((c for c in reversed(run.get("curve", []))
                     if all(f"val_loss/{d}" in c for d in domains)), None)
        ppl = run.get("eval", {}).get("ppl", {})
        if last is None or not all(d in ppl and "loss" in ppl[d] for d in domains):
            continue
        pairs = ", ".join(f"{d} {last[f'val_loss/{d}']:.2f} against {ppl[d]['loss']:.2f}"
                          for d in domains)
        return ("- The curves' validation points score a prefix of each domain's held-out "
                "tokens (the study's `--eval-tokens`), the tables all of them, so a "
                "curve's last point is not the table's loss: "
                f"{run['variant']} seed {run['seed']} ends its curve at {pairs} nats. Compare "
                "variants on the curves with each other, not with the tables.")
    return None


def scale_notes(runs: list[dict], domains: list[str]) -> list[str]:
    """What the study's size allows, from its own numbers."""
    r0 = runs[0]
    params = r0.get("non_embedding_params") or r0["params"]
    kind = "non-embedding parameters" if r0.get("non_embedding_params") else "parameters"
    tokens = r0.get("tokens", 0)
    notes = [f"- Models of {params / 1e6:.1f}M {kind} trained on {tokens / 1e6:.0f}M tokens, "
             f"{tokens / params:.1f} tokens per parameter; the paper trains "
             f"{PAPER_SCALE} on {PAPER_TOKENS}. A gap that opens only with more parameters or "
             "tokens is out of reach."]
    descents = [d for d in map(final_descent, runs) if d is not None]
    if descents and min(descents) > 0.01:
        notes.append(f"- Every run's validation loss was still falling when it stopped: by "
                     f"{min(descents):.2f}–{max(descents):.2f} nats over its last quarter of "
                     "tokens, so the ordering can still change with longer training.")
    notes += [f"- The held-out domains are {', '.join(domains)}, not the paper's FineWeb-Edu: "
              "absolute perplexities are not comparable with the paper's, the gaps are.",
              "- A verdict is only as good as its interval: with 2–3 seeds the t-interval is "
              "wide (the 95% quantile of t with 1 and 2 degrees of freedom is 12.7 and 4.3)."]
    note = curve_note(runs, domains)
    return notes + ([note] if note else [])


def _scored(run: dict, val: dict | None) -> str:
    """How much of the held-out text the tables score: whole windows of the run's seq_len,
    every token after a domain's first predicted once up to the last whole window
    (`hwattn.data.loader.eval_windows`), so a domain's last (n - 1) mod seq_len tokens are
    left out."""
    ppl = run.get("eval", {}).get("ppl", {})
    scored = {d: ppl[d]["tokens"] for d in (val or {}) if isinstance(ppl.get(d), dict)
              and "tokens" in ppl[d]}
    window = f"windows of {run['seq_len']:,} tokens" if run.get("seq_len") else "whole windows"
    if not scored:
        return f"scored in {window} (a domain's last partial window left out)"
    counts = ", ".join(f"{d} {n:,} of {val[d]:,}" for d, n in scored.items())
    return f"scored in {window}, up to each domain's last whole window ({counts} tokens)"


def render(runs: list[dict], summary: dict, plot_name: str = "quality_loss.png",
           gaps_name: str = "quality_gaps.png", claims: list[dict] | None = None) -> str:
    """The markdown report; `plot_name` and `gaps_name` are its figures' file names, `claims`
    the claims table's rows when already computed (`claim_rows`)."""
    by = by_variant(runs)
    domains = domains_of(runs)
    r0 = runs[0]
    sched = summary.get("schedule", {})
    ds = summary.get("dataset", {})
    seeds = sorted({r["seed"] for r in runs})
    plan, pending = summary.get("plan", []), summary.get("pending", [])
    old_env = summary.get("environment", {})  # studies written before per-run records
    def gpu_of(r: dict) -> str:
        return r.get("gpu") or old_env.get("gpu") or "CPU"

    gpus = sorted({gpu_of(r) for r in runs})
    # Training speed depends on the GPU, quality does not: the speed columns come from the
    # runs on the GPU most runs used, so that a spread over seeds is not a spread over cards.
    speed_gpu = max(gpus, key=lambda g: (sum(gpu_of(r) == g for r in runs), g))
    cmds = summary.get("commands", [])
    env = cmds[-1]["environment"] if cmds and cmds[-1].get("environment") else old_env
    out = [f"# Quality study: GTA vs GQA, GLA vs MLA at the `{r0.get('preset')}` scale", "",
           "Generated by `python -m hwattn.eval.report` from the raw files of "
           "`benchmarks/quality_study.py`, kept beside this page in `quality_raw/`. Every number "
           "below is computed from those files; only the paper's perplexities are typed in.", ""]
    if pending:
        # (the plan is the last command's; runs outside it came from earlier plans' seeds)
        extra = len(runs) - (len(plan) - len(pending))
        earlier = f", and {extra} more from earlier plans" if extra > 0 else ""
        out += [f"**The study is incomplete: {len(plan) - len(pending)} of {len(plan)} planned "
                f"runs are finished** (pending: {', '.join(pending)}){earlier}. Conclusions "
                "below use what is finished.", ""]
    tokens = r0.get("tokens", 0)
    avail = sched.get("train_tokens_available")
    val = ds.get("splits", {}).get("val")
    train_split = ds.get("splits", {}).get("train")
    lr, warmup = r0.get("lr", sched.get("lr")), r0.get("warmup_steps", sched.get("warmup_steps"))
    non_emb = [r["non_embedding_params"] for r in runs if r.get("non_embedding_params")]
    when = (f"{len(cmds)} study command(s), the last on {env.get('date', 'an unrecorded date')}"
            if cmds else f"run on {env.get('date', 'an unrecorded date')}")
    tok = ds.get("tokenizer", {})
    per_param = [r["tokens_per_non_embedding_param"] for r in runs
                 if r.get("tokens_per_non_embedding_param")]
    out += ["## Setup", "",
            f"- Hardware / software: {', '.join(gpus)}; PyTorch {env.get('torch', '?')}; {when}.",
            f"- Models: preset `{r0.get('preset')}`, "
            + (f"{non_emb[0] / 1e6:.2f}M non-embedding parameters ({r0['params'] / 1e6:.2f}M "
               "with the tied embedding)" if non_emb else
               f"{r0['params'] / 1e6:.2f}M parameters with the tied embedding")
            + "; every variant parameter-matched to MHA by widening its SwiGLU hidden size.",
            "- Data: "
            + (f"`{ds['path']}`" if ds.get("path") else "a dataset built by `hwattn data build`")
            + (f" (build {str(r0['build_key'])[:12]})" if r0.get("build_key") else "")
            + (f", tokenizer {tok.get('name')} ({tok.get('vocab_size')} ids)" if tok else "")
            + (f"; training tokens by domain {train_split}" if train_split else "")
            + (f"; validation tokens {val}" if val else "")
            + "; validation = held-out documents of each domain, " + _scored(r0, val) + ".",
            "- Schedule, identical for every run: "
            + (f"{r0['steps']} steps × {sched['tokens_per_step']:,} tokens = "
               if r0.get("steps") and sched.get("tokens_per_step") else "")
            + f"{tokens:,} tokens"
            + (f" ({tokens / avail:.2f} epochs)" if avail else "")
            + (f", at least {min(per_param):.1f} tokens per non-embedding parameter"
               if per_param else "")
            + (f"; peak lr {lr}" if lr is not None else "")
            + (f", warm-up {warmup} steps" if warmup is not None else "")
            + ", cosine to 1%, AdamW (0.9, 0.95), weight decay 0.1, clip 1.0, bf16 autocast.",
            f"- Seeds {seeds}: a seed sets the initialisation and the data order, so for one seed "
            "every variant sees the same tokens in the same order; the claim pairs are compared "
            "seed by seed.", ""]

    head = ["variant", "seeds", "hidden", "KV B/token/layer", "val ppl (mean of domains)",
            "seed std", "loss seed std"] + [f"ppl {d}" for d in domains] + \
        [f"bits/byte {d}" for d in domains] + \
        ["cloze", "MC (norm)", "recall", "tok/s", "MFU"]
    loss_rel = seed_loss_spread(by)
    out += ["## Results", "", "Mean ± standard deviation over seeds; seed std: of the mean "
            "validation perplexity, as a share of it; loss seed std: of the validation loss "
            "(nats per token, mean over domains), as a share of it.", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, rs in by.items():
        avg = [r["eval"]["ppl"]["average"]["ppl"] for r in rs]
        m, s = mean_std(avg)
        row = [label, str(len(rs)), str(rs[0].get("hidden_dim", "–")),
               f"{rs[0]['kv_bytes_per_token_per_layer']:,}", _pm(avg),
               _pct(s / m if s is not None else None, 2), _pct(loss_rel.get(label), 2)]
        row += [_pm([ppl_of(r, d) for r in rs]) for d in domains]
        row += [_pm([r["eval"]["ppl"][d].get("bpb") for r in rs], "{:.4f}") for d in domains]
        row += [_pct(mean_std([r["eval"].get("cloze", {}).get("acc") for r in rs])[0]),
                _pct(mean_std([r["eval"].get("mc", {}).get("acc_norm") for r in rs])[0]),
                _pct(mean_std([r["eval"].get("recall", {}).get("mean") for r in rs])[0]),
                _pm([r.get("steady_tokens_per_s") for r in rs if gpu_of(r) == speed_gpu],
                    "{:,.0f}"),
                _pct(mean_std([r.get("steady_mfu") for r in rs if gpu_of(r) == speed_gpu])[0])]
        out.append("| " + " | ".join(row) + " |")
    if len(gpus) > 1:
        others = ", ".join(f"{r['variant']} seed {r['seed']} on {gpu_of(r)}"
                           for r in runs if gpu_of(r) != speed_gpu)
        out += ["", f"tok/s and MFU: the runs on {speed_gpu} only (training speed depends on "
                f"the card; perplexity does not). Trained elsewhere: {others}."]
    stds = {label: mean_std([r["eval"]["ppl"]["average"]["ppl"] for r in rs])
            for label, rs in by.items()}
    rel = {k: s / m for k, (m, s) in stds.items() if s is not None}
    if rel:
        worst = max(rel, key=rel.get)
        out += ["", f"Seed-to-seed standard deviation of the mean validation perplexity: at most "
                f"{_pct(rel[worst], 2)} ({worst}). Resolving a 1% gap needs at most "
                f"{_pct(SEED_STD_NEEDED, 1)}: "
                + ("every variant is within it." if rel[worst] <= SEED_STD_NEEDED else
                   f"{', '.join(k for k, v in rel.items() if v > SEED_STD_NEEDED)} "
                   "vary more.")]
    if loss_rel:
        worst = max(loss_rel, key=loss_rel.get)
        over = [k for k, v in loss_rel.items() if v > SEED_STD_NEEDED]
        out += ["", f"Of the validation loss itself the seed-to-seed standard deviation is at "
                f"most {_pct(loss_rel[worst], 2)} ({worst}) of the loss: "
                + (f"{', '.join(over)} above {_pct(SEED_STD_NEEDED, 1)}, every other variant "
                   "within it." if over else f"every variant within {_pct(SEED_STD_NEEDED, 1)}.")
                + f" A perplexity's relative spread is about its loss's spread in nats (the "
                f"loss, {mean_loss(runs):.2f} nats here, times the loss's relative spread), "
                "and the mean of the domains' perplexities weighs the high-perplexity domain "
                "most (where the domains' deviations offset each other, as with two seeds they "
                "may, the perplexity spread is the smaller one)."]
    peak = r0.get("peak_tflops")
    out += ["", "Perplexity is per held-out domain; the mean over domains weighs each domain "
            "equally. Bits per byte divide the summed loss by the UTF-8 bytes the scored tokens "
            "stand for. Cloze: greedy last-word accuracy; MC: 4-way continuation choice by "
            "per-character log-likelihood (chance 25%); recall: multi-query associative recall "
            "(below). MFU: steady-state training tokens/s × `Transformer.flops_per_token` (6 per "
            "matmul weight plus attention over the full context) against "
            + (f"{peak:.0f} TFLOP/s (bf16 dense)." if peak else "no peak (CPU run)."), "",
            f"![loss curves]({plot_name})", ""]

    looks = summary.get("looks") or {}
    res = claims if claims is not None else claim_rows(runs, summary)
    out += ["## The paper's claims", "",
            "Paired by seed: gap = perplexity of the new variant / perplexity of its baseline − 1; "
            f"95% t-interval over seeds; a claim holds when the interval's upper end is at most "
            f"+{100 * MATCH_MARGIN:.0f}% (the new variant no more than 1% worse). Seeds are added "
            "to the study in batches and each batch's report is a look at the claim: reading a "
            "95% interval after every batch and stopping once it clears the margin would be "
            "wrong more often than 5% of the time, so the verdict is read from the interval "
            "corrected for the looks so far: at the k-th look, the t quantile of "
            "1 − 0.025/(k(k+1)) (each end may be wrong 1.25% of the time at the first look, "
            "0.42% at the second, 0.21% at the third, 0.125% at the fourth, ...; these sum to "
            "less than 2.5% however many looks are taken, so the chance of ever wrongly "
            "declaring either verdict stays within 2.5% a side). `study_looks.json` beside the "
            "runs records the paired-seed counts at which each claim's report was written. "
            "Seeds to decide: for an inconclusive row, "
            "the paired seeds whose interval, corrected for one look more, would clear the "
            "margin if the gaps kept their mean and standard deviation. A batch of seeds "
            "registered before its first seed (`--next-look`, kept in `study_next_looks.json`) "
            "is read once, when it is whole: until then its claim's rows stay those of the last "
            "look, and the verdict column says how far the batch has come.", "",
            "| claim | metric | seeds | per-seed gaps | mean gap | 95% interval | looks | "
            "corrected interval | verdict | seeds to decide |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res:
        iv, cv = r["interval"], r["corrected"]
        gaps = ", ".join(f"s{s}: {100 * g:+.2f}%" for s, g in r["gaps"]) or "–"
        out.append(f"| {r['new']} vs {r['base']} | {r['metric']} | {len(r['gaps'])} | {gaps} | "
                   + (f"{100 * iv[0]:+.2f}% | [{100 * iv[1]:+.2f}%, {100 * iv[2]:+.2f}%] | "
                      f"{r['looks']} | [{100 * cv[1]:+.2f}%, {100 * cv[2]:+.2f}%]"
                      if iv else "– | – | – | –")
                   + f" | {r['verdict']}"
                   + (f" (batch to {r['batch'][1]} seeds: {r['batch'][0]} in)" if r["batch"] else "")
                   + f" | {_seeds(r['seeds_needed'])} |")
    out += ["", f"![the claims' paired gaps]({gaps_name})", "",
            "Per claim and metric: each seed's gap (dots), the mean gap, the 95% t-interval "
            "(thick bar) and the interval corrected for the looks (thin bar), against the "
            f"+{100 * MATCH_MARGIN:.0f}% margin (dashed) and 0."]
    paper = [f"{k}: " + ", ".join(f"{v} {p}" for v, p in d.items()) for k, d in PAPER_PPL.items()]
    gaps = []
    for new, base in CLAIMS:
        gaps += [f"{new} vs {base} {100 * (d[new] / d[base] - 1):+.2f}% at {k}"
                 for k, d in PAPER_PPL.items() if new in d and base in d]
    out += ["", "In plain words:", "", *plain_statement(res, domains, looks), "",
            "The paper (FineWeb-Edu validation, 25–50B tokens) measured " + "; ".join(gaps)
            + ". Its perplexities: " + "; ".join(paper) + ".", ""]

    pairs = sorted({k for r in runs for k in r["eval"].get("recall", {})
                    if k.startswith("pairs_")}, key=lambda k: int(k.split("_")[1]))
    if pairs:
        # (from a run that ran the probe: the first record need not have)
        chance = next(r["eval"]["recall"].get("chance") for r in runs
                      if r["eval"].get("recall", {}).get("chance") is not None)
        out += ["## Recall probe", "",
                "Multi-query associative recall: a list of key–value word pairs, then queries of "
                "the keys; accuracy of the model's next-token argmax at each query (chance "
                f"{_pct(chance, 2)}). Mean ± standard deviation over seeds.", "",
                "| variant | " + " | ".join(f"{k.split('_')[1]} pairs" for k in pairs) + " |",
                "|" + "---|" * (1 + len(pairs))]
        for label, rs in by.items():
            out.append(f"| {label} | " + " | ".join(
                _pm([r["eval"].get("recall", {}).get(k) for r in rs], "{:.3f}") for k in pairs) + " |")
        out.append("")
    out += ["## What this scale can and cannot show", "", *scale_notes(runs, domains), ""]
    return "\n".join(out)
