"""The GPU quality study: does GTA-4 match GQA-4, and GLA-2 match MLA, at equal parameters?

Trains parameter-matched models of the `study` preset (6 layers, d = 512, d_h = 64,
19.3M non-embedding parameters) on the registry corpus (102M training tokens: Linux C code
and English prose, 32,768-id BPE; `hwattn data build`, docs/data.md), each for 3,000 steps
of 128 × 1024 tokens = 393M tokens, 20.4 tokens per non-embedding parameter. A seed fixes
both the initialisation and the data order, so every variant of a seed sees the same tokens
in the same order. Each finished run is evaluated (per-domain perplexity and bits per byte,
cloze, multiple choice, recall probe) and kept.

The plan: all six variants with seeds 0 and 1, and seed 2 for GQA-4, GTA-4, MLA and GLA-2
(16 runs); the claim pairs come first, so each seed's pairs finish together.

Several at once, across commands: one worker process per visible GPU takes the next pending
run (in sequence on one GPU). A command stops at `--deadline-s`: a run in progress is
checkpointed and continues from there in the next command (while the machine holds the
work folder), finished runs are never redone. So the study can span many ten-minute device
commands: run the same command until it reports no run pending.

Folders:
    --study DIR (runs/quality_study)   study_runs.jsonl (one line per finished run: config,
                                       throughput and MFU, loss curve, evaluation),
                                       study_summary.json (plan, progress, schedule),
                                       study_log.txt; small, copied to --export ($OUT)
    --work DIR (runs/quality_work)     checkpoints and metrics of runs in progress, a
                                       copy of each finished run's record, and commands.jsonl:
                                       every command this machine ran, with its log lines
The study folder is tracked by git, the work folder is not: a machine that restores the
tracked copies before each command (a GPU machine lent one command at a time, kept warm in
between) still gets every command of its lifetime into the summary and the log, which are
merged from commands.jsonl.

`python -m hwattn.eval.report --study DIR` turns the study folder into docs/results/quality.md.
CPU smoke test: `python benchmarks/quality_study.py --smoke --data DIR` (tiny preset, a few steps).
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

ALL_VARIANTS = ("gqa-4", "gta-4", "mla", "gla-2", "mha", "mqa")
CLAIM_VARIANTS = ("gqa-4", "gta-4", "mla", "gla-2")
RUNS_FILE, SUMMARY_FILE, LOG_FILE = "study_runs.jsonl", "study_summary.json", "study_log.txt"
JOURNAL_FILE = "commands.jsonl"  # in --work
# What must be equal for runs to be compared: a study folder refuses runs of another setup.
SETUP_KEYS = ("preset", "steps", "seq_len", "batch_size", "lr", "warmup_steps", "build_key")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/study", help="built dataset (default data/study)")
    p.add_argument("--study", default="runs/quality_study", help="study folder (finished runs)")
    p.add_argument("--work", default="runs/quality_work", help="checkpoints of runs in progress")
    p.add_argument("--export", default=os.environ.get("OUT"),
                   help="copy the study files here at the end (default $OUT when set)")
    p.add_argument("--preset", default="study", help="model shape (default %(default)s)")
    p.add_argument("--variants", default=",".join(ALL_VARIANTS), help="variants of every seed")
    p.add_argument("--seeds", default="0,1", help="seeds of every variant")
    p.add_argument("--extra-seeds", default="2", help="seeds of --extra-variants only")
    p.add_argument("--extra-variants", default=",".join(CLAIM_VARIANTS),
                   help="comma-separated variants also run with --extra-seeds (default "
                        "%(default)s)")
    p.add_argument("--seq-len", type=int, default=1024,
                   help="tokens per training sequence and per evaluation window (default "
                        "%(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="sequences per step")
    p.add_argument("--steps", type=int, default=3000,
                   help="optimizer steps per run (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", type=int, default=150,
                   help="warm-up steps, at most --steps (default %(default)s)")
    p.add_argument("--log-every", type=int, default=25,
                   help="metrics record every N steps (default %(default)s)")
    p.add_argument("--evals-per-run", type=int, default=12, help="validation points on the curve")
    p.add_argument("--eval-tokens", type=int, default=262_144,
                   help="validation tokens per domain at each curve point (the final "
                        "evaluation scores every held-out token up to each domain's last whole "
                        "window)")
    p.add_argument("--ppl-tokens", type=int, default=0,
                   help="held-out tokens per domain in the final evaluation (0: all of them)")
    p.add_argument("--ckpt-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a finished run's folder (checkpoint, metrics) under --work, for "
                        "a later command on the same machine, e.g. "
                        "`study_speculative.py --checkpoint WORK/gqa-4-s4`; by default it is "
                        "deleted once the run's record is written")
    p.add_argument("--n-cloze", type=int, default=400,
                   help="cloze items in the final evaluation, 0 skips the task (default "
                        "%(default)s)")
    p.add_argument("--n-mc", type=int, default=400,
                   help="multiple-choice items in the final evaluation, 0 skips the task "
                        "(default %(default)s)")
    p.add_argument("--eval-batch", type=int, default=32,
                   help="sequences per forward in the final evaluation (default %(default)s)")
    p.add_argument("--deadline-s", type=float, default=520.0,
                   help="stop (checkpointing a run in progress) this many seconds after start")
    p.add_argument("--eval-reserve-s", type=float, default=45.0,
                   help="training stops this long before the deadline, for the evaluation")
    p.add_argument("--min-start-s", type=float, default=60.0,
                   help="start no run with less than this left before the deadline")
    p.add_argument("--resume-min-s", type=float, default=60.0,
                   help="resume a run an earlier command checkpointed whenever this much is "
                        "left (it may need far less than a fresh run; --min-start-s is for "
                        "fresh runs)")
    p.add_argument("--max-runs", type=int, default=0,
                   help="start no run once this many of the plan are finished (0: no limit)")
    p.add_argument("--gpus", type=int, default=0,
                   help="workers, one a GPU (0: every visible GPU; on a CPU: that many CPU "
                        "workers, for testing)")
    p.add_argument("--no-compile", action="store_true", help="eager training steps")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="MFU denominator (H100 / H200 bf16 dense: 989)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, ... (default auto: cuda if present)")
    p.add_argument("--smoke", action="store_true", help="CPU smoke test: tiny preset, a few steps")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--deadline-at", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.preset, args.seq_len, args.batch_size = "tiny", 64, 4
        args.steps = 6 if args.steps == 3000 else args.steps
        args.warmup, args.log_every, args.evals_per_run = 1, 1, 2
        args.eval_tokens, args.n_cloze, args.n_mc, args.eval_batch = 2048, 8, 8, 32
        args.ppl_tokens = args.ppl_tokens or 4096
        args.ckpt_every, args.no_compile = 0, True
    return args


def plan(args) -> list[tuple[str, int]]:
    """(variant, seed) in the order they run: per seed the claim variants first, the other
    variants after every claim run."""
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    variants, extra = split(args.variants), split(args.extra_variants)
    seeds, extra_seeds = [int(s) for s in split(args.seeds)], [int(s) for s in split(args.extra_seeds)]
    first, later = [], []
    for seed in seeds + [s for s in extra_seeds if s not in seeds]:
        chosen = variants if seed in seeds else [v for v in extra if v in variants]
        first += [(v, seed) for v in chosen if v in CLAIM_VARIANTS]
        later += [(v, seed) for v in chosen if v not in CLAIM_VARIANTS]
    return first + later


def run_name(variant: str, seed: int) -> str:
    return f"{variant}-s{seed}"


def setup_of(args, build_key: str) -> dict:
    return {"preset": args.preset, "steps": args.steps, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": args.warmup,
            "build_key": build_key}


class Log:
    """Prints with a time stamp and appends to the study log (several workers may append)."""

    def __init__(self, path: Path, tag: str = ""):
        self.path, self.tag = path, tag

    def __call__(self, *parts):
        line = f"[{time.time() - T_START:6.1f}s]{self.tag} " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def finished_runs(study: Path, work: Path | None = None) -> dict[str, dict]:
    """Finished runs by name: study_runs.jsonl (carried from earlier commands) merged with
    the results/*.json that workers write to the study and work folders (the work folder's
    copy survives a command killed before it merged them, on a machine kept warm)."""
    runs = {}
    if (study / RUNS_FILE).is_file():
        for line in (study / RUNS_FILE).read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                runs[run_name(rec["variant"], rec["seed"])] = rec
    for folder in [study] + ([work] if work is not None else []):
        for f in sorted((folder / "results").glob("*.json")) if (folder / "results").is_dir() else []:
            rec = json.loads(f.read_text())
            runs.setdefault(run_name(rec["variant"], rec["seed"]), rec)
    return runs


def _claim(claims: Path, name: str) -> bool:
    try:
        os.close(os.open(claims / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_config(args, variant: str, seed: int, device: str, on_gpu: bool):
    """The `TrainConfig` of one run of the study (its folder under --work)."""
    from hwattn.train.trainer import TrainConfig

    return TrainConfig(data=args.data, out=str(Path(args.work) / run_name(variant, seed)),
                       preset=args.preset, variant=variant, seq_len=args.seq_len,
                       batch_size=args.batch_size, steps=args.steps, lr=args.lr,
                       warmup_steps=min(args.warmup, args.steps), seed=seed, device=device,
                       compile=not args.no_compile,
                       eval_every=max(1, args.steps // args.evals_per_run),
                       eval_tokens=args.eval_tokens, ckpt_every=args.ckpt_every,
                       log_every=args.log_every, peak_tflops=args.peak_tflops if on_gpu else None,
                       resume=True, save_final=True, plot=False)


def study_device(name: str):
    """The device `--device` names, set up as the study trains on it (TF32 matmuls on CUDA),
    and the GPU's name (None off CUDA)."""
    import torch

    from hwattn.device import resolve_device

    device = resolve_device(name)
    if device.type != "cuda":
        return device, None
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return device, torch.cuda.get_device_name(device)


def work(args, deadline: float, log) -> int:
    """A worker: train and evaluate pending runs, one at a time, until none is left or the
    deadline is near. Returns the number of runs it finished."""
    import torch

    from hwattn.data.loader import TokenDataset
    from hwattn.eval.suite import EvalConfig, build_tasks, evaluate_model
    from hwattn.train.metrics import read_metrics
    from hwattn.train.trainer import train

    device, gpu = study_device(args.device)
    study, work_dir = Path(args.study), Path(args.work)
    data = TokenDataset(args.data)
    setup = setup_of(args, data.manifest["build_key"])
    ecfg = EvalConfig(seq_len=args.seq_len, ppl_tokens=args.ppl_tokens or None, n_cloze=args.n_cloze, n_mc=args.n_mc,
                      recall_pairs=(8, 16) if args.smoke else (16, 64, 128),
                      recall_queries=4 if args.smoke else 32, recall_seqs=4 if args.smoke else 64,
                      batch_size=args.eval_batch, seed=0)
    tasks = build_tasks(data, ecfg)
    done_here = 0
    for variant, seed in plan(args):
        name = run_name(variant, seed)
        if name in finished_runs(study, work_dir):
            continue
        if args.max_runs and len(finished_runs(study, work_dir)) >= args.max_runs:
            break
        started = (work_dir / name / "checkpoint").is_dir()  # an earlier command's, to resume
        if deadline - time.time() < (min(args.resume_min_s, args.min_start_s) if started
                                     else args.min_start_s):
            log(f"{deadline - time.time():.0f} s left: starting no more runs in this command")
            break
        if not _claim(work_dir / "claims", name):
            continue
        cfg = run_config(args, variant, seed, str(device), gpu is not None)
        t0 = time.time()
        res = train(cfg, progress=False, log=log, dataset=data,
                    deadline=deadline - args.eval_reserve_s)
        model = res.pop("model")
        segment = {"steps_done": res["steps_done"], "train_s": time.time() - t0,
                   "steady_tokens_per_s": res.get("steady_tokens_per_s"),
                   "steady_mfu": res.get("steady_mfu"), "gpu": gpu}
        with open(work_dir / name / "segments.jsonl", "a") as f:
            f.write(json.dumps(segment) + "\n")
        if res["steps_done"] < cfg.steps:
            log(f"{name}: stopped at step {res['steps_done']} of {cfg.steps} (deadline); the "
                "next command resumes it from its checkpoint")
            (work_dir / "claims" / name).unlink(missing_ok=True)
            break
        t1 = time.time()
        ev = evaluate_model(model, data, ecfg, tasks)
        segments = [json.loads(x) for x in (work_dir / name / "segments.jsonl").read_text().splitlines()]
        timed = [s for s in segments if s["steady_tokens_per_s"]]
        weights = [s["train_s"] for s in timed]
        tps = sum(s["steady_tokens_per_s"] * w for s, w in zip(timed, weights)) / sum(weights) \
            if timed else None
        n_ne = model.num_params(non_embedding=True)
        rec = {"variant": variant, "seed": seed, **setup, "tokens": res["tokens"],
               "params": model.num_params(), "non_embedding_params": n_ne,
               "tokens_per_non_embedding_param": res["tokens"] / n_ne,
               "hidden_dim": model.config.hidden_dim,
               "kv_bytes_per_token": model.kv_bytes_per_token(1, torch.bfloat16),
               "kv_bytes_per_token_per_layer": model.kv_bytes_per_token(1, torch.bfloat16)
               // model.config.n_layers,
               "compiled": cfg.compile, "segments": segments,
               "train_s": sum(s["train_s"] for s in segments), "eval_s": time.time() - t1,
               "steady_tokens_per_s": tps,
               "steady_mfu": tps * res["flops_per_token"] / (args.peak_tflops * 1e12)
               if tps and gpu else None,
               "peak_tflops": args.peak_tflops if gpu else None, "gpu": gpu,
               "flops_per_token": res["flops_per_token"],
               "curve": read_metrics(Path(cfg.out) / "metrics.jsonl"), "eval": ev}
        for folder in (work_dir, study):
            (folder / "results").mkdir(parents=True, exist_ok=True)
            _write_atomic(folder / "results" / f"{name}.json", json.dumps(rec) + "\n")
        if not args.keep_checkpoints:
            shutil.rmtree(work_dir / name, ignore_errors=True)
        (work_dir / "claims" / name).unlink(missing_ok=True)
        done_here += 1
        ppl = ev["ppl"]
        log(f"{name}: val ppl {ppl['average']['ppl']:.3f} ("
            + ", ".join(f"{d} {r['ppl']:.3f}" for d, r in ppl.items() if d != "average")
            + f"), recall {100 * ev.get('recall', {}).get('mean', 0):.1f}%; "
            f"{rec['train_s']:.0f} s training at {tps or 0:,.0f} tok/s"
            + (f", MFU {100 * rec['steady_mfu']:.1f}%" if rec["steady_mfu"] else ""))
    return done_here


def _environment(argv: list[str]) -> dict:
    import torch

    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                  timeout=5).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": commit(),
            "argv": argv}


def _journal_merge(study: Path, work: Path, commands: list[dict], entry: dict,
                   log_start: int) -> list[dict]:
    """Append this command (`entry`, and the log lines written since byte `log_start`) to the
    work folder's journal; rewrite the study log as it was when the command started plus every
    journaled command missing from it, in date order; return `commands` (the summary's) with
    the journaled ones it lacks, in date order."""
    log_path = study / LOG_FILE
    raw = log_path.read_bytes() if log_path.is_file() else b""
    base, own = raw[:log_start].decode(), raw[log_start:].decode().splitlines()
    with open(work / JOURNAL_FILE, "a") as f:
        f.write(json.dumps({"command": entry, "log": own}) + "\n")
    journal = [json.loads(line) for line in (work / JOURNAL_FILE).read_text().splitlines() if line]

    def key(command):
        return json.dumps(command.get("environment"), sort_keys=True)

    def date(command):
        return (command.get("environment") or {}).get("date") or ""

    known = {key(c) for c in commands}
    merged = commands + [j["command"] for j in journal if key(j["command"]) not in known]
    missing = sorted((j for j in journal if json.dumps(j["command"]["environment"]) not in base),
                     key=lambda j: date(j["command"]))
    _write_atomic(log_path, base + "".join(line + "\n" for j in missing for line in j["log"]))
    return sorted({key(c): c for c in merged}.values(), key=date)


def write_study(args, log, env: dict | None = None, log_start: int | None = None) -> dict:
    """Merge the finished runs into study_runs.jsonl (plan order), write study_summary.json,
    and copy both and the log to --export. With `env` (a command's, which began when the log
    was `log_start` bytes long) the command is journaled and merged (`_journal_merge`)."""
    from hwattn.data.loader import TokenDataset

    study = Path(args.study)
    data = TokenDataset(args.data)
    setup = setup_of(args, data.manifest["build_key"])
    runs = finished_runs(study, Path(args.work))
    order = {run_name(v, s): i for i, (v, s) in enumerate(plan(args))}
    ordered = sorted(runs.values(), key=lambda r: order.get(run_name(r["variant"], r["seed"]), 1e9))
    _write_atomic(study / RUNS_FILE, "".join(json.dumps(r) + "\n" for r in ordered))
    pending = [run_name(v, s) for v, s in plan(args) if run_name(v, s) not in runs]
    beyond = len(ordered) - (len(order) - len(pending))  # finished runs of earlier plans
    log(f"study {study}: {len(order) - len(pending)} of {len(order)} planned runs finished"
        + (f" (and {beyond} more from earlier plans)" if beyond else "")
        + (f"; pending: {', '.join(pending)} (run the same command again)" if pending else "; complete"))
    old = json.loads((study / SUMMARY_FILE).read_text()) if (study / SUMMARY_FILE).is_file() else {}
    commands = old.get("commands", [])
    if env:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        commands = _journal_merge(study, Path(args.work), commands,
                                  {"environment": env, "wall_s": time.time() - T_START},
                                  log_start or 0)
    summary = {
        "setup": setup, "plan": list(order), "finished": [run_name(r["variant"], r["seed"])
                                                          for r in ordered],
        "pending": pending,
        "schedule": {"steps": args.steps, "tokens_per_step": args.batch_size * args.seq_len,
                     "tokens_per_run": args.steps * args.batch_size * args.seq_len,
                     "warmup_steps": args.warmup, "lr": args.lr, "min_lr_ratio": 0.01,
                     "train_tokens_available": len(data.train)},
        "dataset": {"path": args.data, "build_key": data.manifest["build_key"],
                    "tokenizer": data.manifest["tokenizer"], "splits": {
                        "train": data.manifest["splits"]["train"].get("tokens_by_domain"),
                        "val": {d: e["tokens"] for d, e in data.manifest["splits"]["val"].items()}}},
        "commands": commands,
    }
    _write_atomic(study / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    if args.export:
        out = Path(args.export)
        out.mkdir(parents=True, exist_ok=True)
        for name in (RUNS_FILE, SUMMARY_FILE, LOG_FILE):
            if (study / name).is_file() and (study / name).resolve() != (out / name).resolve():
                shutil.copy(study / name, out / name)
    return summary


def check_study(args, log) -> None:
    """Refuse to add runs of another setup to a study folder."""
    from hwattn.data.loader import TokenDataset

    data = TokenDataset(args.data)
    want = setup_of(args, data.manifest["build_key"])
    for name, rec in finished_runs(Path(args.study), Path(args.work)).items():
        got = {k: rec.get(k) for k in SETUP_KEYS}
        if got != want:
            diff = {k: (got[k], want[k]) for k in SETUP_KEYS if got[k] != want[k]}
            raise SystemExit(f"{args.study} (or {args.work}) holds run {name} of another setup "
                             f"{diff}; use new --study and --work folders")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0



def main(argv=None) -> int:
    args = parse_args(argv)
    study, work_dir = Path(args.study), Path(args.work)
    study.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:  # a worker process started by the command below
        return 0 if work(args, args.deadline_at, Log(study / LOG_FILE, f" [gpu {args.worker}]")) \
            >= 0 else 1
    log = Log(study / LOG_FILE)
    log_start = (study / LOG_FILE).stat().st_size if (study / LOG_FILE).is_file() else 0
    deadline = T_START + args.deadline_s
    argv = sys.argv[1:] if argv is None else list(argv)
    env = _environment(argv)
    log("command", json.dumps(env))
    check_study(args, log)
    shutil.rmtree(work_dir / "claims", ignore_errors=True)  # claims of earlier commands
    (work_dir / "claims").mkdir(parents=True, exist_ok=True)
    n_gpu = visible_gpus() if args.device in ("auto", "cuda") else 0
    # On GPUs one worker per device; --gpus N on a CPU starts N CPU workers (to test).
    workers = min(args.gpus or n_gpu, n_gpu) if n_gpu else args.gpus
    if workers <= 1:
        work(args, deadline, log)
    else:
        log(f"{workers} workers" + (" (one a GPU)" if n_gpu else " on the CPU"))
        procs = []
        for i in range(workers):
            env_i = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(i)} if n_gpu else {})}
            procs.append(subprocess.Popen([sys.executable, __file__, *argv, "--worker", str(i),
                                           "--deadline-at", str(deadline)], env=env_i))
        codes = [p.wait() for p in procs]
        if any(codes):
            log(f"worker exit codes {codes}")
    write_study(args, log, env, log_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
