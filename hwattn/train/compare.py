"""`hwattn compare`: the whole loop for every variant at one scale, side by side.

For each variant: train on the same tokens with the same schedule and seed, evaluate
(per-domain perplexity and bits per byte, cloze, multiple choice, recall probe), and measure
its KV cache bytes per token and greedy decode tokens/s through the paged cache. Writes
`compare.json` (every number; a diverged run's NaN or inf as null), `compare.md` (the table,
what it can and cannot say, each task's chance level, the measured wall time) and
`compare.png` (loss curves and bars, every axis from zero) under the output folder, each
replaced whole, and prints the table and notes.

Scales: on CPU the `tiny` preset on the shipped corpus (own 2,048-id BPE), a few minutes on
two cores; on a GPU the `mini` preset (d_h = 64) at sequence length 1024 with an 8,192-id BPE
on the shipped corpus, or any dataset built with `hwattn data build` (`data=`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hwattn.analysis.cost import DEFAULT_VARIANTS
from hwattn.config import ModelConfig, parse_variant
from hwattn.data.loader import TokenDataset
from hwattn.eval.suite import EvalConfig, build_tasks, evaluate_model
from hwattn.files import write_json, write_text
from hwattn.models.generate import greedy_generate
from hwattn.device import resolve_device
from hwattn.train.memory import check_batch_fits
from hwattn.train.metrics import read_metrics
from hwattn.train.trainer import TrainConfig, run_model_config, train

# Printed and written with every CPU comparison: what its numbers can and cannot say
# (`smoke_note` puts the run's own model sizes and tokens in front of it).
_SMOKE_REST = ("the run checks that every variant trains, evaluates and decodes, and measures "
               "its KV bytes per token. Its quality columns rank the variants by seed noise "
               "(the order changes from run to run and no seed spread is measured), so they "
               "can neither confirm nor refute the paper's quality claims; that is the GPU "
               "study's job (benchmarks/quality_study.py, docs/quality_study.md).")
# Printed and written with every other comparison (one seed, no spread).
ONE_SEED_NOTE = ("One seed: no seed spread is measured, so quality differences between variants "
                 "are not established by this run (the GPU quality study, "
                 "benchmarks/quality_study.py, runs several seeds).")
MC_CHANCE = 0.25  # 4-way multiple choice (hwattn.eval.tasks.build_mc)

# Per-scale defaults: (preset, tokenizer for the shipped corpus, seq_len, batch, steps, lr).
SCALES = {
    # Two CPU cores: many small steps learn more per second than few large ones.
    "cpu": dict(preset="tiny", tokenizer="bpe:2048", seq_len=128, batch_size=8, steps=320,
                lr=6e-3, warmup_steps=16, eval_tokens=8_192, n_cloze=100, n_mc=50,
                recall_pairs=(4, 8, 16), recall_seqs=16, decode_batch=4, decode_prompt=32,
                decode_new=32),
    "cuda": dict(preset="mini", tokenizer="bpe:8192", seq_len=1024, batch_size=32, steps=300,
                 lr=1.5e-3, warmup_steps=30, eval_tokens=65_536, n_cloze=400, n_mc=400,
                 recall_pairs=(16, 64, 128), recall_seqs=64, decode_batch=32,
                 decode_prompt=512, decode_new=128),
}


# TrainConfig fields `run_compare` sets itself for every variant; `CompareConfig.extra` may
# not name them (those with a field of their own in CompareConfig are set there).
SET_BY_COMPARE = ("data", "out", "preset", "variant", "seq_len", "batch_size", "steps", "lr",
                  "warmup_steps", "seed", "device", "compile", "eval_every", "eval_tokens",
                  "save_final", "plot", "log_every", "resume")


@dataclass
class CompareConfig:
    """Unset fields (None) take the defaults of the device's scale (`SCALES`).

    extra: more `TrainConfig` fields for every variant's training run (e.g. model_overrides,
    accum_steps, amp); a field `run_compare` sets itself (`SET_BY_COMPARE`) or one TrainConfig
    does not have is refused by `resolved` (ValueError naming it), before any data is built.
    """

    out: str = "runs/compare"
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    data: str | None = None
    device: str = "auto"
    preset: str | None = None
    tokenizer: str | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    eval_tokens: int | None = None
    n_cloze: int | None = None
    n_mc: int | None = None
    recall_pairs: tuple[int, ...] | None = None
    recall_seqs: int | None = None
    decode_batch: int | None = None
    decode_prompt: int | None = None
    decode_new: int | None = None
    seed: int = 0
    compile: bool = False
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "CompareConfig":
        """Defaults filled in from the device's scale; `steps` stays None when not given
        (`run_compare` then caps the scale's step count at two epochs of the data), and so
        does `warmup_steps` (the scale's, capped at a tenth of the steps: `default_warmup`).

        Checked here, before any data is built: the keys of `extra`, and that one window of
        `seq_len` tokens fits the `eval_tokens` the training curves score (ValueError naming
        --seq-len and the limit)."""
        check_extra(self.extra)
        kind = "cuda" if resolve_device(self.device).type == "cuda" else "cpu"
        scale = SCALES[kind]
        vals = {k: (v if v is not None or k in ("steps", "warmup_steps") else scale.get(k))
                for k, v in asdict(self).items()}
        cfg = CompareConfig(**vals)
        if cfg.eval_tokens < cfg.seq_len:
            where = (f"(eval_tokens {cfg.eval_tokens})" if self.eval_tokens is not None
                     else f"at the {kind} scale")
            raise ValueError(f"--seq-len {cfg.seq_len} is longer than the {cfg.eval_tokens} "
                             f"validation tokens per domain that the training curves score "
                             f"{where}: give --seq-len at most {cfg.eval_tokens}")
        return cfg


def check_extra(extra: dict) -> None:
    """ValueError naming the keys of `CompareConfig.extra` that are no `TrainConfig` field, or
    that `run_compare` sets itself (`SET_BY_COMPARE`): either failed as a bare TypeError from
    TrainConfig, after the dataset was built."""
    if not isinstance(extra, dict):
        raise ValueError(f"extra must be a dict of TrainConfig fields, got {extra!r}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(k for k in extra if k not in fields)
    if unknown:
        raise ValueError(f"extra names {', '.join(map(repr, unknown))}, not TrainConfig "
                         f"field{'s' if len(unknown) > 1 else ''}")
    taken = [k for k in SET_BY_COMPARE if k in extra]
    if taken:
        own = [k for k in taken if k in {f.name for f in dataclasses.fields(CompareConfig)}]
        raise ValueError(f"extra names {', '.join(map(repr, taken))}, which compare sets for "
                         f"every variant" + (f"; set {', '.join(own)} on CompareConfig itself"
                                             if own else ""))


def prepare_data(cfg: CompareConfig, log=print) -> TokenDataset:
    """The dataset to train on: `cfg.data`, or the shipped corpus built under `<out>/data`."""
    if cfg.data:
        return TokenDataset(cfg.data)
    from hwattn.data.build import BuildOptions
    from hwattn.data.corpora import build_dataset

    path = Path(cfg.out) / "data"
    build_dataset(path, "embedded", cfg.tokenizer, BuildOptions(val_fraction=0.1), progress=False,
                  log=log)
    return TokenDataset(path)


@torch.no_grad()
def decode_speed(model, batch: int, prompt_len: int, new_tokens: int, seed: int = 0,
                 repeats: int = 3) -> dict:
    """Greedy decode through the paged cache (bf16 cache on CUDA): tokens/s of the decode
    phase (median of `repeats` runs after a warm-up, and their spread: (max - min) / median),
    and the cache bytes allocated."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=gen).to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    model.eval()
    m = model.to(torch.bfloat16) if device.type == "cuda" else model
    greedy_generate(m, prompt, 4, cache_dtype=dtype)
    rates = []
    for _ in range(repeats):
        _, stats = greedy_generate(m, prompt, new_tokens, cache_dtype=dtype)
        rates.append(stats.decode_tokens_per_s)
    if device.type == "cuda":
        model.float()
    median = statistics.median(rates)
    return {"decode_tokens_per_s": median,
            "decode_tokens_per_s_spread": (max(rates) - min(rates)) / median,
            "kv_cache_bytes": stats.kv_cache_bytes,
            "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens}


def check_windows(cfg: CompareConfig, data: TokenDataset) -> None:
    """ValueError naming --seq-len and its limit when a validation window of `cfg.seq_len`
    tokens does not fit in a validation domain of the data, checked before the first variant
    trains: it failed in evaluation ("... tokens are fewer than one evaluation window"), after
    training (the trainer builds its model for any --seq-len). The `eval_tokens` the curves
    score are checked earlier, by `CompareConfig.resolved`, before any data is built."""
    if not data.val:
        return
    domain, tokens = min(data.val.items(), key=lambda item: len(item[1]))
    if len(tokens) <= cfg.seq_len:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the {len(tokens)} validation "
                         f"tokens of domain {domain!r} in {data.path} (one window needs "
                         f"--seq-len + 1): give --seq-len at most {len(tokens) - 1}, or build "
                         "a dataset with more validation text")


def _new_folders(out: Path) -> list[Path]:
    """What building the shipped corpus under `out` may create that does not exist yet: the
    highest missing folder of `out` (all of it would be this run's), else `out`/data and
    `out`/raw (the tokenizer's downloads) where missing."""
    missing = [f for f in (out.absolute(), *out.absolute().parents) if not f.exists()]
    if missing:
        return [missing[-1]]
    return [f for f in (out / "data", out / "raw") if not f.exists()]


def default_warmup(cfg: CompareConfig) -> int:
    """The warm-up when none is given: the scale's, at most a tenth of `cfg.steps`."""
    scale = SCALES["cuda" if resolve_device(cfg.device).type == "cuda" else "cpu"]
    return min(scale["warmup_steps"], max(1, cfg.steps // 10))


def model_configs(cfg: CompareConfig, vocab_size: int) -> list[ModelConfig]:
    """The model of each variant on data of `vocab_size` ids, by the trainer's own rule
    (`hwattn.train.trainer.run_model_config`), before any TrainConfig is made (the step
    count may not be known yet); ValueError where that rule refuses the overrides."""
    given = cfg.extra.get("model_overrides")
    known = {f.name for f in dataclasses.fields(ModelConfig)} - {"preset"}
    configs = []
    for label in cfg.variants:
        variant = parse_variant(label)
        # Keys it cannot take are refused, by name, when the run's TrainConfig is made.
        overrides = ({k: v for k, v in given.items() if k in known and k not in variant}
                     if isinstance(given, dict) else {})
        configs.append(run_model_config(cfg.preset, label, cfg.seq_len, vocab_size, overrides))
    return configs


def train_settings(cfg: CompareConfig, data: TokenDataset, out: Path, label: str) -> dict:
    """The `TrainConfig` fields compare sets for variant `label` (`SET_BY_COMPARE`); `extra`
    adds to them."""
    return dict(data=str(data.path), out=str(out / label), preset=cfg.preset, variant=label,
                seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr,
                warmup_steps=default_warmup(cfg) if cfg.warmup_steps is None else cfg.warmup_steps,
                seed=cfg.seed,
                device=cfg.device, compile=cfg.compile, eval_every=max(1, cfg.steps // 4),
                eval_tokens=cfg.eval_tokens, save_final=True, plot=False,
                log_every=max(1, min(10, cfg.steps // 20)), resume=False)


def run_compare(cfg: CompareConfig, progress: bool = True, log=print) -> dict:
    """Train, evaluate and time every variant; returns {"config", "rows", "files"}."""
    cfg = cfg.resolved()  # checks what it can before the data is built
    out = Path(cfg.out)
    t_start = time.perf_counter()
    made = [] if cfg.data else _new_folders(out)
    data = prepare_data(cfg, log)  # with --data, before <out> is made
    try:
        check_windows(cfg, data)
        if not cfg.compile:  # Inductor recomputes what eager keeps: the eager bound is none there
            check_batch_fits(model_configs(cfg, data.vocab_size), cfg.seq_len, cfg.batch_size,
                             resolve_device(cfg.device), cfg.extra.get("amp", "auto"))
    except ValueError:  # refused: what the data build made for this run goes too
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    out.mkdir(parents=True, exist_ok=True)
    if cfg.steps is None:
        scale = SCALES["cuda" if resolve_device(cfg.device).type == "cuda" else "cpu"]
        two_epochs = 2 * len(data.train) // (cfg.seq_len * cfg.batch_size)
        cfg.steps = max(20, min(scale["steps"], two_epochs))
        if cfg.steps < scale["steps"]:
            log(f"{len(data.train):,} training tokens: {cfg.steps} steps (two epochs); build a "
                "larger dataset with `hwattn data build --corpus registry` and pass --data")
    if cfg.warmup_steps is None:  # one given is kept (TrainConfig refuses it past the steps)
        cfg.warmup_steps = default_warmup(cfg)
    ecfg = EvalConfig(seq_len=cfg.seq_len, ppl_tokens=None, n_cloze=cfg.n_cloze, n_mc=cfg.n_mc,
                      recall_pairs=tuple(cfg.recall_pairs), recall_seqs=cfg.recall_seqs,
                      seed=cfg.seed)
    tasks = build_tasks(data, ecfg)
    rows, curves = [], {}
    for label in cfg.variants:
        t0 = time.perf_counter()
        tcfg = TrainConfig(**train_settings(cfg, data, out, label), **cfg.extra)
        res = train(tcfg, progress=progress, log=log, dataset=data)
        train_s = time.perf_counter() - t0
        model = res.pop("model")
        t1 = time.perf_counter()
        ev = evaluate_model(model, data, ecfg, tasks, progress=progress)
        eval_s = time.perf_counter() - t1
        speed = decode_speed(model, cfg.decode_batch, cfg.decode_prompt, cfg.decode_new, cfg.seed)
        curves[label] = read_metrics(out / label / "metrics.jsonl")
        row = {"variant": label, "params": model.num_params(),
               "kv_bytes_per_token": model.kv_bytes_per_token(1, torch.bfloat16),
               "kv_bytes_per_token_per_layer": model.kv_bytes_per_token(1, torch.bfloat16)
               // model.config.n_layers,
               "hidden_dim": model.config.hidden_dim, "train_tokens": res["tokens"],
               "train_tokens_per_s": res.get("steady_tokens_per_s", res["last"].get("tokens_per_s")),
               "train_mfu": res.get("steady_mfu"), "train_s": train_s, "eval_s": eval_s,
               "val_loss": ev["ppl"]["average"]["loss"], "val_ppl": ev["ppl"]["average"]["ppl"],
               "val_bpb": ev["ppl"]["average"]["bpb"],
               "val_ppl_by_domain": {d: r["ppl"] for d, r in ev["ppl"].items() if d != "average"},
               "cloze_acc": ev.get("cloze", {}).get("acc"), "mc_acc": ev.get("mc", {}).get("acc"),
               "mc_acc_norm": ev.get("mc", {}).get("acc_norm"),
               "recall": ev.get("recall", {}), **speed}
        rows.append(row)
        log(f"{label}: val ppl {row['val_ppl']:.2f}, {train_s:.0f} s training, "
            f"{speed['decode_tokens_per_s']:.0f} decode tok/s")
    smoke = resolve_device(cfg.device).type == "cpu"
    diverged = [r for r in rows if not _finite(r, QUALITY_KEYS)]
    notes = [smoke_note(rows) if smoke else ONE_SEED_NOTE, *divergence_notes(diverged),
             *chance_notes(rows)]
    result = {"config": asdict(cfg), "device": str(resolve_device(cfg.device)),
              "smoke_test": smoke, "notes": notes,
              "diverged": [r["variant"] for r in diverged],
              "torch": torch.__version__, "rows": rows,
              "wall_s": time.perf_counter() - t_start}
    # Each file is replaced whole; NaN and inf are written as null (strict JSON), and the
    # table and the notes say which variant diverged.
    write_json(out / "compare.json", result, indent=2)
    table = (format_compare(rows, cfg) + "\n\n" + "\n".join(f"- {n}" for n in notes)
             + f"\n\nwall time {result['wall_s']:.0f} s (data build, training, evaluation and "
             f"decode timing of {len(rows)} variant{'s' if len(rows) != 1 else ''}).")
    write_text(out / "compare.md", table + "\n")
    files = {"json": str(out / "compare.json"), "table": str(out / "compare.md")}
    try:
        plot_compare(rows, curves, out / "compare.png", cfg, notes[0])
        files["plot"] = str(out / "compare.png")
    except ImportError:  # no matplotlib: an earlier run's figure must not pass for this one's
        (out / "compare.png").unlink(missing_ok=True)
    result["files"] = files
    result["table"] = table
    return result


# The quality columns; a diverged model's are NaN or inf.
QUALITY_KEYS = ("val_loss", "val_ppl", "val_bpb")


def _finite(row: dict, keys) -> bool:
    return all(isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in keys)


def smoke_note(rows: list[dict]) -> str:
    """The CPU run's note: smoke test, not evidence, with the run's own model sizes and
    training tokens (--steps and --preset change both)."""
    def span(values, fmt):
        low, high = fmt(min(values)), fmt(max(values))
        return low if low == high else f"{low}-{high}"

    size = span([r["params"] for r in rows], lambda n: f"{n / 1e6:.2f}M")
    seen = span([r["train_tokens"] for r in rows], lambda n: f"{n:,}")
    return (f"Smoke test, not evidence. On CPU every model is small ({size} parameters) and "
            f"sees {seen} training tokens with one seed: " + _SMOKE_REST)


def divergence_notes(bad: list[dict]) -> list[str]:
    """A note naming the variants of the rows `bad`, whose validation loss, perplexity or bits
    per byte is not finite (training diverged): their quality columns compare with nothing."""
    if not bad:
        return []
    said = ", ".join(f"{r['variant']} (val loss {r['val_loss']:.4g})" for r in bad)
    return [f"Diverged: {said}. Perplexity past what a float holds (inf, null in compare.json) "
            f"or NaN: the training run blew up, so these quality columns rank nothing; train "
            f"again with a lower --lr."]


def chance_notes(rows: list[dict]) -> list[str]:
    """What the task columns are measured against: each task's chance level, and why a
    column sits at zero or below chance when it does."""
    notes = []
    mc = [r["mc_acc"] for r in rows if r.get("mc_acc") is not None]
    if mc:
        line = (f"Multiple choice: 4 choices, chance {100 * MC_CHANCE:.0f}%. acc picks the "
                f"choice of highest total log-likelihood, which favours short choices (the "
                f"wrong ones are 0.6-1.6x the true sentence's length); (norm) divides by the "
                f"characters of each choice.")
        if max(mc) < MC_CHANCE:
            line += (f" Every variant's acc is below chance ({_pct(min(mc))}-{_pct(max(mc))}): "
                     f"a model this undertrained mostly prefers the shorter choice.")
        notes.append(line)
    cloze = [r["cloze_acc"] for r in rows if r.get("cloze_acc") is not None]
    if cloze:
        line = ("Cloze: an item counts when greedy decoding reproduces the whole last word of a "
                "held-out sentence, so chance is near 0%.")
        if max(cloze) <= 0.02:
            line += (f" At {_at_most(cloze)} for every variant, the models have not learned to "
                     f"predict whole words from context: the column cannot rank them.")
        notes.append(line)
    recall = [r["recall"].get("mean") for r in rows if r["recall"].get("mean") is not None]
    if recall:
        chance = rows[0]["recall"].get("chance", 0)
        line = (f"Recall: the value of a key seen earlier in the sequence, chance "
                f"{100 * chance:.2f}% (one word among the probe's values).")
        if max(recall) <= 2 * chance:
            line += (f" At {_at_most(recall)} for every variant, the models have not learned to "
                     f"copy from their context: the column cannot rank them.")
        notes.append(line)
    return notes


def format_compare(rows: list[dict], cfg: CompareConfig) -> str:
    """The side-by-side markdown table and the line that says how it was measured."""
    head = ("| variant | params | KV B/token (bf16, all layers) | val loss | val ppl | bits/byte "
            f"| cloze acc | MC acc (norm), chance {100 * MC_CHANCE:.0f}% | recall acc "
            "| train tok/s | decode tok/s |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        rec = r["recall"].get("mean")
        lines.append(
            f"| {r['variant']} | {r['params'] / 1e6:.2f}M | {r['kv_bytes_per_token']:,} "
            f"| {r['val_loss']:.3f} | {r['val_ppl']:.2f} | {r['val_bpb']:.3f} "
            f"| {_pct(r['cloze_acc'])} | {_pct(r['mc_acc'])} ({_pct(r['mc_acc_norm'])}) "
            f"| {_pct(rec)} | {r['train_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.0f}"
            f" ±{50 * r.get('decode_tokens_per_s_spread', 0):.0f}% |")
    lines.append("")
    lines.append(f"preset {cfg.preset}, {cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len} tokens, "
                 f"seed {cfg.seed}; val loss / ppl / bits per byte: every held-out token of each "
                 f"domain, mean over domains (the plot's validation dots during training use the "
                 f"first {cfg.eval_tokens:,} of each); recall = mean over "
                 f"{'/'.join(map(str, cfg.recall_pairs))} pairs "
                 f"(chance {100 * rows[0]['recall'].get('chance', 0):.2f}%); decode: batch "
                 f"{cfg.decode_batch}, {cfg.decode_prompt}-token prompts, {cfg.decode_new} new tokens, "
                 "median of 3 runs ± half their range; differences inside that range are noise.")
    return "\n".join(lines)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _at_most(values: list[float]) -> str:
    return _pct(0.0) if max(values) == 0 else f"{_pct(max(values))} or less"


def plot_compare(rows: list[dict], curves: dict, path: Path, cfg: CompareConfig,
                 note: str = ""):
    """compare.png: loss curves, validation perplexity and task accuracy against their chance
    levels (top); KV bytes, decode speed and `note` (bottom). Every bar axis starts at zero.
    Returns the (closed) matplotlib figure."""
    import textwrap

    from hwattn.plotting import pyplot, save_figure

    plt = pyplot()

    fig, axes = plt.subplots(2, 3, figsize=(15, 8), dpi=110)
    labels = [r["variant"] for r in rows]
    colours = [f"C{i}" for i in range(len(rows))]
    ax = axes[0, 0]
    final = {r["variant"]: r for r in rows}
    for i, (label, recs) in enumerate(curves.items()):
        tr = [(r["tokens"], r["loss"]) for r in recs if "loss" in r]
        va = [(r["tokens"], r["val_loss"]) for r in recs if "val_loss" in r]
        ax.plot(*zip(*tr), color=f"C{i}", alpha=0.35, lw=1)
        if va:
            ax.plot(*zip(*va), "o-", color=f"C{i}", ms=3, label=label)
        if label in final and tr and math.isfinite(final[label]["val_loss"]):
            ax.plot(tr[-1][0], final[label]["val_loss"], "*", color=f"C{i}", ms=9)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss. faint: training; dots: validation on the first {cfg.eval_tokens:,}\n"
                 f"held-out tokens per domain; star: all held-out tokens (the table)", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)

    def bars(ax, key, title, fmt):
        vals = [r[key] for r in rows]
        # A diverged run's NaN or inf has no bar: its label says what it is, at the axis.
        shown = [v if math.isfinite(v) else 0.0 for v in vals]
        ax.bar(labels, shown, color=colours)
        top = max(shown)
        ax.set_ylim(0, 1.12 * top if top > 0 else 1.0)  # from zero: heights compare as values
        ax.set_title(title, fontsize=8)
        for x, v in enumerate(vals):
            ax.text(x, shown[x], fmt(v) if math.isfinite(v) else str(v), ha="center",
                    va="bottom", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)

    bars(axes[0, 1], "val_ppl", "validation perplexity, lower is better (all held-out tokens,\n"
                                "mean over domains)",
         lambda v: f"{v:,.1f}")
    bars(axes[1, 0], "kv_bytes_per_token", "KV cache bytes per token (bf16, all layers)",
         lambda v: f"{v:,.0f}")
    bars(axes[1, 1], "decode_tokens_per_s", "greedy decode tokens/s (median of 3)",
         lambda v: f"{v:,.0f}")

    ax = axes[0, 2]
    tasks = [("cloze", "cloze_acc"), ("MC", "mc_acc"), ("MC (norm)", "mc_acc_norm"),
             ("recall", None)]
    width = 0.8 / len(rows)
    top = 0.0
    for i, r in enumerate(rows):
        vals = [(r["recall"].get("mean") if key is None else r.get(key)) or 0.0 for _, key in tasks]
        top = max(top, *vals)
        ax.bar([t + (i - (len(rows) - 1) / 2) * width for t in range(len(tasks))],
               [100 * v for v in vals], width, color=colours[i], label=r["variant"])
    ax.axhline(100 * MC_CHANCE, color="k", ls="--", lw=1)
    ax.text(len(tasks) - 0.5, 100 * MC_CHANCE, f"MC chance {100 * MC_CHANCE:.0f}%", ha="right",
            va="bottom", fontsize=7)
    ax.set_xticks(range(len(tasks)), [t for t, _ in tasks], fontsize=7)
    ax.set_ylim(0, max(50.0, 115 * top))
    ax.set_ylabel("accuracy (%)")
    recall_chance = 100 * rows[0]["recall"].get("chance", 0)
    ax.set_title(f"task accuracy; chance: MC {100 * MC_CHANCE:.0f}% (dashed), cloze ~0%, "
                 f"recall {recall_chance:.2f}%", fontsize=8)
    ax.legend(fontsize=6, ncol=2)

    ax = axes[1, 2]
    ax.axis("off")
    ax.text(0, 1, "\n".join(textwrap.wrap(note, 60)), va="top", ha="left", fontsize=8,
            transform=ax.transAxes)
    fig.suptitle(f"hwattn compare: preset {cfg.preset}, {cfg.steps} steps x {cfg.batch_size} x "
                 f"{cfg.seq_len} tokens, seed {cfg.seed}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    return fig
