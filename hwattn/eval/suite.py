"""Everything `hwattn eval` measures for one model on one built dataset, as one dict."""

from __future__ import annotations

import time
from dataclasses import dataclass

from hwattn.data.loader import TokenDataset
from hwattn.eval.perplexity import evaluate_domains
from hwattn.eval.recall import recall_accuracy
from hwattn.eval.tasks import build_cloze, build_mc, score_cloze, score_mc


@dataclass
class EvalConfig:
    """seq_len: context of the perplexity windows and cap of task contexts.
    ppl_tokens: held-out tokens scored per domain (None: all), in whole windows of seq_len:
        a value that is not a multiple of seq_len scores the multiple below it (`hwattn eval`
        refuses one); a domain with fewer tokens scores its whole windows. Each domain's
        record says how many it scored ("tokens").
    n_cloze / n_mc: task items (balanced over domains); 0 skips the task.
    recall_pairs: key–value pair counts of the recall probe (those that fit seq_len)."""

    seq_len: int = 256
    ppl_tokens: int | None = None
    n_cloze: int = 200
    n_mc: int = 200
    recall_pairs: tuple[int, ...] = (8, 32, 64)
    recall_queries: int = 16
    recall_seqs: int = 32
    batch_size: int = 16
    seed: int = 0
    amp: str = "auto"


def build_tasks(dataset: TokenDataset, cfg: EvalConfig) -> dict[str, list[dict]]:
    """Cloze and multiple-choice items from the held-out documents. Raises ValueError when
    items were asked for and the held-out text yields none."""
    docs = dataset.val_documents()
    tasks = {"cloze": build_cloze(docs, cfg.n_cloze, cfg.seed) if cfg.n_cloze else [],
             "mc": build_mc(docs, cfg.n_mc, cfg.seed) if cfg.n_mc else []}
    for name, asked in (("cloze", cfg.n_cloze), ("mc", cfg.n_mc)):
        if asked and not tasks[name]:
            chars = sum(len(d["text"]) for d in docs)
            raise ValueError(f"no {name} items could be built from the {len(docs)} held-out "
                             f"documents ({chars:,} characters) of {dataset.path}: rebuild the "
                             f"dataset with a larger --val-fraction, or pass --{name} 0")
    return tasks


def evaluate_model(model, dataset: TokenDataset, cfg: EvalConfig, tasks: dict | None = None,
                   progress: bool = False) -> dict:
    """{"ppl": {domain: {loss, ppl, bpb, tokens, bytes}, "average": ...}, "cloze": {...},
    "mc": {...}, "recall": {...}, "seconds": {...}}. `tasks` reuses items from `build_tasks`.
    `progress`: a bar on stderr per measurement (tokens, cloze items, choices, recall
    sequences scored). The model is in eval mode meanwhile and back in its own mode after,
    also when a measurement raises."""
    was_training = model.training
    model.eval()
    try:
        return _measure(model, dataset, cfg, tasks, progress)
    finally:
        model.train(was_training)


def _measure(model, dataset: TokenDataset, cfg: EvalConfig, tasks: dict | None,
             progress: bool) -> dict:
    """`evaluate_model`'s measurements, the model already in eval mode."""
    tasks = tasks if tasks is not None else build_tasks(dataset, cfg)
    tok = dataset.tokenizer
    out, secs = {}, {}
    t = time.perf_counter()
    out["ppl"] = evaluate_domains(model, dataset, cfg.seq_len, cfg.ppl_tokens, cfg.batch_size, cfg.amp,
                                  progress)
    secs["ppl"] = time.perf_counter() - t
    if tasks["cloze"]:
        t = time.perf_counter()
        out["cloze"] = score_cloze(model, tok, tasks["cloze"], cfg.seq_len, cfg.batch_size, cfg.amp,
                                   progress)
        secs["cloze"] = time.perf_counter() - t
    if tasks["mc"]:
        t = time.perf_counter()
        out["mc"] = score_mc(model, tok, tasks["mc"], cfg.seq_len, cfg.batch_size, cfg.amp,
                             progress)
        secs["mc"] = time.perf_counter() - t
    if cfg.recall_pairs:
        t = time.perf_counter()
        out["recall"] = recall_accuracy(model, tok, cfg.recall_pairs, cfg.recall_queries,
                                        cfg.recall_seqs, cfg.seq_len, cfg.seed, cfg.batch_size,
                                        cfg.amp, progress)
        secs["recall"] = time.perf_counter() - t
    out["seconds"] = secs
    return out
