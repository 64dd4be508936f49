"""N-gram speculative decoding on a trained quality-study model, on held-out C code and prose.

    python benchmarks/study_speculative.py --train gqa-4 --seed 0 --data data/study --out $OUT
    python benchmarks/study_speculative.py --checkpoint runs/study_speculative_work/gqa-4-s0

The model is either a checkpoint (`--checkpoint`: a folder with config.json and
model.safetensors, or a trainer's run folder holding `checkpoint/`) or trained here
(`--train VARIANT --seed S`) with exactly the study's configuration: the `TrainConfig` comes
from `benchmarks/quality_study.py`'s own `parse_args` and `run_config`, so the run is the one
the study would make (its checkpoint stays in `--work`; a finished one there is reused).
Training stops `--measure-reserve-s` before `--deadline-s`, so that training and measuring fit
one command; a run cut short is measured as it stands and reported as unfinished.

From each held-out domain of the built dataset (`--data`; the study's are `code`, Linux C, and
`prose`) `--prompts` documents, drawn in a seeded order, give a prompt each: their first
`--prompt-len` tokens. For each batch size B of `--batch-sizes` (default 1 and `--prompts`),
every prompt of a domain is submitted at once to an engine that runs at most B of them
together (`max_num_seqs` B: B concurrent requests, the next admitted as one finishes) and
decoded greedily for `--output-len` tokens (temperature 0, ignore_eos) through
`hwattn.bench.engine.run_offline`, by an engine without drafting (k = 0) and by one with
n-gram drafting for each k in `--ks`. Speculative decoding is usually judged at small batches
(latency), where a step's forward costs little per token and its host work is small; at
large ones plain steps overlap the host's work with the device's and verify steps do not.
All engines share one model and `ModelRunner` (its KV cache and CUDA graphs for 1 and every
k + 1 query tokens), as benchmarks/engine_speed.py does. Per domain, B and k: decode
tokens/s, speed-up over k = 0 at that B, acceptance (accepted / drafted tokens), the share of
steps where an n-gram matched, the share of decode steps that verified drafts, ITL median and
p99, and whether the greedy outputs equal k = 0's token for token (speculation at
temperature 0 must not change them; in bf16 a near-tie in the logits may still flip between
the verify step and the plain one, so the agreement is reported, not assumed). Each row is the
run of median decode tokens/s among `--repeats` (3) timed runs, with every run's rate and their
spread beside it.

Fallback row: per domain and B, the best k at that B once more with the engine's
`speculative_disable_batch_size` at `--disable-batch-size` (default the largest of
`--batch-sizes`; 0: no such row): steps that start with that many running sequences or more
decode plainly. At B below it the row should match its k's row, at B from it on plain
decoding's (so that the fallback is never slower than plain decoding: measured, not assumed).

Step time: `hwattn.bench.engine.decode_breakdown` times, at each B, one decode step of B
sequences at context prompt + output / 2 that feeds k + 1 tokens (a verify step) against
one that feeds 1 (a plain step): the step as the host sees it and the captured forward on the
device (CUDA events). Verify over plain, beside the ratio of the engines' median ITL (which
also holds drafting and acceptance on the host).

Targets (issue 20), per B: speed-up >= 1.5x on C code at greedy for some k, with that k's
verify step <= 1.3x a plain step (host-seen step wall time).

Writes study_speculative.json, study_speculative.md and study_speculative_log.txt under
`--out` (default $OUT, else runs/study_speculative); prints the tables, then one line of JSON.
`--tiny`: the same on the CPU in seconds (tiny preset trained for a few steps as
quality_study.py --smoke does, fp64, a few short prompts; the embedded corpus is built into
`--work` when `--data` holds no dataset).
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout
sys.path.insert(0, str(HERE))  # quality_study, for the study's training configuration

import quality_study  # noqa: E402
from study_speculative_report import markdown, targets  # noqa: E402
from study_speculative_train import checkpoint_folder, dataset, train_study_run  # noqa: E402

# Workload sizes: (GPU study, --tiny CPU check); an argument given on the command line wins.
SIZES = {"prompts": (32, 3), "prompt_len": (256, 48), "output_len": (128, 24),
         "page_size": (64, 16), "iters": (20, 2), "repeats": (3, 2)}
OUT_JSON, OUT_MD = "study_speculative.json", "study_speculative.md"
OUT_LOG = "study_speculative_log.txt"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a checkpoint folder, or a run folder with checkpoint/")
    src.add_argument("--train", metavar="VARIANT",
                     help="train this variant first, with the study's configuration")
    p.add_argument("--seed", type=int, default=0, help="the study seed of --train")
    p.add_argument("--data", default="data/study", help="built dataset (default data/study)")
    p.add_argument("--work", default="runs/study_speculative_work",
                   help="where --train keeps its run (checkpoint, metrics)")
    p.add_argument("--out", default=os.environ.get("OUT", "runs/study_speculative"),
                   help="results folder (default $OUT when set)")
    p.add_argument("--domains", default="",
                   help="held-out domains, comma-separated (default: all, code first)")
    p.add_argument("--prompts", type=int, default=None, help="documents per domain (32)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (256)")
    p.add_argument("--output-len", type=int, default=None, help="generated tokens (128)")
    p.add_argument("--ks", default="1,2,3,4", help="n-gram draft lengths")
    p.add_argument("--batch-sizes", default=None,
                   help="requests decoded together at most, comma-separated, each measured "
                        "(default 1 and --prompts: 1,32)")
    p.add_argument("--disable-batch-size", type=int, default=None, metavar="N",
                   help="the fallback row's speculative_disable_batch_size (default: the "
                        "largest of --batch-sizes; 0: no fallback row)")
    p.add_argument("--page-size", type=int, default=None, help="KV page tokens (64)")
    p.add_argument("--iters", type=int, default=None, help="timed repeats of each step (20)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs of each row; the row is the run of median decode tokens/s, "
                        "and the spread of all of them is kept (3)")
    p.add_argument("--prompt-seed", type=int, default=0, help="order the documents are drawn in")
    p.add_argument("--dtype", default=None, help="engine dtype (default bf16 on CUDA; fp64 --tiny)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, ... (default auto: cuda if present; with --tiny, the CPU)")
    p.add_argument("--compile-decode", action="store_true",
                   help="decode through torch.compiled blocks (adds compile time)")
    p.add_argument("--deadline-s", type=float, default=560.0,
                   help="everything ends this many seconds after start")
    p.add_argument("--measure-reserve-s", type=float, default=120.0,
                   help="training stops this long before the deadline, for the measurements")
    p.add_argument("--tiny", action="store_true", help="CPU check: tiny preset, short prompts")
    args = p.parse_args(argv)
    for name, sizes in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, sizes[1] if args.tiny else sizes[0])
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.tiny:
        args.device = "cpu" if args.device == "auto" else args.device
        args.dtype = args.dtype or "fp64"
    try:
        args.ks = tuple(sorted({int(k) for k in args.ks.split(",") if k.strip()}))
    except ValueError:
        raise SystemExit(f"--ks must be comma-separated integers, got {args.ks!r}") from None
    if not args.ks or min(args.ks) < 1:
        raise SystemExit(f"--ks needs draft lengths >= 1, got {args.ks}")
    args.batch_sizes = batch_sizes(args.batch_sizes, args.prompts)
    if args.disable_batch_size is None:
        args.disable_batch_size = max(args.batch_sizes)
    if args.disable_batch_size < 0:
        raise SystemExit(f"--disable-batch-size must be >= 0 (0: no fallback row), got "
                         f"{args.disable_batch_size}")
    return args


def batch_sizes(text: str | None, prompts: int) -> tuple[int, ...]:
    """The batch sizes of `--batch-sizes` (default 1 and `prompts`), ascending; each must lie
    in [1, prompts]: a larger batch than there are prompts would never fill."""
    if text is None:
        return tuple(sorted({1, prompts}))
    try:
        sizes = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise SystemExit(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or sizes[0] < 1 or sizes[-1] > prompts:
        raise SystemExit(f"--batch-sizes must lie in [1, --prompts = {prompts}], got {sizes}")
    return sizes


class Log:
    """Prints a line with the seconds since start and appends it to the log file."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, *parts):
        line = f"[{time.time() - T_START:6.1f}s] " + " ".join(str(x) for x in parts)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def held_out_prompts(docs: list[dict], tokenizer, n: int, prompt_len: int,
                     seed: int) -> tuple[list[list[int]], list[str]]:
    """The first `prompt_len` tokens of up to `n` of `docs` (one domain's held-out documents)
    that have that many, drawn in a seeded order. Returns (prompts, their document ids)."""
    order = list(docs)
    random.Random(seed).shuffle(order)
    prompts, ids = [], []
    for start in range(0, len(order), 2 * n):
        chunk = order[start:start + 2 * n]
        for doc, tokens in zip(chunk, tokenizer.encode_batch([d["text"] for d in chunk])):
            if len(tokens) >= prompt_len and len(prompts) < n:
                prompts.append(tokens[:prompt_len])
                ids.append(doc["id"])
        if len(prompts) == n:
            break
    return prompts, ids


