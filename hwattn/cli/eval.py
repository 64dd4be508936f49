"""`hwattn eval`: evaluate a checkpoint on a built dataset's held-out split."""

from __future__ import annotations

import json

from hwattn.cli.analyze import int_list


def register(sub) -> None:
    from hwattn.cli import add_cpu_threads

    p = sub.add_parser("eval", help="perplexity / bits per byte per domain, cloze, multiple "
                                    "choice, recall probe, lm-eval tasks",
                       description="Evaluates a checkpoint folder (from `hwattn train`) on the "
                                   "held-out split of a dataset built by `hwattn data build`. "
                                   "With --write-tasks DIR and no checkpoint, only writes the "
                                   "cloze and multiple-choice items with their lm-eval task "
                                   "YAML (tasks hwattn_cloze, hwattn_mc).")
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="checkpoint folder (config.json + model.safetensors); may be left out "
                        "with --write-tasks")
    p.add_argument("--data", required=True, help="dataset folder")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default: the run's)")
    p.add_argument("--ppl-tokens", type=int,
                   help="held-out tokens scored per domain, a multiple of --seq-len (whole "
                        "windows; default: every whole window); a domain with fewer scores "
                        "all its whole windows, and the table's tokens column shows the count "
                        "scored")
    p.add_argument("--cloze", type=int, default=200, help="cloze items, 0 skips (default 200)")
    p.add_argument("--mc", type=int, default=200, help="multiple-choice items, 0 skips (default 200)")
    p.add_argument("--recall-pairs", type=lambda text: tuple(int_list(text)), default=None,
                   help="key-value pair counts of the recall probe (default 8,32,64, of "
                        "which those that fit --seq-len run; a count given here that does not "
                        "fit, or needs more word tokens than the tokenizer has, is refused)")
    p.add_argument("--write-tasks", metavar="DIR",
                   help="write the cloze / MC items as JSONL with lm-eval task YAML (tasks "
                        "hwattn_cloze, hwattn_mc: `lm_eval --model hwattn --tasks hwattn_cloze,"
                        "hwattn_mc --include_path DIR`)")
    p.add_argument("--lm-eval", action="append", default=[], metavar="NAME=FILE.jsonl",
                   help="run lm-evaluation-harness on a local JSONL task (repeatable)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per forward (default 16)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task sampling (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    add_cpu_threads(p)
    p.set_defaults(func=run)


def check_tokenizer(ckpt, data, data_flag: str) -> None:
    """ValueError when the checkpoint folder holds a tokenizer (`hwattn train` saves the
    dataset's there) other than the dataset's: its ids would mean other strings to the model,
    and the perplexity would be a number about nothing. A checkpoint without one is not
    checked."""
    from hwattn.data.tokenizer import TOKENIZER_FILE, Tokenizer

    if not (ckpt / TOKENIZER_FILE).is_file():
        return
    theirs = Tokenizer.load(ckpt)
    if theirs.sha256() != data.tokenizer.sha256():
        raise ValueError(f"--data {data_flag} was tokenized with {data.tokenizer.name!r} "
                         f"({data.tokenizer.vocab_size} ids), not with the tokenizer the "
                         f"checkpoint {ckpt} was trained with ({theirs.name!r}, "
                         f"{theirs.vocab_size} ids): evaluate on a dataset built with the "
                         f"checkpoint's tokenizer (`hwattn data build --tokenizer "
                         f"{ckpt / TOKENIZER_FILE}`)")


def check_recall_pairs(cfg, tokenizer) -> None:
    """ValueError naming --recall-pairs for a pair count given on the command line that the
    probe would leave out (`recall_accuracy` keeps only the counts that fit): its sequence is
    longer than --seq-len, or the tokenizer has too few word tokens for its keys and values."""
    from hwattn.eval.recall import word_tokens

    long = [n for n in cfg.recall_pairs if 2 * (n + cfg.recall_queries) > cfg.seq_len]
    if long:
        n, most = max(long), cfg.seq_len // 2 - cfg.recall_queries
        raise ValueError(f"--recall-pairs {n}: a probe sequence of {n} pairs and "
                         f"{cfg.recall_queries} queries is {2 * (n + cfg.recall_queries)} tokens, "
                         f"longer than --seq-len {cfg.seq_len}; "
                         + (f"give at most {most} pairs" if most >= 1 else
                            f"no pair count fits a --seq-len under {2 * (1 + cfg.recall_queries)}"))
    words = len(word_tokens(tokenizer))
    many = [n for n in cfg.recall_pairs if 4 * n > words]
    if many:
        raise ValueError(f"--recall-pairs {max(many)}: the tokenizer has {words} word tokens, "
                         f"enough for at most {words // 4} pairs")


def run(args) -> int:
    import importlib.util
    from pathlib import Path

    from hwattn.data.loader import TokenDataset
    from hwattn.eval.suite import EvalConfig, build_tasks, evaluate_model
    from hwattn.device import resolve_device
    from hwattn.models.checkpoint import load_model

    from hwattn.cpu_threads import use_default_cpu_threads
    from hwattn.eval.lm_eval_tasks import task_yaml, write_tasks
    from hwattn.cli import at_least, check_dataset, check_device, check_output_dir

    check_dataset(args.data)
    at_least(args, 0, "cloze", "mc", "seed")  # a negative seed failed after the perplexity
    at_least(args, 1, "seq_len", "ppl_tokens", "batch_size")
    check_output_dir(args.write_tasks, "--write-tasks")
    if args.write_tasks and not (args.cloze or args.mc):  # it would write no task at all
        raise ValueError(f"--write-tasks {args.write_tasks} writes the cloze and "
                         f"multiple-choice items, but --cloze 0 and --mc 0 ask for none")
    if args.checkpoint is None:
        if not args.write_tasks:
            raise ValueError("eval needs a checkpoint folder (or --write-tasks DIR alone to "
                             "write lm-eval tasks)")
        # Writing tasks reads only --data, --cloze, --mc and --seed: refuse the rest.
        given = [flag for flag, value in (("--seq-len", args.seq_len),
                                          ("--ppl-tokens", args.ppl_tokens),
                                          ("--recall-pairs", args.recall_pairs),
                                          ("--lm-eval", args.lm_eval or None),
                                          ("--batch-size", args.batch_size),
                                          ("--device", args.device)) if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} need a checkpoint to evaluate; without one, "
                             f"eval only writes the --write-tasks files")
        tasks = build_tasks(TokenDataset(args.data),
                            EvalConfig(n_cloze=args.cloze, n_mc=args.mc, seed=args.seed))
        written = write_tasks(tasks, args.write_tasks)
        for name, path in written.items():
            print(f"{name}: {len(tasks[path.stem])} items in {path}, task in "
                  f"{path.parent / (name + '.yaml')}")
        print(f"run: lm_eval --model hwattn --model_args pretrained=CHECKPOINT --tasks "
              f"{','.join(written)} --include_path {args.write_tasks}")
        return 0
    specs = {}
    # Task files this command writes (--write-tasks) before lm-eval reads them.
    ours = {(Path(args.write_tasks) / f"{kind}.jsonl").resolve()
            for kind, n in (("cloze", args.cloze), ("mc", args.mc)) if n and args.write_tasks}
    for spec in args.lm_eval:  # checked before the evaluation, not after it
        name, sep, file = spec.partition("=")
        if not sep or not name or not file:
            raise ValueError(f"--lm-eval expects NAME=FILE.jsonl, got {spec!r}")
        if name in specs:  # one would replace the other
            raise ValueError(f"--lm-eval names task {name!r} twice ({specs[name]} and {file}); "
                             f"give each task a name of its own")
        if Path(file).resolve() in ours:
            specs[name] = file
            continue
        if not Path(file).is_file():
            raise ValueError(f"--lm-eval {spec}: no such file {file}")
        try:
            task_yaml(name, Path(file))  # what `run_lm_eval` writes: a row it cannot use
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"--lm-eval {spec}: {err}") from None
        specs[name] = file
    if specs and importlib.util.find_spec("lm_eval") is None:
        raise ValueError("--lm-eval needs lm-evaluation-harness: pip install 'hwattn[eval]'")
    args.batch_size = args.batch_size or 16
    given_pairs = args.recall_pairs is not None  # the default's counts may not all fit
    args.recall_pairs = args.recall_pairs or (8, 32, 64)
    check_device(args.device)
    ckpt = Path(args.checkpoint)
    data = TokenDataset(args.data)
    check_tokenizer(ckpt, data, args.data)
    device = resolve_device(args.device)
    model = load_model(ckpt, device=device)
    use_default_cpu_threads(model.num_params(), device)
    if data.vocab_size > model.config.vocab_size:
        raise ValueError(f"the dataset's tokenizer has {data.vocab_size} ids but the model only "
                         f"{model.config.vocab_size}: --data does not match the checkpoint")
    seq_len = args.seq_len
    if seq_len is None:
        run_cfg = ckpt.parent / "train_config.json"
        seq_len = json.loads(run_cfg.read_text())["seq_len"] if run_cfg.is_file() else 256
        seq_len = min(seq_len, model.config.max_seq_len)
    elif seq_len > model.config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} exceeds the checkpoint's context of "
                         f"{model.config.max_seq_len} tokens (max_seq_len)")
    if args.ppl_tokens is not None and args.ppl_tokens < seq_len:
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} is less than one evaluation window "
                         f"of {seq_len} tokens (--seq-len)")
    if args.ppl_tokens is not None and args.ppl_tokens % seq_len:
        # Scored in whole windows: the rest would be dropped without a word.
        lower = args.ppl_tokens // seq_len * seq_len
        flag = "--seq-len" if args.seq_len is not None else "the default --seq-len"
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} is not a multiple of the "
                         f"{seq_len}-token evaluation window ({flag}): perplexity is scored "
                         f"in whole windows; give {lower} or {lower + seq_len}")
    cfg = EvalConfig(seq_len=seq_len, ppl_tokens=args.ppl_tokens, n_cloze=args.cloze, n_mc=args.mc,
                     recall_pairs=args.recall_pairs, batch_size=args.batch_size, seed=args.seed)
    if given_pairs:
        check_recall_pairs(cfg, data.tokenizer)
    tasks = build_tasks(data, cfg)
    if args.write_tasks:
        write_tasks(tasks, args.write_tasks)
    res = evaluate_model(model, data, cfg, tasks, progress=not args.json)
    if args.lm_eval:
        from hwattn.eval.lm_eval_adapter import HwattnLM, run_lm_eval

        lm = HwattnLM(model=model, tokenizer=data.tokenizer, batch_size=args.batch_size,
                      max_length=seq_len)
        res["lm_eval"] = run_lm_eval(lm, specs)
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"{'domain':<14} {'tokens':>9} {'loss':>7} {'ppl':>9} {'bits/byte':>9}")
    for dom, r in res["ppl"].items():
        if dom != "average":
            print(f"{dom:<14} {r['tokens']:>9,} {r['loss']:>7.4f} {r['ppl']:>9.2f} {r['bpb']:>9.4f}")
    a = res["ppl"]["average"]
    print(f"{'average':<14} {'':>9} {a['loss']:>7.4f} {a['ppl']:>9.2f} {a['bpb']:>9.4f}")
    if "cloze" in res:
        print(f"cloze (last word, greedy): {100 * res['cloze']['acc']:.1f}% of {res['cloze']['n']}")
    if "mc" in res:
        print(f"multiple choice (4-way): acc {100 * res['mc']['acc']:.1f}%, per-char norm "
              f"{100 * res['mc']['acc_norm']:.1f}% of {res['mc']['n']}")
    if "recall" in res:
        r = res["recall"]
        print("recall probe: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r.items()))
    for name, vals in res.get("lm_eval", {}).items():
        print(f"lm-eval {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in vals.items()))
    return 0