class SharedRunner:
    """One model and `ModelRunner` (KV cache; CUDA graphs for 1 and every k + 1 query tokens)
    and an `LLMEngine` on it for each k, built through the engine's public constructor."""

    def __init__(self, ckpt: Path, args, device, dtype):
        import torch

        from hwattn.data.tokenizer import load_tokenizer
        from hwattn.engine.block_manager import pages_for
        from hwattn.engine.loader import build_model
        from hwattn.engine.model_runner import ModelRunner

        self.ckpt, self.args, self.dtype = ckpt, args, dtype
        self.net = build_model(str(ckpt), dtype=dtype, device=device)
        self.max_len = args.prompt_len + args.output_len + 8
        if self.max_len > self.net.config.max_seq_len:
            raise SystemExit(f"--prompt-len + --output-len ({args.prompt_len} + "
                             f"{args.output_len}) exceed the model's context "
                             f"{self.net.config.max_seq_len}")
        kmax = max(args.ks)
        per_seq = pages_for(self.max_len + kmax + 1, args.page_size)
        self.num_pages = (args.prompts + 2) * per_seq + 1  # + the warm-up's, + the null page
        self.runner = ModelRunner(self.net, self.num_pages, args.page_size,
                                  max_model_len=self.max_len + kmax + 1,
                                  max_num_seqs=args.prompts, cache_dtype=dtype,
                                  cuda_graphs=True,
                                  graph_query_lens=(1,) + tuple(k + 1 for k in args.ks),
                                  compile_decode=args.compile_decode)
        self.tokenizer = load_tokenizer(str(ckpt), self.net.config.vocab_size)  # the engine's
        self.kv_bytes = self.net.kv_bytes_per_token(1, dtype)
        self.cuda = torch.device(device).type == "cuda"

    def engine(self, k: int, batch: int | None = None, disable: int | None = None):
        """An engine drafting k tokens a step by n-gram lookup (k = 0: plain decoding) that
        decodes `batch` sequences together at most (default `--prompts`), prefilling as many
        prompts as it admits in one step; `disable`: its speculative_disable_batch_size.

        Prefix caching is off: with it, a row's first timed run prefilled every prompt whole
        and the later runs found all but the last page cached and prefilled 64 tokens over
        it, another kernel path with other bf16 rounding. On an H100 (2026-12-05, 128 prompts
        at B 32, caching on) no row's three runs repeated their outputs, plain decoding's
        included, and the fallback row, which made no verify step, still differed from plain
        decoding in 12% of the code prompts: the runs differed in their prefills, not in
        speculation."""
        from hwattn.engine.config import EngineConfig
        from hwattn.engine.llm_engine import LLMEngine
        from hwattn.engine.speculative import NgramDrafter

        a = self.args
        config = EngineConfig(model=str(self.ckpt), dtype=self.dtype,
                              device=str(self.runner.device), page_size=a.page_size,
                              max_num_seqs=batch or a.prompts,
                              max_num_batched_tokens=a.prompts * a.prompt_len,
                              max_model_len=self.max_len, num_pages=self.num_pages,
                              speculative="ngram" if k else None, num_speculative_tokens=k,
                              speculative_disable_batch_size=disable,
                              enable_prefix_caching=False, compile_decode=a.compile_decode)
        drafter = counting(NgramDrafter(k)) if k else None
        return LLMEngine(self.runner, self.tokenizer, self.net.config, config, self.num_pages,
                         drafter, kv_bytes_per_token=self.kv_bytes, model=self.net,
                         dtype=self.dtype)


def counting(drafter):
    """`drafter` with its `propose` calls counted in `drafter.verify_steps` (one a verify step),
    so that a row can say how many of its decode steps verified drafts."""
    propose = drafter.propose
    drafter.verify_steps = 0

    def counted(seqs, st=None):
        drafter.verify_steps += 1
        return propose(seqs, st)

    drafter.propose = counted
    return drafter


def agreement(plain: list[list[int]], spec: list[list[int]]) -> dict:
    """How far speculative outputs equal the plain ones: the share of sequences equal token
    for token, the share of tokens equal before each sequence's first difference, and the
    mean position of the first difference among the sequences that differ."""
    if len(plain) != len(spec):
        raise ValueError(f"{len(spec)} speculative outputs for {len(plain)} plain ones")
    firsts, kept, total = [], 0, 0
    for a, b in zip(plain, spec):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if a != b:
            firsts.append(first)
        kept += first
        total += len(a)
    return dict(outputs_equal=sum(a == b for a, b in zip(plain, spec)) / len(plain),
                tokens_before_divergence=kept / total if total else 1.0,
                first_divergence_mean=statistics.fmean(firsts) if firsts else None)


def measure_run(engine, prompts: list[list[int]], args, warm) -> tuple:
    """run_offline of the prompts on `engine` after a warm-up on other prompts (kernels,
    allocator), `--repeats` times; returns (the measurements of the run of median decode
    tokens/s, with every run's rate and their relative spread, the outputs). A run takes 2-3 s
    at the study's sizes, and single runs of one configuration were seen 14% apart (H100,
    2026-12-05), hence the median. Greedy runs must repeat their outputs token for token."""
    from hwattn.bench.engine import run_offline

    run_offline(engine, warm, 4)
    runs = []
    for _ in range(args.repeats):
        runs.append(_timed_run(engine, prompts, args, run_offline))
    rates = [row["decode_tokens_per_s"] for row, _ in runs]
    row, outputs = sorted(runs, key=lambda r: r[0]["decode_tokens_per_s"])[len(runs) // 2]
    row["decode_tokens_per_s_runs"] = rates
    row["decode_tokens_per_s_spread"] = (max(rates) - min(rates)) / row["decode_tokens_per_s"]
    # (Recorded, not assumed: bf16 near-ties could flip between runs of other batch orders.)
    row["repeats_equal"] = all(o == runs[0][1] for _, o in runs)
    return row, outputs


def _timed_run(engine, prompts: list[list[int]], args, run_offline) -> tuple:
    """One timed run_offline of the prompts: (its row's measurements, the outputs)."""
    drafter = engine.drafter
    proposed, matched, verified = ((drafter.proposed, drafter.matched, drafter.verify_steps)
                                   if drafter is not None else (0, 0, 0))
    res = run_offline(engine, prompts, args.output_len)
    engine.check_invariants()
    row = dict(decode_tokens_per_s=res.decode_tokens_per_s,
               output_tokens=res.output_tokens, decode_s=res.decode_s,
               prefill_s=res.prefill_s, decode_steps=res.decode_steps,
               itl_median_s=res.itl_s["median"], itl_p99_s=res.itl_s["p99"],
               acceptance=res.acceptance_rate if drafter is not None else None,
               host_phases_us={name: v["median"] for name, v in res.host_phases_us.items()
                               if isinstance(v, dict)})
    if drafter is not None:
        lookups = drafter.proposed - proposed  # one a sequence and verify step
        # No lookup (no verify step: the fallback row at a large batch) leaves both unknown.
        row["ngram_match_share"] = (drafter.matched - matched) / lookups if lookups else None
        row["acceptance"] = res.acceptance_rate if lookups else None
        row["verify_step_share"] = ((drafter.verify_steps - verified) / res.decode_steps
                                    if res.decode_steps else 0.0)
    return row, res.outputs


def compared(row: dict, plain: dict, outputs: list[list[int]]) -> dict:
    """`row` with its speed-up and ITL over the plain row's and its outputs' agreement."""
    return dict(row, speedup=row["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                itl_over_plain=row["itl_median_s"] / plain["itl_median_s"],
                **agreement(plain["outputs"], outputs))


def measure_batch(shared: SharedRunner, prompts: list[list[int]], args, clock, log,
                  domain: str, batch: int, warm) -> tuple[dict, list[list[int]] | None]:
    """One row per k at batch size `batch` (k = 0's first), then the fallback row (the best
    k with `speculative_disable_batch_size` at `--disable-batch-size`); a run is skipped
    once `clock()` says time is up. Returns (rows, plain decoding's outputs or None)."""
    rows, plain = {}, None
    for k in (0,) + args.ks:
        if clock() < 0 or (k and plain is None):
            rows[str(k)] = dict(k=k, batch=batch, skipped="deadline")
            continue
        row, outputs = measure_run(shared.engine(k, batch), prompts, args, warm)
        row = dict(k=k, batch=batch, **row)
        if k:
            row = compared(row, plain, outputs)
        else:
            plain = dict(row, outputs=outputs)
        rows[str(k)] = row
        log(f"{domain} B={batch} k={k}: {row['decode_tokens_per_s']:,.0f} decode tok/s"
            + (f", speed-up {row['speedup']:.2f}x, acceptance {row['acceptance']:.1%}, "
               f"outputs equal to plain {row['outputs_equal']:.0%}" if k else "")
            + f", ITL median {row['itl_median_s'] * 1e3:.2f} ms"
            + f" (median of {len(row['decode_tokens_per_s_runs'])} runs, spread "
              f"{row['decode_tokens_per_s_spread']:.0%})")
    measured = [r for r in rows.values() if r["k"] and "speedup" in r]
    if args.disable_batch_size and measured:
        best = max(measured, key=lambda r: r["speedup"])["k"]
        if clock() < 0:
            rows["fallback"] = dict(k=best, batch=batch, skipped="deadline",
                                    disable_batch_size=args.disable_batch_size)
        else:
            engine = shared.engine(best, batch, disable=args.disable_batch_size)
            row, outputs = measure_run(engine, prompts, args, warm)
            row = compared(dict(k=best, batch=batch, disable_batch_size=args.disable_batch_size,
                                **row), plain, outputs)
            rows["fallback"] = row
            log(f"{domain} B={batch} k={best}, plain steps from {args.disable_batch_size} "
                f"sequences: {row['decode_tokens_per_s']:,.0f} decode tok/s, speed-up "
                f"{row['speedup']:.2f}x, verify steps {row['verify_step_share']:.0%}, outputs "
                f"equal to plain {row['outputs_equal']:.0%}")
    return rows, (plain or {}).get("outputs")


def measure_domain(shared: SharedRunner, prompts: list[list[int]], args, clock, log,
                   domain: str, tokenizer) -> dict:
    """`measure_batch` at each batch size of `--batch-sizes`, smallest first. `tokenizer`
    (the dataset's) writes out the first prompt's end and its plain continuation."""
    from hwattn.bench.engine import random_prompts

    warm = random_prompts(2, args.prompt_len, shared.net.config.vocab_size, seed=9)
    batches, sample = {}, None
    for batch in args.batch_sizes:
        rows, outputs = measure_batch(shared, prompts, args, clock, log, domain, batch, warm)
        batches[str(batch)] = dict(batch=batch, rows=rows)
        if sample is None and outputs is not None:
            sample = dict(prompt_tail=tokenizer.decode(prompts[0][-48:]),
                          plain_output=tokenizer.decode(outputs[0][:96]))
    return dict(batches=batches, sample=sample)


def step_times(shared: SharedRunner, args, log, batch: int) -> dict:
    """decode_breakdown of a verify step (k + 1 query tokens) for each k and of a plain one,
    at batch `batch` and context prompt + output / 2; ratios over the plain step."""
    from hwattn.bench.engine import decode_breakdown

    context = args.prompt_len + args.output_len // 2
    rows = {}
    for k in (0,) + args.ks:
        b = decode_breakdown(shared.engine(k), batch, context, args.iters, query_len=k + 1)
        rows[str(k)] = dict(k=k, query_len=k + 1, step_wall_s=b["step_wall_s"],
                            forward_device_s=b["forward_device_s"], host_s=b["host_s"],
                            attention_s=b["attention_s"], cuda_graphs=b["cuda_graphs"],
                            compiled=b["compiled"], floor_s=b["floor"].get("floor_s"),
                            kernels=b.get("kernels"))
    base = rows["0"]
    for row in rows.values():
        row["step_over_plain"] = row["step_wall_s"] / base["step_wall_s"]
        row["forward_over_plain"] = row["forward_device_s"] / base["forward_device_s"]
    log(f"B={batch} verify / plain step (host-seen wall, device forward): " + ", ".join(
        f"k={r['k']} {r['step_over_plain']:.2f} / {r['forward_over_plain']:.2f}"
        for r in rows.values() if r["k"]))
    return dict(batch=batch, context_len=context, iters=args.iters, rows=rows)


def environment(argv: list[str]) -> dict:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=HERE).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "commit": commit, "argv": argv}


def main(argv=None) -> int:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else list(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / OUT_LOG)
    deadline = T_START + args.deadline_s
    clock = lambda: deadline - time.time()  # noqa: E731

    import torch

    from hwattn.device import resolve_dtype

    device, gpu = quality_study.study_device(args.device)
    dtype = resolve_dtype(args.dtype or "auto", device)
    log(f"device {gpu or device}, dtype {str(dtype).replace('torch.', '')}, deadline "
        f"{args.deadline_s:.0f} s")
    data = dataset(args, log)
    ckpt = checkpoint_folder(args.checkpoint) if args.checkpoint else None
    # Every input is checked before training, which takes minutes.
    docs = data.val_documents()
    known = sorted({d["domain"] for d in docs}, key=lambda d: (d != "code", d))
    domains = [d.strip() for d in args.domains.split(",") if d.strip()] or known
    unknown = [d for d in domains if d not in known]
    if unknown:
        raise SystemExit(f"--domains: {', '.join(unknown)} not among the held-out domains "
                         f"{', '.join(known)} of {args.data}")
    prompts = {}
    for domain in domains:
        prompts[domain] = held_out_prompts([d for d in docs if d["domain"] == domain],
                                           data.tokenizer, args.prompts, args.prompt_len,
                                           args.prompt_seed)
        if len(prompts[domain][0]) < args.prompts:
            raise SystemExit(f"{domain}: {len(prompts[domain][0])} held-out documents hold "
                             f"{args.prompt_len} tokens, --prompts asks for {args.prompts}")
    log(f"prompts: {args.prompts} held-out documents of each of {', '.join(domains)}")
    training = None
    if args.train:
        ckpt, training = train_study_run(args, data, device, gpu, deadline, log, T_START)

    t0 = time.time()
    shared = SharedRunner(ckpt, args, device, dtype)
    log(f"engine on {ckpt}: {shared.net.config.label}, {shared.num_pages} pages, CUDA graphs "
        f"{'on' if shared.runner.cuda_graphs else 'off'}"
        + (f" ({shared.runner.graph_error})" if shared.runner.graph_error else "")
        + f", built in {time.time() - t0:.1f} s")
    doc = dict(setup=dict(data=args.data, build_key=data.manifest.get("build_key"),
                          device=str(device), dtype=str(dtype).replace("torch.", ""),
                          prompts=args.prompts, prompt_len=args.prompt_len,
                          output_len=args.output_len, ks=list(args.ks),
                          batch_sizes=list(args.batch_sizes),
                          disable_batch_size=args.disable_batch_size or None,
                          page_size=args.page_size,
                          prompt_seed=args.prompt_seed, compile_decode=args.compile_decode,
                          temperature=0.0, tiny=args.tiny),
               model=dict(checkpoint=str(ckpt), label=shared.net.config.label,
                          params=shared.net.num_params(),
                          non_embedding_params=shared.net.num_params(non_embedding=True),
                          training=training),
               cuda_graphs=shared.runner.cuda_graphs, graph_error=shared.runner.graph_error,
               domains={}, step_time={}, environment=environment(argv))
    for i, domain in enumerate(domains):
        tokens, ids = prompts[domain]
        doc["domains"][domain] = dict(documents=ids, **measure_domain(
            shared, tokens, args, clock, log, domain, data.tokenizer))
        if i == 0:  # the step timing right after the first domain: it needs little time
            for batch in args.batch_sizes:
                if clock() > 0:
                    doc["step_time"][str(batch)] = step_times(shared, args, log, batch)
    doc["targets"] = targets(doc)
    doc["wall_s"] = time.time() - T_START
    md = markdown(doc)
    (out / OUT_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    (out / OUT_MD).write_text(md + "\n")
    log(f"wrote {out / OUT_JSON} and {out / OUT_MD} after {doc['wall_s']:.0f} s")
    print(md)
    print(json.dumps(doc))
    del shared
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
